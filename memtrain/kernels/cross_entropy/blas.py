"""cuBLAS path: the four large products in the vendor BLAS, the softmax parts in small kernels.

The floor of any exact method that does not store the logits is four products of 2·N·V·D
FLOPs each (forward logits, recomputed logits, dH = G·W, dW = Gᵀ·H). Here all four run in cuBLAS
(``torch.mm``/``torch.addmm`` into preallocated workspaces) and only elementwise work is left to
Triton (``blas_kernels.py``), or to PyTorch ops where Triton cannot run (CPU, float64).

Forward, for each block of rows and chunk of the vocabulary::

    L = H[rows] @ W[chunk].T               float32 output ([rows, chunk], workspace)
    row statistics <- L                     running max and sum of exponentials, target logit

Backward, for each block of rows (outer loop) and chunk of the vocabulary (inner loop)::

    S = W[chunk] @ H[rows].T - hi(lse)      dtype output ([chunk, rows]), see below
    S <- g * (exp(S - lo(lse)) - onehot)    in place: the logits gradient, transposed
    dW[chunk] (+)= S @ H[rows]              straight into the weight gradient's rows
    acc += S.T @ W[chunk]                   float32 accumulator of the row block's dH

Precision. The recomputed logits are not stored as they are (rounding a logit z to bf16 costs
|z|·2⁻⁹, i.e. a few per cent of the probability when |z| ~ 20). The BLAS epilogue instead
subtracts each token's log-sum-exp, rounded to the dtype (``hi``), in float32 before the single
rounding of the output, so S holds log-probabilities (plus the small ``lo = lse - hi``, removed
in float32 by the kernel): the rounding error of p is p·(|log p| + |lo|)·2⁻⁹, relative to p
itself. The one entry where that is not enough is the target's, p - 1, which cancels when p is
close to 1: it takes p from the forward's float32 target logit instead. A logit softcap or a
bias breaks the shift (the log-probability is not an affine function of the product), so with
either the backward takes the product in float32 (``out_dtype``) into a second workspace:
4 more bytes per logit written and read. The forward always takes float32 logits: its
log-sum-exp must be exact before anything can be shifted by it. Measured on the CPU
(emulated rounding, N=512, D=2304, V=32000, bf16, against float64): dH/dW relative error
1.6e-4 shifted vs 4.8e-5 float32 logits on random inputs, 1.7e-3 both on peaked ones (target
probability 0.96); at target probability 0.9998 3.4e-3 vs 1.8e-3 (5.8e-2 without the float32
target entry).

dH is accumulated over vocabulary chunks in float32 (``addmm`` with ``out_dtype=float32``), in a
buffer of rows x D (4·rows·D bytes) that is part of the workspace: summing 36 or 72 partial
products (the chunk counts of a 256k vocabulary) in bf16 instead measured 6-9e-3 of relative
error, against 5e-5 (random) to 1.7e-3 (peaked) in float32. dW of a chunk is complete within one row block, so it
goes straight into the weight gradient, and only across row blocks (N/rows of them) is it
accumulated in the gradient's dtype (cuBLAS adds in float32 and rounds once per block): 1, 2,
4, 8 blocks measured 9.3e-4, 9.7e-4, 1.0e-3, 1.0e-3 (random) and 2.3e-3 to 2.4e-3 (peaked).
Hence the loop order: rows outer (their dH accumulator is small), vocabulary inner. For fp16
the logits gradient is scaled by a power of two first (``fp16_grad_scale``).

Not done: computing both gradients in the forward (as Liger does, rescaled in backward by the
scalar upstream gradient) saves no product here, since the softmax needs the complete
log-sum-exp first and the forward would take the logits twice itself; it would only hold dW
(as large as the weight) and dH from forward to backward. A flash-attention-like online
rescaling gives dH in the first pass, but dW still needs the final log-sum-exp: four products
either way.

``plan_blas`` sizes rows and chunks from ``workspace_bytes``: larger means fewer, larger cuBLAS
calls (closer to its peak, less launch overhead), smaller means less memory.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from memtrain.kernels.cross_entropy.availability import triton_available
from memtrain.kernels.cross_entropy.chunked import (
    fp16_grad_scale,
    prob_scale,
    row_losses,
    undo_grad_scale,
)
from memtrain.kernels.cross_entropy.reductions import full_precision_reductions

MiB = 1024 * 1024
DEFAULT_BLAS_WORKSPACE_BYTES = 64 * MiB
# Rows and chunks are multiples of this (tests lower it to cross every boundary on tiny shapes).
GRANULE = 128
# "auto", "triton" or "torch": who runs the elementwise kernels ("auto": Triton where it runs).
ELEMENTWISE = "auto"
# "cublas", or "triton" to take the Triton path's fused forward (benchmark comparison).
FORWARD = "cublas"
# What the hidden-gradient accumulation used in the last backward ("addmm-fp32-out", "mm+add",
# "same-dtype"); the benchmark reports it.
ACCUMULATION: list[str] = []


class BlasPlan(NamedTuple):
    """Rows per block and vocabulary columns per chunk, for the forward and the backward."""

    fwd_rows: int
    fwd_cols: int
    bwd_rows: int
    bwd_cols: int


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def _split(total: int, cap: int, granule: int) -> int:
    """Chunk size at most ``max(cap, granule)``, a multiple of ``granule`` (or ``total``), that
    splits ``total`` into near-equal chunks."""
    cap = max(granule, cap // granule * granule)
    if cap >= total:
        return total
    chunks = -(-total // cap)
    return min(cap, _round_up(-(-total // chunks), granule))


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Float32 for the low-precision dtypes, float64 kept as is."""
    return torch.promote_types(dtype, torch.float32)


def shifted_backward(bias: torch.Tensor | None, softcap: float | None) -> bool:
    """Whether the backward subtracts the log-sum-exp in the BLAS epilogue (see module doc)."""
    return bias is None and softcap is None


def plan_blas(
    n_rows: int,
    vocab: int,
    dim: int,
    dtype: torch.dtype,
    workspace_bytes: int,
    *,
    shifted: bool = True,
    granule: int | None = None,
) -> BlasPlan:
    """Block sizes that keep each pass's scratch memory within ``workspace_bytes``.

    Forward: float32 logits of rows x cols, about square (both products' operands are reused
    from L2 equally). Backward: at most half the budget goes to the float32 hidden-gradient
    accumulator (rows x D; none for float32/float64 inputs, which accumulate in the gradient),
    the rest to the logits chunk (dtype, plus float32 logits when not shifted).
    """
    granule = granule or GRANULE
    n, v = max(n_rows, 1), max(vocab, 1)
    itemsize = torch.empty((), dtype=dtype).element_size()
    acc_size = torch.empty((), dtype=acc_dtype(dtype)).element_size()

    def square(elems: int) -> tuple[int, int]:
        side = 1 << max(0, math.isqrt(max(elems, 1)).bit_length() - 1)
        rows = _split(n, side, granule)
        return rows, _split(v, elems // rows, granule)

    fwd_rows, fwd_cols = square(workspace_bytes // acc_size)
    per_logit = itemsize if shifted or itemsize == acc_size else itemsize + acc_size
    acc_row = 4 * dim if itemsize < acc_size else 0
    if not acc_row:
        bwd_rows, bwd_cols = square(workspace_bytes // per_logit)
    else:
        bwd_rows = _split(n, workspace_bytes // 2 // acc_row, granule)
        left = max(workspace_bytes - bwd_rows * acc_row, 0)
        bwd_cols = _split(v, left // (bwd_rows * per_logit), granule)
    return BlasPlan(fwd_rows, fwd_cols, bwd_rows, bwd_cols)


def workspace_of(plan: BlasPlan, dtype: torch.dtype, dim: int, shifted: bool) -> int:
    """Bytes of scratch memory the plan allocates (the larger of forward and backward)."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    acc_size = torch.empty((), dtype=acc_dtype(dtype)).element_size()
    fwd = plan.fwd_rows * plan.fwd_cols * acc_size
    per_logit = itemsize if shifted or itemsize == acc_size else itemsize + acc_size
    acc = plan.bwd_rows * dim * 4 if itemsize < acc_size else 0
    return max(fwd, plan.bwd_rows * plan.bwd_cols * per_logit + acc)


# ----------------------------------------------------------------------------- capabilities

_FP32_OUT: dict[str, bool] = {}


def fp32_out_supported(device: torch.device) -> bool:
    """Whether ``torch.mm(a, b, out_dtype=torch.float32)`` runs for bf16 inputs on ``device``
    (cuBLAS with a float32 output, PyTorch 2.8 and later on CUDA). Checked once per device."""
    if device.type != "cuda":
        return False
    key = str(device)
    if key not in _FP32_OUT:
        try:
            a = torch.ones(8, 8, dtype=torch.bfloat16, device=device)
            _FP32_OUT[key] = torch.mm(a, a, out_dtype=torch.float32).dtype == torch.float32
        except (RuntimeError, TypeError, NotImplementedError):
            _FP32_OUT[key] = False
    return _FP32_OUT[key]


def blas_supported(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether this path runs natively: CUDA bf16/fp16 need float32-output products; fp32 and
    float64 always run, and the CPU emulates the products in float32 (for tests)."""
    if device.type == "cuda" and dtype in (torch.bfloat16, torch.float16):
        return fp32_out_supported(device)
    return True


def _elementwise_triton(device: torch.device, dtype: torch.dtype) -> bool:
    if ELEMENTWISE == "torch" or dtype == torch.float64:
        return False
    runs = triton_available(device)
    if ELEMENTWISE == "triton" and not runs:
        raise RuntimeError(f"the Triton elementwise kernels cannot run on {device}")
    return runs


class _Products:
    """The matrix products, native (cuBLAS) or, on the CPU, emulated with float32 operands so
    that the rounding matches cuBLAS's float32 epilogue (one rounding of the final value)."""

    def __init__(self, device: torch.device, dtype: torch.dtype):
        self.acc = acc_dtype(dtype)
        self.low = dtype != self.acc
        self.native = device.type == "cuda" or not self.low

    def to_acc(self, a: torch.Tensor, b: torch.Tensor, out: torch.Tensor) -> None:
        """``out`` (accumulation dtype) = a @ b."""
        if not self.low:
            torch.mm(a, b, out=out)
        elif self.native:
            torch.mm(a, b, out_dtype=torch.float32, out=out)
        else:
            torch.mm(a.to(self.acc), b.to(self.acc), out=out)

    def shifted(self, shift: torch.Tensor, a: torch.Tensor, b: torch.Tensor, out) -> None:
        """``out`` (dtype) = round(a @ b + shift[None, :]), the sum taken before rounding."""
        if self.native:
            torch.addmm(shift, a, b, out=out)
        else:
            out.copy_(torch.addmm(shift.to(self.acc), a.to(self.acc), b.to(self.acc)))

    def accumulate(self, acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor, first: bool) -> None:
        """``acc`` (+)= a @ b, with ``acc`` in the accumulation dtype and a, b in the dtype."""
        if not self.low:
            if first:
                torch.mm(a, b, out=acc)
            else:
                acc.addmm_(a, b)
            _note("same-dtype")
        elif not self.native:
            if first:
                torch.mm(a.to(self.acc), b.to(self.acc), out=acc)
            else:
                acc.addmm_(a.to(self.acc), b.to(self.acc))
            _note("emulated")
        elif first:
            torch.mm(a, b, out_dtype=torch.float32, out=acc)
        else:
            _accumulate_fp32(acc, a, b)


_ADDMM_FP32: list[bool] = []


def _accumulate_fp32(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """``acc += a @ b`` with a float32 ``acc`` and low-precision operands, in cuBLAS's epilogue
    where PyTorch allows a float32 ``self`` for ``addmm(out_dtype=...)`` (2.10 and later);
    otherwise through a float32 product and an addition."""
    if not _ADDMM_FP32 or _ADDMM_FP32[0]:
        try:
            torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
            _ADDMM_FP32[:] = [True]
            _note("addmm-fp32-out")
            return
        except (RuntimeError, TypeError, NotImplementedError):
            _ADDMM_FP32[:] = [False]
    acc.add_(torch.mm(a, b, out_dtype=torch.float32))
    _note("mm+add")


def _note(how: str) -> None:
    if ACCUMULATION != [how]:
        ACCUMULATION[:] = [how]


# ----------------------------------------------------------------------------- elementwise (torch)


def _row_stats_torch(logits, bias, targets, col_start, stats, softcap) -> None:
    """PyTorch twin of ``blas_kernels.row_stats``."""
    run_max, run_sum, target_logit, logit_sum = stats
    n_cols = logits.shape[1]
    z = logits
    if bias is not None:
        z = z + bias[col_start : col_start + n_cols].to(z.dtype)
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    top = z.amax(dim=1)
    part = torch.exp(z - top[:, None]).sum(dim=1)
    new_max = torch.maximum(run_max, top)
    run_sum.mul_(torch.exp(run_max - new_max)).add_(part * torch.exp(top - new_max))
    run_max.copy_(new_max)
    local = targets.long() - col_start
    inside = (local >= 0) & (local < n_cols)
    picked = z.gather(1, local.clamp(0, n_cols - 1)[:, None]).squeeze(1)
    target_logit.add_(torch.where(inside, picked, torch.zeros_like(picked)))
    if logit_sum is not None:
        logit_sum.add_(z.sum(dim=1))


def _grad_logits_torch(
    src, dst, col_start, shift, target_prob, targets, grad_rows, bias, softcap, smoothing, inv_vocab,
    grad_bias, shifted, prob_scale=None,
) -> None:  # fmt: skip
    """PyTorch twin of ``blas_kernels.grad_logits``."""
    n_vocab = src.shape[0]
    x = src.to(shift.dtype)
    tanh = None
    if shifted:
        dz = torch.exp(x - shift[None, :])
    else:
        if bias is not None:
            x = x + bias[col_start : col_start + n_vocab].to(x.dtype)[:, None]
        if softcap is not None:
            tanh = torch.tanh(x / softcap)
            x = tanh * softcap
        dz = torch.exp(x - shift[None, :])
    local = targets.long() - col_start
    hit = ((local >= 0) & (local < n_vocab)).nonzero().squeeze(1)
    dz[local[hit], hit] = target_prob[hit]
    if prob_scale is not None:
        dz *= prob_scale[None, :]
    dz[local[hit], hit] -= 1.0 - smoothing
    if smoothing > 0.0:
        dz -= smoothing * inv_vocab
    dz *= grad_rows[None, :]
    if tanh is not None:
        dz *= 1.0 - tanh * tanh
    if grad_bias is not None:
        grad_bias[col_start : col_start + n_vocab] += dz.sum(dim=1)
    dst.copy_(dz)


# ----------------------------------------------------------------------------- autograd


def blas_forward(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    softcap: float | None,
    need_sum: bool,
    plan: BlasPlan,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(log-sum-exp, target logit, sum of logits or None) of every row, float32 (float64)."""
    n_rows, vocab = hidden.shape[0], weight.shape[0]
    device, dtype = hidden.device, hidden.dtype
    products = _Products(device, dtype)
    if _elementwise_triton(device, dtype):
        from memtrain.kernels.cross_entropy.blas_kernels import row_stats
    else:
        row_stats = _row_stats_torch
    acc = products.acc
    run_max = torch.full((n_rows,), float("-inf"), dtype=acc, device=device)
    run_sum = torch.zeros(n_rows, dtype=acc, device=device)
    target_logit = torch.zeros(n_rows, dtype=acc, device=device)
    logit_sum = torch.zeros(n_rows, dtype=acc, device=device) if need_sum else None
    rows, cols = plan.fwd_rows, plan.fwd_cols
    buf = torch.empty(rows * cols, dtype=acc, device=device) if n_rows else None
    for r0 in range(0, n_rows, rows):
        r1 = min(r0 + rows, n_rows)
        stats = (run_max[r0:r1], run_sum[r0:r1], target_logit[r0:r1])
        stats += (logit_sum[r0:r1] if logit_sum is not None else None,)
        h = hidden[r0:r1]
        for c0 in range(0, vocab, cols):
            c1 = min(c0 + cols, vocab)
            logits = buf[: (r1 - r0) * (c1 - c0)].view(r1 - r0, c1 - c0)
            products.to_acc(h, weight[c0:c1].t(), logits)
            row_stats(logits, bias, targets[r0:r1], c0, stats, softcap)
    return run_max + torch.log(run_sum), target_logit, logit_sum


def _triton_forward(hidden, weight, bias, targets, softcap, need_sum):
    """The Triton path's fused forward (logits never leave registers), for comparison."""
    from memtrain.kernels.cross_entropy.triton_function import ConfigPicker
    from memtrain.kernels.cross_entropy.triton_fwd import forward_row_stats

    flags = (bias is not None, softcap is not None, need_sum)
    n_rows, dim = hidden.shape
    picker = ConfigPicker("forward", hidden.dtype, (dim, *flags), n_rows * weight.shape[0])

    def run(cfg):
        return forward_row_stats(hidden, weight, bias, targets, softcap, need_sum, cfg)

    return run(picker(run))


class BlasLinearCrossEntropy(torch.autograd.Function):
    """Per-row losses of ``softcap(hidden @ weight.T + bias)`` against ``targets`` (-1 = ignore).

    ``plan`` is a :class:`BlasPlan` (see :func:`plan_blas`).
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, softcap, label_smoothing, plan, z_loss=0.0):
        vocab = weight.shape[0]
        if FORWARD == "triton" and _elementwise_triton(hidden.device, hidden.dtype):
            lse, target_logit, logit_sum = _triton_forward(
                hidden, weight, bias, targets, softcap, label_smoothing > 0.0
            )
        else:
            with full_precision_reductions():
                lse, target_logit, logit_sum = blas_forward(
                    hidden, weight, bias, targets, softcap, label_smoothing > 0.0, plan
                )
        losses = row_losses(
            lse, target_logit, logit_sum, targets >= 0, label_smoothing, vocab, z_loss
        )
        target_prob = torch.exp(target_logit - lse)
        ctx.save_for_backward(hidden, weight, bias, targets, lse, target_prob)
        ctx.settings = (softcap, label_smoothing, plan, z_loss)
        return losses

    @staticmethod
    def backward(ctx, grad_losses):
        hidden, weight, bias, targets, lse, target_prob = ctx.saved_tensors
        softcap, smoothing, plan, z_loss = ctx.settings
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        with full_precision_reductions():
            grads = blas_backward(
                hidden, weight, bias, targets, lse, target_prob, grad_losses, softcap, smoothing,
                plan, (need_h, need_w, need_b), z_loss,
            )  # fmt: skip
        return (*grads, None, None, None, None, None)


def blas_backward(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    lse: torch.Tensor,
    target_prob: torch.Tensor,
    grad_losses: torch.Tensor,
    softcap: float | None,
    smoothing: float,
    plan: BlasPlan,
    needs: tuple[bool, bool, bool],
    z_loss: float = 0.0,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Gradients of ``sum(grad_losses * row_losses)`` w.r.t. hidden, weight and bias.

    ``target_prob`` is each row's softmax probability of its target, from the forward's float32
    target logit: the gradient's target entry p - 1 cancels when p is close to 1, so it must
    not come from the rounded log-probabilities.
    """
    need_h, need_w, need_b = needs
    need_b = need_b and bias is not None
    n_rows, dim = hidden.shape
    vocab = weight.shape[0]
    device, dtype = hidden.device, hidden.dtype
    products = _Products(device, dtype)
    acc = products.acc
    if _elementwise_triton(device, dtype):
        from memtrain.kernels.cross_entropy.blas_kernels import grad_logits
    else:
        grad_logits = _grad_logits_torch
    grad_hidden = torch.empty_like(hidden) if need_h else None
    grad_weight = torch.empty_like(weight) if need_w else None
    grad_bias = torch.zeros(vocab, dtype=acc, device=device) if need_b else None
    if not (need_h or need_w or need_b) or n_rows == 0 or vocab == 0:
        if grad_hidden is not None:
            grad_hidden.zero_()
        if grad_weight is not None:
            grad_weight.zero_()
        return grad_hidden, grad_weight, grad_bias.to(bias.dtype) if need_b else None

    grad_rows = (grad_losses.to(acc) * (targets >= 0)).contiguous()
    inv_scale = None
    if dtype == torch.float16:
        scale, inv_scale = fp16_grad_scale(grad_rows)
        grad_rows = grad_rows * scale
    shifted = shifted_backward(bias, softcap)
    if shifted:
        hi = lse.to(dtype)
        neg_hi = -hi
        shift = (lse - hi.to(acc)).contiguous()
    else:
        shift = lse
    rows, cols = plan.bwd_rows, plan.bwd_cols
    grad_buf = torch.empty(rows * cols, dtype=dtype, device=device)
    logits_buf = grad_buf
    if not shifted and products.low:
        logits_buf = torch.empty(rows * cols, dtype=acc, device=device)
    in_place = not products.low  # float32/float64 accumulate in the gradient itself
    acc_buf = None
    if need_h and not in_place:
        acc_buf = torch.empty((rows, dim), dtype=acc, device=device)
    inv_vocab = 1.0 / vocab
    scale = prob_scale(lse, z_loss).contiguous() if z_loss > 0.0 else None

    thin_buf = None  # float32 logits of a one-row block in a shifted backward
    for r0 in range(0, n_rows, rows):
        r1 = min(r0 + rows, n_rows)
        nr = r1 - r0
        h = hidden[r0:r1]
        h_t = h.t()
        # A one-row block is a one-column product, which PyTorch does not hand to cuBLASLt's
        # fused bias epilogue; its shifted log-probabilities measured 1e-2 off on an H200 (2e-3
        # for 3 rows), so such a block takes float32 logits.
        thin = shifted and nr == 1
        block_shifted = shifted and not thin
        row_shift = (lse if thin else shift)[r0:r1]
        if thin and products.low and thin_buf is None:
            thin_buf = torch.empty(cols, dtype=acc, device=device)
        row_targets, row_grad = targets[r0:r1], grad_rows[r0:r1]
        row_target_prob = target_prob[r0:r1]
        row_scale = scale[r0:r1] if scale is not None else None
        dh = None
        if need_h:
            dh = grad_hidden[r0:r1] if in_place else acc_buf[:nr]
        for c0 in range(0, vocab, cols):
            c1 = min(c0 + cols, vocab)
            w = weight[c0:c1]
            grad = grad_buf[: (c1 - c0) * nr].view(c1 - c0, nr)
            if block_shifted:
                products.shifted(neg_hi[r0:r1], w, h_t, grad)
                src = grad
            else:
                buf = thin_buf if thin and thin_buf is not None else logits_buf
                src = buf[: (c1 - c0) * nr].view(c1 - c0, nr)
                products.to_acc(w, h_t, src)
            grad_logits(
                src, grad, c0, row_shift, row_target_prob, row_targets, row_grad, bias, softcap, smoothing,
                inv_vocab, grad_bias, block_shifted, row_scale,
            )  # fmt: skip
            if need_w:
                if r0 == 0:
                    torch.mm(grad, h, out=grad_weight[c0:c1])
                else:
                    grad_weight[c0:c1].addmm_(grad, h)
            if need_h:
                products.accumulate(dh, grad.t(), w, first=c0 == 0)
        if need_h and not in_place:
            undo_grad_scale(inv_scale, dh)
            grad_hidden[r0:r1] = dh
    undo_grad_scale(inv_scale, grad_weight, grad_bias)
    return grad_hidden, grad_weight, grad_bias.to(bias.dtype) if need_b else None
