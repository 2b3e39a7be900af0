"""Triton forward: blockwise logits with an online log-sum-exp, never storing the logits.

Each program owns ``BLOCK_M`` rows and one slice of the vocabulary. It walks its slice in
``BLOCK_V`` columns at a time, keeping a running maximum and a running sum of exponentials
(plus the target's logit and, for label smoothing, the sum of all logits). The slices' partial
results (a few floats per row) are merged on the host side with a log-sum-exp over slices.
Splitting the vocabulary is what keeps all multiprocessors busy when there are few row blocks.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from memtrain.kernels.cross_entropy.triton_tiles import logits_tile

MIN_SPLITS = 8


@triton.jit
def _forward_kernel(
    hidden_ptr,
    weight_ptr,
    bias_ptr,
    targets_ptr,
    max_ptr,
    sumexp_ptr,
    target_logit_ptr,
    logit_sum_ptr,
    n_rows,
    vocab,
    dim,
    stride_h,
    stride_w,
    cols_per_split,
    splits,
    softcap,
    HAS_BIAS: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    NEED_SUM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_D: tl.constexpr,
    EVEN_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
):
    # Slices vary fastest, so the programs running at one time share a few row blocks of hidden
    # (which then stay in L2) and stream each weight block once for all of them.
    pid = tl.program_id(0)
    pid_s = pid % splits
    pid_m = pid // splits
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < n_rows
    targets = tl.load(targets_ptr + rows, mask=row_mask, other=-1)
    col_start = pid_s * cols_per_split
    col_stop = tl.minimum(col_start + cols_per_split, vocab)

    run_max = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    run_sum = tl.zeros((BLOCK_M,), dtype=tl.float32)
    target_logit = tl.zeros((BLOCK_M,), dtype=tl.float32)
    logit_sum = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for v0 in range(col_start, col_stop, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        col_mask = cols < col_stop
        logits, _ = logits_tile(
            hidden_ptr, weight_ptr, bias_ptr, rows, cols, n_rows, vocab, dim,
            stride_h, stride_w, softcap,
            HAS_BIAS, HAS_SOFTCAP, BLOCK_M, BLOCK_V, BLOCK_D, EVEN_D, DOT_PRECISION, UPCAST,
        )  # fmt: skip
        logits = tl.where(col_mask[None, :], logits, float("-inf"))
        new_max = tl.maximum(run_max, tl.max(logits, axis=1))
        run_sum = run_sum * tl.exp(run_max - new_max) + tl.sum(
            tl.exp(logits - new_max[:, None]), axis=1
        )
        run_max = new_max
        hit = cols[None, :] == targets[:, None]
        target_logit += tl.sum(tl.where(hit, logits, 0.0), axis=1)
        if NEED_SUM:
            logit_sum += tl.sum(tl.where(col_mask[None, :], logits, 0.0), axis=1)

    out = pid_s * n_rows + rows
    tl.store(max_ptr + out, run_max, mask=row_mask)
    tl.store(sumexp_ptr + out, run_sum, mask=row_mask)
    tl.store(target_logit_ptr + out, target_logit, mask=row_mask)
    if NEED_SUM:
        tl.store(logit_sum_ptr + out, logit_sum, mask=row_mask)


def forward_row_stats(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    softcap: float | None,
    need_sum: bool,
    config: dict,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Return (lse, target logit, sum of logits or None), each float32 of length N."""
    n_rows, dim = hidden.shape
    vocab = weight.shape[0]
    block_m, block_v, block_d = config["BLOCK_M"], config["BLOCK_V"], config["BLOCK_D"]
    row_blocks = triton.cdiv(n_rows, block_m)
    # Enough vocabulary slices that the grid covers the multiprocessors a few times over, and
    # at least MIN_SPLITS so that concurrent programs span few row blocks.
    wanted = max(MIN_SPLITS, config["target_programs"] // row_blocks)
    cols_per_split = triton.cdiv(triton.cdiv(vocab, wanted), block_v) * block_v
    splits = triton.cdiv(vocab, cols_per_split)
    parts = torch.empty((4, splits, n_rows), dtype=torch.float32, device=hidden.device)
    _forward_kernel[(row_blocks * splits,)](
        hidden, weight, bias if bias is not None else hidden, targets,
        parts[0], parts[1], parts[2], parts[3],
        n_rows, vocab, dim, hidden.stride(0), weight.stride(0), cols_per_split, splits,
        float(softcap) if softcap is not None else 1.0,
        HAS_BIAS=bias is not None, HAS_SOFTCAP=softcap is not None, NEED_SUM=need_sum,
        BLOCK_M=block_m, BLOCK_V=block_v, BLOCK_D=block_d, EVEN_D=dim % block_d == 0,
        DOT_PRECISION=config["dot_precision"],
        UPCAST=config["upcast"] and hidden.dtype == torch.bfloat16,
        num_warps=config["num_warps"], num_stages=config["num_stages"],
    )  # fmt: skip
    run_max, run_sum = parts[0], parts[1]
    top = run_max.max(dim=0).values
    lse = top + torch.log((run_sum * torch.exp(run_max - top)).sum(dim=0))
    target_logit = parts[2].sum(dim=0)
    logit_sum = parts[3].sum(dim=0) if need_sum else None
    return lse, target_logit, logit_sum
