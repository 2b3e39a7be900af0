"""Step time of the 1.2B Llama with a checkpoint every step, through memtrain's recipe runner:
asynchronous checkpoints, synchronous torch.save, and none.

Each mode trains the ``llama-3.2-1b`` preset (bf16, batch 1, --seq generated tokens, fused
AdamW lr 1e-5, gradient clipping 1.0, constant schedule, no plan unless --plan) through
``memtrain.train.run_recipe``, exactly what ``memtrain run RECIPE`` does with that recipe, each
in a fresh process:

  none   train.checkpoint_every 0: no checkpoints
  async  a checkpoint every step, train.async_checkpoints true (the state is copied to pinned
         host memory between two steps and a background thread writes it; the next checkpoint
         waits for the write in flight)
  sync   a checkpoint every step, train.async_checkpoints false (torch.save, fsync and rename
         before the next step starts)

train.keep_checkpoints --keep (2) so the disk does not fill; the checkpoints go to
--work-dir/MODE (default a temporary folder), deleted after each run.

A step is timed from the start of one step to the start of the next (CUDA synchronised at
both ends), so it holds the checkpoint written after it; the last step ends where the runner
waits for the last background write. The runner's strategy is wrapped for this (the runner
itself is unchanged). The first --warmup (2) steps are left out.

Each row: mean and median step seconds of the measured steps, their overhead against ``none``
(computed once every mode of the run is done), the time the checkpoint call held the loop per
step (mean), for async the final wait for the last write (the run is not done until it is on
disk) and the runner's time spent waiting for earlier writes, bytes on disk of one checkpoint,
peak torch.cuda.max_memory_allocated over the loop (the runner's measured peak), the host's
peak RSS above what it was before the run began, notes the checkpoint writer printed (a
fallback to a synchronous write shows there), status and error.

Examples:
  python -m benchmarks.bench_checkpoint_gpu --gpu-cap-gib 79.2
  python -m benchmarks.bench_checkpoint_gpu --gpu-cap-gib 79.2 --seq 8192 --steps 20 \\
      --work-dir /mnt/nvme/ckpt
  python -m benchmarks.bench_checkpoint_gpu --device cpu --seq 64 --steps 4 \\
      --overrides num_hidden_layers=2 hidden_size=64 intermediate_size=128 \\
      num_attention_heads=4 num_key_value_heads=2 vocab_size=512 --results-dir /tmp/ckb
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import torch

from benchmarks.harness import (
    GiB,
    cap_gpu_memory,
    parse_overrides,
    parser,
    results_for,
    synchronize,
)

BENCHMARK = "bench_checkpoint_gpu"
MODEL = "llama-3.2-1b"
MODES = ("none", "async", "sync")


def build_recipe(args: argparse.Namespace, mode: str, out_dir: Path):
    """The typed recipe of one mode, validated as ``memtrain run`` validates a YAML file."""
    from memtrain.train import validate

    cuda = args.device == "cuda"
    raw: dict[str, Any] = {
        "name": f"{BENCHMARK}-{mode}",
        "model": {"preset": MODEL, "dtype": "bf16", "overrides": parse_overrides(args.overrides)},
        "data": {"source": "generated", "seq": args.seq, "batch": 1},
        "optimizer": {"name": "adamw", "lr": 1e-5, "options": {"fused": True} if cuda else {}},
        "schedule": {"steps": args.steps, "warmup": 0, "decay": "constant", "grad_clip": 1.0},
        "plan": {"enabled": False, "fused_loss": True},
        "train": {
            "device": args.device,
            "seed": 0,
            "log_every": 1,
            "checkpoint_every": 0 if mode == "none" else 1,
            "keep_checkpoints": args.keep,
            "async_checkpoints": mode == "async",
            "out_dir": str(out_dir),
            "resume": False,
        },
    }
    if args.plan:
        raw["plan"] = {"hardware": args.plan, "cpu": "128GiB", "fused_loss": True}
    return validate(raw, BENCHMARK)


def timed_strategy(device: torch.device):
    """The runner's single-process strategy, timing each step from outside: the start of every
    step, the blocking time of every checkpoint call, the end of the loop (where the runner
    waits for the last write) and that final wait."""
    from memtrain.train.strategy import SingleProcess

    class Timed(SingleProcess):
        marks: list[float]
        save_s: list[float]
        notes: list[str]
        final_wait_s: float | None = None

        def _now(self) -> float:
            synchronize(device)
            return time.perf_counter()

        def __init__(self, world, where: torch.device) -> None:
            super().__init__(world, where)
            self.marks, self.save_s, self.notes = [], [], []

        def start_writer(self, recipe) -> None:
            note = self.note  # the runner's, set after construction

            def keep(text: str) -> None:
                self.notes.append(text)
                note(text)

            self.note = keep
            super().start_writer(recipe)

        def step(self, ids: torch.Tensor):
            self.marks.append(self._now())
            if len(self.marks) > 1:
                seconds = self.marks[-1] - self.marks[-2]
                print(f"  step {len(self.marks) - 1}: {seconds:.3f} s", file=sys.stderr)
            return super().step(ids)

        def save(self, state: dict[str, Any]) -> None:
            started = self._now()
            super().save(state)
            self.save_s.append(self._now() - started)

        def finish_writes(self) -> None:
            self.marks.append(self._now())
            super().finish_writes()
            self.final_wait_s = self._now() - self.marks[-1]

    return Timed


def run_one(args: argparse.Namespace, mode: str) -> dict[str, Any]:
    """One mode in this process; returns its row."""
    # What `memtrain run` sets before CUDA starts.
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    from memtrain.profile.report import wide_console
    from memtrain.train import run_recipe
    from memtrain.train import runner as runner_module

    device = torch.device(args.device)
    overrides = parse_overrides(args.overrides)
    row: dict[str, Any] = {"mode": mode, "model": MODEL, "seq": args.seq, "steps": args.steps}
    row.update(warmup=args.warmup, keep=args.keep, plan=args.plan, overrides=overrides)
    if device.type == "cuda":
        row.update(cap_gpu_memory(args.gpu_cap_gib))
    out_dir = Path(args.work_dir) / mode
    shutil.rmtree(out_dir, ignore_errors=True)
    row["work_dir_free_gib"] = shutil.disk_usage(args.work_dir).free / GiB
    timed_class = timed_strategy(device)
    made: list[Any] = []

    def make(world, where):
        made.append(timed_class(world, where))
        return made[-1]

    strategies = runner_module.STRATEGIES
    runner_module.STRATEGIES = {**strategies, "single": make}
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    try:
        recipe = build_recipe(args, mode, out_dir)
        summary = run_recipe(recipe, console=wide_console(stderr=True), progress=False)
        train = summary["train"]
        timed = made[0]
        steps = [b - a for a, b in zip(timed.marks, timed.marks[1:], strict=False)]
        measured = steps[args.warmup :]
        row.update(
            status="ok",
            step_s=steps,
            mean_step_s=statistics.mean(measured),
            median_step_s=statistics.median(measured),
            tokens_per_s=args.seq / statistics.mean(measured),
            first_loss=train["first_loss"],
            last_loss=train["last_loss"],
        )
        if timed.save_s:
            row["checkpoint_call_mean_s"] = statistics.mean(timed.save_s[args.warmup :])
        written = train.get("checkpoints")
        if written:
            row["checkpoints_written"] = written["written"]
            row["background"] = written["background"]
            row["waited_for_earlier_writes_s"] = written["waited_s"]
        if mode == "async":
            row["final_wait_s"] = timed.final_wait_s
        newest = out_dir / f"checkpoint-{args.steps}.pt"
        row["checkpoint_bytes"] = newest.stat().st_size if newest.exists() else None
        if row["checkpoint_bytes"]:
            row["checkpoint_gib"] = row["checkpoint_bytes"] / GiB
        peak = train["memory"]["measured_gpu_peak_bytes"]
        row["peak_gib"] = peak / GiB if peak is not None else None
        reserved = train["memory"].get("measured_gpu_reserved_peak_bytes")
        row["reserved_peak_gib"] = reserved / GiB if reserved is not None else None
        row["checkpoint_notes"] = timed.notes
    except Exception as exc:  # report it and go on with the other modes
        text = str(exc)
        row["status"] = "out of memory" if "out of" in text and "memory" in text else "error"
        row["error"] = f"{type(exc).__name__}: {text}"[:500]
        row["traceback"] = traceback.format_exc(limit=10)
        if device.type == "cuda":
            row["peak_gib"] = torch.cuda.max_memory_allocated() / GiB
    finally:
        runner_module.STRATEGIES = strategies
        shutil.rmtree(out_dir, ignore_errors=True)
    rss_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    row["host_peak_rss_gib"] = rss_peak / GiB
    row["host_rss_extra_gib"] = (rss_peak - rss_before) / GiB
    return row


def add_overheads(rows: list[dict[str, Any]]) -> None:
    """Each ok row's mean and median step time against the ``none`` row of the same run."""
    base = next((r for r in rows if r["mode"] == "none" and r.get("status") == "ok"), None)
    for row in rows:
        if base is None or row.get("status") != "ok":
            row["overhead"] = row["median_overhead"] = None
            continue
        row["overhead"] = row["mean_step_s"] / base["mean_step_s"] - 1
        row["median_overhead"] = row["median_step_s"] / base["median_step_s"] - 1


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES), help="run these")
    p.add_argument("--seq", type=int, default=4096, help="tokens a step (batch 1)")
    p.add_argument("--steps", type=int, default=12, help="steps a run")
    p.add_argument("--warmup", type=int, default=2, help="first steps left out of the timing")
    p.add_argument("--keep", type=int, default=2, help="train.keep_checkpoints")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--plan", metavar="HARDWARE", help="train under a plan for this preset")
    p.add_argument("--work-dir", help="checkpoints go under here (default a temporary folder)")
    p.add_argument("--gpu-cap-gib", type=float, help="allocate at most this (79.2: an H100)")
    p.add_argument("--overrides", nargs="*", default=[], help="KEY=JSON config overrides")
    p.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.steps <= args.warmup:
        raise SystemExit(f"--steps {args.steps} leaves no step after {args.warmup} warm-up ones")
    if args.one:
        print(json.dumps(run_one(args, args.modes[0]), default=str))
        return
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU (or --device cpu)")
    own = args.work_dir is None
    work_dir = Path(args.work_dir or tempfile.mkdtemp(prefix="bench_checkpoint_"))
    work_dir.mkdir(parents=True, exist_ok=True)
    results = results_for(BENCHMARK, args, device=args.device)
    modes = [m for m in MODES if m in args.modes]  # none first: the others are measured against it
    passed = [a for a in sys.argv[1:] if a not in ("--fresh",)]
    rows = []
    try:
        for mode in modes:
            print(f"{mode}:", file=sys.stderr, flush=True)
            command = [sys.executable, "-m", f"benchmarks.{BENCHMARK}", *passed]
            command += ["--one", "--modes", mode, "--work-dir", str(work_dir)]
            done = subprocess.run(command, stdout=subprocess.PIPE, text=True)
            lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
            row = json.loads(lines[-1]) if lines else {"mode": mode, "seq": args.seq}
            if not lines:
                row.update(status="error", error=f"exit {done.returncode}")
            rows.append(row)
    finally:
        if own:
            shutil.rmtree(work_dir, ignore_errors=True)
    add_overheads(rows)
    suffix = "|" + ",".join(args.overrides) if args.overrides else ""
    for row in rows:
        key = f"{row['mode']}@{args.seq}x{args.steps}" + (f"@{args.plan}" if args.plan else "")
        results.write(key + suffix, **row)
        print(json.dumps({k: v for k, v in row.items() if k != "traceback"}, default=str))
        if "traceback" in row:
            print(row["traceback"])


if __name__ == "__main__":
    main()
