"""One recipe under several launchers (one process, DDP, FSDP2, DeepSpeed), side by side on the
GPUs of one machine.

A run is KIND[:NPROC] (``single``, ``torchrun``, ``fsdp``, ``deepspeed``); each is ``memtrain run
RECIPE launcher.kind=KIND launcher.nproc=NPROC`` in a fresh process with the recipe's own plan,
plus the ``--set`` overrides. Each row: tokens a second over the run and after its first step
(every rank's tokens), the last step's time beside the plan's, the measured GPU peak of the
fullest rank (max_memory_allocated) beside the plan's prediction for it and the error, the
plan's host peak beside the process's peak resident set, and, under FSDP2, each rank's measured
parameter and optimizer-state bytes on the device and on the host beside the plan's.

Example (the FSDP2 GaLore recipe on one GPU, beside one process):
  python -m benchmarks.bench_launchers_gpu --recipe recipes/llama-1b-fsdp-galore.yaml \\
      --runs single fsdp:1 --set schedule.steps=4 train.gpu_memory_limit=79.2GiB
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import yaml

from benchmarks.harness import GiB, parser, results_for


def run_one(recipe: str, spec: str, overrides: list[str], out_dir: Path) -> dict[str, Any]:
    kind, _, nproc = spec.partition(":")
    command = [sys.executable, "-m", "memtrain", "run", recipe]
    command += [f"launcher.kind={kind}", f"launcher.nproc={nproc or 1}"]
    command += [f"train.out_dir={out_dir}", "train.checkpoint_every=0", *overrides]
    command += ["--no-progress"]  # after the overrides: argparse reads them as one list
    done = subprocess.run(command, capture_output=True, text=True)
    summary_path = out_dir / "summary.json"
    if done.returncode != 0 or not summary_path.exists():
        tail = (done.stdout[-1500:] + done.stderr[-2500:]).strip()
        return {"run": spec, "status": f"exit {done.returncode}", "log_tail": tail}
    train = json.loads(summary_path.read_text())["train"]
    memory = train["memory"]
    metrics = [json.loads(line) for line in (out_dir / "metrics.jsonl").open()]
    plan = (
        yaml.safe_load((out_dir / "plan.yaml").read_text())
        if (out_dir / "plan.yaml").exists()
        else None
    )
    predicted_step = plan["predicted"]["step_time_s"] if plan else None
    row: dict[str, Any] = {
        "run": spec,
        "status": "ok",
        "steps": train["steps_run"],
        "tokens_per_s": train["tokens_per_s"],
        "steady_tokens_per_s": train.get("steady_tokens_per_s"),
        "last_step_s": metrics[-1].get("step_s") if metrics else None,
        "last_loss": train["last_loss"],
        "measured_gpu_peak_gib": _gib(memory.get("measured_gpu_peak_bytes")),
        "predicted_gpu_peak_gib": _gib(memory.get("predicted_gpu_peak_bytes")),
        "error": memory.get("error"),
        "predicted_step_s": predicted_step,
        "predicted_host_peak_gib": _gib(memory.get("predicted_host_peak_bytes")),
        "measured_host_rss_peak_gib": _gib(memory.get("measured_host_rss_peak_bytes")),
    }
    if "model_states_per_rank" in memory:
        row["model_states_per_rank"] = memory["model_states_per_rank"]
    return row


def _gib(value: int | None) -> float | None:
    return None if value is None else round(value / GiB, 3)


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--recipe", required=True, help="a recipe file")
    p.add_argument("--runs", nargs="+", required=True, help="KIND[:NPROC] ...")
    p.add_argument("--set", nargs="*", default=[], help="recipe overrides KEY=VALUE")
    args = p.parse_args()
    results = results_for("bench_launchers_gpu", args)
    for spec in args.runs:
        with tempfile.TemporaryDirectory() as folder:
            row = run_one(args.recipe, spec, args.set, Path(folder) / "run")
        key = "|".join([Path(args.recipe).stem, spec, *args.set])
        results.write(key, **row)
        print(json.dumps(row, default=str), flush=True)


if __name__ == "__main__":
    main()
