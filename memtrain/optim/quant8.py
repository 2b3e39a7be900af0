"""Blockwise 8-bit quantisation of optimizer moments (Dettmers et al.'s dynamic code).

Each block of :data:`BLOCK` values keeps one float32 absmax and one byte per value: the index
of the nearest entry of a 256-value code. The code is *dynamic* (a few exponent levels with a
linear fraction inside each) so small moments keep relative precision that a linear code loses;
the first moment uses a signed code, the second an unsigned one with twice the resolution.
A state of ``n`` values therefore costs ``n + 4 * ceil(n / 256)`` bytes (:func:`quantized_bytes`).
:func:`quantize_rows` blocks each row on its own (a rank's rows of a sharded state); for rows of
a multiple of :data:`BLOCK` values it gives exactly the blocks of :func:`quantize`.
"""

from __future__ import annotations

import functools
import math

import torch

BLOCK = 256
EXPONENT_LEVELS = 7  # codes span 1e-6 .. 1 of the block's absmax


@functools.cache
def _code(signed: bool) -> torch.Tensor:
    """The 256 sorted float32 code values in [-1, 1] (signed) or [0, 1] (unsigned)."""
    values: list[float] = [0.0, 1.0]
    for level in range(EXPONENT_LEVELS):
        count = 2**level if signed else 2 ** (level + 1)
        edges = torch.linspace(0.1, 1.0, count + 1, dtype=torch.float64)
        mids = (edges[:-1] + edges[1:]) / 2 * 10.0 ** (level - EXPONENT_LEVELS + 1)
        values += mids.tolist()
        if signed:
            values += (-mids).tolist()
    code = torch.tensor(sorted(values), dtype=torch.float32)
    assert code.numel() == 256, code.numel()
    return code


@functools.cache
def _code_on(signed: bool, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    code = _code(signed).to(device)
    return code, (code[1:] + code[:-1]) / 2


def quantized_bytes(numel: int) -> int:
    """Bytes of one quantised state of ``numel`` values: the codes plus a float32 per block."""
    return numel + math.ceil(numel / BLOCK) * 4


def quantize(values: torch.Tensor, signed: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(uint8 codes shaped like ``values``, float32 absmax per block of :data:`BLOCK`): the
    values taken as one row, blocked from the first."""
    codes, absmax = quantize_rows(values.reshape(1, -1), signed)
    return codes.view(values.shape), absmax.view(-1)


def dequantize(codes: torch.Tensor, absmax: torch.Tensor, signed: bool) -> torch.Tensor:
    """Float32 values of a quantised state, shaped like ``codes``."""
    return dequantize_rows(codes.reshape(1, -1), absmax.view(1, -1), signed).view(codes.shape)


def _as_rows(values: torch.Tensor) -> torch.Tensor:
    """``values`` as (rows, values per row): dim 0 stays, the others are flattened."""
    return values.reshape(values.shape[0], -1) if values.dim() else values.reshape(1, 1)


def quantize_rows(values: torch.Tensor, signed: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(uint8 codes shaped like ``values``, float32 absmax of shape (rows, blocks per row)):
    blocks of :data:`BLOCK` values that never cross a row of dim 0."""
    rows = _as_rows(values.detach()).float()
    pad = (-rows.shape[1]) % BLOCK
    blocks = torch.nn.functional.pad(rows, (0, pad)).view(rows.shape[0], -1, BLOCK)
    absmax = blocks.abs().amax(dim=2)
    scaled = blocks / absmax.clamp(min=torch.finfo(torch.float32).tiny).unsqueeze(2)
    _, mids = _code_on(signed, rows.device)
    codes = torch.bucketize(scaled, mids).to(torch.uint8).view(rows.shape[0], -1)
    return codes[:, : rows.shape[1]].reshape(values.shape).clone(), absmax


def dequantize_rows(codes: torch.Tensor, absmax: torch.Tensor, signed: bool) -> torch.Tensor:
    """Float32 values of a state quantised by :func:`quantize_rows`, shaped like ``codes``."""
    code, _ = _code_on(signed, codes.device)
    rows = code[_as_rows(codes).long()]
    pad = (-rows.shape[1]) % BLOCK
    blocks = torch.nn.functional.pad(rows, (0, pad)).view(rows.shape[0], -1, BLOCK)
    values = (blocks * absmax.unsqueeze(2)).view(rows.shape[0], -1)
    return values[:, : rows.shape[1]].reshape(codes.shape)
