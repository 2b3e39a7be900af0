"""Dtype names users type (``bf16``, ``float32``, ...), read in one place."""

from __future__ import annotations

import torch

from memtrain.errors import MemtrainError

DTYPES = {
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
    "half": torch.float16,
    "fp32": torch.float32,
    "float32": torch.float32,
    "float": torch.float32,
}
SHORT_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    try:
        return DTYPES[name.lower()]
    except KeyError:
        raise MemtrainError(f"unknown dtype {name!r}; use one of bf16, fp16, fp32") from None


def short_name(name: str | torch.dtype) -> str:
    """``bf16``, ``fp16`` or ``fp32`` (the names DeepSpeed configs and reports use)."""
    return SHORT_NAMES[parse_dtype(name)]


def dtype_bytes(name: str | torch.dtype) -> int:
    return parse_dtype(name).itemsize
