"""Triton elementwise kernels of the cuBLAS path (see ``blas.py``): no matrix products here.

``row_stats`` folds one chunk of float32 logits (tokens x vocabulary) into each token's running
maximum, sum of exponentials, target logit and (label smoothing) sum of logits, in one read.
``grad_logits`` turns one chunk of logits (vocabulary x tokens) into the logits gradient in one
read and one write (in place when source and destination share a dtype), optionally summing it
into the bias gradient.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from memtrain.kernels.cross_entropy.triton_tiles import fold_row_stats, grid_offsets, tanh_f32


@triton.jit
def _row_stats_kernel(
    logits_ptr,
    bias_ptr,
    targets_ptr,
    max_ptr,
    sumexp_ptr,
    target_logit_ptr,
    logit_sum_ptr,
    n_rows,
    n_cols,
    col_start,
    stride,
    softcap,
    HAS_BIAS: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    NEED_SUM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < n_rows
    local_target = tl.load(targets_ptr + rows, mask=row_mask, other=-1) - col_start
    run_max = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    run_sum = tl.zeros((BLOCK_M,), dtype=tl.float32)
    target_logit = tl.zeros((BLOCK_M,), dtype=tl.float32)
    logit_sum = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for v0 in range(0, n_cols, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        col_mask = cols < n_cols
        mask = row_mask[:, None] & col_mask[None, :]
        z = tl.load(logits_ptr + grid_offsets(rows, cols, stride), mask=mask, other=0.0)
        z = z.to(tl.float32)
        if HAS_BIAS:
            b = tl.load(bias_ptr + col_start + cols, mask=col_mask, other=0.0).to(tl.float32)
            z = z + b[None, :]
        if HAS_SOFTCAP:
            z = softcap * tanh_f32(z / softcap)
        z = tl.where(mask, z, float("-inf"))
        hit = (cols[None, :] == local_target[:, None]) & mask
        # Rows past the end stay at -inf (their NaNs are never stored).
        run_max, run_sum, target_logit, logit_sum, _ = fold_row_stats(
            z, mask, hit, run_max, run_sum, target_logit, logit_sum, NEED_SUM
        )
    old_max = tl.load(max_ptr + rows, mask=row_mask, other=0.0)
    old_sum = tl.load(sumexp_ptr + rows, mask=row_mask, other=0.0)
    top = tl.maximum(old_max, run_max)
    total = old_sum * tl.exp(old_max - top) + run_sum * tl.exp(run_max - top)
    tl.store(max_ptr + rows, top, mask=row_mask)
    tl.store(sumexp_ptr + rows, total, mask=row_mask)
    old_target = tl.load(target_logit_ptr + rows, mask=row_mask, other=0.0)
    tl.store(target_logit_ptr + rows, old_target + target_logit, mask=row_mask)
    if NEED_SUM:
        old_logit_sum = tl.load(logit_sum_ptr + rows, mask=row_mask, other=0.0)
        tl.store(logit_sum_ptr + rows, old_logit_sum + logit_sum, mask=row_mask)


@triton.jit
def _grad_logits_kernel(
    src_ptr,
    dst_ptr,
    bias_ptr,
    grad_bias_ptr,
    targets_ptr,
    shift_ptr,
    target_prob_ptr,
    grad_rows_ptr,
    prob_scale_ptr,
    n_vocab,
    n_tokens,
    col_start,
    stride_src,
    stride_dst,
    softcap,
    smoothing,
    inv_vocab,
    SHIFTED: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    BIAS_GRAD: tl.constexpr,
    PROB_SCALE: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid_v = tl.program_id(0)
    pid_n = tl.program_id(1)
    vs = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    ns = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    v_mask = vs < n_vocab
    n_mask = ns < n_tokens
    mask = v_mask[:, None] & n_mask[None, :]
    x = tl.load(src_ptr + grid_offsets(vs, ns, stride_src), mask=mask, other=0.0).to(tl.float32)
    shift = tl.load(shift_ptr + ns, mask=n_mask, other=0.0)
    targets = tl.load(targets_ptr + ns, mask=n_mask, other=-1)
    grad_rows = tl.load(grad_rows_ptr + ns, mask=n_mask, other=0.0)
    target_prob = tl.load(target_prob_ptr + ns, mask=n_mask, other=0.0)
    th = x
    if SHIFTED:
        # x already is logit - (rounded lse); shift is the rounding residual of the lse.
        log_prob = x - shift[None, :]
    else:
        z = x
        if HAS_BIAS:
            z += tl.load(bias_ptr + col_start + vs, mask=v_mask, other=0.0).to(tl.float32)[:, None]
        if HAS_SOFTCAP:
            th = tanh_f32(z / softcap)
            z = th * softcap
        log_prob = z - shift[None, :]
    hit = (col_start + vs)[:, None] == targets[None, :]
    # The target's probability comes from the forward in float32: p - 1 cancels when p ~ 1.
    prob = tl.where(hit, target_prob[None, :], tl.exp(log_prob))
    if PROB_SCALE:  # the z-loss: 2c * lse * softmax on top of the cross-entropy's softmax
        prob = prob * tl.load(prob_scale_ptr + ns, mask=n_mask, other=1.0)[None, :]
    dz = prob - tl.where(hit, 1.0 - smoothing, 0.0) - smoothing * inv_vocab
    dz = dz * grad_rows[None, :]
    if not SHIFTED and HAS_SOFTCAP:
        dz = dz * (1.0 - th * th)
    tl.store(dst_ptr + grid_offsets(vs, ns, stride_dst), dz.to(dst_ptr.dtype.element_ty), mask=mask)
    if BIAS_GRAD:
        partial = tl.sum(tl.where(mask, dz, 0.0), axis=1)
        tl.atomic_add(grad_bias_ptr + col_start + vs, partial, mask=v_mask)


def _interpreting() -> bool:
    from memtrain.kernels.cross_entropy.triton_function import interpreting

    return interpreting()


def row_stats(logits, bias, targets, col_start, stats, softcap) -> None:
    """Fold ``logits`` ([rows, cols] float32, columns ``col_start:``) into ``stats`` in place:
    (running max, sum of exponentials, target logit, sum of logits or None), each [rows]."""
    n_rows, n_cols = logits.shape
    run_max, run_sum, target_logit, logit_sum = stats
    block_m, block_v, warps = (16, 32, 1) if _interpreting() else (4, 1024, 4)
    _row_stats_kernel[(triton.cdiv(n_rows, block_m),)](
        logits, bias if bias is not None else logits, targets, run_max, run_sum, target_logit,
        logit_sum if logit_sum is not None else run_sum,
        n_rows, n_cols, col_start, logits.stride(0),
        float(softcap) if softcap is not None else 1.0,
        HAS_BIAS=bias is not None, HAS_SOFTCAP=softcap is not None,
        NEED_SUM=logit_sum is not None, BLOCK_M=block_m, BLOCK_V=block_v, num_warps=warps,
    )  # fmt: skip


def grad_logits(
    src: torch.Tensor,
    dst: torch.Tensor,
    col_start: int,
    shift: torch.Tensor,
    target_prob: torch.Tensor,
    targets: torch.Tensor,
    grad_rows: torch.Tensor,
    bias: torch.Tensor | None,
    softcap: float | None,
    smoothing: float,
    inv_vocab: float,
    grad_bias: torch.Tensor | None,
    shifted: bool,
    prob_scale: torch.Tensor | None = None,
) -> None:
    """``dst`` ([vocab chunk, tokens]) = logits gradient from ``src`` (see blas.py);
    ``prob_scale`` (per token, the z-loss's ``1 + 2c * lse``) multiplies each probability."""
    n_vocab, n_tokens = src.shape
    block_v, block_n, warps = (32, 16, 1) if _interpreting() else (16, 256, 4)
    grid = (triton.cdiv(n_vocab, block_v), triton.cdiv(n_tokens, block_n))
    _grad_logits_kernel[grid](
        src, dst, bias if bias is not None else src,
        grad_bias if grad_bias is not None else shift,
        targets, shift, target_prob, grad_rows,
        prob_scale if prob_scale is not None else grad_rows,
        n_vocab, n_tokens, col_start, src.stride(0), dst.stride(0),
        float(softcap) if softcap is not None else 1.0, float(smoothing), float(inv_vocab),
        SHIFTED=shifted, HAS_BIAS=bias is not None, HAS_SOFTCAP=softcap is not None,
        BIAS_GRAD=grad_bias is not None, PROB_SCALE=prob_scale is not None, BLOCK_V=block_v, BLOCK_N=block_n, num_warps=warps,
    )  # fmt: skip
