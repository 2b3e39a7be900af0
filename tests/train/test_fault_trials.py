"""Fault trials: ``memtrain run`` killed with SIGKILL at random moments (inside training steps
and inside background checkpoint writes), resumed each time, ends bit-identical to a run that
was never killed; no complete checkpoint is ever lost, and a flipped byte in the newest one is
caught and the previous one used.

One chain of trials per optimizer case: each trial starts the command line on the same
``train.out_dir`` (so it resumes what the last one left), kills it, checks the folder. The
default suite runs ``MEMTRAIN_FAULT_TRIALS`` (4) trials in all; set it to 20 for the full run
recorded in docs/faults.md, and ``MEMTRAIN_FAULT_SEED`` to vary the kill moments.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from rich.console import Console

from memtrain.train import load_recipe, run_recipe
from memtrain.train.checkpoint import PAUSE_ENV, trim_metrics
from memtrain.train.recipe import apply_overrides

from .test_run_and_resume import TINY

TRIALS = int(os.environ.get("MEMTRAIN_FAULT_TRIALS", "4"))
SEED = int(os.environ.get("MEMTRAIN_FAULT_SEED", "0"))
PAUSE_S = 0.15  # per stage of a write: four stages, so a write takes at least 0.6 s
EVERY = 4  # steps between checkpoints
CASES = {
    # GaLore: projector states; AdamW under a tight budget: optimizer states on the host
    "galore": [],
    "adamw-host": ["optimizer.name=adamw", "optimizer.options={}", "plan.gpu_budget_fraction=1.0"],
}
_RESUMED = re.compile(r"resumed from \S*checkpoint-(\d+)\.pt at step (\d+)")


def _recipe(tmp_path: Path, name: str, steps: int, overrides: list[str]) -> Path:
    recipe = apply_overrides(json.loads(json.dumps(TINY)), overrides)
    recipe["schedule"]["steps"] = steps
    recipe["train"].update(
        out_dir=str(tmp_path / name), checkpoint_every=EVERY, threads=1, log_every=1
    )
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def _good(out_dir: Path) -> list[int]:
    """Steps of the numbered checkpoints whose bytes match their sidecar, newest first."""
    steps = []
    for path in out_dir.glob("checkpoint-*.pt"):
        side = path.with_name(path.name + ".sha256")
        if side.exists():
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
            if side.read_text().split()[:1] == [digest]:
                steps.append(int(path.stem.split("-")[1]))
    return sorted(steps, reverse=True)


def _last_logged(metrics: Path) -> int:
    try:
        lines = metrics.read_text().splitlines()
        return json.loads(lines[-1])["step"] if lines else 0
    except (OSError, ValueError, KeyError):
        return 0  # mid-write: read again


def _tmp_files(out_dir: Path) -> dict[str, tuple[int, int]]:
    found = {}
    for path in out_dir.glob("checkpoint-*.pt.tmp"):
        try:
            stat = path.stat()
        except OSError:
            continue
        found[path.name] = (stat.st_ino, stat.st_mtime_ns)
    return found


def _in_write(out_dir: Path) -> bool:
    """Evidence the process died inside a write: a temporary file, or a numbered checkpoint
    that ``checkpoint.pt`` does not link to yet."""
    numbered = [(int(p.stem.split("-")[1]), p) for p in out_dir.glob("checkpoint-*.pt")]
    if list(out_dir.glob("checkpoint-*.pt.tmp")) or not (out_dir / "checkpoint.pt").exists():
        return True
    return bool(numbered) and not os.path.samefile(max(numbered)[1], out_dir / "checkpoint.pt")


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    with open(path, "r+b") as file:  # in place: checkpoint.pt may be the same file
        file.write(data)


def _kill_trial(path: Path, out_dir: Path, mode: str, start: int, rng: random.Random, log: Path):
    """Start the command line, kill it at a random moment of ``mode``; returns seconds run."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if mode == "write":
        env[PAUSE_ENV] = str(PAUSE_S)
    stale = _tmp_files(out_dir)
    target = start + rng.randint(1, 3 * EVERY)  # a step the kill waits for
    began = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "memtrain", "run", str(path), "--no-progress"],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
        )
    deadline = time.time() + 120
    try:
        while proc.poll() is None and time.time() < deadline:
            if mode == "step" and _last_logged(out_dir / "metrics.jsonl") >= target:
                time.sleep(rng.uniform(0, 0.02))  # inside a step, or between two
                break
            if mode == "write":
                fresh = {k: v for k, v in _tmp_files(out_dir).items() if stale.get(k) != v}
                if fresh:  # a write began: die in its first three stages (before pruning)
                    time.sleep(rng.uniform(0, 2.5 * PAUSE_S))
                    break
            time.sleep(0.003)
        assert proc.poll() is None, f"the run ended before the kill:\n{log.read_text()[-2000:]}"
        proc.send_signal(signal.SIGKILL)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    return time.perf_counter() - began


def _assert_same(a, b, where: str = "") -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            _assert_same(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def _final(out_dir: Path) -> dict:
    state = torch.load(out_dir / "checkpoint.pt", weights_only=False)
    return {"step": state["step"], "model": state["model"], "optimizer": state["optimizer"]}


def _split(total: int, cases: int) -> list[int]:
    return [total // cases + (i < total % cases) for i in range(cases)]


@pytest.mark.parametrize(
    ("case", "trials"),
    [(c, n) for c, n in zip(CASES, _split(TRIALS, len(CASES)), strict=True) if n],
)
def test_killed_and_resumed_runs_end_bit_identical(tmp_path, case, trials):
    rng = random.Random(f"{SEED}-{case}")
    steps = EVERY * (3 * trials + 3)  # room for every trial's progress, and a finish
    overrides = CASES[case]
    # The reference writes synchronously: the background snapshot must store the same state.
    reference = _recipe(tmp_path, "whole", steps, overrides)
    run_recipe(load_recipe(reference, ["train.async_checkpoints=false"]), progress=False)
    plan = yaml.safe_load((tmp_path / "whole" / "plan.yaml").read_text())
    places = {layer["optimizer"] for layer in plan["layers"]}
    assert places != {"gpu"} if case == "adamw-host" else True

    path = _recipe(tmp_path, "killed", steps, overrides)
    out_dir = tmp_path / "killed"
    best, expect, damaged, timings, flips = 0, None, None, [], 0
    for trial in range(trials):
        mode = "write" if trial % 2 else "step"
        log = tmp_path / f"trial-{trial}.log"
        start = expect or 0
        if out_dir.exists():
            trim_metrics(out_dir / "metrics.jsonl", start)
        seconds = _kill_trial(path, out_dir, mode, start, rng, log)
        text = log.read_text()
        if expect:  # this trial resumed from the newest good checkpoint, or named the damage
            assert f"at step {expect}" in text and _RESUMED.search(text), text[-2000:]
            if damaged:
                assert f"checkpoint-{damaged}.pt is damaged" in text, text[-2000:]
        good = _good(out_dir)
        newest = good[0] if good else 0
        assert newest >= best, f"trial {trial}: lost a checkpoint ({good}, had {best})"
        if mode == "write":
            assert _in_write(out_dir), f"trial {trial}: the kill missed the write"
        best, expect, damaged = newest, newest or None, None
        if trial % 3 == 0 and len(good) > 1:  # a torn or altered newest file
            _flip(out_dir / f"checkpoint-{good[0]}.pt")
            best, expect, damaged = good[1], good[1], good[0]
            flips += 1
        timings.append((mode, round(seconds, 2), newest))

    text = io.StringIO()
    run_recipe(load_recipe(path), console=Console(file=text, width=300), progress=False)
    log = text.getvalue()
    assert f"at step {expect}" in log, log[-2000:]
    if damaged:
        assert f"checkpoint-{damaged}.pt is damaged" in log
    assert not list(out_dir.glob("*.tmp"))
    whole, resumed = _final(tmp_path / "whole"), _final(out_dir)
    assert whole["step"] == resumed["step"] == steps
    _assert_same(whole, resumed)
    print(f"{case}: {trials} kills, {flips} flipped bytes; (mode, s, newest good): {timings}")
