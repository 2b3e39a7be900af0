"""Planner benchmark: solve time and optimality gap, and the long-sequence plans of the issue.

Run:  python benchmarks/bench_planner.py [--out planner.json]

Part 1 times the placement solve (PuLP + CBC, or HiGHS when installed) for a 32-block model
(Llama-3.1-8B) and an 80-block model (Llama-3.1-70B), each with the identical-layer reduction
(the default) and without it, and for synthetic models whose blocks all differ. The gap is
(predicted step time - LP lower bound) / predicted step time.
Part 2 plans the 1.2B Llama-style model (llama-3.2-1b) at 262144, 524288 and 1048576 tokens
and Llama-3.1-8B at 524288 tokens (ALST's 500K case) on one H100 80 GB with 128 GiB of host
memory, and prints predicted peaks, step time and tokens/s next to the baselines.
All profiles are dry runs on meta tensors; times are the profiler's roofline estimates.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

from memtrain.errors import MemtrainError
from memtrain.hardware import build_hardware
from memtrain.planner import PlanInfeasible, PlanOptions, make_plan
from memtrain.planner.costmodel import available_modes
from memtrain.planner.problem import build_problem
from memtrain.planner.solve import solve, solver_name
from memtrain.planner.synthetic import synthetic_profile
from memtrain.profile import profile_causal_lm
from memtrain.units import GiB


def machine() -> str:
    return (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {platform.system()}"
    )


def solve_case(label: str, profile, hardware, tie: bool) -> dict:
    problem = build_problem(profile, fused_loss=True)
    started = time.perf_counter()
    result = solve(problem, hardware, available_modes(hardware), tie_identical=tie)
    elapsed = time.perf_counter() - started
    row = {
        "case": label,
        "layers": len(problem.layers),
        "identical_layer_reduction": tie,
        "feasible": result.feasible,
        "solve_s": round(elapsed, 3),
        "gap": result.gap,
        "method": result.method,
        "solver_calls": result.solver_calls,
        "chunks": result.chunks,
    }
    if result.evaluation is not None:
        row["step_time_s"] = result.evaluation.step_time_s
    print(
        f"{label:44s} layers {row['layers']:3d}  reduction {'on ' if tie else 'off'}  "
        f"solve {elapsed:6.2f} s  gap {result.gap:.2e}  {result.method} "
        f"({result.solver_calls} solver calls)"
    )
    return row


def plan_case(label: str, model: str, seq: int, cpu: str, nvme: str | None = None) -> dict:
    profile = profile_causal_lm(model, seq=seq, target="h100-sxm-80g")
    hardware = build_hardware("h100-sxm-80g", cpu=cpu, nvme=nvme)
    row: dict = {"case": label, "model": model, "seq": seq, "cpu": cpu, "nvme": nvme}
    try:
        plan = make_plan(profile, hardware, PlanOptions())
    except PlanInfeasible as exc:
        row.update(feasible=False, message=str(exc), minimum_gpu_bytes=exc.minimum_bytes)
        print(f"{label}: {exc}")
        return row
    p = plan.predicted
    row.update(
        feasible=True,
        chunks=plan.chunks,
        peak_gib={t: round(v / GiB, 2) for t, v in p["peak_bytes"].items()},
        step_time_s=round(p["step_time_s"], 3),
        tokens_per_s=round(p["tokens_per_s"]),
        solve_s=plan.solver["solve_time_s"],
        gap=plan.solver["gap"],
        baselines={
            name: {
                "feasible": b["feasible"],
                "gpu_peak_gib": round(b["peak_bytes"]["gpu"] / GiB, 2),
                "tokens_per_s": round(b["tokens_per_s"]),
            }
            for name, b in plan.baselines.items()
        },
    )
    blocks = [layer for layer in plan.layers if layer["kind"] == "block"]
    row["mean_block"] = {
        "keep": round(sum(b["keep"] for b in blocks) / len(blocks), 3),
        "swap_cpu": round(sum(b["swap"]["cpu"] for b in blocks) / len(blocks), 3),
        "swap_nvme": round(sum(b["swap"]["nvme"] for b in blocks) / len(blocks), 3),
        "recompute": round(sum(b["recompute"] for b in blocks) / len(blocks), 3),
        "states_offloaded": sum(b["optimizer"] != "gpu" for b in blocks),
    }
    peaks = ", ".join(f"{t} {v:.1f} GiB" for t, v in row["peak_gib"].items())
    base = "; ".join(
        f"{name}: {'fits' if b['feasible'] else 'OOM'} at {b['gpu_peak_gib']:.1f} GiB"
        for name, b in row["baselines"].items()
    )
    print(
        f"{label}: fits; {peaks}; step {row['step_time_s']:.1f} s, "
        f"{row['tokens_per_s']:,} tokens/s; {row['chunks']} chunks/block; "
        f"blocks on average {row['mean_block']}\n    baselines: {base}"
    )
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="write results as JSON")
    args = parser.parse_args()
    print(f"machine: {machine()}; solver: {solver_name()}")
    print("command: python benchmarks/bench_planner.py\n")
    results: dict = {"machine": machine(), "solver": solver_name(), "solve": [], "plans": []}

    print("Part 1: solve time and optimality gap (H100 80 GB)")
    h100 = build_hardware("h100-sxm-80g", cpu="128GiB")
    big_host = build_hardware("h100-sxm-80g", cpu="2TiB")
    eight = profile_causal_lm("llama-3.1-8b", seq=131072, target="h100-sxm-80g")
    seventy = profile_causal_lm("llama-3.1-70b", seq=32768, target="h100-sxm-80g")
    for tie in (True, False):
        results["solve"].append(
            solve_case("llama-3.1-8b, 131072 tokens, 128 GiB host", eight, h100, tie)
        )
        results["solve"].append(
            solve_case("llama-3.1-70b, 32768 tokens, 2 TiB host", seventy, big_host, tie)
        )
    for n, seq, hidden, inter in ((32, 131072, 4096, 14336), (80, 32768, 8192, 28672)):
        distinct = synthetic_profile(
            layers=n, hidden=hidden, intermediate=inter, seq=seq, distinct_blocks=True
        )
        host = h100 if n == 32 else big_host
        results["solve"].append(
            solve_case(f"synthetic, {n} distinct blocks, {seq} tokens", distinct, host, True)
        )

    print("\nPart 2: plans on one H100 80 GB")
    for seq in (262144, 524288, 1048576):
        results["plans"].append(
            plan_case(f"llama-3.2-1b (1.2B) at {seq}, 128 GiB host", "llama-3.2-1b", seq, "128GiB")
        )
    results["plans"].append(
        plan_case("llama-3.1-8b at 524288, 128 GiB host", "llama-3.1-8b", 524288, "128GiB")
    )
    results["plans"].append(
        plan_case("llama-3.1-8b at 524288, 256 GiB host", "llama-3.1-8b", 524288, "256GiB")
    )
    results["plans"].append(
        plan_case(
            "llama-3.1-8b at 524288, 128 GiB host + 2 TB NVMe",
            "llama-3.1-8b",
            524288,
            "128GiB",
            nvme="/tmp:2TB",
        )
    )
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(results, fh, indent=1)


if __name__ == "__main__":
    try:
        main()
    except MemtrainError as exc:
        raise SystemExit(f"bench_planner: {exc}") from None
