"""Tiny random-weight models and a training loop whose losses and gradients tests compare."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from memtrain.models import build_causal_lm
from tests.tiny_models import TINY, tiny_config

SEQ = 24  # differs from every other dimension of the tiny models
STEPS = 3


def make_config(family: str, **overrides):
    from transformers import AutoConfig

    values = tiny_config(family, **overrides)
    kind = values.pop("model_type")
    return AutoConfig.for_model(kind, **values)


def make_model(family: str = "llama", dtype: str = "fp32", **overrides) -> torch.nn.Module:
    return build_causal_lm(make_config(family, **overrides), dtype, "cpu", seed=0)


def batch(family: str = "llama", seq: int = SEQ, size: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    vocab = TINY[family].get("vocab_size")
    return torch.randint(2, vocab, (size, seq), generator=generator)


@dataclass
class Trace:
    losses: list[torch.Tensor]
    grads: list[dict[str, torch.Tensor]]


def train(model: torch.nn.Module, ids: torch.Tensor, steps: int = STEPS, after_step=None) -> Trace:
    """SGD steps; returns every loss and every parameter gradient."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    trace = Trace([], [])
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        trace.losses.append(loss.detach().clone())
        trace.grads.append(
            {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
        )
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if after_step is not None:
            after_step()
    return trace


def dry_profile(values: dict, seq: int, optimizer: str):
    """The config of ``values`` (a tiny_config dict) and its dry-run profile for the CPU, bf16,
    profiled from a config.json as the command line does."""
    import tempfile
    from pathlib import Path

    from transformers import AutoConfig

    from memtrain.profile import profile_causal_lm

    with tempfile.TemporaryDirectory() as folder:
        values = dict(values)
        config = AutoConfig.for_model(values.pop("model_type"), **values)
        config.save_pretrained(folder)
        profile = profile_causal_lm(
            str(Path(folder, "config.json")), seq=seq, dtype="bf16", device="meta",
            target="cpu", optimizer=optimizer,
        )  # fmt: skip
    return config, profile


def padded_step(model: torch.nn.Module, ids, mask, labels):
    """One backward on a padded batch: the loss and every parameter's gradient."""
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    loss.backward()
    return loss.detach(), [p.grad.detach().clone() for p in model.parameters()]


def assert_identical(a: Trace, b: Trace) -> None:
    """Bit-for-bit equality (pure moves of bytes)."""
    for la, lb in zip(a.losses, b.losses, strict=True):
        assert torch.equal(la, lb)
    for ga, gb in zip(a.grads, b.grads, strict=True):
        assert ga.keys() == gb.keys()
        for name in ga:
            assert torch.equal(ga[name], gb[name]), name


def assert_close(a: Trace, b: Trace, rel: float) -> None:
    """Every loss and gradient within ``rel`` of the largest magnitude of the reference."""
    for la, lb in zip(a.losses, b.losses, strict=True):
        assert abs(la.item() - lb.item()) <= rel * abs(la.item())
    for ga, gb in zip(a.grads, b.grads, strict=True):
        assert ga.keys() == gb.keys()
        for name in ga:
            scale = ga[name].abs().max().item() + 1e-12
            err = (ga[name] - gb[name]).abs().max().item()
            assert err <= rel * scale, f"{name}: {err:.3g} > {rel} * {scale:.3g}"


@pytest.fixture(scope="module")
def llama_reference() -> Trace:
    return train(make_model("llama"), batch("llama"))
