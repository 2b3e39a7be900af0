"""Triton building blocks shared by the forward and backward kernels.

A tile of logits ``hidden[rows] @ weight[cols].T`` is computed in float32 registers by a loop
over the hidden dimension, then biased and softcapped. Row and column indices past the end are
clamped to the last valid one (so every load is in bounds and unmasked); callers mask the
results instead. ``UPCAST`` turns the operands to float32 before the product: Triton's CPU
interpreter gets bf16 products wrong.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def grid_offsets(rows, cols, stride):
    """``rows[:, None] * stride + cols[None, :]`` in int64: ``row * D`` and ``row * V`` pass
    2^31 on large problems (131,072 rows of a 256,000 vocabulary), where int32 would wrap and
    address the wrong memory. Every row-strided pointer of the kernels goes through here."""
    return rows.to(tl.int64)[:, None] * stride + cols[None, :]


@triton.jit
def tanh_f32(x):
    """tanh through exp, so it runs on every Triton backend (the interpreter included)."""
    return 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)


@triton.jit
def logits_tile(
    hidden_ptr,
    weight_ptr,
    bias_ptr,
    rows,
    cols,
    n_rows,
    vocab,
    dim,
    stride_h,
    stride_w,
    softcap,
    HAS_BIAS: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_D: tl.constexpr,
    EVEN_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """Float32 ``[BLOCK_M, BLOCK_V]`` logits; also returns tanh(raw / softcap) for backward."""
    safe_rows = tl.minimum(rows, n_rows - 1).to(tl.int64)
    safe_cols = tl.minimum(cols, vocab - 1).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    h_ptrs = hidden_ptr + grid_offsets(safe_rows, offs_d, stride_h)
    w_ptrs = weight_ptr + grid_offsets(safe_cols, offs_d, stride_w)
    acc = tl.zeros((BLOCK_M, BLOCK_V), dtype=tl.float32)
    for d0 in range(0, dim, BLOCK_D):
        if EVEN_D:
            h = tl.load(h_ptrs)
            w = tl.load(w_ptrs)
        else:
            d_mask = (d0 + offs_d) < dim
            h = tl.load(h_ptrs, mask=d_mask[None, :], other=0.0)
            w = tl.load(w_ptrs, mask=d_mask[None, :], other=0.0)
        if UPCAST:
            h = h.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(h, tl.trans(w), acc, input_precision=DOT_PRECISION)
        h_ptrs += BLOCK_D
        w_ptrs += BLOCK_D
    return bias_softcap(acc, bias_ptr, safe_cols, softcap, HAS_BIAS, HAS_SOFTCAP)


@triton.jit
def bias_softcap(acc, bias_ptr, safe_cols, softcap, HAS_BIAS: tl.constexpr, HAS_SOFTCAP):
    """A tile of raw products biased and softcapped; also tanh(raw / softcap) for backward.
    ``safe_cols`` are column indices clamped into the vocabulary."""
    if HAS_BIAS:
        acc += tl.load(bias_ptr + safe_cols).to(tl.float32)[None, :]
    tanh = acc
    if HAS_SOFTCAP:
        tanh = tanh_f32(acc / softcap)
        acc = tanh * softcap
    return acc, tanh


@triton.jit
def fold_row_stats(
    logits, valid, hit, run_max, run_sum, target_logit, logit_sum, NEED_SUM: tl.constexpr
):
    """Fold one tile into the running row statistics (online log-sum-exp).

    ``logits`` are -inf where not ``valid``; ``hit`` marks each row's target. Returns the
    updated (max, sum of exponentials, target logit, sum of logits) and the tile's row maxima.
    """
    row_top = tl.max(logits, axis=1)
    new_max = tl.maximum(run_max, row_top)
    run_sum = run_sum * tl.exp(run_max - new_max) + tl.sum(
        tl.exp(logits - new_max[:, None]), axis=1
    )
    target_logit += tl.sum(tl.where(hit, logits, 0.0), axis=1)
    if NEED_SUM:
        logit_sum += tl.sum(tl.where(valid, logits, 0.0), axis=1)
    return new_max, run_sum, target_logit, logit_sum, row_top


@triton.jit
def store_row_stats(
    out, mask, max_ptr, sumexp_ptr, target_logit_ptr, logit_sum_ptr,
    run_max, run_sum, target_logit, logit_sum, NEED_SUM: tl.constexpr,
):  # fmt: skip
    """Store one program's row statistics at offsets ``out`` (int64: slice x N)."""
    tl.store(max_ptr + out, run_max, mask=mask)
    tl.store(sumexp_ptr + out, run_sum, mask=mask)
    tl.store(target_logit_ptr + out, target_logit, mask=mask)
    if NEED_SUM:
        tl.store(logit_sum_ptr + out, logit_sum, mask=mask)


@triton.jit
def logits_grad(
    logits, tanh, cols, lse, targets, grad_rows, smoothing, inv_vocab, z_loss,
    HAS_SOFTCAP: tl.constexpr,
):  # fmt: skip
    """The loss's gradient w.r.t. a tile of logits (softmax minus the smoothed one-hot, times
    each row's upstream gradient), through the softcap's derivative when there is one. The
    z-loss ``c * lse^2`` adds ``2c * lse * softmax``: each row's softmax is scaled by
    ``1 + 2c * lse`` (exactly 1 without it)."""
    prob = tl.exp(logits - lse[:, None]) * (1.0 + 2.0 * z_loss * lse)[:, None]
    hit = cols[None, :] == targets[:, None]
    dz = prob - tl.where(hit, 1.0 - smoothing, 0.0) - smoothing * inv_vocab
    dz = dz * grad_rows[:, None]
    if HAS_SOFTCAP:
        dz = dz * (1.0 - tanh * tanh)
    return dz
