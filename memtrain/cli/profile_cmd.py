"""``memtrain profile``: the per-layer memory and time of one training step."""

from __future__ import annotations

import argparse
import sys

NAME = "profile"
HELP = "profile one training step per layer (dry run on meta tensors, or measured)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        default="llama-3.2-1b",
        help="preset name (see `memtrain presets`) or path to a config.json",
    )
    parser.add_argument("--seq", type=int, default=4096, help="sequence length in tokens")
    parser.add_argument("--batch", type=int, default=1, help="micro-batch size")
    parser.add_argument("--dtype", default="bf16", help="bf16 | fp16 | fp32")
    parser.add_argument(
        "--optimizer",
        default="adamw",
        help="adamw | adam | sgd | adafactor | ... with options, e.g. adamw:fused=false",
    )
    parser.add_argument(
        "--device", default="meta", help="meta (dry run, allocates nothing) | cpu | cuda (measured)"
    )
    parser.add_argument(
        "--hardware",
        default=None,
        help="dry runs: hardware preset whose kernels and rates are modelled "
        "(default h100-sxm-80g; `cpu` models CPU attention kernels)",
    )
    parser.add_argument(
        "--layers",
        nargs="+",
        default=None,
        metavar="PATTERN",
        help="granularity: glob patterns over module names (default: embeddings, "
        "each block, final norm, LM head, loss)",
    )
    parser.add_argument(
        "--json",
        nargs="?",
        const="-",
        default=None,
        metavar="FILE",
        help="write the versioned JSON result to FILE, or to stdout with no FILE",
    )
    parser.add_argument(
        "--plot",
        default=None,
        metavar="FILE",
        help="draw memory per layer and over the step (.png or .html)",
    )
    parser.add_argument(
        "--all-layers",
        action="store_true",
        help="one table row per layer instead of collapsing identical blocks",
    )


def run(args: argparse.Namespace) -> int:
    from memtrain.errors import check_output_path
    from memtrain.figures import plot_path
    from memtrain.hardware import get_device
    from memtrain.profile import profile_causal_lm
    from memtrain.profile.report import print_report, wide_console, write_plot

    # Unwritable outputs fail before the profiling work, not after it.
    if args.json not in (None, "-"):
        check_output_path(args.json, "--json")
    if args.plot:
        plot_path(args.plot)
    quiet = args.json == "-"
    console = wide_console(stderr=quiet)
    with console.status(f"profiling {args.model} at {args.batch}x{args.seq} on {args.device} ..."):
        result = profile_causal_lm(
            model=args.model,
            seq=args.seq,
            batch=args.batch,
            dtype=args.dtype,
            optimizer=args.optimizer,
            device=args.device,
            target=args.hardware,
            layers=args.layers,
        )
    if args.json == "-":
        sys.stdout.write(result.to_json() + "\n")
    else:
        capacity = None
        if result.mode == "dry-run" and result.target != "cpu":
            capacity = get_device(result.target).memory_bytes
        print_report(result, console, collapse=not args.all_layers, capacity_bytes=capacity)
        if args.json:
            result.to_json(args.json)
            console.print(f"wrote {args.json}")
    if args.plot:
        path = write_plot(result, args.plot)
        console.print(f"wrote {path}")
    return 0
