"""The chunked PyTorch path of linear_cross_entropy against a float64 reference."""

from __future__ import annotations

import math

import pytest
import torch

import memtrain
from memtrain.errors import MemtrainError
from memtrain.kernels import linear_cross_entropy, reference_linear_cross_entropy
from memtrain.kernels.cross_entropy import chunked

# Relative error ||out - ref|| / ||ref|| allowed per input dtype (float32 logits throughout).
TOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.bfloat16: 2e-2, torch.float16: 1e-2}


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch):
    """Force several row chunks even on tiny shapes, so chunk boundaries are exercised."""
    monkeypatch.setattr(chunked, "LOGITS_BUDGET_ELEMENTS", 64)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    scale = b.norm().item()
    return (a - b).norm().item() / (scale if scale > 0 else 1.0)


def make(n, v, d, dtype, seed, bias=False, ignore_frac=0.2):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, d, generator=g).to(dtype)
    weight = (torch.randn(v, d, generator=g) * 2 / math.sqrt(d)).to(dtype)
    labels = torch.randint(0, v, (n,), generator=g)
    labels[torch.rand(n, generator=g) < ignore_frac] = -100
    b = torch.randn(v, generator=g).to(dtype) if bias else None
    return hidden, weight, labels, b


def check(hidden, weight, labels, bias=None, impl="torch", tol=None, **opts):
    """Loss and every input gradient against float64, under a random upstream gradient."""
    tol = tol or TOL[hidden.dtype]
    if "ignore_index" in opts:
        labels = torch.where(labels == -100, opts["ignore_index"], labels)
    leaves = [t.detach().clone().requires_grad_() for t in (hidden, weight, bias) if t is not None]
    ref_leaves = [t.detach().double().requires_grad_() for t in leaves]
    b = leaves[2] if bias is not None else None
    rb = ref_leaves[2] if bias is not None else None
    out = linear_cross_entropy(leaves[0], leaves[1], labels, bias=b, impl=impl, **opts)
    ref = reference_linear_cross_entropy(ref_leaves[0], ref_leaves[1], labels, bias=rb, **opts)
    assert out.shape == ref.shape
    assert rel(out, ref) < tol, (rel(out, ref), tol)
    upstream = torch.randn(
        ref.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1234)
    )
    grads = torch.autograd.grad(out, leaves, upstream.to(out.dtype))
    ref_grads = torch.autograd.grad(ref, ref_leaves, upstream)
    for name, got, want in zip(("hidden", "weight", "bias"), grads, ref_grads, strict=False):
        assert got.dtype == want.dtype or got.dtype == hidden.dtype
        assert torch.isfinite(got).all()
        assert rel(got, want) < tol, (name, rel(got, want), tol)


@pytest.mark.parametrize("n,v,d", [(1, 7, 3), (37, 101, 24), (130, 1000, 16), (64, 257, 33)])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_shapes_and_reductions_fp32(n, v, d, reduction):
    hidden, weight, labels, _ = make(n, v, d, torch.float32, seed=n + v)
    labels[0] = 3  # at least one valid row for "mean"
    check(hidden, weight, labels, reduction=reduction)


@pytest.mark.parametrize(
    "opts",
    [
        {"softcap": 2.5},
        {"label_smoothing": 0.1},
        {"softcap": 30.0, "label_smoothing": 0.25, "reduction": "sum"},
        {"ignore_index": 5},
        {"shift": True},
        {"shift": True, "reduction": "none", "softcap": 4.0},
        {"z_loss": 1e-2},
        {"z_loss": 0.1, "label_smoothing": 0.1, "reduction": "sum"},
        {"z_loss": 0.05, "softcap": 3.0, "label_smoothing": 0.2, "reduction": "none"},
        {"z_loss": 0.05, "softcap": 3.0, "shift": True, "ignore_index": 5},
    ],
)
@pytest.mark.parametrize("bias", [False, True])
def test_options_fp32(opts, bias):
    hidden, weight, labels, b = make(45, 131, 20, torch.float32, seed=7, bias=bias)
    check(hidden, weight, labels, bias=b, **opts)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16])
def test_dtypes(dtype):
    hidden, weight, labels, b = make(50, 300, 32, dtype, seed=3, bias=True)
    check(hidden, weight, labels, bias=b, softcap=20.0, label_smoothing=0.05)
    check(hidden, weight, labels, bias=b, softcap=20.0, label_smoothing=0.05, z_loss=1e-3)


@pytest.mark.parametrize("impl", ["torch", "cublas"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("eps", [0.1, 0.5])
def test_smoothing_matches_torch_cross_entropy(impl, reduction, eps):
    """Label smoothing as torch.nn.functional.cross_entropy defines it, on explicit float64
    logits: (1 - eps) * CE + eps * mean over the vocabulary of -log p, ignored rows excluded
    (also from the mean's count)."""
    hidden, weight, labels, b = make(40, 90, 16, torch.float64, seed=11, bias=True, ignore_frac=0.3)
    leaves = [t.clone().requires_grad_() for t in (hidden, weight, b)]
    got = linear_cross_entropy(
        *leaves[:2], labels, bias=leaves[2], label_smoothing=eps, reduction=reduction, impl=impl
    )
    ref_leaves = [t.clone().requires_grad_() for t in (hidden, weight, b)]
    logits = ref_leaves[0] @ ref_leaves[1].t() + ref_leaves[2]
    want = torch.nn.functional.cross_entropy(
        logits, labels, label_smoothing=eps, reduction=reduction
    )
    assert rel(got, want) < 1e-10
    upstream = torch.randn(
        want.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(2)
    )
    grads = torch.autograd.grad(got, leaves, upstream)
    ref_grads = torch.autograd.grad(want, ref_leaves, upstream)
    for g, r in zip(grads, ref_grads, strict=True):
        assert rel(g, r) < 1e-10


def test_zloss_is_the_squared_log_normaliser():
    """z_loss * lse^2 per valid row, averaged like the loss: the difference of two calls is
    exactly that term, computed independently here."""
    hidden, weight, labels, _ = make(30, 50, 8, torch.float64, seed=12, ignore_frac=0.3)
    base = linear_cross_entropy(hidden, weight, labels, impl="torch")
    with_z = linear_cross_entropy(hidden, weight, labels, impl="torch", z_loss=0.25)
    lse = torch.logsumexp(hidden @ weight.t(), -1)
    valid = labels != -100
    assert torch.allclose(with_z - base, 0.25 * (lse[valid] ** 2).mean(), rtol=1e-12)


def test_filter_with_label_smoothing_and_softcap_is_refused():
    """Smoothing's uniform gradient share has a closed form only without a softcap (whose tanh
    derivative differs per logit): that combination is refused in one line, on every path."""
    hidden, weight, labels, _ = make(8, 20, 4, torch.float32, seed=0)
    for impl in ("auto", "torch"):
        with pytest.raises(
            MemtrainError, match="cannot combine label_smoothing > 0 with softcap"
        ) as err:
            linear_cross_entropy(
                hidden, weight, labels, label_smoothing=0.1, softcap=5.0, grad_filter=True,
                impl=impl,
            )  # fmt: skip
        assert "\n" not in str(err.value) and "tanh derivative" in str(err.value)


@pytest.mark.parametrize("smoothing", [0.1, 0.3])
def test_filter_with_label_smoothing_runs_exact_on_torch_path(smoothing):
    """grad_filter=True now accepts label smoothing; the torch path ignores the filter."""
    hidden, weight, labels, bias = make(37, 101, 24, torch.float32, seed=5, bias=True)
    opts = {"label_smoothing": smoothing, "z_loss": 0.05, "reduction": "sum"}
    leaves = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
    out = linear_cross_entropy(*leaves[:2], labels, bias=leaves[2], impl="torch",
                               grad_filter=True, **opts)  # fmt: skip
    ref = linear_cross_entropy(*(t.detach().double() for t in leaves[:2]), labels,
                               bias=bias.double(), impl="torch", **opts)  # fmt: skip
    assert rel(out, ref) < TOL[torch.float32]


def test_leading_dims_and_shift_match_reference():
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(3, 11, 16, generator=g)
    weight = torch.randn(40, 16, generator=g) / 4
    labels = torch.randint(0, 40, (3, 11), generator=g)
    check(hidden, weight, labels, shift=True)
    check(hidden, weight, labels, shift=True, reduction="none")


def test_all_rows_ignored():
    hidden, weight, labels, _ = make(20, 50, 8, torch.float32, seed=1)
    labels[:] = -100
    h = hidden.clone().requires_grad_()
    loss = linear_cross_entropy(h, weight, labels, impl="torch", reduction="sum")
    loss.backward()
    assert loss.item() == 0.0
    assert torch.count_nonzero(h.grad) == 0
    # "mean" over no valid label is 0/0, as in torch.nn.functional.cross_entropy
    assert torch.isnan(linear_cross_entropy(hidden, weight, labels, impl="torch"))
    assert torch.isnan(reference_linear_cross_entropy(hidden, weight, labels))


def test_loss_is_float32_for_low_precision_inputs():
    hidden, weight, labels, _ = make(10, 30, 8, torch.bfloat16, seed=2)
    assert linear_cross_entropy(hidden, weight, labels, impl="torch").dtype == torch.float32


def test_chunks_are_bounded():
    assert chunked.chunk_rows_for(256000, 16 * 1024 * 1024) == 65
    assert chunked.chunk_rows_for(10**9, 1024) == 16


def test_public_exports():
    assert memtrain.linear_cross_entropy is linear_cross_entropy
    assert memtrain.kernels.linear_cross_entropy is linear_cross_entropy


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda a: a.update(reduction="avg"), "reduction="),
        (lambda a: a.update(impl="cuda"), "impl="),
        (lambda a: a.update(labels=a["labels"].float()), "integer"),
        (lambda a: a.update(labels=a["labels"][:-1]), "labels shape"),
        (lambda a: a.update(weight=a["weight"][:, :-1]), "shapes do not fit"),
        (lambda a: a.update(weight=a["weight"].half()), "share one dtype"),
        (lambda a: a.update(label_smoothing=1.0), "label_smoothing"),
        (lambda a: a.update(softcap=0.0), "softcap"),
        (lambda a: a.update(z_loss=-1e-4), "z_loss"),
        (lambda a: a.update(z_loss=float("inf")), "z_loss"),
        (lambda a: a.update(bias=torch.zeros(3)), "bias must have shape"),
    ],
)
def test_bad_input_raises_memtrain_error(mutate, message):
    hidden, weight, labels, _ = make(8, 20, 4, torch.float32, seed=0)
    args = {"hidden": hidden, "weight": weight, "labels": labels}
    mutate(args)
    args.setdefault("impl", "torch")
    with pytest.raises(MemtrainError, match=message):
        linear_cross_entropy(args.pop("hidden"), args.pop("weight"), args.pop("labels"), **args)


def test_out_of_range_label_is_reported():
    hidden, weight, labels, _ = make(8, 20, 4, torch.float32, seed=0)
    labels[2] = 20
    with pytest.raises(MemtrainError, match="label 20 is outside the vocabulary"):
        linear_cross_entropy(hidden, weight, labels)


def test_triton_refused_where_it_cannot_run(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    hidden, weight, labels, _ = make(8, 20, 4, torch.float32, seed=0)
    with pytest.raises(MemtrainError, match="impl='triton' cannot run"):
        linear_cross_entropy(hidden, weight, labels, impl="triton")
    with pytest.raises(MemtrainError, match="impl='triton' cannot run"):
        linear_cross_entropy(hidden.double(), weight.double(), labels, impl="triton")


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_empty_batch_behaves_like_torch_on_every_impl(monkeypatch, reduction):
    """No rows: the kernels' grids and chunk plans are never built, and the result is what
    torch.nn.functional.cross_entropy gives (nan for "mean", 0 for "sum", empty for "none")."""
    from memtrain.kernels import cross_entropy

    monkeypatch.setattr(cross_entropy, "triton_available", lambda device: True)
    weight = torch.randn(30, 8, requires_grad=True)
    labels = torch.zeros(0, dtype=torch.long)
    want = torch.nn.functional.cross_entropy(torch.zeros(0, 30), labels, reduction=reduction)
    for impl in ("auto", "triton", "torch"):
        hidden = torch.randn(0, 8, requires_grad=True)
        loss = linear_cross_entropy(hidden, weight, labels, reduction=reduction, impl=impl)
        assert loss.shape == want.shape and torch.equal(loss.isnan(), want.isnan()), impl
        loss.sum().backward()
        assert hidden.grad.shape == (0, 8)
