"""prepare()'s allocator setting: every branch, with CUDA's answers stubbed on the CPU."""

from __future__ import annotations

import pytest
import torch

from memtrain.train import allocator


@pytest.fixture
def clean_env(monkeypatch):
    for name in allocator.VARIABLES:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_no_cuda_no_change(clean_env):
    clean_env.setattr(torch.cuda, "is_available", lambda: False)
    assert allocator.use_expandable_segments() is None


def test_before_cuda_starts_sets_the_variable(clean_env):
    import os

    clean_env.setattr(torch.cuda, "is_available", lambda: True)
    clean_env.setattr(torch.cuda, "is_initialized", lambda: False)
    note = allocator.use_expandable_segments()
    assert os.environ["PYTORCH_CUDA_ALLOC_CONF"] == allocator.SETTING
    assert "before CUDA started" in note


def test_after_cuda_starts_changes_the_running_allocator(clean_env):
    calls = []
    clean_env.setattr(torch.cuda, "is_available", lambda: True)
    clean_env.setattr(torch.cuda, "is_initialized", lambda: True)
    clean_env.setattr(torch.cuda.memory, "_set_allocator_settings", calls.append, raising=False)
    assert "set by prepare" in allocator.use_expandable_segments()
    assert calls == [allocator.SETTING]


def test_a_refusal_is_reported_not_raised(clean_env):
    def refuse(_):
        raise RuntimeError("not supported")

    clean_env.setattr(torch.cuda, "is_available", lambda: True)
    clean_env.setattr(torch.cuda, "is_initialized", lambda: True)
    clean_env.setattr(torch.cuda.memory, "_set_allocator_settings", refuse, raising=False)
    note = allocator.use_expandable_segments()
    assert "could not be turned on" in note and "allocator margin" in note


def test_the_users_choice_stands(clean_env):
    clean_env.setenv("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:False")
    clean_env.setattr(torch.cuda, "is_available", lambda: True)
    assert "keeps expandable segments off" in allocator.use_expandable_segments()
    clean_env.setenv("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    assert "on (PYTORCH_CUDA_ALLOC_CONF" in allocator.use_expandable_segments()
