"""``memtrain plan``: where every byte of a training step goes, and what that buys.

Runs a dry-run profile of ``--model`` at ``--seq`` (or reads ``--profile``), solves the placement
problem for ``--hardware`` with the given host tiers and prints per-layer decisions, predicted
peaks, step time and tokens/s next to the baselines. ``--out`` writes the plan the executors read.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from memtrain.cli.hardware_args import add_hardware_arguments, hardware_request

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
    add_hardware_arguments(parser)
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
        "multi-GPU (plans one GPU of a DeepSpeed or FSDP2 run; memtrain run executes the fsdp "
        "engine's per-rank plan)"
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
        "--engine",
        choices=("zero", "fsdp"),
        default="zero",
        help="zero: DeepSpeed ZeRO (states divided evenly); fsdp: the per-rank plan memtrain run "
        "executes with launcher.kind=fsdp (FSDP2 row shards: ZeRO stage 3, fp32 master weights "
        "off, each optimizer's states split as it steps them; blocks that do not fit go to "
        "the host whole, as FSDP2's CPU offload runs them)",
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
        help="with --plot: a `bench_offload_gpu --moments --plot` JSON to draw beside the prediction",
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


def plan_request(args: argparse.Namespace):
    """The :class:`~memtrain.planner.pipeline.PlanRequest` the flags describe."""
    from memtrain.errors import MemtrainError
    from memtrain.planner import PlanOptions
    from memtrain.planner.pipeline import PlanRequest

    batches = _parse_batches(args.batch)
    if not 0 < args.time_limit < float("inf"):
        raise MemtrainError(
            f"--time-limit must be a positive number of seconds, e.g. 10, got {args.time_limit}"
        )
    if args.profile and (len(batches) > 1 or len(args.optimizer) > 1):
        raise MemtrainError("--profile fixes batch and optimizer; use --model to compare several")
    if args.step_in_backward and len(args.optimizer) > 1:
        raise MemtrainError("--step-in-backward plans one optimizer; name a single --optimizer")
    parallelism = parallelism_from_args(args)
    return PlanRequest(
        seq=args.seq,
        batches=batches,
        optimizers=tuple(args.optimizer),
        dtype=args.dtype,
        hardware=hardware_request(args),
        options=PlanOptions(
            fused_loss={"auto": None, "on": True, "off": False}[args.fused_loss],
            allow_state_offload=not args.no_state_offload,
            chunk_options=_parse_chunks(args.chunks),
            always_store_ops=tuple(args.always_store),
            step_in_backward=args.step_in_backward,
            method=args.method,
            time_limit=args.time_limit,
        ),
        parallelism=parallelism,
    )


def parallelism_from_args(args: argparse.Namespace):
    """The multi-GPU split the flags ask for, or None for a single-GPU plan."""
    from memtrain.planner.distributed import Parallelism
    from memtrain.units import parse_bytes

    parallelism = Parallelism.of_engine(
        args.engine,
        zero_stage=args.zero_stage,
        master_weights={"auto": None, "on": True, "off": False}[args.master_weights],
        world_size=args.world_size,
        sequence_parallel=args.sequence_parallel,
        gpus_per_node=args.gpus_per_node,
        interconnect_bandwidth=None
        if args.interconnect is None
        else parse_bytes(args.interconnect),
    )
    return None if parallelism.is_single else parallelism


def run(args: argparse.Namespace) -> int:
    from memtrain.errors import MemtrainError, check_output_path
    from memtrain.planner.pipeline import plan_model
    from memtrain.planner.report import print_plan

    # Bad --plot or --measured input fails before the planning work, not after it.
    measured = None
    if args.measured and not args.plot:
        raise MemtrainError("--measured is drawn by --plot; name a .png or .html file")
    if args.out:
        check_output_path(args.out, "--out")
    if args.plot:
        from memtrain.figures import plot_path
        from memtrain.planner.plot import measured_moments

        plot_path(args.plot)
        if args.measured:
            measured = measured_moments(_read_json(args.measured, "--measured"))
    model = args.model or "llama-3.2-1b"
    if args.profile:
        from memtrain.profile.result import ProfileResult

        model = ProfileResult.from_json(args.profile)
    plan = plan_model(model, plan_request(args)).plan
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
