"""``memtrain plan``: where every byte of a training step goes, and what that buys.

Runs a dry-run profile of ``--model`` at ``--seq`` (or reads ``--profile``), solves the placement
problem for ``--hardware`` with the given host tiers and prints per-layer decisions, predicted
peaks, step time and tokens/s next to the baselines. ``--out`` writes the plan the executors read.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

NAME = "plan"
HELP = "plan keep/swap/recompute and state placement per layer across GPU, CPU, CXL, NVMe"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group()
    source.add_argument(
        "--model", default=None, help="preset name or config.json (dry-run profiled first)"
    )
    source.add_argument("--profile", default=None, help="a profile JSON from `memtrain profile`")
    parser.add_argument("--seq", type=int, default=4096, help="sequence length (with --model)")
    parser.add_argument(
        "--batch",
        "--micro-batch",
        default="1",
        help="micro-batch size (with --model); a list such as 1,2,4 plans each and keeps the "
        "fastest",
    )
    parser.add_argument("--dtype", default="bf16", help="bf16 | fp16 | fp32 (with --model)")
    parser.add_argument(
        "--optimizer",
        nargs="+",
        default=["adamw"],
        help="optimizer and options, e.g. adamw, galore:rank=512, frugal:density=0.25; several "
        "(with --model) are each planned and the fastest kept",
    )
    parser.add_argument(
        "--hardware",
        default="h100-sxm-80g",
        help="device preset (see `memtrain presets`) or a YAML from `memtrain calibrate`",
    )
    parser.add_argument("--gpu-budget", default=None, help="GPU memory to plan for, e.g. 70GiB")
    parser.add_argument("--cpu", default=None, help="pinned host memory to use (default 128GiB)")
    parser.add_argument("--cxl", default=None, help="CXL memory to use, e.g. 256GiB")
    parser.add_argument("--nvme", default=None, help="NVMe swap as PATH:SIZE, e.g. /mnt/nvme:2TB")
    parser.add_argument(
        "--fused-loss",
        choices=("auto", "on", "off"),
        default="auto",
        help="fused linear cross-entropy (never stores logits); auto = on when there is a head",
    )
    parser.add_argument(
        "--no-state-offload",
        action="store_true",
        help="keep parameters, gradients and optimizer states on the GPU",
    )
    parser.add_argument(
        "--chunks",
        default=None,
        help="sequence chunk counts to consider for tiling blocks, e.g. 1,2,4 (default 1..64)",
    )
    parser.add_argument(
        "--always-store",
        nargs="*",
        default=(),
        metavar="OP",
        help="ops whose saved tensors are never recomputed (substring match), e.g. attention",
    )
    parser.add_argument(
        "--step-in-backward",
        action="store_true",
        help="the optimizer steps each weight inside backward (no resident gradients; states "
        "stay on the GPU); step sizes from the profile alone, so conservative",
    )
    parser.add_argument(
        "--method", choices=("auto", "lp-round", "mip"), default="auto", help="solve method"
    )
    parser.add_argument("--time-limit", type=float, default=10.0, help="solver time limit (s)")
    multi = parser.add_argument_group(
        "multi-GPU (plans one GPU of a DeepSpeed run; planning only, memtrain does not execute it)"
    )
    multi.add_argument("--world-size", type=int, default=1, help="GPUs in the run (ranks)")
    multi.add_argument(
        "--zero-stage",
        type=int,
        default=0,
        choices=(0, 1, 2, 3),
        help="DeepSpeed ZeRO stage over the ranks: 1 shards optimizer states, 2 also gradients, "
        "3 also parameters",
    )
    multi.add_argument(
        "--sequence-parallel",
        type=int,
        default=1,
        metavar="K",
        help="Ulysses sequence parallel degree: each rank holds seq/K tokens (K divides the world "
        "size, the heads and the sequence)",
    )
    multi.add_argument(
        "--gpus-per-node", type=int, default=8, help="ranks sharing one host (default 8)"
    )
    multi.add_argument(
        "--interconnect",
        default=None,
        help="collective bandwidth per GPU per second, e.g. 300GB (default: the device preset's)",
    )
    multi.add_argument(
        "--master-weights",
        choices=("auto", "on", "off"),
        default="auto",
        help="fp32 master weights and optimizer states as DeepSpeed keeps them (auto: with ZeRO)",
    )
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")
    parser.add_argument("--out", default=None, help="write the plan to FILE (.yaml or .json)")
    parser.add_argument(
        "--plot",
        default=None,
        help="draw the predicted GPU memory at every moment of the step (.png or .html)",
    )
    parser.add_argument(
        "--measured",
        default=None,
        help="with --plot: a diag_offload_memory JSON to draw beside the prediction",
    )


def _parse_chunks(text: str | None) -> tuple[int, ...] | None:
    from memtrain.errors import MemtrainError

    if text is None:
        return None
    try:
        chunks = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise MemtrainError(f"cannot read --chunks {text!r}: use counts like 1,2,4,8") from None
    if not chunks or min(chunks) < 1:
        raise MemtrainError("--chunks needs positive counts, e.g. 1,2,4,8")
    return chunks


def _parse_batches(text: str) -> list[int]:
    from memtrain.errors import MemtrainError

    try:
        batches = [int(x) for x in str(text).split(",") if x.strip()]
    except ValueError:
        raise MemtrainError(f"cannot read --batch {text!r}: use sizes like 1 or 1,2,4") from None
    if not batches or min(batches) < 1:
        raise MemtrainError("--batch needs positive sizes, e.g. 1 or 1,2,4")
    return batches


def _step_bytes(args: argparse.Namespace):
    """Per layer, the most one parameter holds while it steps in backward, from a meta-device
    build of --model (None with --profile: the planner's conservative estimate)."""
    if not args.model:
        return None
    from memtrain.errors import MemtrainError
    from memtrain.models import build_causal_lm, load_config
    from memtrain.planner.step_in_backward import model_step_bytes

    if len(args.optimizer) > 1:
        raise MemtrainError("--step-in-backward plans one optimizer; name a single --optimizer")
    meta = build_causal_lm(load_config(args.model), args.dtype, "meta")
    step_bytes, _ = model_step_bytes(meta, args.optimizer[0])
    return step_bytes


def load_profiles(args: argparse.Namespace) -> list[tuple[str, object]]:
    """(label, profile) per candidate: --profile, or dry runs of --model per micro-batch size
    and optimizer."""
    from memtrain.errors import MemtrainError
    from memtrain.profile.result import ProfileResult

    batches = _parse_batches(args.batch)
    if args.profile:
        if len(batches) > 1 or len(args.optimizer) > 1:
            raise MemtrainError(
                "--profile fixes batch and optimizer; use --model to compare several"
            )
        return [("profile", ProfileResult.from_json(args.profile))]
    out = []
    for batch in batches:
        for optimizer in args.optimizer:
            label = f"micro-batch {batch}, {optimizer}"
            out.append((label, load_profile(args, batch, optimizer)))
    return out


def load_profile(args: argparse.Namespace, batch: int, optimizer: str):
    """A dry-run profile of --model at --seq."""
    try:  # registers the GaLore / FRUGAL state formulas
        import memtrain.optim  # noqa: F401
    except ImportError:
        pass
    from memtrain.profile import profile_causal_lm

    target = args.hardware
    if target.endswith((".yaml", ".yml")):
        from memtrain.hardware.tiers import HardwareModel

        target = HardwareModel.load_yaml(target).device.name
    return profile_causal_lm(
        model=args.model or "llama-3.2-1b",
        seq=args.seq,
        batch=batch,
        dtype=args.dtype,
        optimizer=optimizer,
        device="meta",
        target=target,
    )


def parallelism_from_args(args: argparse.Namespace):
    """The multi-GPU split the flags ask for, or None for a single-GPU plan."""
    from memtrain.planner.distributed import Parallelism
    from memtrain.units import parse_bytes

    parallelism = Parallelism(
        world_size=args.world_size,
        zero_stage=args.zero_stage,
        sequence_parallel=args.sequence_parallel,
        gpus_per_node=args.gpus_per_node,
        interconnect_bandwidth=None
        if args.interconnect is None
        else parse_bytes(args.interconnect),
        master_weights={"auto": None, "on": True, "off": False}[args.master_weights],
    )
    return None if parallelism.is_single else parallelism


def run(args: argparse.Namespace) -> int:
    from memtrain.hardware.tiers import load_hardware
    from memtrain.planner import PlanOptions
    from memtrain.planner.distributed import attention_shape, plan_per_rank
    from memtrain.planner.plan import best_of

    # Bad --plot or --measured input fails before the planning work, not after it.
    measured = None
    if args.measured and not args.plot:
        from memtrain.errors import MemtrainError

        raise MemtrainError("--measured is drawn by --plot; name a .png or .html file")
    if args.plot:
        from memtrain.figures import plot_path
        from memtrain.planner.plot import measured_moments

        plot_path(args.plot)
        if args.measured:
            measured = measured_moments(_read_json(args.measured, "--measured"))
    hardware = load_hardware(
        args.hardware, gpu_budget=args.gpu_budget, cpu=args.cpu, cxl=args.cxl, nvme=args.nvme
    )
    candidates = load_profiles(args)
    options = PlanOptions(
        fused_loss={"auto": None, "on": True, "off": False}[args.fused_loss],
        allow_state_offload=not args.no_state_offload,
        chunk_options=_parse_chunks(args.chunks),
        always_store_ops=tuple(args.always_store),
        step_in_backward=args.step_in_backward,
        step_bytes=_step_bytes(args) if args.step_in_backward else None,
        method=args.method,
        time_limit=args.time_limit,
    )
    parallelism = parallelism_from_args(args)
    if parallelism is None:
        plan, _ = best_of(candidates, hardware, options)
    else:
        attention = attention_shape(args.model) if args.model else None
        plan, _ = plan_per_rank(candidates, hardware, parallelism, options, attention)
    if args.out:
        plan.save(args.out)
    if args.plot:
        from memtrain.planner.plot import write_plan_plot

        write_plan_plot(plan.to_dict(), args.plot, measured)
    if args.json:
        print(json.dumps(plan.to_dict(), indent=1))
    else:
        print_plan(plan)
        if args.out:
            print(f"plan written to {args.out}")
        if args.plot:
            print(f"memory plot written to {args.plot}")
    return 0


def _read_json(path: str, flag: str) -> dict:
    from memtrain.errors import MemtrainError

    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise MemtrainError(f"{flag}: no file {path}") from None
    except (OSError, ValueError) as exc:
        raise MemtrainError(f"{flag}: cannot read {path} as JSON ({exc})") from None


def _row_key(layer: dict) -> tuple:
    return tuple(
        json.dumps(layer[k], sort_keys=True)
        for k in (
            "kind",
            "keep",
            "swap",
            "recompute",
            "input_checkpoint",
            "chunks",
            "params",
            "optimizer",
        )
    )


def print_plan(plan, console=None) -> None:
    """Rich tables: decisions (identical neighbours collapsed), peaks, time, baselines."""
    from rich.table import Table

    from memtrain.profile.report import wide_console
    from memtrain.units import format_bytes

    console = console or wide_console()
    split = getattr(plan, "parallelism", None)
    if split:
        console.print(
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
    rows: list[tuple[list[dict], tuple]] = []
    for layer in plan.layers:
        key = _row_key(layer)
        if rows and rows[-1][1] == key:
            rows[-1][0].append(layer)
        else:
            rows.append(([layer], key))
    for group, _ in rows:
        first = group[0]
        name = (
            first["name"]
            if len(group) == 1
            else f"{first['name']} .. {group[-1]['name']} (x{len(group)})"
        )
        swap = ", ".join(f"{t} {v:.0%}" for t, v in first["swap"].items() if v > 5e-4) or "-"
        recompute = f"{first['recompute']:.0%}" + (" (full)" if first["full_recompute"] else "")
        checkpoint = ", ".join(f"{t} {v:.0%}" for t, v in first["input_checkpoint"].items()) or "-"
        states = (
            "gpu"
            if first["optimizer"] == "gpu"
            else (f"params {first['params']}, optimizer {first['optimizer']}")
        )
        table.add_row(name, f"{first['keep']:.0%}", swap, recompute, checkpoint, states)
    console.print(table)

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
    console.print(table)
    p = plan.predicted
    solver = plan.solver
    console.print(
        f"step {p['step_time_s']:.3f} s = compute {p['compute_s']:.3f} s + exposed transfers "
        f"{p['exposed_transfer_s']:.3f} s + optimizer tail {p['optimizer_tail_s']:.3f} s; "
        f"GPU peak at {p['peak_at'].get('gpu')}"
    )
    console.print(
        f"solved by {solver['solver']} ({solver['method']}) in {solver['solve_time_s']:.2f} s, "
        f"optimality gap {solver['gap']:.2e}"
    )
    for note in plan.notes:
        console.print(f"- {note}")
