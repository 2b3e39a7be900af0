"""``memtrain calibrate``: measure this machine and write the hardware YAML ``memtrain plan``
reads with ``--hardware FILE.yaml``."""

from __future__ import annotations

import argparse
import json

NAME = "calibrate"
HELP = (
    "measure host memory, NUMA/CXL nodes, NVMe and (with CUDA) the host link and compute "
    "rates; write YAML"
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--device",
        default=None,
        help="GPU preset for what cannot be measured here (default: detect; h100-sxm-80g "
        "without CUDA)",
    )
    parser.add_argument("--nvme", default=None, help="a folder on the NVMe drive to measure")
    parser.add_argument(
        "--nvme-size", default=None, help="NVMe capacity to offer (default: free space there)"
    )
    parser.add_argument(
        "--test-size", default="256MiB", help="bytes written and read at --nvme (default 256MiB)"
    )
    parser.add_argument("--cpu", default=None, help="host memory to offer (default: available)")
    parser.add_argument(
        "--no-optimizer", action="store_true", help="skip timing the CPU AdamW step"
    )
    parser.add_argument(
        "--no-compute",
        action="store_true",
        help="skip timing the GPU's matrix product, attention and copy (keep preset figures)",
    )
    parser.add_argument("--out", default="hardware.yaml", help="YAML to write")
    parser.add_argument("--json", action="store_true", help="print the model as JSON")


def run(args: argparse.Namespace) -> int:
    from memtrain.errors import check_output_path
    from memtrain.hardware.calibrate import calibrate
    from memtrain.units import format_bytes

    check_output_path(args.out, "--out")  # before the measurements, not after them
    model = calibrate(
        device=args.device,
        nvme_path=args.nvme,
        nvme_size=args.nvme_size,
        test_bytes=args.test_size,
        cpu=args.cpu,
        measure_optimizer=not args.no_optimizer,
        measure_compute=not args.no_compute,
    )
    model.save_yaml(args.out)
    if args.json:
        print(json.dumps(model.to_dict(), indent=1))
        return 0
    from rich.console import Console
    from rich.table import Table

    console = Console()
    table = Table(title=f"Hardware model ({model.device.name}) written to {args.out}")
    for column in ("tier", "capacity", "read GB/s", "write GB/s", "where"):
        table.add_column(column)
    for tier in model.tiers.values():
        where = tier.path or ("" if tier.numa_node is None else f"NUMA node {tier.numa_node}")
        table.add_row(
            tier.name,
            format_bytes(tier.capacity_bytes),
            f"{tier.read_bandwidth / 1e9:.1f}",
            f"{tier.write_bandwidth / 1e9:.1f}",
            where,
        )
    console.print(table)
    for note in model.notes:
        console.print(f"- {note}")
    return 0
