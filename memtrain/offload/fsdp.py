"""Shard a model with FSDP2 as a plan says: one ``fully_shard`` unit per decoder block, with
``CPUOffloadPolicy`` on the blocks whose parameters, gradients and optimizer states the plan
puts on the host, then the root (embeddings, final norm, head) on the GPU.

FSDP2 offloads a whole unit: its row shards of the weights live in (pinned) host memory, are
copied to the GPU for each all-gather (forward and backward), gradients are copied back after
their reduce-scatter, and the optimizer steps the shards on the CPU in their own dtype. Plans
made for the ``fsdp`` engine (memtrain.planner.distributed.Parallelism.engine_options) only
choose that or nothing per block; a plan made for another executor is refused in one line.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from memtrain.errors import MemtrainError

ON_HOST = {"params": "cpu", "grads": "cpu", "optimizer": "cpu"}


def host_blocks(plan: Any) -> list[str]:
    """Names of the plan's layers whose model states FSDP2 keeps on the host; a placement it
    cannot run (states split between tiers, a non-CPU tier) is a one-line error."""
    layers = plan.layers if hasattr(plan, "layers") else plan["layers"]
    out = []
    for layer in layers:
        entry = layer if isinstance(layer, Mapping) else layer.to_dict()
        where = {k: entry[k] for k in ON_HOST}
        if all(v == "gpu" for v in where.values()):
            continue
        if where != ON_HOST:
            raise MemtrainError(
                f"layer {entry['name']}: the plan puts parameters on {where['params']}, "
                f"gradients on {where['grads']} and optimizer states on {where['optimizer']}; "
                "FSDP2 moves a block's three to the CPU together: plan for the fsdp engine "
                "(launcher.kind=fsdp, memtrain plan --engine fsdp)"
            )
        out.append(str(entry["name"]))
    return out


def shard_as_planned(
    model: nn.Module,
    plan: Any = None,
    *,
    layers: Sequence[tuple[str, str, Sequence[nn.Module]]] | None = None,
    pin_memory: bool | None = None,
    **fully_shard_kwargs: Any,
) -> list[str]:
    """``fully_shard`` every block of ``model`` (CPU offload where ``plan`` says), then the
    model itself; returns the offloaded blocks' names. ``layers``: (name, kind, modules) in
    forward order (default: the Hugging Face causal LM's, memtrain.models.build). ``pin_memory``
    (default: on where a CUDA device is in use) pins the host shards so copies overlap
    compute; other keywords (``mesh``, ``mp_policy``, ...) go to every ``fully_shard``."""
    from torch.distributed.fsdp import CPUOffloadPolicy, fully_shard

    if layers is None:
        from memtrain.models.build import causal_lm_layers

        layers = [(spec.name, spec.kind, spec.modules) for spec in causal_lm_layers(model)]
    offloaded = host_blocks(plan) if plan is not None else []
    kinds = {name: kind for name, kind, _ in layers}
    stray = [name for name in offloaded if kinds.get(name) != "block"]
    if stray:
        raise MemtrainError(
            f"the plan offloads {', '.join(stray)}, which FSDP2 does not shard as a unit of its "
            "own (each decoder block is one); plan for the fsdp engine"
        )
    if pin_memory is None:
        pin_memory = torch.cuda.is_available() and any(
            p.device.type == "cuda" for p in model.parameters()
        )
    for name, kind, modules in layers:
        if kind != "block":
            continue
        policy = {}
        if name in offloaded:
            policy = {"offload_policy": CPUOffloadPolicy(pin_memory=pin_memory)}
        for module in modules:
            fully_shard(module, **policy, **fully_shard_kwargs)
    fully_shard(model, **fully_shard_kwargs)
    return offloaded
