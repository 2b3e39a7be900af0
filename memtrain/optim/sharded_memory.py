"""Optimizer-state bytes one rank keeps when FSDP2 splits every weight along dim 0.

What each rank holds follows from how :mod:`memtrain.optim.sharded` steps (and is measured
against it by the tests): row-stepped optimizers keep states shaped like the weight in the
rank's rows; a right projection's low-rank moments keep the weight's rows too, while the
projection itself (``r x n``) is whole on every rank; a left projection's moments (``r x n``)
sum over the rows, so they and their projection are whole everywhere. 8-bit moments of a
shard carry one scale per block of each row. Whole-matrix optimizers keep all their states on
every rank; so are Adafactor's factored statistics (reductions over rows). Natural GaLore's
history of low-rank gradients is split like their moments. Figures are for the rank with the most rows
(``ceil(m / world)``), the peak one.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from memtrain.optim.lowrank import effective_rank, projection_side
from memtrain.optim.memory import (
    APOLLO_MINI_DEFAULTS,
    FLOAT32_BYTES,
    GALORE_DEFAULTS,
    NATURAL_GALORE_DEFAULTS,
    OPTIMIZERS,
    STEP_BYTES,
    OptimizerSpec,
    factored_state_bytes,
    keeps_first_moment,
    parse_optimizer_spec,
    state_bytes_for,
)
from memtrain.optim.quant8 import quantized_bytes
from memtrain.optim.sharded import sharded_step_kind

_GALORE_NAMES = ("galore", "galore-adamw", "natural-galore")


def _moments(rows: int, inner: int, dtype: torch.dtype, options: dict[str, Any]) -> int:
    """Two moments of ``rows x inner`` values; 8-bit ones in blocks along each row, so each
    row costs one state of ``inner`` values (:func:`quantized_bytes`)."""
    if int(options.get("bits", 32)) == 8:
        return 2 * rows * quantized_bytes(inner)
    return 2 * rows * inner * dtype.itemsize


def _dense(shape: tuple[int, ...], rows: int, dtype: torch.dtype, spec: OptimizerSpec) -> int:
    inner = math.prod(shape[1:])
    name, options = spec.name, spec.options
    if name == "adamw8bit":
        return _moments(rows, inner, dtype, {"bits": 8}) + STEP_BYTES
    if name in _GALORE_NAMES:
        return _moments(rows, inner, dtype, options) + STEP_BYTES
    if name == "galore-adafactor":
        first = rows * inner * FLOAT32_BYTES if keeps_first_moment(options) else 0
        if len(shape) >= 2:  # factored statistics are reductions: whole on every rank
            return factored_state_bytes(shape, beta1=False) + first + STEP_BYTES
        return rows * FLOAT32_BYTES + first + STEP_BYTES
    return state_bytes_for((rows, *shape[1:]), dtype, spec)


def rank_state_bytes(
    shape: tuple[int, ...], dtype: torch.dtype, spec: str | OptimizerSpec, world: int
) -> int:
    """Optimizer-state bytes the rank with the most rows keeps for one weight of ``shape``."""
    spec = parse_optimizer_spec(spec)
    shape = tuple(int(s) for s in shape)
    if not shape or sharded_step_kind(spec.name) == "whole":
        return state_bytes_for(shape, dtype, spec)
    rows = math.ceil(shape[0] / world)
    options = dict(spec.options)
    projected = (
        OPTIMIZERS[spec.name].projects and len(shape) == 2 and options.get("projected", True)
    )
    if not projected:
        return _dense(shape, rows, dtype, spec)
    if spec.name == "apollo-mini":
        options = {**APOLLO_MINI_DEFAULTS, **options}
    side = projection_side(shape, options.get("proj_type", GALORE_DEFAULTS["proj_type"]))
    if side == "left":  # low-rank states sum over the rows: whole on every rank
        return state_bytes_for(shape, dtype, spec)
    m, n = shape
    r = effective_rank(shape, int(options.get("rank", GALORE_DEFAULTS["rank"])))
    if spec.name in ("apollo", "apollo-mini"):
        limiter = FLOAT32_BYTES if float(options.get("norm_growth", 1.01)) > 0 else 0
        return 2 * rows * r * dtype.itemsize + limiter + STEP_BYTES
    if spec.name == "galore-adafactor":  # factored statistics whole, first moment in rows
        stats = m + r + (rows * r if keeps_first_moment(options) else 0)
        return (stats + r * n) * FLOAT32_BYTES + STEP_BYTES
    total = _moments(rows, r, dtype, options) + r * n * dtype.itemsize + STEP_BYTES
    if spec.name == "natural-galore":  # its history of low-rank gradients keeps the rows too
        history = int(options.get("history", NATURAL_GALORE_DEFAULTS["history"]))
        total += history * rows * r * dtype.itemsize
    return total


def model_rank_state_bytes(model: torch.nn.Module, spec: str | OptimizerSpec, world: int) -> int:
    """:func:`rank_state_bytes` over a model's trainable weights (tied ones counted once)."""
    return sum(layer_rank_state_bytes(model, spec, world).values())


def layer_rank_state_bytes(
    model: torch.nn.Module, spec: str | OptimizerSpec, world: int
) -> dict[str, int]:
    """Per layer as profiled (the causal-LM granularity; works on a meta-device model), the
    optimizer-state bytes one rank keeps; a weight counts in the first layer that holds it."""
    from memtrain.models.build import params_by_layer
    from memtrain.optim.memory import param_state_specs

    specs = param_state_specs(model, spec)
    return {
        layer: sum(
            rank_state_bytes(tuple(p.shape), p.dtype, specs[name], world) for name, p in params
        )
        for layer, params in params_by_layer(model)
    }
