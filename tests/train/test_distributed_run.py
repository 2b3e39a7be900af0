"""`memtrain run` with several processes: torchrun (DDP, gloo) and DeepSpeed ZeRO-3 on the CPU.

Two ranks of a tiny Llama: each reads its own shard of the data, rank 0 alone writes metrics,
and a run killed (every process, SIGKILL) and resumed from its checkpoint ends with exactly the
weights of one that was never interrupted.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import psutil
import pytest
import torch
import yaml

from memtrain.cli import main
from memtrain.errors import ConfigError
from memtrain.train import load_recipe, run_recipe
from memtrain.train.data import TokenStream
from tests.train.test_run_and_resume import TINY

STEPS = 20
TORCHRUN = ["launcher.kind=torchrun", "launcher.nproc=2"]


def _write(tmp_path: Path, out: str, **changes) -> Path:
    recipe = json.loads(json.dumps(TINY))
    recipe["schedule"]["steps"] = STEPS
    recipe["train"].update(out_dir=str(tmp_path / out), threads=1)
    for section, values in changes.items():
        recipe.setdefault(section, {}).update(values)
    path = tmp_path / f"{out}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def _cmd(path: Path, *overrides: str, flags: tuple[str, ...] = ()) -> list[str]:
    return [sys.executable, "-m", "memtrain", "run", str(path), *overrides, "--no-progress", *flags]


def _run(path: Path, *overrides: str, flags: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    cmd = _cmd(path, *overrides, flags=flags)
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def _steps(out_dir: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (out_dir / "metrics.jsonl").open()]


def _model_state(out_dir: Path) -> dict:
    return torch.load(out_dir / "checkpoint.pt", weights_only=False)["model"]


def _expected_digest(rank: int, batches: int, vocab: int = 256) -> str:
    data = TINY["data"]
    stream = TokenStream("stdlib", data["seq"], data["batch"], vocab, rank=rank, world_size=2)
    digest = hashlib.sha256()
    for _ in range(batches):
        digest.update(next(stream).numpy().tobytes())
    return digest.hexdigest()


def _kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL the launcher and every rank (torchrun starts its ranks in sessions of their own)."""
    try:
        family = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    for member in family:
        try:
            member.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(family, timeout=30)


# ------------------------------------------------------------------------------ fast checks


def test_token_stream_shards_are_disjoint_and_resume_across_world_sizes():
    one = TokenStream("generated", 8, 2, 100, seed=3)
    ranks = [TokenStream("generated", 8, 2, 100, seed=3, rank=r, world_size=2) for r in (0, 1)]
    single = [next(one) for _ in range(6)]
    for step in range(3):
        for rank, stream in enumerate(ranks):
            assert torch.equal(next(stream), single[2 * step + rank])
    # A 2-rank checkpoint at local position 3 (6 batches consumed) read by one process.
    one_again = TokenStream("generated", 8, 2, 100, seed=3)
    one_again.load_state_dict(ranks[0].state_dict())
    assert one_again.position == 6
    with pytest.raises(ConfigError, match="outside"):
        TokenStream("generated", 8, 2, 100, rank=2, world_size=2)


def test_launcher_settings_are_checked(tmp_path, capsys):
    path = _write(tmp_path, "bad")
    assert main(["run", str(path), "launcher.nproc=2"]) == 2
    assert "launcher.kind=torchrun" in capsys.readouterr().err
    assert main(["run", str(path), *TORCHRUN, "launcher.zero_stage=3"]) == 2
    assert "zero_stage is for launcher.kind=deepspeed" in capsys.readouterr().err
    assert main(["run", str(path), "launcher.kind=deepspeed", "launcher.nproc=2"]) == 2
    assert "DeepSpeed's own optimizer" in capsys.readouterr().err
    assert main(["run", str(path), *TORCHRUN, "train.step_in_backward=true"]) == 2
    assert "single process" in capsys.readouterr().err
    assert main(["run", str(path), *TORCHRUN, "train.overlap_host_step=true"]) == 2
    err = capsys.readouterr().err
    assert "overlap_host_step" in err and "single process" in err
    # In-process API: a launched kind is refused rather than silently run in one process.
    with pytest.raises(ConfigError, match="one process per rank"):
        run_recipe(load_recipe(path, TORCHRUN), progress=False)


def test_missing_launcher_and_too_few_gpus(tmp_path, capsys, monkeypatch):
    from memtrain.train import launch

    path = _write(tmp_path, "bad")
    monkeypatch.setitem(launch.LAUNCHERS, "torchrun", "no_such_launcher_module.run")
    assert main(["run", str(path), *TORCHRUN]) == 2
    assert "no_such_launcher_module.run) is not installed" in capsys.readouterr().err
    monkeypatch.undo()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert main(["run", str(path), *TORCHRUN, "train.device=cuda"]) == 2
    assert "1 CUDA device(s) are visible" in capsys.readouterr().err


def test_launch_commands(tmp_path, monkeypatch):
    from memtrain.train.launch import launch_command

    recipe = load_recipe(_write(tmp_path, "cmd"), TORCHRUN)
    cmd, env = launch_command(recipe, ["run", "x.yaml"])
    assert cmd[:3] == [sys.executable, "-m", "torch.distributed.run"]
    assert "--nproc_per_node=2" in cmd and cmd[-4:] == ["-m", "memtrain", "run", "x.yaml"]
    pytest.importorskip("deepspeed")
    recipe = load_recipe(
        _write(tmp_path, "cmd"),
        [
            "launcher.kind=deepspeed",
            "launcher.nproc=2",
            "optimizer.name=adamw",
            "optimizer.options={}",
        ],
    )
    cmd, env = launch_command(recipe, ["run", "x.yaml"])
    assert cmd[:3] == [sys.executable, "-m", "deepspeed.launcher.runner"]
    assert {"--num_gpus=2", "--no_local_rank", "--module"} <= set(cmd)
    assert "DS_ACCELERATOR" in env  # train.device is cpu
    # On GPUs the launcher keeps to CUDA_VISIBLE_DEVICES (it would ignore it with --num_gpus).
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5,6")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 3)
    recipe = replace(recipe, train=replace(recipe.train, device="cuda"))
    cmd, env = launch_command(recipe, ["run", "x.yaml"])
    assert "--include=localhost:4,5" in cmd and not any(c.startswith("--num_gpus") for c in cmd)


# --------------------------------------------------------------------------- launched runs


@pytest.mark.slow
def test_torchrun_two_ranks_kill_and_resume_equals_uninterrupted(tmp_path):
    whole = _write(tmp_path, "whole")
    _run(whole, *TORCHRUN)
    out = tmp_path / "whole"
    assert _steps(out) == list(range(1, STEPS + 1)), "rank 0 alone writes one line per step"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["launcher"] == {"kind": "torchrun", "world_size": 2, "backend": "gloo"}
    train = summary["train"]
    assert train["steps_run"] == STEPS and train["last_loss"] < train["first_loss"]
    ranks = train["ranks"]
    assert [r["first_position"] for r in ranks] == [0, 1]
    assert ranks[0]["data_digest"] != ranks[1]["data_digest"], "both ranks read the same data"
    for rank in ranks:
        assert rank["data_digest"] == _expected_digest(rank["rank"], STEPS)

    killed = _write(tmp_path, "killed")
    ckpt = tmp_path / "killed" / "checkpoint.pt"
    proc = subprocess.Popen(
        _cmd(killed, *TORCHRUN), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.time() + 240
    try:
        while not ckpt.exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.02)
    finally:
        _kill_tree(proc)
    assert ckpt.exists(), "the run never wrote a checkpoint"
    killed_at = torch.load(ckpt, weights_only=False)["step"]
    assert killed_at < STEPS, "the run finished before it could be killed"

    _run(killed, *TORCHRUN)
    resumed = json.loads((tmp_path / "killed" / "summary.json").read_text())["train"]
    assert resumed["steps_run"] == STEPS - killed_at
    assert _steps(tmp_path / "killed") == list(range(1, STEPS + 1))
    a, b = _model_state(out), _model_state(tmp_path / "killed")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.mark.slow
def test_deepspeed_zero3_two_ranks_trains_and_resumes(tmp_path):
    pytest.importorskip("deepspeed")
    path = _write(
        tmp_path,
        "ds",
        optimizer={"name": "adamw", "options": {}},
        launcher={"kind": "deepspeed", "nproc": 2, "zero_stage": 3},
    )
    out = tmp_path / "ds"  # train.device is cpu: the launch sets DS_ACCELERATOR=cpu
    done = _run(path, "schedule.steps=2", "train.checkpoint_every=2", flags=("--json",))
    assert json.loads(done.stdout)["train"]["steps_run"] == 2  # launcher logs kept off stdout
    config = json.loads((out / "deepspeed_config.json").read_text())
    assert config["zero_optimization"]["stage"] == 3
    assert config["train_batch_size"] == 2 * TINY["data"]["batch"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["launcher"]["kind"] == "deepspeed" and summary["launcher"]["world_size"] == 2
    assert summary["train"]["steps_run"] == 2
    assert (out / "deepspeed" / "latest").read_text().strip() == "step2"
    # launcher.zero_stage: each rank planned with its ZeRO-3 partition of the model states
    plan = yaml.safe_load((out / "plan.yaml").read_text())
    split = plan["parallelism"]
    assert (split["engine"], split["zero_stage"], split["world_size"]) == ("zero", 3, 2)
    assert "ZeRO partition" in summary["train"]["memory"]["note"]
    # What each rank holds, measured in the engine: its ZeRO-3 partitions of the weights, and
    # the fp32 partitions (masters, a copy even of fp32 weights) with AdamW's moments on them,
    # against the plan's bytes (device and host together: on the CPU they are one memory).
    held = summary["train"]["memory"]["model_states_per_rank"]
    for kind in ("params", "optimizer"):
        predicted = held["predicted"][kind] + held["predicted"][f"host_{kind}"]
        for rank in held["measured"]:
            measured = rank[kind] + rank[f"host_{kind}"]
            assert abs(measured - predicted) <= 0.02 * predicted, (kind, measured, predicted)
    # Resume through engine.load_checkpoint: one more step, metrics continue.
    _run(path, "schedule.steps=3", "train.checkpoint_every=3")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["train"]["steps_run"] == 1
    assert _steps(out) == [1, 2, 3]
    kept = sorted(p.name for p in (out / "deepspeed").glob("step*"))
    assert kept == ["step2", "step3"]  # train.keep_checkpoints: 2


def test_deepspeed_cpu_shm_buffer_is_released(tmp_path, monkeypatch):
    import os

    from memtrain.train.strategy import release_shm_buffer

    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29511")
    names = [f"deepspeed_allreduce_buffer_{os.getuid()}_127.0.0.1_29511_{r}" for r in (2, 3)]
    for name in names:
        (tmp_path / name).write_bytes(b"x")
    release_shm_buffer(3, root=str(tmp_path))
    assert [p.name for p in tmp_path.iterdir()] == names[:1]  # rank 2's stays
    release_shm_buffer(3, root=str(tmp_path))  # gone already: nothing to do


def test_a_rank_stuck_closing_its_process_group_leaves_with_one_line(capsys):
    """A finished rank whose process group does not close (a gloo peer stuck in teardown) says
    so in one line and leaves: status 0 after a good run, 1 after a failed one; a group that
    closes in time changes nothing."""
    from memtrain.train.strategy import leave_if_stuck

    left: list[int] = []
    with leave_if_stuck(0.2, 1, True, leave=left.append):
        time.sleep(0.6)
    assert left == [0]
    err = capsys.readouterr().err.strip()
    assert "rank 1" in err and "did not close" in err and len(err.splitlines()) == 1
    with leave_if_stuck(0.2, 0, False, leave=left.append):
        time.sleep(0.6)
    assert left == [0, 1]
    capsys.readouterr()
    with leave_if_stuck(0.3, 0, True, leave=left.append):
        pass
    time.sleep(0.5)
    assert left == [0, 1] and capsys.readouterr().err == ""
