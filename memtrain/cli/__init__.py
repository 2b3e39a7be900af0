"""The ``memtrain`` command line: one module per subcommand, listed in ``COMMANDS``.

Each subcommand module defines ``NAME``, ``HELP``, ``add_arguments(parser)`` and
``run(args) -> int``. User errors (:class:`memtrain.errors.MemtrainError`) print one line and exit
with status 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from memtrain.errors import MemtrainError

# Order is the order ``memtrain --help`` lists them in.
COMMANDS = [
    "memtrain.cli.run_cmd",
    "memtrain.cli.profile_cmd",
    "memtrain.cli.plan_cmd",
    "memtrain.cli.calibrate_cmd",
    "memtrain.cli.export_deepspeed_cmd",
    "memtrain.cli.presets_cmd",
]


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, object]]:
    from memtrain import __version__

    parser = argparse.ArgumentParser(
        prog="memtrain",
        description="Train large PyTorch models in less GPU memory: profile, plan, execute.",
    )
    parser.add_argument("--version", action="version", version=f"memtrain {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    handlers: dict[str, object] = {}
    for module_name in COMMANDS:
        module = importlib.import_module(module_name)
        command = sub.add_parser(module.NAME, help=module.HELP, description=module.HELP)
        module.add_arguments(command)
        handlers[module.NAME] = module
    return parser, handlers


def main(argv: list[str] | None = None) -> int:
    parser, handlers = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        return int(handlers[args.command].run(args) or 0)
    except MemtrainError as exc:
        print(f"memtrain {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
