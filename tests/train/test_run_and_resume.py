"""`memtrain run`: a real loop under a plan; killing it and resuming equals not killing it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from memtrain.train import load_recipe, run_recipe

TINY = {
    "name": "tiny",
    "model": {
        "preset": "llama-3.2-1b",
        "dtype": "fp32",
        "overrides": {
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "head_dim": 16,
            "vocab_size": 256,
        },
    },
    "data": {"source": "stdlib", "seq": 32, "batch": 2},
    "optimizer": {"name": "galore", "lr": 0.003, "options": {"rank": 8, "update_proj_gap": 5}},
    "schedule": {"steps": 120, "warmup": 3},
    "plan": {"gpu_budget_fraction": 0.7},
    "train": {"device": "cpu", "checkpoint_every": 4, "log_every": 1},
}


def _write(tmp_path: Path, out: str, **train) -> Path:
    recipe = json.loads(json.dumps(TINY))
    recipe["train"].update(out_dir=str(tmp_path / out), **train)
    path = tmp_path / f"{out}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def _final_state(out_dir: Path) -> dict:
    return torch.load(out_dir / "checkpoint.pt", weights_only=False)["model"]


def test_run_trains_under_a_plan(tmp_path):
    recipe = load_recipe(_write(tmp_path, "short"), ["schedule.steps=12"])
    summary = run_recipe(recipe, progress=False)
    train = summary["train"]
    assert train["steps_run"] == 12
    assert train["last_loss"] < train["first_loss"]
    assert train["memory"]["predicted_gpu_peak_bytes"] > 0
    plan = yaml.safe_load((tmp_path / "short" / "plan.yaml").read_text())
    moved = [
        layer
        for layer in plan["layers"]
        if layer["recompute"] > 0 or any(v > 0 for v in layer["swap"].values())
    ]
    assert moved, "a half-size GPU budget must make the plan swap or recompute something"
    lines = (tmp_path / "short" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == list(range(1, 13))
    # The steady rate leaves out step 1 (kernels compiled, allocator warmed): steps 2-12's
    # tokens over their logged times.
    after_first = [json.loads(line)["step_s"] for line in lines[1:]]
    tokens = recipe.data.seq * recipe.data.batch
    steady = train["steady_tokens_per_s"]
    assert steady == pytest.approx(tokens * len(after_first) / sum(after_first), rel=1e-9)


def test_kill_and_resume_equals_uninterrupted(tmp_path):
    reference = run_recipe(load_recipe(_write(tmp_path, "whole")), progress=False)
    assert reference["train"]["steps_run"] == TINY["schedule"]["steps"]

    path = _write(tmp_path, "killed")
    ckpt = tmp_path / "killed" / "checkpoint.pt"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "memtrain", "run", str(path), "--no-progress"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
    )
    deadline = time.time() + 240
    while not ckpt.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert ckpt.exists(), "the run never wrote a checkpoint"
    killed_at = torch.load(ckpt, weights_only=False)["step"]
    assert killed_at < TINY["schedule"]["steps"], "the run finished before it could be killed"

    resumed = run_recipe(load_recipe(path), progress=False)
    assert resumed["train"]["steps_run"] == TINY["schedule"]["steps"] - killed_at
    a, b = _final_state(tmp_path / "whole"), _final_state(tmp_path / "killed")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    steps = [json.loads(x)["step"] for x in (tmp_path / "killed" / "metrics.jsonl").open()]
    assert steps[-1] == TINY["schedule"]["steps"]


def test_step_in_backward_equals_ordinary_step(tmp_path):
    # A budget under which neither plan recomputes: a step-in-backward plan holds no
    # gradients, so under a tight one the two would recompute differently (rounding
    # differences); swapping moves bytes exactly. 1x the unplanned peak was such a budget until
    # the cost model counted a tiled layer's swapped bytes whole in backward.
    common = [
        "schedule.steps=6",
        "schedule.grad_clip=0",
        "train.checkpoint_every=6",
        "plan.gpu_budget_fraction=null",
        "plan.gpu_budget=1GiB",
    ]
    plain = load_recipe(_write(tmp_path, "plain"), common)
    fused = load_recipe(_write(tmp_path, "inbwd"), [*common, "train.step_in_backward=true"])
    run_recipe(plain, progress=False)
    run_recipe(fused, progress=False)
    a, b = _final_state(tmp_path / "plain"), _final_state(tmp_path / "inbwd")
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-6, atol=1e-7)


def test_step_in_backward_refuses_clipping(tmp_path):
    import pytest

    from memtrain.errors import ConfigError

    recipe = load_recipe(_write(tmp_path, "clip"), ["train.step_in_backward=true"])
    with pytest.raises(ConfigError, match="grad_clip=0"):
        run_recipe(recipe, progress=False)


def test_resume_with_optimizer_states_on_the_host(tmp_path):
    """AdamW under a tight budget puts states on the host; checkpoints still resume exactly."""
    common = [
        "optimizer.name=adamw",
        "optimizer.options={}",
        "plan.gpu_budget_fraction=1.0",
        "train.checkpoint_every=3",
    ]
    whole = load_recipe(_write(tmp_path, "w"), [*common, "schedule.steps=6"])
    summary = run_recipe(whole, progress=False)
    plan = yaml.safe_load((tmp_path / "w" / "plan.yaml").read_text())
    assert any(layer["optimizer"] != "gpu" for layer in plan["layers"])
    assert summary["train"]["steps_run"] == 6
    part = load_recipe(_write(tmp_path, "p"), [*common, "schedule.steps=3"])
    run_recipe(part, progress=False)
    rest = load_recipe(_write(tmp_path, "p"), [*common, "schedule.steps=6"])
    assert run_recipe(rest, progress=False)["train"]["steps_run"] == 3
    a, b = _final_state(tmp_path / "w"), _final_state(tmp_path / "p")
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_quickstart_recipe_runs(tmp_path):
    """The README's main job, shortened: the dry-run plan and a few steps under a plan."""
    path = Path(__file__).resolve().parents[2] / "recipes" / "quickstart.yaml"
    recipe = load_recipe(path, ["schedule.steps=3", f"train.out_dir={tmp_path / 'qs'}"])
    summary = run_recipe(recipe, progress=False)
    assert summary["dry_run"]["predicted"]["peak_bytes"]["gpu"] > 0
    assert summary["train"]["steps_run"] == 3
    plan = yaml.safe_load((tmp_path / "qs" / "plan.yaml").read_text())
    for layer in plan["layers"]:
        if layer["kind"] != "block":
            assert layer["recompute"] == 0, layer["name"]  # only blocks recompute token-wise


def test_resume_stepping_in_backward_equals_uninterrupted(tmp_path):
    """The in-backward step takes the learning rate the schedule sets after a resume."""
    common = [
        "schedule.grad_clip=0",
        "train.step_in_backward=true",
        "train.checkpoint_every=3",
        "plan.gpu_budget_fraction=null",
        "plan.gpu_budget=1GiB",
    ]
    run_recipe(load_recipe(_write(tmp_path, "w"), [*common, "schedule.steps=6"]), progress=False)
    run_recipe(load_recipe(_write(tmp_path, "p"), [*common, "schedule.steps=3"]), progress=False)
    rest = load_recipe(_write(tmp_path, "p"), [*common, "schedule.steps=6"])
    assert run_recipe(rest, progress=False)["train"]["steps_run"] == 3
    a, b = _final_state(tmp_path / "w"), _final_state(tmp_path / "p")
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_a_resume_runs_the_plan_its_checkpoints_were_written_under(tmp_path, monkeypatch):
    """A resumed run installs the stored plan instead of solving again (a new solve could
    differ where the solver's time limit binds); a changed plan input plans again."""
    import memtrain.planner.pipeline as pipeline

    common = ["train.checkpoint_every=3"]
    run_recipe(load_recipe(_write(tmp_path, "p"), [*common, "schedule.steps=3"]), progress=False)
    assert (tmp_path / "p" / "plan-inputs.json").exists()

    def no_solve(*args, **kwargs):
        raise AssertionError("planned again")

    monkeypatch.setattr(pipeline, "best_of", no_solve)
    rest = load_recipe(_write(tmp_path, "p"), [*common, "schedule.steps=6"])
    assert run_recipe(rest, progress=False)["train"]["steps_run"] == 3
    changed = load_recipe(
        _write(tmp_path, "p"), [*common, "schedule.steps=9", "plan.gpu_budget_fraction=0.9"]
    )
    try:
        run_recipe(changed, progress=False)
    except AssertionError as exc:
        assert "planned again" in str(exc)
    else:
        raise AssertionError("a changed plan input must plan again")


def test_overlapped_host_step_trains_and_resumes_exactly(tmp_path):
    """train.overlap_host_step: host states step as their gradients arrive. A resumed
    overlapped run ends bit-identical to an uninterrupted one; against the step after backward
    it differs only by rounding (the plan, priced for the overlap, places states elsewhere and so
    steps some of them with another kernel; memtrain/offload tests check bit-identity under one
    plan). Clipping is refused in one line."""
    import pytest

    from memtrain.errors import ConfigError

    common = [
        "optimizer.name=adamw",
        "optimizer.options={}",
        "schedule.grad_clip=0",
        "plan.gpu_budget_fraction=1.0",
        "train.checkpoint_every=3",
    ]
    overlap = [*common, "train.overlap_host_step=true"]
    run_recipe(
        load_recipe(_write(tmp_path, "after"), [*common, "schedule.steps=6"]), progress=False
    )
    run_recipe(
        load_recipe(_write(tmp_path, "over"), [*overlap, "schedule.steps=6"]), progress=False
    )
    plan = yaml.safe_load((tmp_path / "over" / "plan.yaml").read_text())
    assert any(layer["optimizer"] == "cpu" for layer in plan["layers"])
    run_recipe(load_recipe(_write(tmp_path, "p"), [*overlap, "schedule.steps=3"]), progress=False)
    rest = load_recipe(_write(tmp_path, "p"), [*overlap, "schedule.steps=6"])
    assert run_recipe(rest, progress=False)["train"]["steps_run"] == 3
    after, over, resumed = (_final_state(tmp_path / n) for n in ("after", "over", "p"))
    for key in over:
        assert torch.equal(over[key], resumed[key]), key
        torch.testing.assert_close(over[key], after[key], rtol=1e-5, atol=1e-6)
    clipped = load_recipe(_write(tmp_path, "clip"), ["train.overlap_host_step=true"])
    with pytest.raises(ConfigError, match="grad_clip=0"):
        run_recipe(clipped, progress=False)
