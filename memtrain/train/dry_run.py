"""A recipe's ``dry_run`` section: plan a large model without building it."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def dry_run_plan(
    section: dict[str, Any], console, step_in_backward: bool = False
) -> dict[str, Any]:
    """Plan a (large) model without building it: dry-run profile, then the planner
    (``step_in_backward``: for an optimizer stepping inside backward, as the recipe trains)."""
    from memtrain.cli.plan_cmd import print_plan
    from memtrain.hardware import load_hardware
    from memtrain.planner import make_plan
    from memtrain.planner.distributed import Parallelism, attention_shape, plan_per_rank
    from memtrain.profile import profile_causal_lm

    optimizers = section["optimizer"]
    optimizer = optimizers[0] if isinstance(optimizers, list) else optimizers
    hardware = load_hardware(
        section["hardware"],
        gpu_budget=section["gpu_budget"],
        cpu=section["cpu"],
        cxl=section["cxl"],
        nvme=section["nvme"],
    )
    with console.status(f"dry run: profiling {section['model']} at {section['seq']:,} tokens"):
        device = hardware.device.name
        profile = profile_causal_lm(
            section["model"],
            seq=section["seq"],
            batch=section["batch"],
            dtype=section["dtype"],
            optimizer=optimizer,
            target=device,
        )
        parallelism = Parallelism(
            world_size=section["world_size"],
            zero_stage=section["zero_stage"],
            sequence_parallel=section["sequence_parallel"],
        )
        if parallelism.is_single:
            plan = make_plan(profile, hardware, _dry_run_options(section, step_in_backward))
        else:
            attention = attention_shape(section["model"])
            options = _dry_run_options(section, step_in_backward)
            plan, _ = plan_per_rank(
                [("dry run", profile)], hardware, parallelism, options, attention
            )
    where = (
        f" per GPU of {parallelism.world_size} ({parallelism.describe()})"
        if not parallelism.is_single
        else ""
    )
    console.print(
        f"[bold]dry-run plan[/bold]{where}: {section['model']}, {section['seq']:,} tokens"
    )
    print_plan(plan, console)
    if section["out"]:
        Path(section["out"]).parent.mkdir(parents=True, exist_ok=True)
        plan.save(section["out"])
        console.print(f"dry-run plan written to {section['out']}")
    return {
        "model": section["model"],
        "seq": section["seq"],
        "per_gpu": not parallelism.is_single,
        "parallelism": plan.parallelism,
        "predicted": plan.predicted,
        "baselines": plan.baselines,
    }


def _dry_run_options(section: dict[str, Any], step_in_backward: bool):
    """Plan options of a dry run: defaults, or stepping in backward with the step bytes of a
    meta-device build of the model."""
    if not step_in_backward:
        return None
    from memtrain.models import build_causal_lm, load_config
    from memtrain.planner import PlanOptions
    from memtrain.planner.step_in_backward import model_step_bytes

    optimizers = section["optimizer"]
    optimizer = optimizers[0] if isinstance(optimizers, list) else optimizers
    meta = build_causal_lm(load_config(section["model"]), section["dtype"], "meta")
    step_bytes, _ = model_step_bytes(meta, optimizer)
    return PlanOptions(step_in_backward=True, step_bytes=step_bytes)
