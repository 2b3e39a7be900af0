"""Triton forward: blockwise logits with an online log-sum-exp, never storing the logits.

Each program owns ``BLOCK_M`` rows and one slice of the vocabulary. It walks its slice in
``BLOCK_V`` columns at a time, keeping a running maximum and a running sum of exponentials
(plus the target's logit and, for label smoothing, the sum of all logits). The slices' partial
results (a few floats per row) are merged on the host side with a log-sum-exp over slices.
Splitting the vocabulary is what keeps all multiprocessors busy when there are few row blocks.

For the gradient filter the kernel can also record the largest logit of each ``CELL_M x CELL_V``
cell of its tiles (a few floats per tile; rows with an ignored target do not count). With the
log-sum-exps this bounds every softmax probability of a cell, so the backward can skip blocks
that are negligible without recomputing their logits. Cells are the finest grid that every
candidate block shape is made of, so the backward's blocks, whatever shape it picks, are unions
of whole cells.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from memtrain.kernels.cross_entropy.triton_tiles import (
    fold_row_stats,
    logits_tile,
    store_row_stats,
)

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
    cell_max_ptr,
    n_rows,
    vocab,
    dim,
    stride_h,
    stride_w,
    cols_per_split,
    splits,
    cell_rows,
    cell_cols,
    softcap,
    HAS_BIAS: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    NEED_SUM: tl.constexpr,
    CELL_MAX: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_D: tl.constexpr,
    EVEN_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
    CELL_M: tl.constexpr,
    CELL_V: tl.constexpr,
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
        hit = cols[None, :] == targets[:, None]
        run_max, run_sum, target_logit, logit_sum, row_top = fold_row_stats(
            logits, col_mask[None, :], hit, run_max, run_sum, target_logit, logit_sum, NEED_SUM
        )
        if CELL_MAX:
            _store_cell_maxima(
                cell_max_ptr, logits, row_top, targets >= 0, pid_m, v0, cell_rows, cell_cols,
                BLOCK_M, BLOCK_V, CELL_M, CELL_V,
            )  # fmt: skip

    store_row_stats(
        pid_s.to(tl.int64) * n_rows + rows, row_mask, max_ptr, sumexp_ptr, target_logit_ptr, logit_sum_ptr,
        run_max, run_sum, target_logit, logit_sum, NEED_SUM,
    )  # fmt: skip


@triton.jit
def _store_cell_maxima(
    cell_max_ptr,
    logits,
    row_top,
    counted,
    pid_m,
    v0,
    cell_rows,
    cell_cols,
    BLOCK_M: tl.constexpr,
    BLOCK_V: tl.constexpr,
    CELL_M: tl.constexpr,
    CELL_V: tl.constexpr,
):
    """Store the largest logit of each cell of the tile at rows ``pid_m``, columns from ``v0``.

    ``row_top`` is the tile's row maximum; only ``counted`` rows count (in range and not
    ignored: ignored rows get no gradient, so they need no bound). Out-of-range columns are -inf
    already. Cells wholly past the end are not stored (``cols_per_split`` is a multiple of
    ``BLOCK_V``, so each cell lies in one program's slice and is stored once).
    """
    offs_m = tl.arange(0, BLOCK_M) // CELL_M
    offs_v = tl.arange(0, BLOCK_V) // CELL_V
    for j in tl.static_range(BLOCK_V // CELL_V):
        cell_top = row_top
        if CELL_V < BLOCK_V:
            cell_top = tl.max(tl.where(offs_v[None, :] == j, logits, float("-inf")), axis=1)
        col = v0 // CELL_V + j
        for i in tl.static_range(BLOCK_M // CELL_M):
            top = tl.max(tl.where(counted & (offs_m == i), cell_top, float("-inf")), axis=0)
            row = pid_m * (BLOCK_M // CELL_M) + i
            tl.store(
                cell_max_ptr + row.to(tl.int64) * cell_cols + col,
                top,
                mask=(row < cell_rows) & (col < cell_cols),
            )


def empty_cell_max(
    n_rows: int, vocab: int, cell: tuple[int, int], device: torch.device
) -> torch.Tensor:
    """Float32 ``[N / CELL_M, V / CELL_V]`` (rounded up) for the forward to fill with the
    largest logit of each cell."""
    shape = (triton.cdiv(n_rows, cell[0]), triton.cdiv(vocab, cell[1]))
    return torch.empty(shape, dtype=torch.float32, device=device)


def forward_row_stats(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    softcap: float | None,
    need_sum: bool,
    config: dict,
    cell_max: torch.Tensor | None = None,
    cell: tuple[int, int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Return (lse, target logit, sum of logits or None), each float32 of length N.

    If given, ``cell_max`` (from :func:`empty_cell_max`) receives the largest logit of every
    ``cell`` (rows x columns, default the block shape; each must divide the block's).
    """
    n_rows, dim = hidden.shape
    vocab = weight.shape[0]
    block_m, block_v, block_d = config["BLOCK_M"], config["BLOCK_V"], config["BLOCK_D"]
    row_blocks = triton.cdiv(n_rows, block_m)
    # Enough vocabulary slices that the grid covers the multiprocessors a few times over, and
    # at least MIN_SPLITS so that concurrent programs span few row blocks.
    wanted = max(MIN_SPLITS, config["target_programs"] // row_blocks)
    cols_per_split = triton.cdiv(triton.cdiv(vocab, wanted), block_v) * block_v
    splits = triton.cdiv(vocab, cols_per_split)
    cell = cell or (block_m, block_v)
    assert block_m % cell[0] == 0 and block_v % cell[1] == 0, (cell, block_m, block_v)
    parts = torch.empty((4, splits, n_rows), dtype=torch.float32, device=hidden.device)
    if config.get("tma"):
        from memtrain.kernels.cross_entropy.triton_tma import forward_tma

        assert cell_max is None, "the tensor-descriptor forward records no cell maxima"
        forward_tma(
            hidden, weight, bias, targets, softcap, need_sum, config, splits, cols_per_split, parts
        )
        return _merge_splits(parts, need_sum)
    _forward_kernel[(row_blocks * splits,)](
        hidden, weight, bias if bias is not None else hidden, targets,
        parts[0], parts[1], parts[2], parts[3], cell_max if cell_max is not None else parts,
        n_rows, vocab, dim, hidden.stride(0), weight.stride(0), cols_per_split, splits,
        *(cell_max.shape if cell_max is not None else (0, 0)),
        float(softcap) if softcap is not None else 1.0,
        HAS_BIAS=bias is not None, HAS_SOFTCAP=softcap is not None, NEED_SUM=need_sum,
        CELL_MAX=cell_max is not None,
        BLOCK_M=block_m, BLOCK_V=block_v, BLOCK_D=block_d, EVEN_D=dim % block_d == 0,
        DOT_PRECISION=config["dot_precision"],
        UPCAST=config["upcast"] and hidden.dtype == torch.bfloat16,
        CELL_M=cell[0], CELL_V=cell[1],
        num_warps=config["num_warps"], num_stages=config["num_stages"],
    )  # fmt: skip
    return _merge_splits(parts, need_sum)


def _merge_splits(
    parts: torch.Tensor, need_sum: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(lse, target logit, sum of logits or None) from the vocabulary slices' partial results."""
    run_max, run_sum = parts[0], parts[1]
    top = run_max.max(dim=0).values
    lse = top + torch.log((run_sum * torch.exp(run_max - top)).sum(dim=0))
    target_logit = parts[2].sum(dim=0)
    logit_sum = parts[3].sum(dim=0) if need_sum else None
    return lse, target_logit, logit_sum
