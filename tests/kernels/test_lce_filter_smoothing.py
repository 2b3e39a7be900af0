"""The filtered Triton backward with label smoothing, run on the CPU by Triton's interpreter.

Smoothing puts ``-g * smoothing / V`` into every logit's gradient; the filtered backward leaves
that uniform term out of the blocks (so the filter still skips the negligible ones) and adds it
in closed form to dH, dW and the bias gradient. Each case (``interpret_worker.py smoothing``)
must match float64 within the filtered path's usual tolerances while the filter skips blocks,
and the forward's bound must not change the gradients (it only skips the same blocks earlier).
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from tests.kernels.interpret_worker import SMOOTHING_CASES, run_interpreted  # noqa: E402


@pytest.fixture(scope="module")
def runs():
    return run_interpreted("smoothing")


@pytest.mark.parametrize("name", sorted(SMOOTHING_CASES))
def test_filtered_smoothing_within_float64_tolerance(runs, name):
    result = runs[name]
    assert set(result["errors"]) >= {"loss", "grad_hidden", "grad_weight"}
    bad = {k: e for k, e in result["errors"].items() if not e < result["tol"]}
    assert not bad, f"{name}: {bad} (tolerance {result['tol']})"


@pytest.mark.parametrize("name", sorted(SMOOTHING_CASES))
def test_filter_still_skips_blocks_with_smoothing(runs, name):
    on, off = runs[name]["stats_on"], runs[name]["stats_off"]
    assert on["tiles"] == off["tiles"] > 0 and on["skipped"] == off["skipped"]
    assert on["skipped"] >= runs[name]["min_share"] * on["tiles"], on


@pytest.mark.parametrize("name", sorted(SMOOTHING_CASES))
def test_preskip_does_not_change_smoothed_gradients(runs, name):
    assert all(d == 0.0 for d in runs[name]["diff"].values()), runs[name]["diff"]


def _peaked_problem(n: int, v: int, d: int, dtype: torch.dtype, seed: int = 0):
    """Hidden states whose logits peak on their label (most vocabulary blocks negligible), on
    the GPU, with a few ignored rows."""
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(v, d, generator=gen) / d**0.5
    labels = torch.randint(0, v, (n,), generator=gen)
    hidden = 0.3 * torch.randn(n, d, generator=gen) + 4.0 * weight[labels]
    labels[::97] = -100
    bias = 0.1 * torch.randn(v, generator=gen)
    return (t.to("cuda", dtype) for t in (hidden, weight, bias)), labels.cuda()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("smoothing,z_loss", [(0.1, 0.0), (0.3, 1e-4)])
def test_filtered_smoothing_native_on_cuda(dtype, smoothing, z_loss):
    """The compiled kernels (not the interpreter): filtered and exact paths against float64."""
    from memtrain.kernels.cross_entropy import linear_cross_entropy
    from memtrain.kernels.cross_entropy.reference import reference_linear_cross_entropy

    (hidden, weight, bias), labels = _peaked_problem(2048, 32000, 512, dtype)
    grads = {}
    for name, filtered in (("filtered", True), ("exact", False)):
        h, w, b = (t.detach().clone().requires_grad_() for t in (hidden, weight, bias))
        loss = linear_cross_entropy(
            h, w, labels, bias=b, label_smoothing=smoothing, z_loss=z_loss, grad_filter=filtered
        )
        loss.backward()
        grads[name] = (loss.detach().double(), h.grad.double(), w.grad.double(), b.grad.double())
    h, w, b = (t.detach().double().requires_grad_() for t in (hidden, weight, bias))
    loss = reference_linear_cross_entropy(
        h, w, labels, bias=b, label_smoothing=smoothing, z_loss=z_loss
    )
    loss.backward()
    want = (loss.detach(), h.grad, w.grad, b.grad)

    def error(got, ref):
        return float((got - ref).norm() / ref.norm().clamp_min(1e-30))

    for name, got in grads.items():
        errors = [error(g, r) for g, r in zip(got, want, strict=True)]
        exact_errors = [error(g, r) for g, r in zip(grads["exact"], want, strict=True)]
        # the filter may add its own small error, never more than twice the exact path's plus
        # its skip threshold's share
        tol = 2e-5 if dtype == torch.float32 else 2e-2
        assert all(e < tol for e in errors), (name, errors)
        if name == "filtered":
            assert all(e <= 2 * x + tol / 10 for e, x in zip(errors, exact_errors, strict=True))
