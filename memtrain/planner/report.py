"""The plan report every front door prints: decisions per layer, peaks, time, baselines."""

from __future__ import annotations

from dataclasses import replace
from itertools import groupby
from typing import Any

from memtrain.planner.plan import Plan
from memtrain.units import format_bytes


def print_plan(plan: Plan, console=None) -> None:
    """Print :func:`plan_report` (to a wide console by default)."""
    from memtrain.profile.report import wide_console

    console = console or wide_console()
    for part in plan_report(plan):
        console.print(part)


def plan_report(plan: Plan) -> list[Any]:
    """Rich renderables: decisions (identical neighbours collapsed), peaks, time, baselines."""
    from rich.table import Table

    parts: list[Any] = []
    split = plan.parallelism
    if split:
        parts.append(
            f"[bold]per GPU[/bold]: one rank of {split['world_size']} (ZeRO stage "
            f"{split['zero_stage']}, sequence parallel {split['sequence_parallel']}, data "
            f"parallel {split['data_parallel']}); {split['seq_per_rank']:,} of {split['seq']:,} "
            f"tokens per GPU; every figure below is per GPU; ZeRO buffers "
            f"{format_bytes(split['comm_buffer_bytes'])} reserved; predicted GPU peak with them "
            f"{format_bytes(split['gpu_peak_bytes'])}; cluster "
            f"{split['cluster_tokens_per_s']:,.0f} tokens/s"
        )
    table = Table(
        title=f"Plan: {plan.model}, {plan.seq} tokens x {plan.micro_batch}, "
        f"{plan.optimizer}, fused loss {'on' if plan.fused_loss else 'off'}, "
        f"{plan.chunks} chunk(s) per block"
    )
    for column in ("layers", "keep", "swap", "recompute", "input kept at", "states"):
        table.add_column(column)
    # neighbours that differ only in name, gradients and byte counts share a row
    blank = {"name": "", "grads": "", "token_saved_bytes": 0, "input_checkpoint_bytes": 0}
    for _, rows in groupby(plan.layers, key=lambda layer: replace(layer, **blank)):
        first, *rest = rows
        name = first.name + (f" .. {rest[-1].name} (x{1 + len(rest)})" if rest else "")
        swap = ", ".join(f"{t} {v:.0%}" for t, v in first.swap.items() if v > 5e-4) or "-"
        recompute = f"{first.recompute:.0%}" + (" (full)" if first.full_recompute else "")
        checkpoint = ", ".join(f"{t} {v:.0%}" for t, v in first.input_checkpoint.items()) or "-"
        moved = first.optimizer != "gpu"
        states = f"params {first.params}, optimizer {first.optimizer}" if moved else "gpu"
        table.add_row(name, f"{first.keep:.0%}", swap, recompute, checkpoint, states)
    parts.append(table)

    table = Table(title="Predicted step (this plan vs baselines priced by the same model)")
    tiers = list(plan.hardware["usable_bytes"])
    for column in ("", "fits", *[f"{t} peak" for t in tiers], "step time", "tokens/s"):
        table.add_column(column)

    def add(name: str, figures: dict) -> None:
        peaks = figures["peak_bytes"]
        table.add_row(
            name,
            "yes" if figures["feasible"] else "no",
            *[format_bytes(peaks.get(t, 0)) for t in tiers],
            f"{figures['step_time_s']:.3f} s",
            f"{figures['tokens_per_s']:,.0f}",
        )

    add("plan", plan.predicted)
    labels = {
        "no_checkpointing": "no checkpointing",
        "full_checkpointing": "full ckpt",
        "full_checkpointing_zero_offload": "full ckpt + ZeRO-Offload",
    }
    for name, figures in plan.baselines.items():
        add(labels.get(name, name), figures)
    table.add_row(
        "usable", "", *[format_bytes(plan.hardware["usable_bytes"][t]) for t in tiers], "", ""
    )
    parts.append(table)
    p = plan.predicted
    solver = plan.solver
    parts.append(
        f"step {p['step_time_s']:.3f} s = compute {p['compute_s']:.3f} s + exposed transfers "
        f"{p['exposed_transfer_s']:.3f} s + optimizer tail {p['optimizer_tail_s']:.3f} s; "
        f"GPU peak at {p['peak_at'].get('gpu')}"
    )
    parts.append(
        f"solved by {solver['solver']} ({solver['method']}) in {solver['solve_time_s']:.2f} s, "
        f"optimality gap {solver['gap']:.2e}"
    )
    parts.extend(f"- {note}" for note in plan.notes)
    return parts
