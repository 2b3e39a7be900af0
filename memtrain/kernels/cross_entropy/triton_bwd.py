"""Triton backward: recompute logits block by block and turn them into the two input gradients.

The logits gradient ``dZ = g * (softmax - onehot)`` (with label smoothing and the softcap's chain
rule folded in) is formed in registers by :func:`_grad_logits_kernel` for one bounded chunk of
rows x vocabulary at a time and written to a reusable workspace. It is then contracted into the
input gradients by matrix products: ``dH += dZ @ W[chunk]`` (float32 accumulator across vocabulary
chunks) and ``dW[chunk] (+)= dZ.T @ H[rows]``. The workspace, not N x V, bounds the memory.

With the gradient filter on, the kernel also marks each ``BLOCK_M x BLOCK_V`` block that holds
neither a target nor a softmax probability of at least ``eps``; such blocks count as zero, and
the block-sparse products of ``triton_sparse`` skip them, which saves most of the matrix work
when the softmax is peaked. Without the filter the products go to the vendor BLAS and nothing
is skipped.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from memtrain.kernels.cross_entropy.chunked import fp16_grad_scale
from memtrain.kernels.cross_entropy.triton_sparse import sparse_products
from memtrain.kernels.cross_entropy.triton_tiles import logits_tile


@triton.jit
def _grad_logits_kernel(
    hidden_ptr,
    weight_ptr,
    bias_ptr,
    targets_ptr,
    lse_ptr,
    grad_rows_ptr,
    dz_ptr,
    flags_ptr,
    row_start,
    row_stop,
    col_start,
    col_stop,
    dim,
    stride_h,
    stride_w,
    stride_dz,
    flag_cols,
    softcap,
    smoothing,
    inv_vocab,
    eps,
    HAS_BIAS: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    FILTER: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_D: tl.constexpr,
    EVEN_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_v = tl.program_id(1)
    rows = row_start + pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = col_start + pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    row_mask = rows < row_stop
    col_mask = cols < col_stop
    logits, tanh = logits_tile(
        hidden_ptr, weight_ptr, bias_ptr, rows, cols, row_stop, col_stop, dim,
        stride_h, stride_w, softcap,
        HAS_BIAS, HAS_SOFTCAP, BLOCK_M, BLOCK_V, BLOCK_D, EVEN_D, DOT_PRECISION, UPCAST,
    )  # fmt: skip
    lse = tl.load(lse_ptr + rows, mask=row_mask, other=0.0)
    targets = tl.load(targets_ptr + rows, mask=row_mask, other=-1)
    grad_rows = tl.load(grad_rows_ptr + rows, mask=row_mask, other=0.0)
    prob = tl.exp(logits - lse[:, None])
    hit = cols[None, :] == targets[:, None]
    dz = prob - tl.where(hit, 1.0 - smoothing, 0.0) - smoothing * inv_vocab
    dz = dz * grad_rows[:, None]
    if HAS_SOFTCAP:
        dz = dz * (1.0 - tanh * tanh)
    mask = row_mask[:, None] & col_mask[None, :]
    local_rows = (rows - row_start).to(tl.int64)
    local_cols = cols - col_start
    dz_ptrs = dz_ptr + local_rows[:, None] * stride_dz + local_cols[None, :]
    if FILTER:
        # Per-row reductions only: clamped out-of-range rows and columns repeat valid ones, so
        # they cannot raise a maximum; rows without gradient (ignored) do not count.
        live_rows = row_mask & (grad_rows != 0.0)
        row_top = tl.exp(tl.max(logits, axis=1) - lse)
        tile_top = tl.max(tl.where(live_rows, row_top, 0.0))
        first_col = col_start + pid_v * BLOCK_V
        in_tile = live_rows & (targets >= first_col) & (targets < first_col + BLOCK_V)
        keep = (tile_top >= eps) | (tl.sum(in_tile.to(tl.int32)) > 0)
        # The mark is 0 for a kept block, 1 for a skipped one (sorting puts kept ones first).
        tl.store(flags_ptr + pid_m * flag_cols + pid_v, 1 - keep.to(tl.int32))
        if HAS_BIAS:  # the bias gradient sums the whole chunk: skipped blocks must read 0
            tl.store(dz_ptrs, tl.where(keep, dz, 0.0).to(dz_ptr.dtype.element_ty), mask=mask)
        elif keep:
            tl.store(dz_ptrs, dz.to(dz_ptr.dtype.element_ty), mask=mask)
    else:
        tl.store(dz_ptrs, dz.to(dz_ptr.dtype.element_ty), mask=mask)


def plan_chunks(
    n_rows: int, vocab: int, dim: int, itemsize: int, budget: int, block_m: int, block_v: int
) -> tuple[int, int]:
    """Rows per block and vocabulary columns per chunk that keep the workspace within budget.

    Half the budget goes to the float32 hidden-gradient accumulator (not needed for fp32
    inputs, which accumulate in place), the rest to the logits-gradient chunk.
    """
    acc_row_bytes = 4 * dim if itemsize < 4 else 0
    rows_cap = budget // 2 // max(acc_row_bytes, 1) if acc_row_bytes else n_rows
    rows_cap = max(block_m, rows_cap // block_m * block_m)
    n_blocks = triton.cdiv(n_rows, rows_cap)
    rows = min(triton.cdiv(triton.cdiv(n_rows, n_blocks), block_m) * block_m, rows_cap)
    left = budget - rows * acc_row_bytes
    cols = max(block_v, left // (rows * itemsize) // block_v * block_v)
    cols = min(cols, triton.cdiv(vocab, block_v) * block_v)
    return rows, cols


_NATIVE_FLOAT32_OUT: list[bool] = []


def accumulate_mm(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """``acc += a @ b`` into a float32 accumulator from low-precision operands.

    Uses the BLAS's float32 output when this PyTorch offers it (``out_dtype``); otherwise the
    product is rounded to the operand dtype once before it is added.
    """
    if a.dtype == torch.float32:
        acc.addmm_(a, b)
        return
    if not _NATIVE_FLOAT32_OUT or _NATIVE_FLOAT32_OUT[0]:
        try:
            torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
            if not _NATIVE_FLOAT32_OUT:
                _NATIVE_FLOAT32_OUT.append(True)
            return
        except (RuntimeError, TypeError, NotImplementedError):
            _NATIVE_FLOAT32_OUT[:] = [False]
    acc.add_(a @ b)


def launch_grad_logits(
    config: dict,
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    lse: torch.Tensor,
    grad_rows: torch.Tensor,
    dz: torch.Tensor,
    flags: torch.Tensor,
    rows: tuple[int, int],
    cols: tuple[int, int],
    softcap: float | None,
    smoothing: float,
    filter_eps: float | None,
) -> None:
    """Write the logits gradient of ``rows x cols`` into ``dz`` (and block marks into flags)."""
    (r0, r1), (c0, c1) = rows, cols
    block_m, block_v, block_d = config["BLOCK_M"], config["BLOCK_V"], config["BLOCK_D"]
    dim = hidden.shape[1]
    grid = (triton.cdiv(r1 - r0, block_m), triton.cdiv(c1 - c0, block_v))
    _grad_logits_kernel[grid](
        hidden, weight, bias if bias is not None else hidden, targets, lse, grad_rows,
        dz, flags, r0, r1, c0, c1, dim,
        hidden.stride(0), weight.stride(0), dz.stride(0), flags.stride(0),
        float(softcap) if softcap is not None else 1.0,
        float(smoothing), 1.0 / weight.shape[0], float(filter_eps or 0.0),
        HAS_BIAS=bias is not None, HAS_SOFTCAP=softcap is not None,
        FILTER=filter_eps is not None,
        BLOCK_M=block_m, BLOCK_V=block_v, BLOCK_D=block_d, EVEN_D=dim % block_d == 0,
        DOT_PRECISION=config["dot_precision"],
        UPCAST=config["upcast"] and hidden.dtype == torch.bfloat16,
        num_warps=config["num_warps"], num_stages=config["num_stages"],
    )  # fmt: skip


def backward_grads(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    lse: torch.Tensor,
    grad_rows: torch.Tensor,
    softcap: float | None,
    smoothing: float,
    filter_eps: float | None,
    needs: tuple[bool, bool, bool],
    pick_config,
    workspace_bytes: int,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Gradients of ``sum(grad_rows * row_losses)`` w.r.t. hidden, weight and bias.

    ``pick_config(run)`` returns the launch settings for the logits-gradient kernel, given a
    function that runs it once with candidate settings; its ``granule`` (a multiple of every
    candidate's block shape) sizes the chunks and its ``min_block`` the block-mark array.
    """
    need_h, need_w, need_b = needs
    n_rows, dim = hidden.shape
    vocab = weight.shape[0]
    rows_per_block, cols_per_chunk = plan_chunks(
        n_rows,
        vocab,
        dim,
        hidden.element_size(),
        workspace_bytes,
        pick_config.granule,
        pick_config.granule,
    )
    use_filter = filter_eps is not None
    device = hidden.device
    inv_scale = None
    if hidden.dtype == torch.float16:
        scale, inv_scale = fp16_grad_scale(grad_rows)
        grad_rows = grad_rows * scale
    dz = torch.empty((rows_per_block, cols_per_chunk), dtype=hidden.dtype, device=device)
    small = pick_config.min_block
    flags = torch.ones(
        (rows_per_block // small, cols_per_chunk // small), dtype=torch.int32, device=device
    )
    stats = (hidden, weight, bias, targets, lse, grad_rows, dz, flags)
    options = (softcap, smoothing, filter_eps)
    first = ((0, min(rows_per_block, n_rows)), (0, min(cols_per_chunk, vocab)))
    config = pick_config(lambda cfg: launch_grad_logits(cfg, *stats, *first, *options))

    grad_hidden = torch.empty_like(hidden) if need_h else None
    grad_weight = torch.empty_like(weight) if need_w else None
    grad_bias = torch.zeros(vocab, dtype=torch.float32, device=device) if need_b else None
    in_place = hidden.dtype == torch.float32
    acc_all = None
    if need_h and not in_place:
        acc_all = torch.empty((rows_per_block, dim), dtype=torch.float32, device=device)

    for r0 in range(0, n_rows, rows_per_block):
        r1 = min(r0 + rows_per_block, n_rows)
        nr = r1 - r0
        acc = None
        if need_h:
            acc = grad_hidden[r0:r1] if in_place else acc_all[:nr]
            acc.zero_()
        for c0 in range(0, vocab, cols_per_chunk):
            c1 = min(c0 + cols_per_chunk, vocab)
            launch_grad_logits(config, *stats, (r0, r1), (c0, c1), *options)
            chunk = dz[:nr, : c1 - c0]
            if need_b:
                grad_bias[c0:c1] += chunk.sum(0, dtype=torch.float32)
            if use_filter:
                sparse_products(
                    chunk, flags, hidden[r0:r1], weight[c0:c1], acc,
                    grad_weight[c0:c1] if need_w else None, r0 > 0, config,
                )  # fmt: skip
                continue
            if need_h:
                accumulate_mm(acc, chunk, weight[c0:c1])
            if need_w:
                if r0 == 0:
                    torch.mm(chunk.t(), hidden[r0:r1], out=grad_weight[c0:c1])
                else:
                    grad_weight[c0:c1].addmm_(chunk.t(), hidden[r0:r1])
        if need_h and not in_place:
            if inv_scale is not None:
                acc.mul_(inv_scale)
            grad_hidden[r0:r1] = acc
    if inv_scale is not None:
        if need_w:
            grad_weight.mul_(inv_scale)
        if need_b:
            grad_bias.mul_(inv_scale)
    if need_b:
        grad_bias = grad_bias.to(bias.dtype)
    return grad_hidden, grad_weight, grad_bias
