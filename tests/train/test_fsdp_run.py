"""`memtrain run` with launcher.kind=fsdp (FSDP2, 2 gloo ranks on the CPU).

Sharding the tiny Llama's weights along dim 0 changes nothing a GaLore step computes (every
other optimizer: tests/optim/test_sharded.py): losses, gradient norms and final weights equal a
2-rank DDP run's on the same data, each rank holds the parameter and state bytes its per-rank
plan predicts on the device and on the host (the plan's budget puts a block's model states on
the host, which FSDP2's CPU offload runs), and a run whose every process is killed (SIGKILL) mid-run resumes from its DCP
checkpoint to exactly the uninterrupted run's weights.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from memtrain.cli import main
from tests.train.test_distributed_run import _run, _write

FSDP = ["launcher.kind=fsdp", "launcher.nproc=2"]
PLAN = {"gpu_budget_fraction": 0.85}  # FSDP2: a block's model states on the host


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


# rank 8 of 16-row key/value weights: left projections, whose moments are replicated; the
# others right ones, whose moments are row shards
GALORE = {"name": "galore", "options": {"rank": 8, "update_proj_gap": 2}}
STEPS = ("schedule.steps=6", "train.checkpoint_every=1")


@pytest.mark.slow
def test_fsdp_galore_equals_ddp_and_a_killed_run_resumes_exactly(tmp_path):
    from memtrain.train.checkpoint import FSDP_CLIENT
    from tests.train.test_distributed_run import _cmd, _kill_tree

    ddp = _write(tmp_path, "ddp", optimizer=GALORE, plan=PLAN)
    _run(ddp, "launcher.kind=torchrun", "launcher.nproc=2", *STEPS)
    fsdp = _write(tmp_path, "fsdp", optimizer=GALORE, plan=PLAN)
    _run(fsdp, *FSDP, *STEPS)
    out = tmp_path / "fsdp"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["launcher"] == {"kind": "fsdp", "world_size": 2, "backend": "gloo"}
    # Each rank ran its own per-rank plan: its rows of the weights and optimizer states, as
    # predicted to the byte here (even shards; uneven ones give rank 0 one row more).
    plan = yaml.safe_load((out / "plan.yaml").read_text())
    assert plan["parallelism"]["engine"] == "fsdp" and plan["parallelism"]["world_size"] == 2
    # The budget leaves no room for every block's states: the plan puts a block's on the host,
    # which FSDP2's CPU offload runs (its weights, gradients and GaLore states stepped there).
    host = [x["name"] for x in plan["layers"] if x["optimizer"] == "cpu"]
    assert host and all(x["params"] == x["optimizer"] for x in plan["layers"])
    held = summary["train"]["memory"]["model_states_per_rank"]
    for kind in ("params", "optimizer", "host_params", "host_optimizer"):
        assert held["predicted"][kind] > 0, kind
        for rank in held["measured"]:
            assert abs(rank[kind] - held["predicted"][kind]) <= 0.01 * held["predicted"][kind]
    a, b = _metrics(tmp_path / "ddp"), _metrics(out)
    assert [m["step"] for m in b] == list(range(1, 7))
    for x, y in zip(a, b, strict=True):
        assert _close(x["loss"], y["loss"]) and _close(x["grad_norm"], y["grad_norm"]), (x, y)
    expected = torch.load(tmp_path / "ddp" / "checkpoint.pt", weights_only=False)["model"]
    got = _fsdp_weights(out / "fsdp" / "step6", tmp_path)
    assert expected.keys() == got.keys()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=1e-5, atol=1e-6, msg=key)
    assert sorted(p.name for p in (out / "fsdp").glob("step*")) == ["step5", "step6"]

    # The same run with every process killed (SIGKILL) once step 2 is saved, then resumed: the
    # sharded and replicated GaLore states and the projections come back from DCP, and a step
    # folder the kill cut short (no client state yet) is passed over.
    killed = _write(tmp_path, "killed", optimizer=GALORE, plan=PLAN)
    folder = tmp_path / "killed" / "fsdp"
    proc = subprocess.Popen(
        _cmd(killed, *FSDP, *STEPS), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.time() + 240
    try:
        while not (folder / "step2" / FSDP_CLIENT).exists() and proc.poll() is None:
            assert time.time() < deadline, "the run never wrote its step-2 checkpoint"
            time.sleep(0.02)
    finally:
        _kill_tree(proc)
    saved = [int(p.name[4:]) for p in folder.glob("step*") if (p / FSDP_CLIENT).exists()]
    assert saved and max(saved) < 6, "the run finished before it could be killed"
    _run(killed, *FSDP, *STEPS)
    resumed = json.loads((tmp_path / "killed" / "summary.json").read_text())["train"]
    assert resumed["steps_run"] == 6 - max(saved)
    for x, y in zip(b, _metrics(tmp_path / "killed"), strict=True):
        assert x["step"] == y["step"] and x["loss"] == y["loss"], (x, y)
        assert x["grad_norm"] == y["grad_norm"]
    again = _fsdp_weights(folder / "step6", tmp_path)
    for key in got:
        assert torch.equal(got[key], again[key]), key
