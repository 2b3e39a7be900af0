"""Draw a plan's predicted GPU memory at every moment of the step, optionally beside a
measured step (``python -m benchmarks.bench_offload_gpu --moments --plot DIR`` writes one), as PNG
or HTML.

People read a memory plan faster as a curve than as a table: where it peaks, how close it runs
to the budget, and, with a measurement, where the prediction and the device part ways.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from memtrain.errors import MemtrainError

GiB = 2**30


def step_order(moments: list[tuple[str, float]]) -> list[tuple[str, float]]:
    """Moments in the order a step visits them: every forward, the backwards in reverse, then
    the optimizer step (plans list them layer by layer)."""
    forward = [m for m in moments if m[0].startswith("forward ")]
    backward = [m for m in moments if m[0].startswith("backward ")]
    rest = [m for m in moments if not m[0].startswith(("forward ", "backward "))]
    return forward + backward[::-1] + rest


def _moments(plan: Mapping[str, Any]) -> list[tuple[str, float]]:
    moments = plan.get("predicted", {}).get("gpu_moments")
    if not moments:
        raise MemtrainError(
            "this plan lists no per-moment GPU memory (made by an older memtrain); re-plan"
        )
    return step_order([(str(name), float(value)) for name, value in moments])


def _figure(plan: Mapping[str, Any], measured: Mapping[str, float] | None):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    moments = _moments(plan)
    names = [name for name, _ in moments]
    fig, axis = plt.subplots(figsize=(max(8.0, 0.18 * len(names) + 3), 5))
    x = list(range(len(names)))
    axis.plot(x, [v / GiB for _, v in moments], marker=".", label="plan's prediction")
    if measured:
        points = [(i, measured[n] / GiB) for i, n in enumerate(names) if n in measured]
        if points:
            axis.plot(*zip(*points, strict=True), marker="x", linestyle="--", label="measured")
    usable = plan.get("hardware", {}).get("usable_bytes", {}).get("gpu")
    if usable:
        axis.axhline(usable / GiB, color="red", linewidth=1, label="GPU memory the plan may use")
    colours = iter(f"C{i}" for i in range(2, 10))
    for name, baseline in plan.get("baselines", {}).items():
        peak = baseline.get("peak_bytes", {}).get("gpu")
        if peak and (not usable or peak < 2 * usable):
            label = f"baseline: {name.replace('_', ' ')} (peak)"
            axis.axhline(peak / GiB, color=next(colours, "grey"), linestyle=":", label=label)
    axis.set_xticks(x)
    axis.set_xticklabels(names, rotation=90, fontsize=6)
    axis.set_ylabel("GiB")
    axis.set_title(
        f"{plan.get('model')}, {plan.get('micro_batch', 1)} x {plan.get('seq')} tokens: "
        "GPU memory at every moment of a step"
    )
    axis.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    return fig


def write_plan_plot(
    plan: Mapping[str, Any], path: str | Path, measured: Mapping[str, float] | None = None
) -> Path:
    """Write the plan's memory curve (and ``measured`` bytes per moment) to ``.png``/``.html``."""
    from memtrain.figures import plot_path, save_figure

    path = plot_path(path)
    title = f"memtrain plan: {plan.get('model')}, {plan.get('seq')} tokens"
    return save_figure(_figure(plan, measured), path, title)


def measured_moments(diagnostic: Mapping[str, Any]) -> dict[str, float]:
    """Bytes per moment from a ``bench_offload_gpu --moments`` result (its rows are in GiB)."""
    rows = diagnostic.get("moments")
    if not isinstance(rows, list):
        raise MemtrainError(
            "--measured expects the JSON that bench_offload_gpu --moments --plot writes"
        )
    return {
        row["moment"]: row["measured_gib"] * GiB
        for row in rows
        if row.get("measured_gib") is not None
    }
