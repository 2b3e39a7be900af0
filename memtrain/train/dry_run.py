"""A recipe's ``dry_run`` section: plan a large model without building it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from memtrain.planner import PlanOptions
from memtrain.planner.costmodel import STREAMED_KINDS
from memtrain.planner.distributed import Parallelism
from memtrain.planner.pipeline import PlanRequest, plan_model
from memtrain.planner.report import print_plan


def dry_run_plan(section, console, step_in_backward: bool = False) -> dict[str, Any]:
    """Dry-run profile and plan ``section.model`` (``step_in_backward``: for an optimizer
    stepping inside backward, as the recipe trains); print the plan and return its figures."""
    optimizers = section.optimizer
    optimizer = optimizers[0] if isinstance(optimizers, list) else optimizers
    parallelism = Parallelism.of_engine(
        section.engine,
        zero_stage=section.zero_stage,
        world_size=section.world_size,
        sequence_parallel=section.sequence_parallel,
    )
    request = PlanRequest(
        seq=section.seq,
        batches=(section.batch,),
        optimizers=(optimizer,),
        dtype=section.dtype,
        hardware=section.hardware_request(),
        # one GPU: what memtrain's executor runs (it streams blocks' weights); several: what
        # the engine runs (ZeRO-3 any layer's, FSDP2 whole blocks: Parallelism.engine_options)
        options=PlanOptions(
            step_in_backward=step_in_backward,
            streamed_kinds=STREAMED_KINDS if parallelism.is_single else None,
        ),
        parallelism=parallelism,
    )
    with console.status(f"dry run: profiling {section.model} at {section.seq:,} tokens"):
        plan = plan_model(section.model, request).plan
    where = (
        ""
        if parallelism.is_single
        else f" per GPU of {parallelism.world_size} ({parallelism.describe()})"
    )
    console.print(f"[bold]dry-run plan[/bold]{where}: {section.model}, {section.seq:,} tokens")
    print_plan(plan, console)
    if section.out:
        Path(section.out).parent.mkdir(parents=True, exist_ok=True)
        plan.save(section.out)
        console.print(f"dry-run plan written to {section.out}")
    return {
        "model": section.model,
        "seq": section.seq,
        "per_gpu": not parallelism.is_single,
        "parallelism": plan.parallelism,
        "predicted": plan.predicted,
        "baselines": plan.baselines,
    }
