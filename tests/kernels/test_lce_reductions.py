"""The loss's products run with cuBLAS's reduced-precision reductions off, and the caller's
settings come back afterwards (also when the body raises)."""

from __future__ import annotations

import pytest
import torch

from memtrain.kernels.cross_entropy import blas, linear_cross_entropy
from memtrain.kernels.cross_entropy.reductions import full_precision_reductions

matmul = torch.backends.cuda.matmul


def _switches() -> tuple[bool, bool]:
    return (
        matmul.allow_bf16_reduced_precision_reduction,
        matmul.allow_fp16_reduced_precision_reduction,
    )


def test_switches_off_inside_and_restored():
    before = _switches()
    matmul.allow_fp16_reduced_precision_reduction = True
    matmul.allow_bf16_reduced_precision_reduction = True
    try:
        with pytest.raises(RuntimeError):
            with full_precision_reductions():
                assert _switches() == (False, False)
                raise RuntimeError("body fails")
        assert _switches() == (True, True)
    finally:
        matmul.allow_bf16_reduced_precision_reduction = before[0]
        matmul.allow_fp16_reduced_precision_reduction = before[1]


def test_cublas_path_products_run_without_reduced_precision(monkeypatch):
    seen = []
    real_forward, real_backward = blas.blas_forward, blas.blas_backward

    def forward(*args, **kwargs):
        seen.append(("forward", _switches()))
        return real_forward(*args, **kwargs)

    def backward(*args, **kwargs):
        seen.append(("backward", _switches()))
        return real_backward(*args, **kwargs)

    monkeypatch.setattr(blas, "blas_forward", forward)
    monkeypatch.setattr(blas, "blas_backward", backward)
    before = _switches()
    h = torch.randn(5, 16, dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(40, 16, dtype=torch.bfloat16, requires_grad=True)
    linear_cross_entropy(h, w, torch.randint(0, 40, (5,)), impl="cublas").backward()
    assert seen == [("forward", (False, False)), ("backward", (False, False))]
    assert _switches() == before
