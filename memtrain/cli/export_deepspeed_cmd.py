"""``memtrain export-deepspeed PLAN``: the DeepSpeed config for a plan, for users who launch it."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

NAME = "export-deepspeed"
HELP = "write the DeepSpeed JSON config (ZeRO stage, CPU/NVMe offload, async I/O) for a plan"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("plan", help="a plan file written by `memtrain plan --out`")
    parser.add_argument("--dtype", default="bf16", choices=("bf16", "fp16", "fp32"))
    parser.add_argument("--gradient-accumulation-steps", type=int, default=1)
    parser.add_argument(
        "--mixed",
        choices=("error", "offload-all"),
        default="error",
        help="when layers place states differently: refuse, or offload them all",
    )
    parser.add_argument(
        "--lr",
        type=float,
        default=None,
        help="name an AdamW optimizer with this learning rate in the config "
        "(needed with ZeRO-Offload unless you pass DeepSpeedCPUAdam yourself)",
    )
    parser.add_argument("--out", default=None, help="write to FILE instead of stdout")


def run(args: argparse.Namespace) -> int:
    from memtrain.errors import MemtrainError, check_output_path
    from memtrain.offload import deepspeed_config

    if not Path(args.plan).exists():
        raise MemtrainError(f"{args.plan}: no such plan file")
    if args.gradient_accumulation_steps < 1:
        raise MemtrainError(
            "--gradient-accumulation-steps must be a positive integer, e.g. 1, got "
            f"{args.gradient_accumulation_steps}"
        )
    if args.lr is not None and not 0 < args.lr < float("inf"):
        raise MemtrainError(f"--lr must be a positive number, e.g. 1e-4, got {args.lr}")
    if args.out:
        check_output_path(args.out, "--out")
    config = deepspeed_config(
        args.plan,
        dtype=args.dtype,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed=args.mixed,
        lr=args.lr,
    )
    text = json.dumps(config, indent=2)
    if "train_batch_size" in config:
        print(
            f"multi-GPU plan: ZeRO stage {config['zero_optimization']['stage']}, "
            f"sequence_parallel_size {config.get('sequence_parallel_size', 1)}; launch every "
            "rank with DeepSpeed (e.g. deepspeed --num_gpus N train.py); memtrain does not "
            "execute per-rank plans",
            file=sys.stderr,
        )
    if args.out:
        Path(args.out).write_text(text + "\n")
        print(f"wrote {args.out}", file=sys.stderr)
    else:
        sys.stdout.write(text + "\n")
    return 0
