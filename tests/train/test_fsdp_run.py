"""`memtrain run` with launcher.kind=fsdp (FSDP2, 2 gloo ranks on the CPU).

Sharding the tiny Llama's weights along dim 0 changes nothing a step computes, whatever the
optimizer (AdamW and GaLore on the row shards, FRUGAL on gathered whole matrices; every other
optimizer is checked in tests/optim/test_sharded.py):
losses, gradient norms and final weights equal a 2-rank DDP run's on the same data; a run
stopped after step 2 and resumed from its DCP checkpoint equals the uninterrupted one.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
import yaml

from memtrain.cli import main
from tests.train.test_distributed_run import _run, _write

FSDP = ["launcher.kind=fsdp", "launcher.nproc=2"]
ADAMW = {"name": "adamw", "options": {}}
PLAN = {"gpu_budget_fraction": 0.85}  # some activations swapped or recomputed


def _metrics(out_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").open()]


def _fsdp_weights(folder: Path, tmp_path: Path) -> dict[str, torch.Tensor]:
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    target = tmp_path / f"{folder.parent.parent.name}-{folder.name}.pt"  # e.g. fsdp-step2.pt
    dcp_to_torch_save(folder, target)
    return torch.load(target, weights_only=False)["model"]


def _close(a: float, b: float) -> bool:
    return abs(a - b) <= 1e-5 * max(abs(a), abs(b))


def test_fsdp_launch_and_bad_input(tmp_path, capsys):
    path = _write(tmp_path, "bad")  # step-in-backward needs one process
    assert main(["run", str(path), *FSDP, "train.step_in_backward=true"]) == 2
    err = capsys.readouterr().err.strip()
    assert "step_in_backward" in err and len(err.splitlines()) == 1
    # The ranks start as torchrun's do.
    from memtrain.train import load_recipe
    from memtrain.train.launch import launch_command

    recipe = load_recipe(_write(tmp_path, "cmd"), FSDP)
    cmd, _ = launch_command(recipe, ["run", "x.yaml"])
    assert cmd[:3] == [sys.executable, "-m", "torch.distributed.run"]
    assert "--nproc_per_node=2" in cmd and cmd[-4:] == ["-m", "memtrain", "run", "x.yaml"]


OPTIMIZERS = {
    "adamw": ADAMW,
    # rank 8 of 16-row key/value weights: left projections, whose moments are replicated
    "galore": {"name": "galore", "options": {"rank": 8, "update_proj_gap": 2}},
    "frugal": {"name": "frugal", "options": {"density": 0.25, "update_proj_gap": 2}},
}


@pytest.mark.slow
@pytest.mark.parametrize("name", ["adamw", "galore", "frugal"])
def test_fsdp_two_ranks_equal_ddp_and_resume(tmp_path, name):
    optimizer, steps = OPTIMIZERS[name], "schedule.steps=3"
    ddp = _write(tmp_path, "ddp", optimizer=optimizer, plan=PLAN)
    _run(ddp, "launcher.kind=torchrun", "launcher.nproc=2", steps)
    fsdp = _write(tmp_path, "fsdp", optimizer=optimizer, plan=PLAN)
    _run(fsdp, *FSDP, steps, "train.checkpoint_every=1")
    out = tmp_path / "fsdp"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["launcher"] == {"kind": "fsdp", "world_size": 2, "backend": "gloo"}
    # Each rank ran its own per-rank plan: its rows of the weights and optimizer states, as
    # predicted to the byte here (even shards; uneven ones give rank 0 one row more).
    plan = yaml.safe_load((out / "plan.yaml").read_text())
    assert plan["parallelism"]["engine"] == "fsdp" and plan["parallelism"]["world_size"] == 2
    held = summary["train"]["memory"]["model_states_per_rank"]
    for kind in ("params", "optimizer"):
        for rank in held["measured"]:
            assert abs(rank[kind] - held["predicted"][kind]) <= 0.01 * held["predicted"][kind]
    a, b = _metrics(tmp_path / "ddp"), _metrics(out)
    assert [m["step"] for m in b] == [1, 2, 3]
    for x, y in zip(a, b, strict=True):
        assert _close(x["loss"], y["loss"]) and _close(x["grad_norm"], y["grad_norm"]), (x, y)
    expected = torch.load(tmp_path / "ddp" / "checkpoint.pt", weights_only=False)["model"]
    got = _fsdp_weights(out / "fsdp" / "step3", tmp_path)
    assert expected.keys() == got.keys()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=1e-5, atol=1e-6, msg=key)
    kept = ["step2", "step3"]  # train.keep_checkpoints=2
    assert sorted(p.name for p in (out / "fsdp").glob("step*")) == kept

    # The same run stopped after step 2 (its step3 never written), resumed to step 3: the
    # low-rank states (sharded and replicated) and the projections come back from DCP.
    resumed = tmp_path / "resumed"
    shutil.copytree(out, resumed)
    shutil.rmtree(resumed / "fsdp" / "step3")
    (resumed / "summary.json").unlink()
    _run(fsdp, *FSDP, steps, "train.checkpoint_every=1", f"train.out_dir={resumed}")
    assert json.loads((resumed / "summary.json").read_text())["train"]["steps_run"] == 1
    for x, y in zip(b, _metrics(resumed), strict=True):
        assert x["step"] == y["step"] and x["loss"] == y["loss"], (x, y)
        assert x["grad_norm"] == y["grad_norm"]
    again = _fsdp_weights(resumed / "fsdp" / "step3", tmp_path)
    for key in got:
        assert torch.equal(got[key], again[key]), key
