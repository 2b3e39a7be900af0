"""Price the exact decisions that ran on a GPU with the current cost model, beside what was
measured: a check of the memory model that needs no GPU.

A plan's decisions are stored with its profile (``benchmarks/results/measured_plan_decisions_*``)
and each measured run with its per-moment GPU bytes (``diag_offload_memory_*``) or its step
peak. A change to the cost model is judged here against the same measurements, without
re-running anything on the device.

Run:  python benchmarks/reprice_measured_plans.py
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from memtrain.hardware.tiers import load_hardware  # noqa: E402
from memtrain.planner.evaluate import LayerDecision, evaluate  # noqa: E402
from memtrain.planner.problem import build_problem  # noqa: E402
from memtrain.profile.result import ProfileResult  # noqa: E402

GiB = 2**30
RESULTS = ROOT / "benchmarks" / "results"
DECISIONS = RESULTS / "measured_plan_decisions_h100_2026-11-25.json"
# plan key -> (per-moment measurement file or None, measured step peak in GiB or None)
MEASURED = {
    "65536": ("diag_offload_memory_65536_h100_2026-11-25.json", 71.99),
    "262144": (None, 72.37),
    "524288": (None, None),  # ran out of memory at 77.69 GiB
    "1048576:1": ("diag_offload_memory_1048576_1layer_h100_2026-11-25.json", 67.24),
}


def reprice(key: str, item: dict, host_gib: float) -> dict:
    profile = ProfileResult.from_dict(item["profile"])
    problem = build_problem(profile, fused_loss=True, always_store_ops=("flash",))
    hardware = load_hardware("h100-sxm-80g", cpu=f"{host_gib}GiB")
    decisions = [LayerDecision(**d) for d in item["decisions"]]
    evaluation = evaluate(problem, hardware, decisions, item["chunks"])
    predicted = dict(evaluation.gpu_moments)
    measurement, peak = MEASURED.get(key, (None, None))
    row = {
        "plan": key,
        "predicted_peak_gib": round(evaluation.peaks["gpu"] / GiB, 2),
        "predicted_peak_at": evaluation.binding["gpu"],
        "measured_peak_gib": peak,
    }
    if measurement:
        moments = json.loads((RESULTS / measurement).read_text())["moments"]
        errors = [
            abs(predicted[m["moment"]] / GiB - m["measured_gib"])
            for m in moments
            if m["measured_gib"] is not None and m["moment"] in predicted
        ]
        row["mean_abs_error_gib"] = round(sum(errors) / len(errors), 2)
        row["moments_compared"] = len(errors)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--decisions", default=str(DECISIONS))
    parser.add_argument("--host-gib", type=float, default=80.0)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    stored = json.loads(Path(args.decisions).read_text())["plans"]
    rows = [reprice(key, item, args.host_gib) for key, item in stored.items()]
    if args.json:
        print(json.dumps(rows, indent=1))
        return
    print(f"{'plan':>10s} {'predicted':>10s} {'measured':>9s} {'per-moment |error|':>19s}  peak at")
    for row in rows:
        measured = "-" if row["measured_peak_gib"] is None else f"{row['measured_peak_gib']:.2f}"
        error = f"{row['mean_abs_error_gib']:.2f} GiB" if "mean_abs_error_gib" in row else "-"
        print(
            f"{row['plan']:>10s} {row['predicted_peak_gib']:>10.2f} {measured:>9s} "
            f"{error:>19s}  {row['predicted_peak_at']}"
        )


if __name__ == "__main__":
    main()
