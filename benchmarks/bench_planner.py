"""The planner: solve time and optimality gap, plans at long context, and its memory model
against GPU measurements.

solve   times the placement solve (PuLP + CBC, or HiGHS when installed) for Llama-3.1-8B (32
        blocks) and Llama-3.1-70B (80 blocks), with the identical-layer reduction and without,
        and for synthetic models whose blocks all differ. Gap = (predicted step time - LP
        lower bound) / predicted step time.
plans   plans the 1.2B llama-3.2-1b at 262144-1048576 tokens and Llama-3.1-8B at 524288-1048576 on one
        H100 80 GB, with the baselines priced by the same model.
reprice prices the exact decisions that ran on a GPU (benchmarks/data/measured_plans_*.json:
        decisions, profile, measured step peak and per-moment GPU bytes) with the current cost
        model, beside what was measured: a check of the memory model that needs no GPU.
Profiles are dry runs on meta tensors; times are the profiler's roofline estimates. A case is
MODEL:TOKENS[:HOST] (MODEL a preset or a config.json; HOST like 128GiB).

Example: python -m benchmarks.bench_planner --parts solve plans reprice
"""

from __future__ import annotations

import json
import time
from typing import Any

from benchmarks.harness import DATA, GiB, parser, results_for
from memtrain.errors import MemtrainError
from memtrain.hardware import build_hardware
from memtrain.hardware.tiers import load_hardware
from memtrain.planner import PlanInfeasible, PlanOptions, make_plan
from memtrain.planner.costmodel import available_modes
from memtrain.planner.evaluate import LayerDecision, evaluate
from memtrain.planner.problem import build_problem
from memtrain.planner.solve import solve, solver_name
from memtrain.planner.synthetic import synthetic_profile
from memtrain.profile import profile_causal_lm
from memtrain.profile.result import ProfileResult

MEASURED = DATA / "measured_plans_h100_2026-11-25.json"
SOLVE_CASES = ["llama-3.1-8b:131072:128GiB", "llama-3.1-70b:32768:2TiB"]
SYNTHETIC = ((32, 131072, 4096, 14336, "128GiB"), (80, 32768, 8192, 28672, "2TiB"))
PLAN_CASES = [
    "llama-3.2-1b:262144:128GiB",
    "llama-3.2-1b:524288:128GiB",
    "llama-3.2-1b:1048576:128GiB",
    "llama-3.1-8b:524288:128GiB",
    "llama-3.1-8b:524288:256GiB",
    "llama-3.1-8b:524288:128GiB:/tmp:2TB",
    "llama-3.1-8b:1048576:128GiB:/tmp:4TB",
]


def parse_case(case: str) -> tuple[str, int, str, str | None]:
    model, seq, host, *nvme = case.split(":", 3)
    return model, int(seq), host, nvme[0] if nvme else None


def solve_case(profile, hardware, tie: bool) -> dict[str, Any]:
    problem = build_problem(profile, fused_loss=True)
    started = time.perf_counter()
    result = solve(problem, hardware, available_modes(hardware), tie_identical=tie)
    row = {
        "layers": len(problem.layers),
        "identical_layer_reduction": tie,
        "feasible": result.feasible,
        "solve_s": round(time.perf_counter() - started, 3),
        "gap": result.gap,
        "method": result.method,
        "solver_calls": result.solver_calls,
        "chunks": result.chunks,
        "solver": solver_name(),
    }
    if result.evaluation is not None:
        row["step_time_s"] = result.evaluation.step_time_s
    return row


def solve_part(results, cases: list[str], synthetic: bool) -> None:
    work = []
    for case in cases:
        model, seq, host, _ = parse_case(case)
        profile = profile_causal_lm(model, seq=seq, target="h100-sxm-80g")
        work += [(f"{case}/reduction {'on' if t else 'off'}", profile, host, t) for t in (1, 0)]
    for n, seq, hidden, inter, host in SYNTHETIC if synthetic else ():
        profile = synthetic_profile(
            layers=n, hidden=hidden, intermediate=inter, seq=seq, distinct_blocks=True
        )
        work.append((f"synthetic {n} distinct blocks:{seq}:{host}", profile, host, True))
    for key, profile, host, tie in work:
        row = solve_case(profile, build_hardware("h100-sxm-80g", cpu=host), bool(tie))
        results.write(f"solve/{key}", **row)
        print(f"{key:52s} solve {row['solve_s']:6.2f} s  gap {row['gap']:.2e}  {row['method']}")


def plan_case(case: str) -> dict[str, Any]:
    model, seq, host, nvme = parse_case(case)
    profile = profile_causal_lm(model, seq=seq, target="h100-sxm-80g")
    hardware = build_hardware("h100-sxm-80g", cpu=host, nvme=nvme)
    row: dict[str, Any] = {"model": model, "seq": seq, "cpu": host, "nvme": nvme}
    try:
        plan = make_plan(profile, hardware, PlanOptions())
    except PlanInfeasible as exc:
        return {
            **row,
            "feasible": False,
            "message": str(exc),
            "minimum_gpu_bytes": exc.minimum_bytes,
        }
    p = plan.predicted
    blocks = [layer for layer in plan.layers if layer.kind == "block"]
    return {
        **row,
        "feasible": True,
        "chunks": plan.chunks,
        "peak_gib": {t: round(v / GiB, 2) for t, v in p["peak_bytes"].items()},
        "step_time_s": round(p["step_time_s"], 3),
        "tokens_per_s": round(p["tokens_per_s"]),
        "solve_s": plan.solver["solve_time_s"],
        "gap": plan.solver["gap"],
        "baselines": {
            name: {
                "feasible": b["feasible"],
                "gpu_peak_gib": round(b["peak_bytes"]["gpu"] / GiB, 2),
                "tokens_per_s": round(b["tokens_per_s"]),
            }
            for name, b in plan.baselines.items()
        },
        "mean_block": {
            "keep": round(sum(b.keep for b in blocks) / len(blocks), 3),
            "swap_cpu": round(sum(b.swap["cpu"] for b in blocks) / len(blocks), 3),
            "recompute": round(sum(b.recompute for b in blocks) / len(blocks), 3),
            "states_offloaded": sum(b.optimizer != "gpu" for b in blocks),
        },
    }


def reprice(key: str, item: dict[str, Any], host_gib: float = 80.0) -> dict[str, Any]:
    """The decisions of one measured plan priced with the current cost model."""
    profile = ProfileResult.from_dict(item["profile"])
    problem = build_problem(profile, fused_loss=True, always_store_ops=("flash",))
    hardware = load_hardware("h100-sxm-80g", cpu=f"{host_gib}GiB")
    decisions = [LayerDecision(**d) for d in item["decisions"]]
    evaluation = evaluate(problem, hardware, decisions, item["chunks"])
    predicted = dict(evaluation.gpu_moments)
    row = {
        "plan": key,
        "predicted_peak_gib": round(evaluation.peaks["gpu"] / GiB, 2),
        "predicted_peak_at": evaluation.binding["gpu"],
        "measured_peak_gib": item.get("measured_peak_gib"),
        "measured_status": item.get("measured_status", "ok"),
    }
    moments = item.get("measured_moments") or []
    errors = [
        abs(predicted[m["moment"]] / GiB - m["measured_gib"])
        for m in moments
        if m["measured_gib"] is not None and m["moment"] in predicted
    ]
    if errors:
        row["mean_abs_error_gib"] = round(sum(errors) / len(errors), 2)
        row["moments_compared"] = len(errors)
    return row


def measured_plans(path=MEASURED) -> dict[str, Any]:
    return json.loads(path.read_text())["plans"]


def main() -> None:
    p = parser(__doc__)
    p.add_argument(
        "--parts",
        nargs="+",
        choices=["solve", "plans", "reprice"],
        default=["solve", "plans", "reprice"],
    )
    p.add_argument("--solve-cases", nargs="*", default=SOLVE_CASES)
    p.add_argument("--no-synthetic", action="store_true", help="skip the synthetic solve cases")
    p.add_argument("--plan-cases", nargs="*", default=PLAN_CASES)
    p.add_argument("--measured", default=str(MEASURED), help="decisions that ran on a GPU")
    args = p.parse_args()
    results = results_for("bench_planner", args, device="cpu")
    print(f"{results.environment}; solver {solver_name()}")
    if "solve" in args.parts:
        solve_part(results, args.solve_cases, not args.no_synthetic)
    for case in args.plan_cases if "plans" in args.parts else ():
        row = results.write(f"plan/{case}", **plan_case(case))
        summary = row.get("peak_gib") or row.get("message")
        print(f"{case}: {summary}, {row.get('tokens_per_s', '-')} tokens/s")
    if "reprice" in args.parts:
        from pathlib import Path

        for key, item in measured_plans(Path(args.measured)).items():
            row = results.write(f"reprice/{key}", **reprice(key, item))
            print(f"reprice {key}: predicted {row['predicted_peak_gib']} GiB, measured "
                  f"{row['measured_peak_gib']} GiB, mean |error| {row.get('mean_abs_error_gib')}")  # fmt: skip
    print(f"wrote {results.path}")


if __name__ == "__main__":
    try:
        main()
    except MemtrainError as exc:
        raise SystemExit(f"bench_planner: {exc}") from None
