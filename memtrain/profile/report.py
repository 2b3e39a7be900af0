"""Human-facing views of a profile: a per-layer table, a summary, and memory plots."""

from __future__ import annotations

import io
from pathlib import Path

from rich.console import Console
from rich.table import Table

from memtrain.profile.result import LayerProfile, ProfileResult
from memtrain.units import format_bytes, short_bytes


def _signature(layer: LayerProfile) -> tuple:
    """Layers with equal costs collapse into one row (identical transformer blocks)."""
    return (
        layer.kind,
        layer.param_bytes,
        layer.grad_bytes,
        layer.optimizer_state_bytes,
        layer.saved_bytes,
        layer.forward_transient_bytes,
        layer.backward_transient_bytes,
        round(layer.forward_flops),
        round(layer.backward_flops),
    )


def collapse_layers(layers: list[LayerProfile]) -> list[tuple[str, int, LayerProfile]]:
    """Group consecutive layers with equal costs: ``(label, count, representative)``."""
    groups: list[tuple[str, int, LayerProfile]] = []
    for layer in layers:
        if (
            groups
            and groups[-1][2].kind == "block"
            and _signature(groups[-1][2]) == _signature(layer)
        ):
            label, count, rep = groups[-1]
            first = label.split("..")[0]
            prefix, _, _ = first.rpartition(".")
            last = (
                layer.name[len(prefix) + 1 :] if layer.name.startswith(prefix + ".") else layer.name
            )
            groups[-1] = (f"{first}..{last}", count + 1, rep)
        else:
            groups.append((layer.name, 1, layer))
    return groups


def layer_table(result: ProfileResult, collapse: bool = True) -> Table:
    timed = "ms" if result.mode == "measured" else "ms (est.)"
    table = Table(title=f"{result.model}: per-layer cost of one step ({result.mode})")
    for column in (
        "layer",
        "params",
        "grads",
        "opt st.",
        "saved",
        "#saved",
        "fwd tr.",
        "bwd tr.",
        "fwd GFLOP",
        "bwd GFLOP",
        f"fwd {timed}",
        f"bwd {timed}",
    ):
        table.add_column(column, justify="left" if column == "layer" else "right")
    rows = collapse_layers(result.layers) if collapse else [(x.name, 1, x) for x in result.layers]
    for label, count, layer in rows:
        times = f" x{count}" if count > 1 else ""
        table.add_row(
            label + times,
            short_bytes(layer.param_bytes),
            short_bytes(layer.grad_bytes),
            short_bytes(layer.optimizer_state_bytes),
            short_bytes(layer.saved_bytes),
            str(len(layer.saved_tensors)),
            short_bytes(layer.forward_transient_bytes),
            short_bytes(layer.backward_transient_bytes),
            f"{layer.forward_flops / 1e9:,.1f}",
            f"{layer.backward_flops / 1e9:,.1f}",
            f"{layer.forward_time_s * 1e3:,.2f}",
            f"{layer.backward_time_s * 1e3:,.2f}",
        )
    return table


def summary_table(result: ProfileResult, capacity_bytes: int | None = None) -> Table:
    table = Table(title="Step totals", show_header=False)
    table.add_column("what")
    table.add_column("value", justify="right")
    tokens = result.batch * result.seq
    rows = [
        ("model / parameters", f"{result.model} / {result.param_count / 1e9:.3f} B"),
        ("batch x sequence", f"{result.batch} x {result.seq:,} ({result.dtype})"),
        ("optimizer", result.optimizer),
        ("weights", format_bytes(result.param_bytes)),
        ("gradients", format_bytes(result.grad_bytes)),
        ("optimizer states", format_bytes(result.optimizer_state_bytes)),
        ("activations saved for backward", format_bytes(result.saved_bytes)),
        ("largest transient", format_bytes(result.largest_transient_bytes)),
        (
            "peak, upper bound (sum of the above)",
            format_bytes(result.predicted_peak_bytes),
        ),
    ]
    if result.simulated_peak_bytes is not None:
        label = "peak, simulated step" if result.mode == "dry-run" else "peak, tracked step"
        rows.append((label, format_bytes(result.simulated_peak_bytes)))
    if result.measured_peak_bytes is not None:
        rows.append(
            ("peak, measured (max_memory_allocated)", format_bytes(result.measured_peak_bytes))
        )
    kind = "estimated" if result.mode == "dry-run" else "measured"
    rows.append((f"step time ({kind})", f"{result.step_time_s * 1e3:,.1f} ms"))
    rows.append(("tokens / s", f"{tokens / max(result.step_time_s, 1e-12):,.0f}"))
    if capacity_bytes:
        peak = (
            result.measured_peak_bytes or result.simulated_peak_bytes or result.predicted_peak_bytes
        )
        verdict = "fits" if peak <= capacity_bytes else "does NOT fit"
        rows.append((f"on {result.target} ({format_bytes(capacity_bytes)})", verdict))
    for what, value in rows:
        table.add_row(what, value)
    return table


def wide_console(stderr: bool = False) -> Console:
    """A console that does not squeeze tables to 80 columns when output is not a terminal."""
    console = Console(stderr=stderr)
    if not console.is_terminal:
        console = Console(stderr=stderr, width=140)
    return console


def print_report(
    result: ProfileResult,
    console: Console | None = None,
    collapse: bool = True,
    capacity_bytes: int | None = None,
) -> None:
    console = console or wide_console()
    console.print(layer_table(result, collapse))
    console.print(summary_table(result, capacity_bytes))
    for note in result.notes:
        console.print(f"[dim]note: {note}[/dim]")


def _figure(result: ProfileResult):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    gib = 2**30
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(11, 8))
    names = [layer.name for layer in result.layers]
    x = range(len(names))
    parts = [
        ("weights", [layer.param_bytes / gib for layer in result.layers]),
        ("gradients", [layer.grad_bytes / gib for layer in result.layers]),
        ("optimizer states", [layer.optimizer_state_bytes / gib for layer in result.layers]),
        ("saved activations", [layer.saved_bytes / gib for layer in result.layers]),
    ]
    bottom_acc = [0.0] * len(names)
    for label, values in parts:
        top.bar(x, values, bottom=bottom_acc, label=label)
        bottom_acc = [a + b for a, b in zip(bottom_acc, values, strict=True)]
    top.set_xticks(list(x))
    top.set_xticklabels(names, rotation=90, fontsize=6)
    top.set_ylabel("GiB")
    top.set_title(f"{result.model}, {result.batch}x{result.seq} tokens: memory per layer")
    top.legend(fontsize=8)
    live = [p.live_bytes / gib for p in result.timeline]
    bottom.plot(range(len(live)), live, drawstyle="steps-post")
    phases = [p.phase for p in result.timeline]
    for phase in ("backward", "optimizer"):
        if phase in phases:
            bottom.axvline(phases.index(phase), color="grey", linestyle="--")
            bottom.text(phases.index(phase), max(live or [0]) * 0.02, f" {phase}", fontsize=8)
    bottom.set_ylabel("live GiB")
    bottom.set_xlabel("layer boundaries over the step (forward, then backward)")
    source = "simulated" if result.mode == "dry-run" else "measured"
    bottom.set_title(f"device memory over the step ({source})")
    fig.tight_layout()
    return fig


def write_plot(result: ProfileResult, path: str | Path) -> Path:
    """Write memory per layer and over the step as PNG (``.png``) or a self-contained ``.html``."""
    from memtrain.figures import plot_path, save_figure

    path = plot_path(path)
    console = Console(record=True, width=160, file=io.StringIO())
    print_report(result, console)
    tables = console.export_html(inline_styles=True, code_format="{code}")
    return save_figure(
        _figure(result),
        path,
        f"memtrain profile: {result.model}, {result.batch}x{result.seq}",
        f"<pre style='font-family:monospace'>{tables}</pre>",
    )
