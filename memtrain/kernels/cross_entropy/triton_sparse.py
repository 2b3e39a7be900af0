"""Block-sparse products of the filtered backward: only the kept blocks of the logits gradient.

The logits-gradient kernel marks each block of a chunk 0 (kept) or 1 (skipped). For each row
block (hidden gradient) or vocabulary block (weight gradient) a stable sort of its marks lists
the kept blocks first, and their count is the number of zeros; the kernels loop over just those
blocks with tensor-core products and add into the float32 accumulator or the weight gradient.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from memtrain.kernels.cross_entropy.triton_tiles import grid_offsets


@triton.jit
def _sparse_dz_weight_kernel(
    dz_ptr,
    weight_ptr,
    acc_ptr,
    flags_ptr,
    order_ptr,
    n_rows,
    n_cols,
    dim,
    stride_dz,
    stride_w,
    stride_acc,
    stride_flags,
    stride_order_row,
    stride_order_col,
    FLAG_SPAN: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_D: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """``acc[rows] += dZ[rows] @ W[chunk]`` over the marked blocks of each row block only.

    ``order[m]`` lists row block ``m``'s vocabulary blocks, kept ones (flag 0) first.
    """
    pid_m = tl.program_id(0)
    pid_d = tl.program_id(1)
    span = tl.arange(0, FLAG_SPAN)
    n_blocks = tl.cdiv(n_cols, BLOCK_V)
    dead = tl.load(flags_ptr + pid_m * stride_flags + span, mask=span < n_blocks, other=1)
    n_live = tl.sum(1 - dead)
    if n_live > 0:
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
        row_mask = rows < n_rows
        d_mask = offs_d < dim
        acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
        for i in range(0, n_live):
            vb = tl.load(order_ptr + pid_m * stride_order_row + i * stride_order_col)
            cols = vb * BLOCK_V + tl.arange(0, BLOCK_V)
            col_mask = cols < n_cols
            a = tl.load(
                dz_ptr + grid_offsets(rows, cols, stride_dz),
                mask=row_mask[:, None] & col_mask[None, :],
                other=0.0,
            )
            b = tl.load(
                weight_ptr + grid_offsets(cols, offs_d, stride_w),
                mask=col_mask[:, None] & d_mask[None, :],
                other=0.0,
            )
            if UPCAST:
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            acc = tl.dot(a, b, acc)
        out_ptrs = acc_ptr + grid_offsets(rows, offs_d, stride_acc)
        out_mask = row_mask[:, None] & d_mask[None, :]
        acc += tl.load(out_ptrs, mask=out_mask, other=0.0)
        tl.store(out_ptrs, acc, mask=out_mask)


@triton.jit
def _sparse_dz_hidden_kernel(
    dz_ptr,
    hidden_ptr,
    out_ptr,
    flags_ptr,
    order_ptr,
    n_rows,
    n_cols,
    dim,
    stride_dz,
    stride_h,
    stride_out,
    stride_flags,
    stride_order_row,
    stride_order_col,
    shift_ptr,
    FLAG_SPAN: tl.constexpr,
    ACCUMULATE: tl.constexpr,
    HAS_SHIFT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_D: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """``out[chunk] (+)= dZ.T @ H[rows]`` over the marked blocks of each vocabulary block only.

    ``order[v]`` lists vocabulary block ``v``'s row blocks, kept ones (flag 0) first. With
    ``HAS_SHIFT`` the float32 ``[dim]`` row at ``shift_ptr`` is added to every output row too.
    """
    pid_v = tl.program_id(0)
    pid_d = tl.program_id(1)
    span = tl.arange(0, FLAG_SPAN)
    n_blocks = tl.cdiv(n_rows, BLOCK_M)
    dead = tl.load(flags_ptr + span * stride_flags + pid_v, mask=span < n_blocks, other=1)
    n_live = tl.sum(1 - dead)
    cols = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    col_mask = cols < n_cols
    d_mask = offs_d < dim
    acc = tl.zeros((BLOCK_V, BLOCK_D), dtype=tl.float32)
    for i in range(0, n_live):
        mb = tl.load(order_ptr + pid_v * stride_order_row + i * stride_order_col)
        rows = mb * BLOCK_M + tl.arange(0, BLOCK_M)
        row_mask = rows < n_rows
        a = tl.load(
            dz_ptr + grid_offsets(rows, cols, stride_dz),
            mask=row_mask[:, None] & col_mask[None, :],
            other=0.0,
        )
        b = tl.load(
            hidden_ptr + grid_offsets(rows, offs_d, stride_h),
            mask=row_mask[:, None] & d_mask[None, :],
            other=0.0,
        )
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(tl.trans(a), b, acc)
    out_ptrs = out_ptr + grid_offsets(cols, offs_d, stride_out)
    out_mask = col_mask[:, None] & d_mask[None, :]
    if HAS_SHIFT:
        acc += tl.load(shift_ptr + offs_d, mask=d_mask, other=0.0)[None, :]
    if ACCUMULATE:
        acc += tl.load(out_ptrs, mask=out_mask, other=0.0).to(tl.float32)
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=out_mask)


def sparse_products(
    chunk: torch.Tensor,
    flags: torch.Tensor,
    hidden_rows: torch.Tensor,
    weight_cols: torch.Tensor,
    acc: torch.Tensor | None,
    grad_weight_cols: torch.Tensor | None,
    accumulate: bool,
    config: dict,
    weight_shift: torch.Tensor | None = None,
) -> None:
    """``acc += chunk @ weight_cols`` and ``grad_weight_cols (+)= chunk.T @ hidden_rows`` over
    the blocks that ``flags`` marks as kept (0); skipped blocks (1) are never read.

    ``weight_shift`` (float32 ``[dim]``) is added to every row of ``grad_weight_cols`` in the
    same float32 sum, before the one rounding to its dtype."""
    nr, nc = chunk.shape
    dim = hidden_rows.shape[1]
    block_m, block_v = config["BLOCK_M"], config["BLOCK_V"]
    # Two operand tiles per pipeline stage must fit in shared memory (228 KB on Hopper).
    large = block_m * block_v > 128 * 128
    block_d = config["SPARSE_BLOCK_D"] // 2 if large else config["SPARSE_BLOCK_D"]
    live = flags[: triton.cdiv(nr, block_m), : triton.cdiv(nc, block_v)]
    warps = config["sparse_num_warps"]
    stages = min(2, config["sparse_num_stages"]) if large else config["sparse_num_stages"]
    upcast = config["upcast"] and chunk.dtype == torch.bfloat16
    span = triton.next_power_of_2(max(live.shape))
    if acc is not None:
        order = torch.argsort(live, dim=1, stable=True)
        grid = (live.shape[0], triton.cdiv(dim, block_d))
        _sparse_dz_weight_kernel[grid](
            chunk, weight_cols, acc, live, order, nr, nc, dim,
            chunk.stride(0), weight_cols.stride(0), acc.stride(0), live.stride(0),
            order.stride(0), order.stride(1), FLAG_SPAN=span,
            BLOCK_M=block_m, BLOCK_V=block_v, BLOCK_D=block_d, UPCAST=upcast,
            num_warps=warps, num_stages=stages,
        )  # fmt: skip
    if grad_weight_cols is not None:
        order = torch.argsort(live.t(), dim=1, stable=True)
        grid = (live.shape[1], triton.cdiv(dim, block_d))
        _sparse_dz_hidden_kernel[grid](
            chunk, hidden_rows, grad_weight_cols, live, order, nr, nc, dim,
            chunk.stride(0), hidden_rows.stride(0), grad_weight_cols.stride(0), live.stride(0),
            order.stride(0), order.stride(1),
            weight_shift if weight_shift is not None else live, FLAG_SPAN=span,
            ACCUMULATE=accumulate, HAS_SHIFT=weight_shift is not None,
            BLOCK_M=block_m, BLOCK_V=block_v, BLOCK_D=block_d,
            UPCAST=upcast, num_warps=warps, num_stages=stages,
        )  # fmt: skip
