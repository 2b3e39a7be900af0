"""The cuBLAS path of linear_cross_entropy (``impl="cublas"``) against a float64 reference.

On the CPU the products are emulated with float32 operands and a single rounding of the output
(what cuBLAS's float32 epilogue does) and the elementwise parts run as PyTorch ops; the Triton
elementwise kernels are covered by the interpreter tests (interpret_worker.py). Rows and
vocabulary chunks are multiples of 8 here, so the odd shapes below cross every row-block and
chunk boundary, and the last block and chunk are partial.
"""

from __future__ import annotations

import math

import pytest
import torch

from memtrain.errors import MemtrainError
from memtrain.kernels import linear_cross_entropy, reference_linear_cross_entropy
from memtrain.kernels.cross_entropy import blas

# Relative error ||out - ref|| / ||ref|| allowed per input dtype (loss and every gradient).
TOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.bfloat16: 2e-2, torch.float16: 1e-2}
TINY = 1  # workspace_bytes: the smallest blocks (8 rows x 8 columns)


@pytest.fixture(autouse=True)
def small_granule(monkeypatch):
    monkeypatch.setattr(blas, "GRANULE", 8)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    scale = b.norm().item()
    return (a - b).norm().item() / (scale if scale > 0 else 1.0)


def make(n, v, d, dtype, seed, bias=False, ignore_frac=0.2, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, d, generator=g).to(dtype)
    weight = (torch.randn(v, d, generator=g) * scale / math.sqrt(d)).to(dtype)
    labels = torch.randint(0, v, (n,), generator=g)
    labels[torch.rand(n, generator=g) < ignore_frac] = -100
    labels[0] = 1  # at least one valid row for "mean"
    b = torch.randn(v, generator=g).to(dtype) if bias else None
    return hidden, weight, labels, b


def errors(hidden, weight, labels, bias=None, needs=(True, True, True), **opts):
    """Relative errors of the loss and of each input gradient, random upstream gradient."""
    if "ignore_index" in opts:
        labels = torch.where(labels == -100, opts["ignore_index"], labels)
    inputs = [t for t in (hidden, weight, bias) if t is not None]
    needs = needs[: len(inputs)]
    leaves = [t.detach().clone().requires_grad_(x) for t, x in zip(inputs, needs, strict=True)]
    ref_leaves = [t.detach().double().requires_grad_(x) for t, x in zip(inputs, needs, strict=True)]
    b = leaves[2] if bias is not None else None
    rb = ref_leaves[2] if bias is not None else None
    opts.setdefault("workspace_bytes", TINY)
    out = linear_cross_entropy(leaves[0], leaves[1], labels, bias=b, impl="cublas", **opts)
    opts.pop("workspace_bytes")
    ref = reference_linear_cross_entropy(ref_leaves[0], ref_leaves[1], labels, bias=rb, **opts)
    assert out.shape == ref.shape
    assert out.dtype == (torch.float64 if hidden.dtype == torch.float64 else torch.float32)
    errs = {"loss": rel(out, ref)}
    seeded = torch.Generator().manual_seed(1234)  # a fixed upstream: the test is repeatable
    upstream = torch.randn(ref.shape, dtype=torch.float64, generator=seeded).to(ref.device)
    wanted = [t for t in leaves if t.requires_grad]
    grads = torch.autograd.grad(out, wanted, upstream.to(out.dtype))
    ref_grads = torch.autograd.grad(ref, [t for t in ref_leaves if t.requires_grad], upstream)
    names = ("hidden", "weight", "bias")[: len(leaves)]
    names = [n for n, t in zip(names, leaves, strict=True) if t.requires_grad]
    for name, got, want, leaf in zip(names, grads, ref_grads, wanted, strict=True):
        assert got.dtype == leaf.dtype and got.shape == leaf.shape
        errs[name] = rel(got, want) if torch.isfinite(got).all() else math.inf
    return errs


def check(hidden, *args, tol=None, **kwargs):
    tol = tol or TOL[hidden.dtype]
    errs = errors(hidden, *args, **kwargs)
    assert max(errs.values()) < tol, (errs, tol)


@pytest.mark.parametrize("n,v,d", [(1, 7, 3), (37, 101, 24), (130, 300, 16), (64, 257, 33)])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_shapes_and_reductions_fp32(n, v, d, reduction):
    hidden, weight, labels, _ = make(n, v, d, torch.float32, seed=n + v)
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


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize(
    "opts",
    [
        {},
        {"softcap": 20.0, "reduction": "sum"},
        {"label_smoothing": 0.05, "bias": True},
        {"z_loss": 1e-3, "label_smoothing": 0.05},
        {"z_loss": 1e-3, "softcap": 20.0, "bias": True, "reduction": "none"},
    ],
)
def test_dtypes(dtype, opts):
    opts = dict(opts)
    hidden, weight, labels, b = make(50, 300, 32, dtype, seed=3, bias=opts.pop("bias", False))
    check(hidden, weight, labels, bias=b, **opts)


def test_fp16_mean_over_many_rows_and_large_vocab_does_not_underflow():
    # grad_row * probability = 1/600 * 1/5000 is below fp16's smallest subnormal: the logits
    # gradient is scaled by a power of two before it is rounded to fp16.
    hidden, weight, labels, _ = make(600, 5000, 16, torch.float16, seed=4, scale=0.5)
    check(hidden, weight, labels, workspace_bytes=1 << 20)


def test_peaked_logits_keep_bf16_gradients_accurate():
    """Logits of ~25, target probability 0.9998: the gradient's target entry p - 1 cancels, and
    rounding log-probabilities of ~-10 to bf16 costs a few 1e-3 on the small entries. With the
    target entry taken from the forward in float32 the shifted bf16 products stay within 2x of
    float32 logits (the softcap path, here with a cap too large to matter): 3.4e-3 vs 1.8e-3
    (5.8e-2 with the target entry from the rounded log-probabilities)."""
    g = torch.Generator().manual_seed(5)
    n, v, d = 96, 500, 64
    weight = torch.randn(v, d, generator=g) / math.sqrt(d)
    labels = torch.randint(0, v, (n,), generator=g)
    hidden = 25.0 * weight[labels] + 0.5 * torch.randn(n, d, generator=g)
    hidden, weight = hidden.bfloat16(), weight.bfloat16()
    shifted = errors(hidden, weight, labels, workspace_bytes=1 << 20)
    float32 = errors(hidden, weight, labels, softcap=1e6, workspace_bytes=1 << 20)
    assert max(shifted.values()) < 6e-3, shifted
    for key in ("hidden", "weight"):
        assert shifted[key] < 2 * float32[key] + 1e-3, (shifted, float32)


def test_frozen_inputs_get_no_gradient():
    hidden, weight, labels, b = make(30, 70, 12, torch.float32, seed=9, bias=True)
    check(hidden, weight, labels, bias=b, needs=(True, False, False))
    check(hidden, weight, labels, bias=b, needs=(False, True, True))
    check(hidden, weight, labels, bias=b, needs=(False, False, True))


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
    loss = linear_cross_entropy(h, weight, labels, impl="cublas", reduction="sum")
    loss.backward()
    assert loss.item() == 0.0
    assert torch.count_nonzero(h.grad) == 0
    assert torch.isnan(linear_cross_entropy(hidden, weight, labels, impl="cublas"))


def test_default_workspace_single_block_matches_tiny_blocks():
    hidden, weight, labels, _ = make(70, 150, 24, torch.float32, seed=12)
    one = errors(hidden, weight, labels, workspace_bytes=None)
    many = errors(hidden, weight, labels, workspace_bytes=TINY)
    assert max(one.values()) < 2e-5 and max(many.values()) < 2e-5


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shifted", [True, False])
@pytest.mark.parametrize("workspace", [1 << 20, 16 << 20, 64 << 20, 256 << 20])
@pytest.mark.parametrize("n,v,d", [(8192, 256000, 2304), (32768, 128256, 2048), (100, 50257, 768)])
def test_plan_stays_within_workspace(monkeypatch, dtype, shifted, workspace, n, v, d):
    monkeypatch.setattr(blas, "GRANULE", 128)
    plan = blas.plan_blas(n, v, d, dtype, workspace, shifted=shifted)
    assert all(x > 0 for x in plan)
    assert plan.fwd_rows <= max(n, 1) and plan.bwd_rows <= max(n, 1)
    assert plan.fwd_cols <= v and plan.bwd_cols <= v
    used = blas.workspace_of(plan, dtype, d, shifted)
    # within budget, unless even the smallest blocks (128 x 128 logits) do not fit
    smallest = blas.workspace_of(blas.BlasPlan(128, 128, 128, 128), dtype, d, shifted)
    assert used <= max(workspace, smallest), (plan, used, workspace)


def test_plan_for_the_gemma_head_uses_large_products(monkeypatch):
    monkeypatch.setattr(blas, "GRANULE", 128)
    plan = blas.plan_blas(8192, 256000, 2304, torch.bfloat16, 64 << 20)
    assert plan.fwd_rows * plan.fwd_cols * 4 <= 64 << 20
    assert min(plan) >= 2048, plan


def test_explicit_plan_through_the_autograd_function():
    hidden, weight, labels, _ = make(33, 90, 16, torch.float32, seed=13)
    targets = torch.where(labels == -100, -1, labels).to(torch.int32)
    h = hidden.clone().requires_grad_()
    plan = blas.BlasPlan(fwd_rows=16, fwd_cols=40, bwd_rows=24, bwd_cols=32)
    losses = blas.BlasLinearCrossEntropy.apply(h, weight, None, targets, None, 0.0, plan)
    losses.sum().backward()
    ref_h = hidden.double().requires_grad_()
    ref = reference_linear_cross_entropy(ref_h, weight.double(), labels, reduction="sum")
    ref.backward()
    assert rel(losses.sum(), ref) < 2e-5 and rel(h.grad, ref_h.grad) < 2e-5


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_one_row_block_takes_float32_logits(monkeypatch, dtype):
    """A block of one row would be a one-column shifted product (not fused on the GPU); it
    takes float32 logits instead, and the gradients still match the reference."""
    hidden, weight, labels, _ = make(9, 70, 16, dtype, seed=21, ignore_frac=0.0)
    targets = torch.where(labels == -100, -1, labels).to(torch.int32)
    shifted_cols = []
    real = blas._Products.shifted

    def spy(self, shift, a, b, out):
        shifted_cols.append(b.shape[1])
        return real(self, shift, a, b, out)

    monkeypatch.setattr(blas._Products, "shifted", spy)
    leaves = [t.clone().requires_grad_() for t in (hidden, weight)]
    plan = blas.BlasPlan(fwd_rows=8, fwd_cols=24, bwd_rows=8, bwd_cols=24)  # rows 8 + 1
    losses = blas.BlasLinearCrossEntropy.apply(*leaves, None, targets, None, 0.0, plan)
    losses.sum().backward()
    assert shifted_cols and set(shifted_cols) == {8}, shifted_cols  # never the 1-row block
    ref_leaves = [t.double().requires_grad_() for t in (hidden, weight)]
    ref = reference_linear_cross_entropy(*ref_leaves, labels, reduction="sum")
    ref.backward()
    for got, want in zip(leaves, ref_leaves, strict=True):
        assert rel(got.grad, want.grad) < TOL[dtype]


def test_grad_filter_is_refused():
    hidden, weight, labels, _ = make(8, 20, 4, torch.float32, seed=0)
    with pytest.raises(MemtrainError, match="grad_filter"):
        linear_cross_entropy(hidden, weight, labels, impl="cublas", grad_filter=True)


def test_auto_keeps_the_torch_path_on_the_cpu(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    calls = []
    monkeypatch.setattr(blas.BlasLinearCrossEntropy, "apply", lambda *a: calls.append(a))
    hidden, weight, labels, _ = make(8, 20, 4, torch.float32, seed=0)
    linear_cross_entropy(hidden, weight, labels)
    assert not calls


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize(
    "opts",
    [{}, {"softcap": 20.0, "label_smoothing": 0.1, "bias": True}, {"z_loss": 1e-3}],
)
def test_cuda_products_and_kernels(dtype, opts):
    """cuBLAS products (float32 output, shifted epilogue, float32 accumulation) and the Triton
    elementwise kernels on the GPU; float32 tolerance looser for TF32-free fp32 BLAS rounding."""
    opts = dict(opts)
    hidden, weight, labels, b = make(300, 5000, 64, dtype, seed=6, bias=opts.pop("bias", False))
    to = lambda t: t.cuda() if t is not None else None  # noqa: E731
    tol = 1e-4 if dtype == torch.float32 else None
    check(to(hidden), to(weight), to(labels), bias=to(b), tol=tol, workspace_bytes=1 << 16, **opts)


class _CudaHidden:
    """Just what ``_auto_impl`` reads of a CUDA tensor (no GPU needed to build it)."""

    def __init__(self, dim: int, dtype: torch.dtype):
        self.device = torch.device("cuda")
        self.shape = (8, dim)
        self.dtype = dtype

    def element_size(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()


@pytest.mark.parametrize(
    "dim,dtype,hopper,filtering,supported,want",
    [
        (2304, torch.bfloat16, True, False, True, "triton"),  # descriptor kernels: Triton
        (2304, torch.bfloat16, False, False, True, "cublas"),  # pointer kernels: cuBLAS >= 2048
        (2300, torch.bfloat16, True, False, True, "cublas"),  # rows not 16-byte aligned
        (896, torch.bfloat16, False, False, True, "triton"),  # small hidden size
        (4096, torch.float32, True, False, True, "cublas"),  # no descriptor kernels for fp32
        (2304, torch.bfloat16, False, True, True, "triton"),  # the filter is Triton's
        (2304, torch.bfloat16, False, False, False, "triton"),  # no float32-output products
        (2304, torch.float64, False, False, True, "triton"),
    ],
)
def test_auto_choice_on_cuda(monkeypatch, dim, dtype, hopper, filtering, supported, want):
    import memtrain.kernels.cross_entropy as lce_module
    from memtrain.kernels.cross_entropy import triton_function

    monkeypatch.setattr(triton_function, "tma_capable_device", lambda: hopper)
    monkeypatch.setattr(blas, "blas_supported", lambda device, dtype: supported)
    assert lce_module._auto_impl(_CudaHidden(dim, dtype), True, filtering) == want
