"""State-byte formulas for GaLore and FRUGAL, registered with the profiler's formula table.

Each formula gives, for one parameter, exactly the bytes our optimizer keeps in
``optimizer.state`` after its first step (``state_bytes()`` reads the same tensors). A 2-D
weight is projected unless the options say ``projected=False``; ``param_state_specs`` in
``memtrain.optim.factory`` sets that for the weights ``build_optimizer`` leaves dense.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from memtrain.optim.frugal import subspace_size
from memtrain.optim.lowrank import low_rank_shape, projection_shape, projection_side
from memtrain.profile.optimizer_state import register_state_formula

STEP_BYTES = 4  # float32 scalar step counter
INDEX_BYTES = 8  # int64 column index / block start
FLOAT32_BYTES = 4

GALORE_DEFAULTS: dict[str, Any] = {"rank": 128, "update_proj_gap": 200, "scale": 1.0}
GALORE_DEFAULTS["proj_type"] = "std"
FRUGAL_DEFAULTS: dict[str, Any] = {"density": 0.25, "update_proj_gap": 200, "proj_type": "svd"}


def _elem(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype, device="meta").element_size()


def _projected(shape: tuple[int, ...], options: dict[str, Any]) -> bool:
    return len(shape) == 2 and bool(options.get("projected", True))


def galore_adamw_bytes(shape: tuple[int, ...], dtype: torch.dtype, options: dict[str, Any]) -> int:
    """Moments of the low-rank gradient and the projection, in the weight's dtype."""
    elem = _elem(dtype)
    if not _projected(shape, options):
        return 2 * math.prod(shape) * elem + STEP_BYTES
    rank = int(options.get("rank", GALORE_DEFAULTS["rank"]))
    side = projection_side(shape, options.get("proj_type", GALORE_DEFAULTS["proj_type"]))
    low = math.prod(low_rank_shape(shape, rank, side))
    proj = math.prod(projection_shape(shape, rank, side))
    return (2 * low + proj) * elem + STEP_BYTES


def _factored_bytes(shape: tuple[int, ...], beta1: bool) -> int:
    if len(shape) >= 2:
        stats = math.prod(shape[:-1]) + math.prod(shape[:-2]) * shape[-1]
    else:
        stats = math.prod(shape)
    first = math.prod(shape) if beta1 else 0
    return (stats + first) * FLOAT32_BYTES


def galore_adafactor_bytes(
    shape: tuple[int, ...], dtype: torch.dtype, options: dict[str, Any]
) -> int:
    """Factored float32 statistics of the low-rank gradient plus a float32 projection."""
    beta1 = options.get("beta1") not in (None, "none", "None")
    if not _projected(shape, options):
        return _factored_bytes(shape, beta1) + STEP_BYTES
    rank = int(options.get("rank", GALORE_DEFAULTS["rank"]))
    side = projection_side(shape, options.get("proj_type", GALORE_DEFAULTS["proj_type"]))
    low = low_rank_shape(shape, rank, side)
    proj = math.prod(projection_shape(shape, rank, side)) * FLOAT32_BYTES
    return _factored_bytes(low, beta1) + proj + STEP_BYTES


def frugal_bytes(shape: tuple[int, ...], dtype: torch.dtype, options: dict[str, Any]) -> int:
    """AdamW moments of the state-full part plus what identifies the subspace."""
    elem = _elem(dtype)
    if not _projected(shape, options):
        return 2 * math.prod(shape) * elem + STEP_BYTES
    group = dict(FRUGAL_DEFAULTS)
    group.update({k: v for k, v in options.items() if k in ("density", "rank", "proj_type")})
    if "rank" in options:
        group["density"] = None
    size = subspace_size(shape, group)
    kind = group["proj_type"]
    if kind == "columns":
        return 2 * shape[0] * size * elem + size * INDEX_BYTES + STEP_BYTES
    if kind == "blocks":
        return 2 * size * shape[1] * elem + INDEX_BYTES + STEP_BYTES
    side = projection_side(shape, "std")
    low = math.prod(low_rank_shape(shape, size, side))
    proj = math.prod(projection_shape(shape, size, side))
    return (2 * low + proj) * elem + STEP_BYTES


def register_formulas() -> None:
    register_state_formula("galore", galore_adamw_bytes)
    register_state_formula("galore-adamw", galore_adamw_bytes)
    register_state_formula("galore-adafactor", galore_adafactor_bytes)
    register_state_formula("frugal", frugal_bytes)
