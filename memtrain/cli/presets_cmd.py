"""``memtrain presets``: list the model configs and hardware presets that ship with memtrain."""

from __future__ import annotations

import argparse
import json

NAME = "presets"
HELP = "list shipped model configs and hardware presets"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")


def run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from memtrain.hardware import device_names, get_device
    from memtrain.models.configs import load_config_dict, preset_names

    models = []
    for name in preset_names():
        _, data = load_config_dict(name)
        models.append(
            {
                "name": name,
                "model_type": data.get("model_type"),
                "layers": data.get("num_hidden_layers", data.get("n_layer")),
                "hidden": data.get("hidden_size", data.get("n_embd")),
                "vocab": data.get("vocab_size"),
            }
        )
    hardware = [get_device(n).to_dict() for n in device_names()]
    if args.json:
        print(json.dumps({"models": models, "hardware": hardware}, indent=1))
        return 0
    console = Console()
    table = Table(title="Model presets (random weights, built from config)")
    for column in ("name", "model_type", "layers", "hidden", "vocab"):
        table.add_column(column)
    for row in models:
        table.add_row(*(str(row[c]) for c in ("name", "model_type", "layers", "hidden", "vocab")))
    console.print(table)
    table = Table(title="Hardware presets")
    for column in ("name", "memory", "bf16 TFLOP/s (achievable)", "HBM GB/s", "host link GB/s"):
        table.add_column(column)
    for spec in hardware:
        table.add_row(
            spec["name"],
            f"{spec['memory_bytes'] / 1e9:.0f} GB",
            f"{spec['achievable_bf16_flops'] / 1e12:.0f}",
            f"{spec['hbm_bandwidth'] / 1e9:.0f}",
            f"{spec['host_to_device'] / 1e9:.0f}",
        )
    console.print(table)
    return 0
