"""Command-line flags for :class:`~memtrain.hardware.HardwareRequest`, made from its fields."""

from __future__ import annotations

import argparse
from dataclasses import fields

from memtrain.hardware.request import HardwareRequest


def add_hardware_arguments(parser: argparse.ArgumentParser) -> None:
    """``--hardware``, ``--gpu-budget``, ``--cpu``, ``--cxl``, ``--nvme``."""
    for spec in fields(HardwareRequest):
        flag = "--" + spec.name.replace("_", "-")
        parser.add_argument(flag, default=spec.default, help=spec.metadata["help"])


def hardware_request(args: argparse.Namespace) -> HardwareRequest:
    return HardwareRequest(
        **{spec.name: getattr(args, spec.name) for spec in fields(HardwareRequest)}
    )
