"""Checkpoints you can trust: hashed, the last few kept, damage detected and skipped, and the
stored recipe and plan compared on resume; resumed runs stay bit-identical."""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import pytest
import torch
import yaml
from rich.console import Console

from memtrain.errors import MemtrainError
from memtrain.train import load_recipe, run_recipe
from memtrain.train.checkpoint import KEEP

from .test_run_and_resume import _write

SHORT = ["schedule.steps=6", "train.checkpoint_every=2"]
HOST = ["plan.gpu_budget_fraction=1.0"]  # AdamW's states go to the host
ROOMY = ["plan.gpu_budget_fraction=null", "plan.gpu_budget=1GiB"]  # they stay on the GPU
ADAMW = ["optimizer.name=adamw", "optimizer.options={}"]


def _run(path: Path, *overrides: str) -> tuple[dict, str]:
    text = io.StringIO()
    console = Console(file=text, width=300)
    summary = run_recipe(load_recipe(path, list(overrides)), console=console, progress=False)
    return summary, text.getvalue()


def _model(out_dir: Path) -> dict:
    return torch.load(out_dir / "checkpoint.pt", weights_only=False)["model"]


def _assert_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def _drop(out_dir: Path, *names: str) -> None:
    for name in names:
        (out_dir / name).unlink()
        (out_dir / f"{name}.sha256").unlink()


def test_keeps_the_last_k_hashed_and_the_newest_under_the_old_name(tmp_path):
    _run(_write(tmp_path, "k"), *SHORT)
    out = tmp_path / "k"
    kept = sorted(p.name for p in out.glob("checkpoint*.pt"))
    assert KEEP == 2
    assert kept == ["checkpoint-4.pt", "checkpoint-6.pt", "checkpoint.pt"]
    assert not list(out.glob("*.tmp"))
    for name in kept:
        digest = hashlib.sha256((out / name).read_bytes()).hexdigest()
        assert (out / f"{name}.sha256").read_text().split()[0] == digest
    assert torch.load(out / "checkpoint.pt", weights_only=False)["step"] == 6
    assert torch.load(out / "checkpoint-4.pt", weights_only=False)["step"] == 4


def test_a_flipped_byte_falls_back_to_the_previous_checkpoint_and_resumes_exactly(tmp_path):
    _run(_write(tmp_path, "whole"), *SHORT)
    path = _write(tmp_path, "hurt")
    _run(path, *SHORT)
    newest = tmp_path / "hurt" / "checkpoint-6.pt"
    data = bytearray(newest.read_bytes())
    data[len(data) // 2] ^= 0x01
    with open(newest, "r+b") as file:  # in place: checkpoint.pt is the same file
        file.write(data)
    summary, out = _run(path, *SHORT)
    assert "checkpoint-6.pt is damaged" in out and "checkpoint-4.pt" in out
    assert summary["train"]["steps_run"] == 2
    _assert_equal(_model(tmp_path / "whole"), _model(tmp_path / "hurt"))


def _truncate(path: Path) -> None:
    with open(path, "r+b") as file:
        file.truncate(path.stat().st_size // 2)


def _empty(path: Path) -> None:
    open(path, "r+b").close()
    with open(path, "r+b") as file:
        file.truncate(0)


def _garbage(path: Path) -> None:
    with open(path, "r+b") as file:
        file.truncate(0)
        file.write(b"not a checkpoint at all\n" * 10)


@pytest.mark.parametrize("damage", [_truncate, _empty, _garbage])
@pytest.mark.parametrize("hashed", [True, False])
def test_damage_with_no_good_checkpoint_is_one_line_naming_the_file(tmp_path, damage, hashed):
    path = _write(tmp_path, "bad")
    _run(path, "schedule.steps=2", "train.checkpoint_every=2")
    out = tmp_path / "bad"
    if hashed:
        damage(out / "checkpoint-2.pt")  # and checkpoint.pt, the same file
        name = "checkpoint-2.pt"
    else:  # a checkpoint from before numbering and hashes
        (out / "checkpoint.pt").unlink()
        (out / "checkpoint-2.pt").rename(out / "checkpoint.pt")
        (out / "checkpoint-2.pt.sha256").unlink()
        (out / "checkpoint.pt.sha256").unlink()
        damage(out / "checkpoint.pt")
        name = "checkpoint.pt"
    with pytest.raises(MemtrainError) as info:
        _run(path, "schedule.steps=4")
    message = str(info.value)
    assert name in message and "\n" not in message and "train.resume=false" in message


def test_a_changed_data_seq_is_refused_naming_the_key(tmp_path):
    path = _write(tmp_path, "seq")
    _run(path, *ROOMY, "schedule.steps=2", "train.checkpoint_every=2")
    with pytest.raises(MemtrainError, match=r"data\.seq was 32, now 16") as info:
        _run(path, *ROOMY, "schedule.steps=4", "data.seq=16")
    assert "\n" not in str(info.value) and "checkpoint-2.pt" in str(info.value)


def test_a_changed_optimizer_option_is_refused_naming_the_option(tmp_path):
    path = _write(tmp_path, "opt")
    _run(path, "schedule.steps=2", "train.checkpoint_every=2")
    with pytest.raises(MemtrainError, match=r"optimizer\.options\.rank was 8, now 4"):
        _run(path, "schedule.steps=4", "optimizer.options={rank: 4, update_proj_gap: 5}")


def test_a_changed_step_count_resumes_with_a_note(tmp_path):
    # Three steps are all warm-up (TINY warms up over 3), so 3 + 3 equals 6 at once.
    _run(_write(tmp_path, "whole"), "schedule.steps=6", "train.checkpoint_every=3")
    path = _write(tmp_path, "more")
    _run(path, "schedule.steps=3", "train.checkpoint_every=3")
    summary, out = _run(path, "schedule.steps=6", "train.checkpoint_every=3")
    assert "schedule.steps changed since the checkpoint: 3 -> 6" in out
    assert summary["train"]["steps_run"] == 3
    _assert_equal(_model(tmp_path / "whole"), _model(tmp_path / "more"))


def test_a_checkpoint_without_recipe_or_hash_still_resumes(tmp_path):
    path = _write(tmp_path, "old")
    _run(path, "schedule.steps=2", "train.checkpoint_every=2")
    out = tmp_path / "old"
    state = torch.load(out / "checkpoint.pt", weights_only=False)
    del state["recipe"], state["plan"]
    _drop(out, "checkpoint.pt", "checkpoint-2.pt")
    torch.save(state, out / "checkpoint.pt")
    summary, text = _run(path, "schedule.steps=4")
    assert summary["train"]["steps_run"] == 2
    assert "stores no recipe" in text and "loaded unverified" in text


def test_moving_optimizer_states_is_refused(tmp_path):
    path = _write(tmp_path, "moved")
    _run(path, *ADAMW, *HOST, "schedule.steps=2", "train.checkpoint_every=2")
    with pytest.raises(MemtrainError, match="optimizer states on gpu, not") as info:
        _run(path, *ADAMW, *ROOMY, "schedule.steps=4")
    assert "\n" not in str(info.value)


CASES = {
    "adamw-gpu": [*ADAMW, *ROOMY],
    "adamw-host": [*ADAMW, *HOST],
    "galore": [],
    "frugal": ["optimizer.name=frugal", "optimizer.options={density: 0.5}", *ROOMY],
    "step-in-backward": ["schedule.grad_clip=0", "train.step_in_backward=true", *ROOMY],
}


@pytest.mark.parametrize("case", list(CASES))
def test_resume_equals_uninterrupted(tmp_path, case):
    """Six steps at once against three, a lost checkpoint (killed before it), three more."""
    common = [*CASES[case], "schedule.steps=6", "train.checkpoint_every=3"]
    _run(_write(tmp_path, "whole"), *common)
    states = [layer["optimizer"] for layer in _plan(tmp_path / "whole")]
    if case == "adamw-gpu":
        assert set(states) == {"gpu"}
    if case == "adamw-host":
        assert set(states) != {"gpu"}
    path = _write(tmp_path, "part")
    _run(path, *common)
    _drop(tmp_path / "part", "checkpoint.pt", "checkpoint-6.pt")
    summary, out = _run(path, *common)
    assert "resumed from" in out and "checkpoint-3.pt" in out
    assert summary["train"]["steps_run"] == 3
    _assert_equal(_model(tmp_path / "whole"), _model(tmp_path / "part"))


def _plan(out_dir: Path) -> list[dict]:
    return yaml.safe_load((out_dir / "plan.yaml").read_text())["layers"]


class _Engine:
    """Stands for a DeepSpeed engine: records loads, or fails like a damaged shard."""

    def __init__(self, fail: bool = False) -> None:
        self.fail, self.loads = fail, []

    def load_checkpoint(self, folder: str, tag: str):
        self.loads.append(tag)
        if self.fail:
            raise RuntimeError("PytorchStreamReader failed reading zip archive\nmore text")
        return folder, {"step": 2}


def _deepspeed(tmp_path: Path, engine: _Engine, recipe: dict | None, tag: str = "step2"):
    from memtrain.train.launch import World
    from memtrain.train.strategy import DeepSpeedStrategy

    strategy = DeepSpeedStrategy(World(kind="deepspeed"), torch.device("cpu"))
    strategy.path, strategy.engine = tmp_path / "deepspeed", engine
    (strategy.path / "step2").mkdir(parents=True)
    (strategy.path / "latest").write_text(tag)
    if recipe is not None:
        stored = {"step": 2, "world_size": 1, "recipe": recipe, "plan": None}
        (strategy.path / "step2" / "memtrain.json").write_text(json.dumps(stored))
    return strategy


def _check(recipe: dict):
    from memtrain.train.checkpoint import compare_resume

    def check(stored: dict, path: Path) -> None:
        problem, _ = compare_resume(stored, recipe, None, 1)
        if problem:
            raise MemtrainError(f"cannot resume from {path}: {problem}")

    return check


def test_deepspeed_recipe_is_compared_before_the_engine_loads(tmp_path):
    old = {"data": {"seq": 32, "batch": 2}, "schedule": {"steps": 2}}
    new = {"data": {"seq": 64, "batch": 2}, "schedule": {"steps": 4}}
    engine = _Engine()
    strategy = _deepspeed(tmp_path, engine, old)
    with pytest.raises(MemtrainError, match=r"data\.seq was 32, now 64"):
        strategy.load(_check(new), print)
    assert engine.loads == []
    more = {"data": {"seq": 32, "batch": 2}, "schedule": {"steps": 4}}
    assert strategy.load(_check(more), print) == {"step": 2}
    assert engine.loads == ["step2"]


def test_deepspeed_load_failures_are_one_line(tmp_path):
    strategy = _deepspeed(tmp_path / "a", _Engine(fail=True), None)
    with pytest.raises(MemtrainError) as info:
        strategy.load(_check({}), print)
    assert "step2" in str(info.value) and "\n" not in str(info.value)
    # ``latest`` naming a tag that is gone: the newest older kept one, with a note naming it
    notes = []
    strategy = _deepspeed(tmp_path / "b", _Engine(), None, tag="step9")
    assert strategy.load(_check({}), notes.append) == {"step": 2}
    assert len(notes) == 1 and "step9" in notes[0]
