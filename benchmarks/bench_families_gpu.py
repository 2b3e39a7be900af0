"""Decoder families other than Llama through memtrain.prepare(), beside their strongest stock
recipe, on one GPU.

A run is KIND@PRESET@TOKENS; each runs in a fresh process (allocator state, expandable segments
and compile caches start clean):

  stock     Hugging Face non-reentrant checkpointing of every decoder layer, the fused linear
            cross-entropy (memtrain.kernels.patch_causal_lm_loss), fused AdamW; expandable
            segments on (PYTORCH_CUDA_ALLOC_CONF)
  memtrain  exactly what the README shows: prepared = memtrain.prepare(model, seq=TOKENS,
            hardware="h100-sxm-80g"), then loss.backward() and prepared.optimizer.step();
            nothing set beforehand (prepare handles the allocator); --hardware plans with
            another preset or a `memtrain calibrate` YAML (predicted step times on measured
            rates)

bf16, batch 1, random tokens, AdamW lr 1e-5 (--optimizer another spec, built by memtrain.optim for
both kinds). Each row: peak torch.cuda.max_memory_allocated
over the last step, step time and tokens/s; memtrain rows add the plan's predicted GPU peak and
step time, and the activation modes the plan installed. --overrides KEY=VALUE change the preset
(for example dropout off: attention with dropout runs only whole-layer modes).

Examples:
  python -m benchmarks.bench_families_gpu --gpu-cap-gib 79.2 \\
      --runs stock@qwen3-1.7b@65536 memtrain@qwen3-1.7b@65536
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import traceback
from typing import Any

import torch

from benchmarks.harness import (
    GiB,
    cap_gpu_memory,
    parse_overrides,
    parser,
    release_memory,
    results_for,
)

STEPS = 3  # the last one is measured


def host_memory_gib() -> dict[str, float]:
    """This process's resident host memory now and at its high-water mark (pinned pools count
    once touched), from /proc/self/status; empty where that file is missing."""
    out: dict[str, float] = {}
    try:
        with open("/proc/self/status") as status:
            for line in status:
                key, _, value = line.partition(":")
                if key in ("VmRSS", "VmHWM"):
                    out[key] = int(value.split()[0]) * 1024 / GiB
    except OSError:
        return {}
    return out


def run_one(
    spec: str,
    cap_gib: float | None,
    overrides: dict[str, Any],
    optimizer_spec: str = "adamw",
    cpu: str | None = None,
    hardware: str = "h100-sxm-80g",
    gpu_budget: str | None = None,
    steps: int = STEPS,
) -> dict[str, Any]:
    """One run in this process; returns its row."""
    kind, preset, tokens = spec.split("@")
    seq = int(tokens)
    if kind == "stock":
        os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    import memtrain
    from memtrain.kernels import patch_causal_lm_loss
    from memtrain.models import build_causal_lm, load_config
    from memtrain.optim import build_optimizer

    row: dict[str, Any] = {"run": spec, "kind": kind, "model": preset, "seq": seq}
    row.update(cap_gpu_memory(cap_gib))
    config = load_config(preset)
    for key, value in overrides.items():
        setattr(config, key, value)
    row["overrides"] = overrides
    row["optimizer"] = optimizer_spec
    model = build_causal_lm(config, "bf16", "cuda")
    model.train()
    row["host_rss_before_gib"] = host_memory_gib().get("VmRSS")
    prepared = None
    try:
        if kind == "stock":
            model.config.use_cache = False
            model.gradient_checkpointing_enable({"use_reentrant": False})
            patch_causal_lm_loss(model)
            if optimizer_spec == "adamw":
                optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
            else:
                optimizer = build_optimizer(model, optimizer_spec, lr=1e-5)
        else:
            started = time.perf_counter()
            prepared = memtrain.prepare(
                model,
                seq=seq,
                hardware=hardware,
                lr=1e-5,
                optimizer=optimizer_spec,
                cpu=cpu,
                gpu_budget=gpu_budget,
            )
            row["prepare_s"] = round(time.perf_counter() - started, 1)
            optimizer = prepared.optimizer
            predicted = prepared.plan.predicted
            row["predicted_gpu_peak_gib"] = predicted["peak_bytes"]["gpu"] / GiB
            row["predicted_host_peak_gib"] = predicted["peak_bytes"].get("cpu", 0) / GiB
            row["predicted_step_s"] = predicted["step_time_s"]
            row["notes"] = list(prepared.notes)
        ids = torch.randint(0, config.vocab_size, (1, seq), device="cuda")
        for step in range(steps):
            torch.cuda.synchronize()
            if step == steps - 1:
                torch.cuda.reset_peak_memory_stats()
            started = time.perf_counter()
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            row["loss"] = loss.item()
            del loss
            torch.cuda.synchronize()
            seconds = time.perf_counter() - started
            print(f"  {spec} step {step}: {seconds:.2f} s", file=sys.stderr, flush=True)
        row.update(status="ok", step_s=seconds, tokens_per_s=seq / seconds)
        row["peak_gib"] = torch.cuda.max_memory_allocated() / GiB
        row["reserved_peak_gib"] = torch.cuda.max_memory_reserved() / GiB
        host = host_memory_gib()
        row["host_rss_peak_gib"] = host.get("VmHWM")
        if prepared is not None:
            stats = prepared.handle.stats() if prepared.handle is not None else {}
            modes = stats.get("modes", {})
            row["modes"] = {
                m: sum(1 for v in modes.values() if v == m) for m in set(modes.values())
            }
            row["attention_kernels"] = stats.get("attention_kernels")
            pools = stats.get("pools", {})
            row["host_pool_capacity_gib"] = sum(p["capacity"] for p in pools.values()) / GiB
            row["host_pool_high_water_gib"] = sum(p["high_water"] for p in pools.values()) / GiB
            if row.get("host_rss_before_gib") is not None and row["host_rss_peak_gib"]:
                row["host_added_gib"] = row["host_rss_peak_gib"] - row["host_rss_before_gib"]
            row["peak_vs_plan"] = row["peak_gib"] / row["predicted_gpu_peak_gib"] - 1
    except torch.OutOfMemoryError as exc:
        row["status"] = "out of memory"
        row["peak_gib"] = torch.cuda.max_memory_allocated() / GiB
        row["error"] = str(exc).split("\n")[0][:300]
    except Exception as exc:  # report it and go on with the other runs
        row["status"] = f"error: {type(exc).__name__}: {exc}"[:500]
        row["traceback"] = traceback.format_exc(limit=10)
    finally:
        if prepared is not None:
            prepared.remove()
        del model
        release_memory()
    return row


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--runs", nargs="+", required=True, help="KIND@PRESET@TOKENS ...")
    p.add_argument("--gpu-cap-gib", type=float, help="allocate at most this (79.2: an H100)")
    p.add_argument("--overrides", nargs="*", default=[], help="KEY=JSON config overrides")
    p.add_argument("--optimizer", default="adamw", help="optimizer spec, e.g. adamw8bit")
    p.add_argument("--cpu", help="memtrain runs: host memory to plan for, e.g. 100GiB")
    p.add_argument(
        "--hardware",
        default="h100-sxm-80g",
        help="memtrain runs: device preset or a `memtrain calibrate` YAML",
    )
    p.add_argument("--gpu-budget", help="memtrain runs: GPU memory to plan for, e.g. 80GB")
    p.add_argument("--steps", type=int, default=STEPS, help="steps per run; the last is measured")
    p.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    overrides = parse_overrides(args.overrides)
    if args.one:
        row = run_one(
            args.runs[0],
            args.gpu_cap_gib,
            overrides,
            args.optimizer,
            args.cpu,
            args.hardware,
            args.gpu_budget,
            args.steps,
        )
        print(json.dumps(row, default=str))
        return
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU")
    results = results_for("bench_families_gpu", args)
    for spec in args.runs:
        command = [sys.executable, "-m", "benchmarks.bench_families_gpu", "--one", "--runs", spec]
        if args.gpu_cap_gib:
            command += ["--gpu-cap-gib", str(args.gpu_cap_gib)]
        if args.overrides:
            command += ["--overrides", *args.overrides]
        command += ["--optimizer", args.optimizer, "--hardware", args.hardware]
        command += ["--cpu", args.cpu] if args.cpu else []
        command += ["--gpu-budget", args.gpu_budget] if args.gpu_budget else []
        command += ["--steps", str(args.steps)]
        done = subprocess.run(command, capture_output=True, text=True)
        sys.stderr.write(done.stderr[-3000:])
        lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
        row = json.loads(lines[-1]) if lines else {"run": spec, "status": f"exit {done.returncode}"}
        key = spec + ("|" + ",".join(args.overrides) if args.overrides else "")
        key += "" if args.optimizer == "adamw" else f"|{args.optimizer}"
        key += "" if args.hardware == "h100-sxm-80g" else "|calibrated"
        key += "" if args.cpu is None else f"|cpu={args.cpu}"
        results.write(key, **row)
        print(json.dumps({k: v for k, v in row.items() if k != "traceback"}, default=str))
        if "traceback" in row:
            print(row["traceback"])


if __name__ == "__main__":
    main()
