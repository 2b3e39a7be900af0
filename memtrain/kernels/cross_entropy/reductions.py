"""Full-precision reductions inside the vendor BLAS for the loss's products.

PyTorch lets cuBLAS reduce bf16/fp16 products in reduced precision by default
(``torch.backends.cuda.matmul.allow_{bf16,fp16}_reduced_precision_reduction``): a split-K kernel
may then sum its partial products in the output dtype, rounding each partial. The loss relies on
one rounding per output (the cuBLAS path's shifted log-probabilities, the weight gradient added
over row blocks), so its products run with both switches off and the caller's settings are put
back afterwards. On an H200 the shifted bf16 backward of a single row (N=1, D=64, V=1000) came
out 2.8e-2 off with the default, 2e-3 on the CPU's emulation of one rounding.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

_SWITCHES = ("allow_bf16_reduced_precision_reduction", "allow_fp16_reduced_precision_reduction")


@contextmanager
def full_precision_reductions() -> Iterator[None]:
    """Turn cuBLAS's reduced-precision reductions off for the body (restored on exit)."""
    matmul = torch.backends.cuda.matmul
    saved = {name: getattr(matmul, name) for name in _SWITCHES}
    try:
        for name in _SWITCHES:
            setattr(matmul, name, False)
        yield
    finally:
        for name, value in saved.items():
            setattr(matmul, name, value)
