"""Background checkpoint writes: a snapshot later steps cannot change, one write in flight,
failures as one line with the previous checkpoints kept, keep-K, Ctrl-C waits for the write."""

from __future__ import annotations

import errno
import io
import threading

import pytest
import torch
from rich.console import Console

from memtrain.errors import ConfigError, MemtrainError
from memtrain.train import load_recipe, run_recipe
from memtrain.train.async_checkpoint import CheckpointWriter, HostSnapshot, tensor_bytes
from memtrain.train.checkpoint import PAUSE_ENV, numbered
from memtrain.train.strategy import stale_tags

from .test_run_and_resume import _write


def _state(step: int, weight: torch.Tensor) -> dict:
    return {"step": step, "model": {"w": weight, "tied": weight}, "optimizer": {"state": {}}}


def test_snapshot_is_a_copy_that_keeps_ties_and_reuses_its_buffers():
    weight = torch.arange(6.0)
    opt = {"state": {0: {"step": torch.tensor(1.0), "exp_avg": torch.ones(6)}}, "groups": [{}]}
    tree = {"model": {"a": weight, "b": weight.detach()}, "optimizer": opt, "rng": (1, 2)}
    snap = HostSnapshot(pin=False)
    copied = snap.take(tree)
    weight.add_(1)
    opt["state"][0]["step"] += 1
    opt["state"][0]["lr"] = 3  # a later step adding state
    assert copied["model"]["a"].tolist() == [0.0, 1, 2, 3, 4, 5]
    assert copied["model"]["a"] is copied["model"]["b"]  # tied weights stay one tensor
    assert (
        float(copied["optimizer"]["state"][0]["step"]) == 1
        and "lr" not in copied["optimizer"]["state"][0]
    )
    assert tensor_bytes(tree) == 6 * 4 + 4 + 6 * 4
    buffers = list(snap.buffers)
    snap.take(tree)
    assert all(a is b for a, b in zip(buffers, snap.buffers, strict=True))


def test_one_write_in_flight_and_training_goes_on(tmp_path, monkeypatch):
    import memtrain.train.async_checkpoint as module

    gate, started = threading.Event(), threading.Event()
    real = module.save_checkpoint

    def slow(path, state, keep):
        started.set()
        gate.wait(10)
        return real(path, state, keep=keep)

    monkeypatch.setattr(module, "save_checkpoint", slow)
    writer = CheckpointWriter(keep=2, background=True, note=print)
    weight = torch.zeros(4)
    writer.write(tmp_path / "checkpoint.pt", _state(1, weight))
    assert started.wait(10) and writer.pending[0] == 1  # write() returned: training continues
    weight.add_(7)  # the next step changes the weights in place
    second = threading.Thread(
        target=writer.write, args=(tmp_path / "checkpoint.pt", _state(2, weight))
    )
    second.start()
    second.join(0.2)
    assert second.is_alive()  # the next checkpoint waits for the write in flight
    gate.set()
    second.join(10)
    writer.wait()
    first = torch.load(tmp_path / "checkpoint-1.pt", weights_only=False)
    assert first["model"]["w"].tolist() == [0.0] * 4
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=False)["step"] == 2


def test_a_failed_background_write_is_one_line_and_keeps_the_previous(tmp_path, monkeypatch):
    writer = CheckpointWriter(keep=2, background=True, note=print)
    writer.write(tmp_path / "checkpoint.pt", _state(1, torch.ones(3)))
    writer.wait()
    real = torch.save

    def full(obj, file, *args, **kwargs):
        file.write(b"partial bytes")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full)
    writer.write(tmp_path / "checkpoint.pt", _state(2, torch.ones(3)))
    with pytest.raises(MemtrainError) as info:
        writer.wait()
    message = str(info.value)
    assert "\n" not in message and "checkpoint 2" in message and "No space left" in message
    assert "previous checkpoints are kept" in message
    monkeypatch.setattr(torch, "save", real)
    assert [s for s, _ in numbered(tmp_path)] == [1]
    assert not list(tmp_path.glob("*.tmp"))
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=False)["step"] == 1


def test_too_little_host_memory_writes_synchronously_with_a_note(tmp_path, monkeypatch):
    import memtrain.train.async_checkpoint as module

    notes: list[str] = []
    monkeypatch.setattr(module, "host_available_bytes", lambda: 10)
    writer = CheckpointWriter(keep=2, background=True, note=notes.append)
    writer.write(tmp_path / "checkpoint.pt", _state(1, torch.ones(64)))
    assert writer.thread is None and (tmp_path / "checkpoint-1.pt").exists()
    assert "written synchronously" in notes[0] and "256 B" in notes[0]


def test_keep_checkpoints_keeps_k_and_is_validated(tmp_path):
    path = _write(tmp_path, "k3")
    run_recipe(
        load_recipe(
            path, ["schedule.steps=8", "train.checkpoint_every=2", "train.keep_checkpoints=3"]
        ),
        progress=False,
    )
    assert [s for s, _ in numbered(tmp_path / "k3")] == [8, 6, 4]
    for bad, match in [
        ("train.keep_checkpoints=0", "train.keep_checkpoints must be positive, got 0"),
        ("train.keep_checkpoints=1.5", "train.keep_checkpoints must be int, got 1.5"),
        ("train.keep_checkpoint=3", "did you mean 'keep_checkpoints'"),
        ("train.async_checkpoints=maybe", "train.async_checkpoints must be bool"),
    ]:
        with pytest.raises(ConfigError, match=match) as info:
            load_recipe(path, [bad])
        assert "\n" not in str(info.value)


def test_deepspeed_keeps_k_tags(tmp_path):
    for name in ["step2", "step4", "step6", "step8"]:
        (tmp_path / name).mkdir()
    (tmp_path / "latest").write_text("step6")
    stale = sorted(p.name for p in stale_tags(tmp_path, 6, 2))
    assert stale == ["step2", "step8"]  # older than the two newest, and past this step
    assert [p.name for p in stale_tags(tmp_path, 8, 3)] == ["step2"]


def test_ctrl_c_waits_for_the_checkpoint_in_flight(tmp_path, monkeypatch):
    from memtrain.train.strategy import SingleProcess

    monkeypatch.setenv(PAUSE_ENV, "0.1")
    real = SingleProcess.step

    def step(self, ids):
        if self.writer is not None and self.writer.pending is not None:
            raise KeyboardInterrupt  # Ctrl-C while checkpoint 2 is being written
        return real(self, ids)

    monkeypatch.setattr(SingleProcess, "step", step)
    text = io.StringIO()
    recipe = load_recipe(_write(tmp_path, "c"), ["schedule.steps=6", "train.checkpoint_every=2"])
    with pytest.raises(KeyboardInterrupt):
        run_recipe(recipe, console=Console(file=text, width=300), progress=False)
    out = tmp_path / "c"
    assert "waiting for checkpoint 2" in text.getvalue()
    assert [s for s, _ in numbered(out)] == [2] and not list(out.glob("*.tmp"))
    assert torch.load(out / "checkpoint.pt", weights_only=False)["step"] == 2
