"""Optimizer memory: what every optimizer keeps per parameter, and allocates while stepping.

One table, :data:`OPTIMIZERS`, holds each optimizer's formulas, from a parameter's shape, dtype
and the spec's options only, so a meta-device model gets exact figures. The profiler prices
states with it, the planner the steps taken inside backward, and the optimizers' own
``state_bytes()`` read states with :func:`measured_state_bytes`. Users add their optimizers with
:func:`register_state_formula`; an optimizer with no formula is an error, never a silent zero.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn

from memtrain.errors import MemtrainError
from memtrain.models.build import params_by_layer
from memtrain.optim.lowrank import (
    effective_rank,
    low_rank_shape,
    lowrank_targets,
    projection_shape,
    projection_side,
    subspace_size,
)
from memtrain.optim.quant8 import BLOCK as QUANT_BLOCK
from memtrain.optim.quant8 import quantized_bytes
from memtrain.optim.sharded import local

# shape, dtype, options -> bytes
StateFormula = Callable[[tuple[int, ...], torch.dtype, dict[str, Any]], int]

STEP_BYTES = 4  # torch optimizers and ours keep ``step`` as a float32 scalar tensor per parameter
INDEX_BYTES = 8  # int64 column index / block start (FRUGAL)
FLOAT32_BYTES = 4
# Stepping an optimizer with no step formula: assume four float32 copies of the parameter (every
# built-in one allocates less).
FALLBACK_FLOAT32_COPIES = 4

# The options GaLore/FRUGAL specs default to (``build_optimizer`` applies the same).
GALORE_DEFAULTS: dict[str, Any] = {"rank": 128, "update_proj_gap": 200, "scale": 1.0}
GALORE_DEFAULTS["proj_type"] = "std"
FRUGAL_DEFAULTS: dict[str, Any] = {"density": 0.25, "update_proj_gap": 200, "proj_type": "svd"}
APOLLO_MINI_DEFAULTS: dict[str, Any] = {"rank": 1, "scale_type": "tensor", "scale": 128**0.5}
NATURAL_GALORE_DEFAULTS: dict[str, Any] = {"history": 10, "damping": 1e-3}
COSMOS_RANK = 64  # COSMOS's default leading-subspace rank


@dataclass(frozen=True)
class OptimizerSpec:
    """An optimizer name plus options, parsed from text like ``galore:rank=512,scale=0.25``."""

    name: str
    options: dict[str, Any] = field(default_factory=dict)

    def __str__(self) -> str:
        if not self.options:
            return self.name
        return self.name + ":" + ",".join(f"{k}={v}" for k, v in self.options.items())


# -- state formulas: bytes in ``optimizer.state`` after the first step ------------------------


def adam_state(shape: tuple[int, ...], dtype: torch.dtype, options: dict[str, Any]) -> int:
    moments = 3 if options.get("amsgrad") else 2
    return moments * math.prod(shape) * dtype.itemsize + STEP_BYTES


def sgd_state(shape: tuple[int, ...], dtype: torch.dtype, options: dict[str, Any]) -> int:
    return math.prod(shape) * dtype.itemsize if float(options.get("momentum", 0.9)) else 0


def adafactor_state(shape: tuple[int, ...], dtype: torch.dtype, options: dict[str, Any]) -> int:
    """torch.optim.Adafactor: factored row/column variances for >= 2-D, full variance otherwise."""
    if len(shape) >= 2:
        numel = math.prod(shape[:-2]) * (shape[-2] + shape[-1])
    else:
        numel = math.prod(shape)
    return numel * dtype.itemsize + STEP_BYTES


def no_state(shape: tuple[int, ...], dtype: torch.dtype, options: dict[str, Any]) -> int:
    return 0


def _projected(shape: tuple[int, ...], options: dict[str, Any]) -> bool:
    """GaLore/FRUGAL project 2-D weights unless ``param_state_specs`` marked them dense."""
    return len(shape) == 2 and bool(options.get("projected", True))


def _galore_side(shape: tuple[int, ...], options: dict[str, Any]) -> tuple[int, str]:
    rank = int(options.get("rank", GALORE_DEFAULTS["rank"]))
    return rank, projection_side(shape, options.get("proj_type", GALORE_DEFAULTS["proj_type"]))


def _moments(numel: int, dtype: torch.dtype, options: dict[str, Any]) -> int:
    """Two Adam moments of ``numel`` values: in ``dtype``, or 8-bit codes plus block scales."""
    if int(options.get("bits", 32)) == 8:
        return 2 * quantized_bytes(numel)
    return 2 * numel * dtype.itemsize


def adamw8bit_state(shape: tuple[int, ...], dtype: torch.dtype, options: dict[str, Any]) -> int:
    """AdamW8bit: both moments as uint8 codes plus a float32 absmax per 256 values."""
    return 2 * quantized_bytes(math.prod(shape)) + STEP_BYTES


def galore_state(shape: tuple[int, ...], dtype: torch.dtype, options: dict[str, Any]) -> int:
    """GaLoreAdamW: moments of the low-rank gradient (8-bit with ``bits=8``) and the projection,
    in the weight's dtype."""
    if not _projected(shape, options):
        return _moments(math.prod(shape), dtype, options) + STEP_BYTES
    rank, side = _galore_side(shape, options)
    low = math.prod(low_rank_shape(shape, rank, side))
    proj = math.prod(projection_shape(shape, rank, side))
    return _moments(low, dtype, options) + proj * dtype.itemsize + STEP_BYTES


def natural_galore_state(
    shape: tuple[int, ...], dtype: torch.dtype, options: dict[str, Any]
) -> int:
    """Natural GaLore: GaLore's state plus ``history`` low-rank gradients per weight."""
    base = galore_state(shape, dtype, options)
    if not _projected(shape, options):
        return base
    rank, side = _galore_side(shape, options)
    history = int(options.get("history", NATURAL_GALORE_DEFAULTS["history"]))
    return base + history * math.prod(low_rank_shape(shape, rank, side)) * dtype.itemsize


def apollo_state(shape: tuple[int, ...], dtype: torch.dtype, options: dict[str, Any]) -> int:
    """APOLLO: moments of the rank-r random projection of the gradient (the projection itself
    is regenerated from its seed) and the limiter's previous norm (float32 scalar)."""
    if not _projected(shape, options):
        return adam_state(shape, dtype, {})
    rank, side = _galore_side(shape, options)
    low = math.prod(low_rank_shape(shape, rank, side))
    limiter = FLOAT32_BYTES if float(options.get("norm_growth", 1.01)) > 0 else 0
    return 2 * low * dtype.itemsize + limiter + STEP_BYTES


def apollo_mini_state(shape: tuple[int, ...], dtype: torch.dtype, options: dict[str, Any]) -> int:
    return apollo_state(shape, dtype, {**APOLLO_MINI_DEFAULTS, **options})


def cosmos_state(shape: tuple[int, ...], dtype: torch.dtype, options: dict[str, Any]) -> int:
    """COSMOS: the full first moment in the weight's dtype; the ``n x r`` basis, its ``r x r``
    second moment and the ``m x r`` projected second moment in float32 (``n`` the smaller
    side; float64 for float64 weights)."""
    if not _projected(shape, options):
        return adam_state(shape, dtype, {})
    m, n = max(shape), min(shape)
    r = effective_rank(shape, int(options.get("rank", COSMOS_RANK)))
    stat = 8 if dtype == torch.float64 else FLOAT32_BYTES
    return m * n * dtype.itemsize + (n * r + r * r + m * r) * stat + STEP_BYTES


def keeps_first_moment(options: dict[str, Any]) -> bool:
    """Whether a (GaLore-)Adafactor spec keeps a first moment (``beta1`` given, not none)."""
    return options.get("beta1") not in (None, "none", "None")


def factored_state_bytes(shape: tuple[int, ...], beta1: bool) -> int:
    """Adafactor's float32 statistics of a ``shape`` gradient (row and column means of its
    last two dims; a 1-D one whole), plus the first moment with ``beta1``."""
    if len(shape) >= 2:
        stats = math.prod(shape[:-1]) + math.prod(shape[:-2]) * shape[-1]
    else:
        stats = math.prod(shape)
    first = math.prod(shape) if beta1 else 0
    return (stats + first) * FLOAT32_BYTES


def galore_adafactor_state(
    shape: tuple[int, ...], dtype: torch.dtype, options: dict[str, Any]
) -> int:
    """GaLoreAdafactor: factored float32 statistics of the low-rank gradient, float32 projection."""
    beta1 = keeps_first_moment(options)
    if not _projected(shape, options):
        return factored_state_bytes(shape, beta1) + STEP_BYTES
    rank, side = _galore_side(shape, options)
    proj = math.prod(projection_shape(shape, rank, side)) * FLOAT32_BYTES
    return factored_state_bytes(low_rank_shape(shape, rank, side), beta1) + proj + STEP_BYTES


def frugal_state(shape: tuple[int, ...], dtype: torch.dtype, options: dict[str, Any]) -> int:
    """FRUGAL: AdamW moments of the state-full part plus what identifies the subspace."""
    elem = dtype.itemsize
    if not _projected(shape, options):
        return _moments(math.prod(shape), dtype, options) + STEP_BYTES
    group = dict(FRUGAL_DEFAULTS)
    group.update({k: v for k, v in options.items() if k in ("density", "rank", "proj_type")})
    if "rank" in options:
        group["density"] = None
    size = subspace_size(shape, group)
    if group["proj_type"] == "columns":
        return _moments(shape[0] * size, dtype, options) + size * INDEX_BYTES + STEP_BYTES
    if group["proj_type"] == "blocks":
        return _moments(size * shape[1], dtype, options) + INDEX_BYTES + STEP_BYTES
    side = projection_side(shape, "std")
    low = math.prod(low_rank_shape(shape, size, side))
    proj = math.prod(projection_shape(shape, size, side))
    return _moments(low, dtype, options) + proj * elem + STEP_BYTES


# -- step transients: bytes above the states while one parameter steps (gradient excluded) ----


def adam_transient(shape: tuple[int, ...], dtype: torch.dtype, options: dict[str, Any]) -> int:
    """torch Adam/AdamW: the denominator and its scaled copy (the single-tensor path; foreach
    makes one, fused none)."""
    return 2 * math.prod(shape) * dtype.itemsize


def sgd_transient(shape: tuple[int, ...], dtype: torch.dtype, options: dict[str, Any]) -> int:
    """torch SGD: momentum updates in place; Nesterov adds one gradient-size temporary."""
    return math.prod(shape) * dtype.itemsize


def galore_transient(shape: tuple[int, ...], dtype: torch.dtype, options: dict[str, Any]) -> int:
    """GaLoreAdamW stepping one parameter (measured on CPU by the tests).

    Dense parameters: one full-size denominator. Projected ones: at a projection refresh the
    gradient's float32 copy (none for float32 gradients) plus the subspace iteration's float32
    ``(m + n) x l`` buffers (``l`` = rank + oversample), or a full SVD's ``U``, ``S``, ``V^T``;
    between refreshes the low-rank gradient, denominator and normalised update (3 low-rank
    matrices). The first step always refreshes, so the larger of the two is the bound.
    """
    if int(options.get("bits", 32)) == 8:
        return galore8_transient(shape, dtype, options)
    elem = dtype.itemsize
    if not _projected(shape, options):
        return math.prod(shape) * elem
    rank, side = _galore_side(shape, options)
    between = 3 * math.prod(low_rank_shape(shape, rank, side)) * elem
    return max(between, _galore_refresh(shape, dtype, options))


def _galore_refresh(shape: tuple[int, ...], dtype: torch.dtype, options: dict[str, Any]) -> int:
    """A GaLore projection refresh alone (shared by Natural GaLore and FRUGAL's svd subspace):
    the gradient's float32 copy plus the subspace iteration's buffers, or a full SVD."""
    numel = math.prod(shape)
    m, n = shape
    rank = effective_rank(shape, _galore_side(shape, options)[0])
    copy = 0 if dtype == torch.float32 else numel * FLOAT32_BYTES
    if options.get("proj_method", "iter") == "svd":
        k = min(m, n)
        return copy + FLOAT32_BYTES * (m * k + k * n + k)
    extra = max(0, min(int(options.get("proj_oversample", 0)), min(m, n) - rank))
    width = rank + extra
    unit = (m + n) * width * FLOAT32_BYTES
    # The copy's products hold two (m + n) x l blocks (three with extra columns: the
    # Rayleigh-Ritz step), the orthonormalisation up to 4.5 (5) of them; ``l x l`` Gram and
    # Cholesky factors on top. Bounds every case the tests measure, cold and warm.
    refresh = max(copy + (3 if extra else 2) * unit, int((5 if extra else 4.5) * unit))
    return refresh + 2 * width * width * FLOAT32_BYTES


def _blocks_padded(numel: int) -> int:
    return -(-numel // QUANT_BLOCK) * QUANT_BLOCK


def quant_roundtrip_transient(numel: int) -> int:
    """Bytes above the new 8-bit states while :mod:`memtrain.optim.moments` dequantises both
    moments, updates them and re-quantises them (``numel`` values, ``N`` padded to whole blocks).

    Peak: re-quantising the second moment, with both float32 moments alive as views of padded
    dequantised blocks (``2 x 4N``), the first moment's new codes (``n``), the clamped second
    moment (``4n``), its padded blocks (``4N``), the scaled blocks (``4N``), ``bucketize``'s int64
    indices (``8N``) and their uint8 cast (``N``): ``25N + 5n``, less the ``2n`` of new codes.
    """
    padded = _blocks_padded(numel)
    return 25 * padded + 3 * numel


def _float_copy(numel: int, dtype: torch.dtype) -> int:
    """``grad.float()``: a float32 copy unless the gradient already is float32."""
    return 0 if dtype == torch.float32 else numel * FLOAT32_BYTES


def adamw8bit_transient(shape: tuple[int, ...], dtype: torch.dtype, options: dict[str, Any]) -> int:
    """AdamW8bit: the gradient's float32 copy plus the 8-bit moments' round trip (the float32
    update made afterwards reuses the dequantised first moment, so never adds to the peak)."""
    numel = math.prod(shape)
    return _float_copy(numel, dtype) + quant_roundtrip_transient(numel)


def galore8_transient(shape: tuple[int, ...], dtype: torch.dtype, options: dict[str, Any]) -> int:
    """GaLoreAdamW with ``bits=8``: dense, the 8-bit AdamW step (:func:`adamw8bit_transient`);
    projected, the larger of a refresh (as with 32-bit moments) and an ordinary step: the
    low-rank gradient, its float32 copy and the round trip of its 8-bit moments."""
    numel = math.prod(shape)
    if not _projected(shape, options):
        return _float_copy(numel, dtype) + quant_roundtrip_transient(numel)
    rank, side = _galore_side(shape, options)
    low = math.prod(low_rank_shape(shape, rank, side))
    between = low * dtype.itemsize + _float_copy(low, dtype) + quant_roundtrip_transient(low)
    return max(between, _galore_refresh(shape, dtype, options))


def apollo_transient(shape: tuple[int, ...], dtype: torch.dtype, options: dict[str, Any]) -> int:
    """APOLLO / APOLLO-Mini (no refresh work: the projection is re-drawn from its seed each step).

    Peak: the scaled full-size gradient ``grad * ratio`` while the projection (``r x n`` or
    ``m x r``, in the gradient's dtype), the low-rank gradient, the low-rank Adam update and the
    per-channel ratio (channel scaling only) are alive. Dense parameters: GaLoreAdamW's AdamW.
    """
    elem = dtype.itemsize
    numel = math.prod(shape)
    if not _projected(shape, options):
        return numel * elem
    rank, side = _galore_side(shape, options)
    low_shape = low_rank_shape(shape, rank, side)
    proj = math.prod(projection_shape(shape, rank, side))
    channel = options.get("scale_type", "channel") == "channel"
    ratio = (low_shape[0] if side == "right" else low_shape[1]) if channel else 0
    return (numel + proj + 2 * math.prod(low_shape) + ratio) * elem


def apollo_mini_transient(
    shape: tuple[int, ...], dtype: torch.dtype, options: dict[str, Any]
) -> int:
    return apollo_transient(shape, dtype, {**APOLLO_MINI_DEFAULTS, **options})


def natural_galore_transient(
    shape: tuple[int, ...], dtype: torch.dtype, options: dict[str, Any]
) -> int:
    """Natural GaLore: the larger of a refresh (GaLore's) and an ordinary step.

    Ordinary step, larger of: the Woodbury solve (the low-rank gradient ``L``; for low-precision
    weights float32 copies of ``L`` and of the ``f = min(history, update_proj_gap)`` filled
    history rows; two float32 ``L``-size temporaries, ``h^T c`` and ``g - h^T c``; the ``f x f``
    Gram matrix) and the Adam step (``L``, the natural gradient, ``sqrt(v)`` and ``sqrt(v)+eps``).
    """
    numel = math.prod(shape)
    elem = dtype.itemsize
    if not _projected(shape, options):
        return numel * elem
    rank, side = _galore_side(shape, options)
    low = math.prod(low_rank_shape(shape, rank, side))
    work = 8 if dtype == torch.float64 else FLOAT32_BYTES
    history = int(options.get("history", NATURAL_GALORE_DEFAULTS["history"]))
    filled = min(history, int(options.get("update_proj_gap", GALORE_DEFAULTS["update_proj_gap"])))
    copies = 0 if dtype in (torch.float32, torch.float64) else (1 + filled) * low * work
    solve = low * elem + copies + 2 * low * work + 2 * (filled * filled + filled) * work
    adam = 4 * low * elem
    return max(solve, adam, _galore_refresh(shape, dtype, options))


def cosmos_transient(shape: tuple[int, ...], dtype: torch.dtype, options: dict[str, Any]) -> int:
    """COSMOS (no separate refresh: the basis takes one QR step every step).

    Peak: inside Newton-Schulz, in the statistics' dtype (``m >= n``): the SOAP update, the
    residual, the iterate, ``(b G + c G^2) Y``, ``a Y`` and their sum (six ``m x n``), one
    ``n x n`` Gram matrix, ``G U``, ``G U'``, ``M U'`` and the Adam denominator (four ``m x r``),
    the new basis (``n x r``) and an ``r x r`` rotation; plus float32 copies of the gradient and
    first moment for low-precision weights. Without Newton-Schulz steps, three ``m x n``.
    """
    numel = math.prod(shape)
    if not _projected(shape, options):
        return numel * dtype.itemsize
    m, n = max(shape), min(shape)
    r = effective_rank(shape, int(options.get("rank", COSMOS_RANK)))
    work = 8 if dtype == torch.float64 else FLOAT32_BYTES
    copies = 0 if dtype in (torch.float32, torch.float64) else 2 * numel * work
    full = 6 if int(options.get("ns_steps", 5)) > 0 else 3
    return copies + work * (full * m * n + n * n + 4 * m * r + n * r + r * r)


def frugal_transient(shape: tuple[int, ...], dtype: torch.dtype, options: dict[str, Any]) -> int:
    """FRUGAL: the larger of a subspace refresh and an ordinary step.

    Ordinary step: projections (svd/random) hold the low-rank gradient, the residual and its
    signSGD/SGD direction (two full-size); coordinates (columns/blocks) the full free direction,
    the gathered columns (none for a band of rows: a view) and two subspace-size Adam
    temporaries. The Adam step on the subspace (``s`` values) adds up to three ``s``-size
    temporaries, or, with ``bits=8``, a float32 copy plus the 8-bit round trip. Refresh: the
    subspace iteration (svd, bounded as GaLore's) or the random basis' QR (random), plus moving
    the moments into the new subspace (float32 copies and results, old projection kept).
    """
    elem = dtype.itemsize
    numel = math.prod(shape)
    eight = int(options.get("bits", 32)) == 8
    if not _projected(shape, options):
        if eight:
            return _float_copy(numel, dtype) + quant_roundtrip_transient(numel)
        return 2 * numel * elem
    group = dict(FRUGAL_DEFAULTS)
    group.update({k: v for k, v in options.items() if k in ("density", "rank", "proj_type")})
    if "rank" in options:
        group["density"] = None
    size = subspace_size(shape, group)
    kind = group["proj_type"]
    if kind == "columns":
        sub, gathered = shape[0] * size, shape[0] * size
    elif kind == "blocks":
        sub, gathered = size * shape[1], 0
    else:
        side = projection_side(shape, "std")
        sub = math.prod(low_rank_shape(shape, size, side))
    if eight:
        # plus one float32 ``s``-size margin: FRUGAL's ``sq.sqrt()`` is not in place
        adam = (sub + _float_copy(sub, dtype) // elem) * elem + quant_roundtrip_transient(sub)
        adam += sub * FLOAT32_BYTES
    else:
        adam = 3 * sub * elem
    transfer = 4 * sub * FLOAT32_BYTES + 2 * sub * elem
    if kind in ("columns", "blocks"):
        between = numel * elem + max(gathered * elem + 2 * sub * elem, adam)
        return max(between, transfer + 2 * size * size * FLOAT32_BYTES)
    side = projection_side(shape, "std")
    proj = math.prod(projection_shape(shape, size, side))
    between = max(sub * elem + 2 * numel * elem, adam)
    if kind == "random":
        basis = 3 * proj * FLOAT32_BYTES
    else:
        basis = _galore_refresh(shape, dtype, {**options, "rank": size, "proj_type": "std"})
    moved = proj * elem + 2 * proj * FLOAT32_BYTES + transfer + 2 * size * size * FLOAT32_BYTES
    return max(between, basis, moved)


@dataclass(frozen=True)
class OptimizerMemory:
    """One optimizer's memory per parameter. ``step_transient`` None: not known (priced as
    :data:`FALLBACK_FLOAT32_COPIES`); ``projects``: the 2-D weights :func:`lowrank_targets`
    picks are projected and the rest dense, as ``build_optimizer`` does."""

    state_bytes: StateFormula
    step_transient: StateFormula | None = None
    projects: bool = False


_ADAM = OptimizerMemory(adam_state, adam_transient)
_GALORE = OptimizerMemory(galore_state, galore_transient, projects=True)
OPTIMIZERS: dict[str, OptimizerMemory] = {
    "adamw": _ADAM,
    "adam": _ADAM,
    "sgd": OptimizerMemory(sgd_state, sgd_transient),
    "adafactor": OptimizerMemory(adafactor_state),
    "none": OptimizerMemory(no_state),
    "galore": _GALORE,
    "galore-adamw": _GALORE,
    "galore-adafactor": OptimizerMemory(galore_adafactor_state, projects=True),
    "frugal": OptimizerMemory(frugal_state, frugal_transient, projects=True),
    "adamw8bit": OptimizerMemory(adamw8bit_state, adamw8bit_transient),
    "apollo": OptimizerMemory(apollo_state, apollo_transient, projects=True),
    "apollo-mini": OptimizerMemory(apollo_mini_state, apollo_mini_transient, projects=True),
    "natural-galore": OptimizerMemory(
        natural_galore_state, natural_galore_transient, projects=True
    ),
    "cosmos": OptimizerMemory(cosmos_state, cosmos_transient, projects=True),
}


def register_state_formula(name: str, formula: StateFormula) -> None:
    """Declare how many state bytes optimizer ``name`` keeps for a parameter of a given shape
    (for a name already in the table, only its state formula is replaced)."""
    key = name.lower()
    known = OPTIMIZERS.get(key)
    OPTIMIZERS[key] = replace(known, state_bytes=formula) if known else OptimizerMemory(formula)


def optimizer_names() -> list[str]:
    return sorted(OPTIMIZERS)


def _parse_value(text: str) -> Any:
    lowered = text.lower()
    if lowered in {"true", "false"}:
        return lowered == "true"
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


# Numeric and boolean options the built-in optimizers read: (accepted types, test, what is
# accepted). parse_optimizer_spec refuses any other value for them in one line that names the
# option; text options (proj_type, targets, ...) are checked where they are used.
_INT, _NUMBER, _BOOL = (int,), (int, float), (bool,)
OPTION_CHECKS: dict[str, tuple[tuple[type, ...], Callable[[Any], bool], str]] = {
    "rank": (_INT, lambda v: v > 0, "a positive integer, e.g. rank=128"),
    "update_proj_gap": (_INT, lambda v: v > 0, "a positive integer, e.g. update_proj_gap=200"),
    "seed": (_INT, lambda v: True, "an integer"),
    "proj_iters": (_INT, lambda v: v >= 0, "an integer >= 0"),
    "proj_cold_iters": (_INT, lambda v: v >= 0, "an integer >= 0"),
    "proj_oversample": (_INT, lambda v: v >= 0, "an integer >= 0"),
    "density": (_NUMBER, lambda v: 0 < v <= 1, "a number in (0, 1], e.g. density=0.25"),
    "bits": (_INT, lambda v: v in (8, 32), "8 or 32 (optimizer-state precision)"),
    "history": (_INT, lambda v: v > 0, "a positive integer, e.g. history=10"),
    "damping": (_NUMBER, lambda v: v > 0, "a positive number, e.g. damping=1e-3"),
    "gamma": (_NUMBER, lambda v: v >= 0, "a number >= 0, e.g. gamma=0.2"),
    "ns_steps": (_INT, lambda v: v >= 0, "an integer >= 0, e.g. ns_steps=5"),
    "norm_growth": (_NUMBER, lambda v: v >= 0, "a number >= 0 (0: no limiter), e.g. 1.01"),
    "scale": (_NUMBER, lambda v: v >= 0, "a number >= 0, e.g. scale=0.25"),
    "free_lr_scale": (_NUMBER, lambda v: v >= 0, "a number >= 0"),
    "clip_threshold": (_NUMBER, lambda v: v > 0, "a positive number"),
    "eps": (_NUMBER, lambda v: v >= 0, "a number >= 0, e.g. eps=1e-8"),
    "weight_decay": (_NUMBER, lambda v: v >= 0, "a number >= 0, e.g. weight_decay=0.01"),
    "momentum": (_NUMBER, lambda v: v >= 0, "a number >= 0, e.g. momentum=0.9"),
    "dampening": (_NUMBER, lambda v: v >= 0, "a number >= 0"),
    "beta2": (_NUMBER, lambda v: 0 <= v < 1, "a number in [0, 1), e.g. beta2=0.999"),
    "decay_rate": (_NUMBER, lambda v: math.isfinite(v), "a number, e.g. decay_rate=-0.8"),
    "beta2_decay": (_NUMBER, lambda v: math.isfinite(v), "a number, e.g. beta2_decay=-0.8"),
    "d": (_NUMBER, lambda v: math.isfinite(v), "a number, e.g. d=1.0"),
    **{
        flag: (_BOOL, lambda v: True, "true or false")
        for flag in (
            "amsgrad",
            "fused",
            "foreach",
            "nesterov",
            "correct_bias",
            "scale_parameter",
        )
    },
}


def _check_option(name: str, key: str, value: Any) -> None:
    if key == "beta1":  # GaLore-Adafactor takes beta1=none for no first moment
        if isinstance(value, str) and value.lower() == "none":
            return
        check = (_NUMBER, lambda v: 0 <= v < 1, "a number in [0, 1), e.g. beta1=0.9")
    elif key in OPTION_CHECKS:
        check = OPTION_CHECKS[key]
    else:
        return
    types, test, accepted = check
    wrong_type = isinstance(value, bool) != (types == _BOOL) or not isinstance(value, types)
    if wrong_type or not test(value):
        raise MemtrainError(f"optimizer option {name}:{key} must be {accepted}, got {value!r}")


def parse_optimizer_spec(text: str | OptimizerSpec) -> OptimizerSpec:
    """Parse ``name[:key=value,...]``; the name must be in :data:`OPTIMIZERS`."""
    if isinstance(text, OptimizerSpec):
        spec = text
    else:
        name, _, rest = text.partition(":")
        options: dict[str, Any] = {}
        for item in filter(None, rest.split(",")):
            key, sep, value = item.partition("=")
            if not sep or not key.strip():
                raise MemtrainError(f"cannot read optimizer option {item!r}: use key=value")
            options[key.strip()] = _parse_value(value.strip())
        spec = OptimizerSpec(name.strip().lower(), options)
    if spec.name not in OPTIMIZERS:
        raise MemtrainError(
            f"unknown optimizer {spec.name!r}; known: {', '.join(sorted(OPTIMIZERS))}"
        )
    for key, value in spec.options.items():
        _check_option(spec.name, key, value)
    return spec


# -- per parameter ---------------------------------------------------------------------------


def state_bytes_for(shape: Iterable[int], dtype: torch.dtype, spec: OptimizerSpec) -> int:
    """Predicted state bytes for one parameter."""
    return OPTIMIZERS[spec.name].state_bytes(tuple(shape), dtype, spec.options)


def step_transient_bytes(
    shape: Sequence[int], dtype: torch.dtype, spec: str | OptimizerSpec
) -> tuple[int, bool]:
    """(bytes above states while ``spec`` steps one parameter, whether a formula gave them)."""
    spec = parse_optimizer_spec(spec)
    shape = tuple(int(s) for s in shape)
    formula = OPTIMIZERS[spec.name].step_transient
    if formula is None:
        return FALLBACK_FLOAT32_COPIES * math.prod(shape) * FLOAT32_BYTES, False
    return int(formula(shape, dtype, dict(spec.options))), True


def param_step_bytes(shape: Sequence[int], dtype: torch.dtype, spec: str | OptimizerSpec) -> int:
    """Most bytes one parameter holds while it steps in backward: its gradient plus the larger
    of a second gradient (a weight used twice, as sequence chunks and token-wise recompute do,
    sums two gradients before it steps) and the optimizer's transient."""
    grad = math.prod(int(s) for s in shape) * dtype.itemsize
    transient, _ = step_transient_bytes(shape, dtype, spec)
    return grad + max(grad, transient)


def optimizer_step_transient(spec: OptimizerSpec, param_bytes: int, fused: bool) -> int:
    """Extra bytes while one ``optimizer.step()`` updates the whole model: foreach Adam builds
    a full-size temporary list."""
    return param_bytes if spec.name in ("adamw", "adam") and not fused else 0


# -- per model -------------------------------------------------------------------------------


def param_state_specs(model: nn.Module, spec: str | OptimizerSpec) -> dict[str, OptimizerSpec]:
    """Per-parameter specs for the formulas: what ``build_optimizer(model, spec)`` does to each
    trainable parameter (weights it leaves dense get ``projected=False``)."""
    spec = parse_optimizer_spec(spec)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    if not OPTIMIZERS[spec.name].projects:
        return {n: spec for n in names}
    chosen = {n for n, _ in lowrank_targets(model, spec.options.get("targets"))}
    dense = OptimizerSpec(spec.name, {**spec.options, "projected": False})
    return {n: spec if n in chosen else dense for n in names}


def predicted_state_bytes(model: nn.Module, spec: str | OptimizerSpec) -> int:
    """Optimizer-state bytes of ``build_optimizer(model, spec)`` after its first step, by
    formula (works on a meta-device model). Tied parameters are counted once."""
    specs = param_state_specs(model, spec)
    params = dict(model.named_parameters())
    return sum(state_bytes_for(params[n].shape, params[n].dtype, s) for n, s in specs.items())


def model_step_bytes(
    model: nn.Module,
    spec: str | OptimizerSpec,
    layers: Sequence[tuple[str, Sequence[nn.Module]]] | None = None,
) -> tuple[dict[str, int], list[str]]:
    """Per layer, its largest :func:`param_step_bytes` (works on a meta-device model).

    ``layers``: ``(name, modules)`` pairs as profiled (default: the causal-LM granularity). A
    parameter counts in the first layer that holds it, as the profiler counts it. Returns the
    bytes and notes (optimizers priced without a formula).
    """
    spec = parse_optimizer_spec(spec)
    specs = param_state_specs(model, spec)
    out: dict[str, int] = {}
    guessed = False
    for name, params in params_by_layer(model, layers):
        best = 0
        for param_name, param in params:
            pspec = specs.get(param_name, spec)
            guessed |= not step_transient_bytes(param.shape, param.dtype, pspec)[1]
            best = max(best, param_step_bytes(param.shape, param.dtype, pspec))
        out[name] = best
    notes = []
    if guessed:
        notes.append(
            f"step in backward: no step-transient formula for optimizer {spec.name!r}; assumed "
            f"{FALLBACK_FLOAT32_COPIES} float32 copies of each parameter"
        )
    return out, notes


def measured_state_bytes(optimizer: torch.optim.Optimizer) -> dict[int, int]:
    """Bytes of every tensor in ``optimizer.state``, keyed by ``id(param)``.

    A storage shared between entries (or parameters) is counted once, found by storage identity.
    Sharded states (DTensors) count this rank's part.
    """
    seen: set[int] = set()
    result: dict[int, int] = {}
    for param, state in optimizer.state.items():
        total = 0
        for value in _tensors_in(state):
            storage = local(value).untyped_storage()  # a sharded state: this rank's part
            if storage._cdata not in seen:
                seen.add(storage._cdata)
                total += storage.nbytes()
        result[id(param)] = total
    return result


def _tensors_in(obj: Any) -> Iterable[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for value in obj.values():
            yield from _tensors_in(value)
    elif isinstance(obj, (list, tuple)):
        for value in obj:
            yield from _tensors_in(value)
