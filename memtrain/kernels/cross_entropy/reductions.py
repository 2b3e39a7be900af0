"""Full-precision reductions inside the vendor BLAS for the loss's products.

PyTorch lets cuBLAS reduce bf16/fp16 products in reduced precision by default
(``torch.backends.cuda.matmul.allow_{bf16,fp16}_reduced_precision_reduction``): a split-K kernel
may then sum its partial products in the output dtype, rounding each partial. The loss relies on
one rounding per output (the cuBLAS path's shifted log-probabilities, the weight gradient added
over row blocks), so its products run with both switches off and the caller's settings are put
back afterwards. Measured on an H200 (2026-12-03, a diagnostic since retired, worst of 5 seeds,
bf16): the cuBLAS path at N=4097, D=256, V=32000 went from 2.5e-3 to 1.9e-3 of relative gradient
error; the other shapes tried (N=1, 3, 257) and the Triton path did not change.
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
