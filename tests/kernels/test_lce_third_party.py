"""memtrain's fused loss against the published packages, where they and a GPU are present.

cut-cross-entropy and Liger-Kernel run only on CUDA; on a CPU-only machine these tests skip.
"""

from __future__ import annotations

import pytest
import torch

from memtrain.kernels import linear_cross_entropy

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def inputs(n=1000, d=256, v=32000):
    g = torch.Generator(device="cuda").manual_seed(0)
    h = torch.randn(n, d, device="cuda", generator=g).bfloat16()
    w = (torch.randn(v, d, device="cuda", generator=g) / 16).bfloat16()
    y = torch.randint(0, v, (n,), device="cuda", generator=g)
    y[::7] = -100
    return h, w, y


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def grads(fn, h, w, y):
    h, w = h.clone().requires_grad_(), w.clone().requires_grad_()
    loss = fn(h, w, y)
    loss.backward()
    return loss.detach(), h.grad, w.grad


def test_matches_cut_cross_entropy_unfiltered():
    cce = pytest.importorskip("cut_cross_entropy")
    h, w, y = inputs()
    ours = grads(lambda *a: linear_cross_entropy(*a, softcap=20.0), h, w, y)
    theirs = grads(lambda *a: cce.linear_cross_entropy(*a, softcap=20.0, filter_eps=None), h, w, y)
    # both bf16 paths: a few 1e-3 apart at most (tolerance for bf16 operands)
    assert all(rel(a, b) < 2e-2 for a, b in zip(ours, theirs, strict=True))


def test_matches_liger():
    liger = pytest.importorskip("liger_kernel.transformers.fused_linear_cross_entropy")
    loss_fn = liger.LigerFusedLinearCrossEntropyLoss()
    h, w, y = inputs()
    ours = grads(linear_cross_entropy, h, w, y)

    def run(h, w, y):
        out = loss_fn(w, h, y)
        return out[0] if isinstance(out, tuple) else getattr(out, "loss", out)

    theirs = grads(run, h, w, y)
    assert all(rel(a, b) < 2e-2 for a, b in zip(ours, theirs, strict=True))
