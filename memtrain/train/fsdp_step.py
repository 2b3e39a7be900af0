"""How an FSDP2 rank steps (``launcher.kind=fsdp``): which optimizer implementation steps
shards FSDP2 keeps on the host, and gradient clipping that leaves unclipped gradients alone."""

from __future__ import annotations

import torch
from torch import nn


def clip_when_needed(params: list[torch.Tensor], max_norm: float) -> float:
    """``clip_grad_norm_`` (sharded gradients included), returning the norm, that scales the
    gradients only when the norm is over ``max_norm``: torch multiplies by a coefficient clamped
    to 1 to avoid a device sync, a pass over every gradient that changes nothing, and under
    FSDP2's CPU offload a pass over the host gradients in host memory."""
    from torch.distributed.tensor import DTensor

    grads = [p.grad for p in params if p.grad is not None]
    norm = nn.utils.get_total_norm(grads, 2.0)
    total = float(norm.full_tensor() if isinstance(norm, DTensor) else norm)
    if max_norm / (total + 1e-6) < 1.0:
        nn.utils.clip_grads_with_norm_(params, max_norm, norm)
    return total


def host_step_spec(spec, on_host: bool):
    """torch's Adam/AdamW with its fused kernel where FSDP2 steps some shards on the CPU and the
    spec picks no implementation: torch's default there is a loop over the tensors, which
    steps bf16 shards several times slower (benchmarks/bench_host_optimizer.py --dtype
    bfloat16); the update is AdamW's either way."""
    from dataclasses import replace

    if not on_host or spec.name not in ("adamw", "adam"):
        return spec
    if {"fused", "foreach"} & set(spec.options):
        return spec
    return replace(spec, options={**spec.options, "fused": True})
