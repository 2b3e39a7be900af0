"""Adam moments kept either as plain tensors or as blockwise 8-bit codes.

Optimizers read the moments, update them in place and write them back; with 32-bit states
:func:`read_moments` hands out the state tensors themselves and :func:`write_moments` does
nothing, so the full-precision path costs no copy.

8-bit states keep the *square root* of the second moment. Adam divides the first moment by
that root, and the two have the same scale (``|m| <= c * sqrt(v)``), so a value too small for
its block's code underflows in both together. Quantising ``v`` itself squares its dynamic range:
a small ``v`` fell below the code's floor and was stored as 0 while ``m`` kept its value, and
the next step divided by almost nothing. States written in that older layout (``exp_avg_sq_*``
keys) are still read.
"""

from __future__ import annotations

from typing import Any

import torch

from memtrain.errors import MemtrainError
from memtrain.optim.quant8 import dequantize, dequantize_rows, quantize, quantize_rows
from memtrain.optim.sharded import from_rows, is_sharded, like, local, row_sharded

STATE_BITS = (32, 8)
_ROOT_KEYS = ("exp_avg_sq_root_codes", "exp_avg_sq_root_absmax")
_SQUARED_KEYS = ("exp_avg_sq_codes", "exp_avg_sq_absmax")  # the older layout, read only
_QUANT_KEYS = ("exp_avg_codes", "exp_avg_absmax", *_ROOT_KEYS, *_SQUARED_KEYS)


def check_bits(bits: int) -> int:
    if bits not in STATE_BITS:
        raise MemtrainError(f"bits must be 32 or 8 (optimizer-state precision), got {bits!r}")
    return int(bits)


def has_moments(state: dict[str, Any]) -> bool:
    return "exp_avg" in state or "exp_avg_codes" in state


def read_moments(
    state: dict[str, Any], like: torch.Tensor, bits: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(first, second) moment for a gradient shaped like ``like``: zeros on first use; float32
    copies of 8-bit states, the state tensors themselves otherwise."""
    if bits == 8:
        if "exp_avg_codes" not in state:
            zeros = torch.zeros_like(like, dtype=torch.float32)
            return zeros, zeros.clone()
        first = _dequantize(state["exp_avg_codes"], state["exp_avg_absmax"], signed=True)
        if _ROOT_KEYS[0] in state:
            second = _dequantize(*(state[key] for key in _ROOT_KEYS), signed=False).square_()
        else:
            second = _dequantize(*(state[key] for key in _SQUARED_KEYS), signed=False)
        return first, second
    if "exp_avg" not in state:
        state["exp_avg"] = torch.zeros_like(like, memory_format=torch.contiguous_format)
        state["exp_avg_sq"] = torch.zeros_like(like, memory_format=torch.contiguous_format)
    return state["exp_avg"], state["exp_avg_sq"]


def write_moments(
    state: dict[str, Any], first: torch.Tensor, second: torch.Tensor, bits: int
) -> None:
    """Store updated moments (8-bit: re-quantised; 32-bit: they already are the state)."""
    if bits != 8:
        if first is not state.get("exp_avg"):
            state["exp_avg"], state["exp_avg_sq"] = first, second
        return
    state["exp_avg_codes"], state["exp_avg_absmax"] = _quantize(first, signed=True)
    root = _quantize(second.clamp(min=0).sqrt(), signed=False)
    state[_ROOT_KEYS[0]], state[_ROOT_KEYS[1]] = root
    for key in _SQUARED_KEYS:
        state.pop(key, None)


def _quantize(values: torch.Tensor, signed: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes and scales; a row-sharded state is quantised in blocks along each of its rows and
    both are kept as row shards (a replicated one as replicated tensors)."""
    if not is_sharded(values):
        return quantize(values, signed)
    if not row_sharded(values):
        codes, absmax = quantize(local(values), signed)
        return like(codes, values), like(absmax, values)
    codes, absmax = quantize_rows(local(values), signed)
    rows = values.shape[0] if values.dim() else 1
    return (
        from_rows(codes, values, tuple(values.shape)),
        from_rows(absmax, values, (rows, absmax.shape[1])),
    )


def _dequantize(codes: torch.Tensor, absmax: torch.Tensor, signed: bool) -> torch.Tensor:
    if not is_sharded(codes):
        return dequantize(codes, absmax, signed)
    if not row_sharded(codes):
        return like(dequantize(local(codes), local(absmax), signed), codes)
    values = dequantize_rows(local(codes), local(absmax), signed)
    return from_rows(values, codes, tuple(codes.shape))


def drop_moments(state: dict[str, Any]) -> None:
    """Forget the moments (the next read starts from zeros)."""
    for key in ("exp_avg", "exp_avg_sq", *_QUANT_KEYS):
        state.pop(key, None)
