"""``memtrain run RECIPE.yaml [section.key=value ...]``: train under a plan from a recipe."""

from __future__ import annotations

import argparse
import json
import sys

NAME = "run"
HELP = "run a YAML recipe: dry-run plan, then a real training loop under a plan"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe", help="a recipe file, e.g. recipes/quickstart.yaml")
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="KEY=VALUE",
        help="override recipe values, e.g. schedule.steps=5 train.device=cpu",
    )
    parser.add_argument(
        "--json",
        action="store_true",
        help="print the final summary as JSON on stdout (reports go to stderr)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    import os

    # Plans swap and rebuild tensors of many sizes every step; growable segments keep the
    # caching allocator from stranding memory between them (set before CUDA starts).
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    from memtrain.profile.report import wide_console
    from memtrain.train import load_recipe, run_recipe
    from memtrain.train.launch import launch, needs_launch, world_from_env

    recipe = load_recipe(args.recipe, args.overrides)
    if needs_launch(recipe):  # start the ranks, each runs this command again
        cli = ["run", args.recipe, *args.overrides] + ["--no-progress"] * args.no_progress
        return launch(recipe, cli, json_summary=args.json)
    console = wide_console(stderr=args.json)
    summary = run_recipe(recipe, console=console, progress=not args.no_progress)
    if args.json and int(os.environ.get("RANK", "0")) == 0:  # one summary from a launched job
        sys.stdout.write(json.dumps(summary, indent=1, default=str) + "\n")
    if world_from_env(recipe).distributed:
        # A launched rank whose work is done and saved leaves without C++ static teardown:
        # gloo/c10d threads still joinable there abort the interpreter now and then
        # ("terminate called without an active exception"), which fails the whole job.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    return 0
