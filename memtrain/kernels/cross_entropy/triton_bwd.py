"""Triton backward: recompute logits block by block and turn them into the two input gradients.

The logits gradient ``dZ = g * (softmax - onehot)`` (with label smoothing and the softcap's chain
rule folded in) is formed in registers by :func:`_grad_logits_kernel` for one bounded chunk of
rows x vocabulary at a time and written to a reusable workspace. It is then contracted into the
input gradients by matrix products: ``dH += dZ @ W[chunk]`` (float32 accumulator across vocabulary
chunks) and ``dW[chunk] (+)= dZ.T @ H[rows]``. The workspace, not N x V, bounds the memory. For
the exact backward, ``triton_schedule`` picks the chunks' order and where the accumulator lives
(with a small workspace: in the gradients' own unwritten storage); on Hopper the logits gradient
comes from the tensor-descriptor kernel of ``triton_tma`` when it measures faster.

With the gradient filter on, the kernel also marks each ``BLOCK_M x BLOCK_V`` block that holds
neither a live target nor a softmax probability of at least ``eps`` (rows without gradient do
not count); such blocks count as zero, and the block-sparse products of ``triton_sparse`` skip
them, which saves most of the matrix work when the softmax is peaked. Label smoothing's uniform
term ``-g * smoothing / V`` (in every logit, so it would keep every block) is left out of the
blocks and added in closed form instead (:func:`_uniform_smoothing`; not with a softcap). Without
the filter the products go to the vendor BLAS and nothing is skipped.

Recomputing a block's logits only to find it negligible costs a quarter of the matrix work.
So the filtered forward also records the largest logit of each cell of its tiles (a grid that
every candidate block shape is made of), and :func:`preskip_keep` turns that into a bound per
backward block before the chunk loop: each probability in the block is at most
``exp(largest logit - smallest live lse)``. A block whose bound is below ``eps`` (by a margin
for the rounding of the recomputed products) and that holds no live target is marked without
recomputing its logits. The bound is conservative: it skips a subset of the blocks that the
kernel's own check skips after recomputing (which still runs on the others), so the same blocks
are skipped in all and the gradients do not change.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import triton
import triton.language as tl

from memtrain.kernels.cross_entropy import triton_schedule
from memtrain.kernels.cross_entropy.chunked import fp16_grad_scale, undo_grad_scale
from memtrain.kernels.cross_entropy.triton_sparse import sparse_products
from memtrain.kernels.cross_entropy.triton_tiles import grid_offsets, logits_grad, logits_tile
from memtrain.kernels.cross_entropy.triton_tma import Descriptors, grad_logits_tma

# Use the forward's cell maxima to skip negligible blocks without recomputing them. Off gives
# the plain filter (read when the forward runs, which then records nothing): for comparisons.
PRESKIP = True
# Set to a dict to have each filtered backward store its block counts there ("tiles",
# "pre_skipped": skipped from the bound, "skipped": in all); costs a sync per chunk.
FILTER_STATS: dict | None = None
# The recomputed logits may round differently from the forward's (other tile shapes, other
# summation orders): a block is skipped early only if its log-bound clears log(eps) by
# BOUND_SLACK * (1 + |bound|), far more than the two float32 products can differ by.
BOUND_SLACK = 2.0**-8


def _regrid_max(table: torch.Tensor, dim: int, src: int, dst: int, count: int) -> torch.Tensor:
    """Max over the ``src``-wide blocks of ``table`` along ``dim`` that overlap each of ``count``
    ``dst``-wide blocks (both grids start at 0; entries past the table's end count as -inf)."""
    g = math.gcd(src, dst)
    fine = table.repeat_interleave(src // g, dim=dim)  # one entry per g-wide piece
    need = count * (dst // g)
    fine = fine.narrow(dim, 0, min(need, fine.shape[dim]))
    if fine.shape[dim] < need:
        pad = list(fine.shape)
        pad[dim] = need - fine.shape[dim]
        fine = torch.cat([fine, fine.new_full(pad, float("-inf"))], dim)
    return fine.unflatten(dim, (count, dst // g)).amax(dim + 1)


def preskip_keep(
    cell_max: torch.Tensor,
    cell: tuple[int, int],
    block: tuple[int, int],
    vocab: int,
    lse: torch.Tensor,
    targets: torch.Tensor,
    grad_rows: torch.Tensor,
    eps: float,
    z_loss: float = 0.0,
) -> torch.Tensor:
    """uint8 ``[row blocks, vocabulary blocks]`` of ``block``-shaped blocks: 0 where the block
    is provably negligible (no live target, every probability below ``eps``), else 1.

    ``cell_max`` holds the largest logit of each ``cell``-shaped piece of the logits (rows with
    an ignored target left out; any cell shape works, blocks made of whole cells get the
    tightest bound). A live row ``r`` (``grad_rows != 0``) has probability
    ``exp(z - lse_r) <= exp(bound - min live lse)`` at every column of the block; a block
    without live rows is negligible. With the z-loss each row's probabilities count times
    ``|1 + 2c * lse_r|`` (as in the kernel's own check), i.e. ``lse_r`` less its log.
    Small torch ops on the device, no sync.
    """
    n_rows = lse.shape[0]
    (fm, fv), (bm, bv) = cell, block
    row_blocks, col_blocks = -(-n_rows // bm), -(-vocab // bv)
    bound = _regrid_max(cell_max, 0, fm, bm, row_blocks)
    bound = _regrid_max(bound, 1, fv, bv, col_blocks)
    live = grad_rows != 0
    low = lse
    if z_loss > 0.0:
        low = lse - torch.log(torch.abs(1.0 + 2.0 * z_loss * lse))
    low = torch.where(live, low, float("inf"))
    low = torch.cat([low, low.new_full((row_blocks * bm - n_rows,), float("inf"))])
    low = low.view(row_blocks, bm).amin(1)
    slack = BOUND_SLACK * (1.0 + bound.abs().nan_to_num(posinf=0.0))  # -inf bounds: no slack
    keep = ~(bound - low[:, None] + slack < math.log(eps))  # NaN keeps
    # Blocks with a live target: each live row marks its target's block, the others a spare slot.
    rows = torch.arange(n_rows, device=lse.device)
    slot = (rows // bm) * col_blocks + targets.long().clamp(min=0) // bv
    slot = torch.where(live & (targets >= 0), slot, row_blocks * col_blocks)
    hit = torch.zeros(row_blocks * col_blocks + 1, dtype=torch.uint8, device=lse.device)
    hit.scatter_(0, slot, 1)
    return (keep | hit[:-1].view(row_blocks, col_blocks).bool()).to(torch.uint8)


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
    keep_ptr,
    row_start,
    row_stop,
    col_start,
    col_stop,
    dim,
    stride_h,
    stride_w,
    stride_dz,
    flag_cols,
    keep_row0,
    keep_col0,
    keep_cols,
    softcap,
    smoothing,
    inv_vocab,
    z_loss,
    eps,
    HAS_BIAS: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    FILTER: tl.constexpr,
    PRESKIP: tl.constexpr,
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
    mask = row_mask[:, None] & col_mask[None, :]
    dz_ptrs = dz_ptr + grid_offsets(rows - row_start, cols - col_start, stride_dz)
    pre_skipped = False
    if PRESKIP:  # the forward's bound proved this block negligible: no logits to recompute
        keep_at = (keep_row0 + pid_m).to(tl.int64) * keep_cols + keep_col0 + pid_v
        pre_skipped = tl.load(keep_ptr + keep_at) == 0
    if pre_skipped:
        tl.store(flags_ptr + pid_m * flag_cols + pid_v, 1)
        if HAS_BIAS:  # the bias gradient sums the whole chunk: skipped blocks must read 0
            tl.store(dz_ptrs, tl.zeros((BLOCK_M, BLOCK_V), dz_ptr.dtype.element_ty), mask=mask)
    else:
        logits, tanh = logits_tile(
            hidden_ptr, weight_ptr, bias_ptr, rows, cols, row_stop, col_stop, dim,
            stride_h, stride_w, softcap,
            HAS_BIAS, HAS_SOFTCAP, BLOCK_M, BLOCK_V, BLOCK_D, EVEN_D, DOT_PRECISION, UPCAST,
        )  # fmt: skip
        lse = tl.load(lse_ptr + rows, mask=row_mask, other=0.0)
        targets = tl.load(targets_ptr + rows, mask=row_mask, other=-1)
        grad_rows = tl.load(grad_rows_ptr + rows, mask=row_mask, other=0.0)
        dz = logits_grad(
            logits, tanh, cols, lse, targets, grad_rows, smoothing, inv_vocab, z_loss, HAS_SOFTCAP
        )
        if FILTER:
            # Per-row reductions only: clamped out-of-range rows and columns repeat valid ones,
            # so they cannot raise a maximum; rows without gradient (ignored) do not count. The
            # z-loss scales each row's probabilities by 1 + 2c * lse: the bound is on |dZ / g|.
            live_rows = row_mask & (grad_rows != 0.0)
            row_top = tl.exp(tl.max(logits, axis=1) - lse) * tl.abs(1.0 + 2.0 * z_loss * lse)
            tile_top = tl.max(tl.where(live_rows, row_top, 0.0))
            first_col = col_start + pid_v * BLOCK_V
            in_tile = live_rows & (targets >= first_col) & (targets < first_col + BLOCK_V)
            keep = (tile_top >= eps) | (tl.sum(in_tile.to(tl.int32)) > 0)
            # The mark is 0 for a kept block, 1 for a skipped one (sorting puts kept ones first).
            tl.store(flags_ptr + pid_m * flag_cols + pid_v, 1 - keep.to(tl.int32))
            if HAS_BIAS:
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
    keep: torch.Tensor | None = None,
    z_loss: float = 0.0,
    uniform: bool = True,
) -> None:
    """Write the logits gradient of ``rows x cols`` into ``dz`` (and block marks into flags).

    ``keep`` (from :func:`preskip_keep` for this config's block shape) lets the blocks it marks
    0 skip their recomputation; chunks start at multiples of the block shape. ``uniform=False``
    leaves out label smoothing's uniform term ``-g * smoothing / V`` (the filtered backward adds
    it in closed form, see :func:`_uniform_smoothing`).
    """
    (r0, r1), (c0, c1) = rows, cols
    block_m, block_v, block_d = config["BLOCK_M"], config["BLOCK_V"], config["BLOCK_D"]
    dim = hidden.shape[1]
    grid = (triton.cdiv(r1 - r0, block_m), triton.cdiv(c1 - c0, block_v))
    _grad_logits_kernel[grid](
        hidden, weight, bias if bias is not None else hidden, targets, lse, grad_rows,
        dz, flags, keep if keep is not None else flags, r0, r1, c0, c1, dim,
        hidden.stride(0), weight.stride(0), dz.stride(0), flags.stride(0),
        r0 // block_m, c0 // block_v, keep.stride(0) if keep is not None else 0,
        float(softcap) if softcap is not None else 1.0,
        float(smoothing), 1.0 / weight.shape[0] if uniform else 0.0, float(z_loss),
        float(filter_eps or 0.0),
        HAS_BIAS=bias is not None, HAS_SOFTCAP=softcap is not None,
        FILTER=filter_eps is not None, PRESKIP=keep is not None,
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
    bound: tuple[torch.Tensor, tuple[int, int]] | None = None,
    z_loss: float = 0.0,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Gradients of ``sum(grad_rows * row_losses)`` w.r.t. hidden, weight and bias.

    ``pick_config(run)`` returns the launch settings for the logits-gradient kernel, given a
    function that runs it once with candidate settings; its ``granule`` (a multiple of every
    candidate's block shape) sizes the chunks and its ``min_block`` the block-mark array.
    ``bound`` (the forward's cell maxima and cell shape) lets the filter skip blocks unseen.
    """
    need_h, need_w, need_b = needs
    n_rows, dim = hidden.shape
    vocab = weight.shape[0]
    if filter_eps is None:
        return _exact_grads(
            hidden, weight, bias, targets, lse, grad_rows, softcap, smoothing, needs,
            pick_config, workspace_bytes, z_loss,
        )  # fmt: skip
    rows_per_block, cols_per_chunk = plan_chunks(
        n_rows,
        vocab,
        dim,
        hidden.element_size(),
        workspace_bytes,
        pick_config.granule,
        pick_config.granule,
    )
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
    # Label smoothing's uniform term is added in closed form below, not through the blocks.
    share, hidden_shift, weight_shift, bias_shift = _uniform_smoothing(
        hidden, weight, grad_rows, smoothing, softcap, needs
    )
    keep_for = _keep_lookup(bound, vocab, lse, targets, grad_rows, filter_eps, z_loss)
    first = ((0, min(rows_per_block, n_rows)), (0, min(cols_per_chunk, vocab)))
    uniform = share is None
    config = pick_config(
        lambda cfg: launch_grad_logits(
            cfg, *stats, *first, *options, keep_for(cfg), z_loss, uniform
        )
    )
    keep = keep_for(config)
    counts = {"tiles": 0, "pre_skipped": 0, "skipped": 0}

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
            launch_grad_logits(config, *stats, (r0, r1), (c0, c1), *options, keep, z_loss, uniform)
            chunk = dz[:nr, : c1 - c0]
            if need_b:
                grad_bias[c0:c1] += chunk.sum(0, dtype=torch.float32)
            if FILTER_STATS is not None:
                _count_chunk(counts, flags, chunk.shape, config)
            sparse_products(
                chunk, flags, hidden[r0:r1], weight[c0:c1], acc,
                grad_weight[c0:c1] if need_w else None, r0 > 0, config,
                weight_shift if r0 == 0 else None,
            )  # fmt: skip
        if hidden_shift is not None:
            acc.addr_(share[r0:r1], hidden_shift)
        if need_h and not in_place:
            undo_grad_scale(inv_scale, acc)
            grad_hidden[r0:r1] = acc
    if bias_shift is not None:
        grad_bias += bias_shift
    undo_grad_scale(inv_scale, grad_weight, grad_bias)
    if need_b:
        grad_bias = grad_bias.to(bias.dtype)
    if FILTER_STATS is not None:
        counts["pre_skipped"] = int((keep == 0).sum()) if keep is not None else 0
        FILTER_STATS.clear()
        FILTER_STATS.update(counts)
    return grad_hidden, grad_weight, grad_bias


def _uniform_smoothing(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    grad_rows: torch.Tensor,
    smoothing: float,
    softcap: float | None,
    needs: tuple[bool, bool, bool],
) -> tuple[torch.Tensor | None, ...]:
    """Label smoothing's uniform term of the logits gradient, ``-g_t * smoothing / V`` at every
    logit, in closed form (all float32, ``grad_rows`` already scaled like the rest):

    - dH_t += share_t * sum_v W_v, with ``share_t = -g_t * smoothing / V``;
    - dW_v += sum_t share_t * H_t (one D-vector, the same for every row v);
    - dbias_v += sum_t share_t.

    Returns ``(share, hidden_shift, weight_shift, bias_shift)`` (Nones for the gradients not
    needed; all None without smoothing). The filter then only sees ``g * (p - (1 - smoothing)
    * onehot)``, negligible in the same blocks as without smoothing (targets are always kept).
    A softcap scales each logit's gradient by its own tanh derivative, so the term is not
    uniform there: the caller refuses that combination.
    """
    if smoothing <= 0.0:
        return None, None, None, None
    if softcap is not None:
        raise ValueError("the filtered backward has no closed form for smoothing with a softcap")
    need_h, need_w, need_b = needs
    n_rows, dim = hidden.shape
    share = grad_rows.float() * (-smoothing / weight.shape[0])
    hidden_shift = weight.sum(0, dtype=torch.float32) if need_h else None
    weight_shift = None
    if need_w:
        weight_shift = torch.zeros(dim, dtype=torch.float32, device=hidden.device)
        step = max(1, (1 << 22) // max(dim, 1))  # float32 copies of at most 16 MiB of rows
        for r0 in range(0, n_rows, step):
            rows = slice(r0, min(r0 + step, n_rows))
            weight_shift.addmv_(hidden[rows].t().float(), share[rows])
    bias_shift = share.sum() if need_b else None
    return share, hidden_shift, weight_shift, bias_shift


def _exact_grads(
    hidden, weight, bias, targets, lse, grad_rows, softcap, smoothing, needs, pick_config,
    workspace_bytes, z_loss=0.0,
):  # fmt: skip
    """The exact backward (nothing skipped): dense products over a chunk schedule."""
    need_h, need_w, need_b = needs
    n_rows, dim = hidden.shape
    vocab = weight.shape[0]
    device = hidden.device
    plan = triton_schedule.plan_exact(
        n_rows, vocab, dim, hidden.element_size(), workspace_bytes, pick_config.granule,
        (need_h, need_w),
    )  # fmt: skip
    inv_scale = None
    if hidden.dtype == torch.float16:
        scale, inv_scale = fp16_grad_scale(grad_rows)
        grad_rows = grad_rows * scale
    flags = torch.ones((1, 1), dtype=torch.int32, device=device)  # no block marks without filter
    stats = (hidden, weight, bias, targets, lse, grad_rows)
    options = (softcap, smoothing, None)
    first = ((0, min(plan.rows, n_rows)), (0, min(plan.cols, vocab)))
    descriptors: dict[tuple, Descriptors] = {}

    def run_kernel(cfg, rows, cols, dz):
        if not cfg.get("tma"):
            launch_grad_logits(cfg, *stats, dz, flags, rows, cols, *options, None, z_loss)
            return
        shape = (cfg["BLOCK_M"], cfg["BLOCK_V"], cfg["BLOCK_D"])
        if shape not in descriptors:
            descriptors[shape] = Descriptors(hidden, weight, cfg)
        grad_logits_tma(
            cfg, descriptors[shape], hidden, weight, bias, targets, lse, grad_rows, dz, rows,
            cols, softcap, smoothing, z_loss,
        )  # fmt: skip

    tuning: list[torch.Tensor] = []

    def tune_run(cfg):
        if not tuning:  # a buffer like the schedule's (row stride a multiple of 16 bytes)
            cols = -(-first[1][1] // 16) * 16
            tuning.append(torch.empty((first[0][1], cols), dtype=hidden.dtype, device=device))
        run_kernel(cfg, *first, tuning[0])

    config = pick_config.for_chunk((plan.rows, plan.cols))(tune_run)
    tuning.clear()
    for desc in descriptors.values():  # they hold the tuning buffer
        desc.release_chunks()

    def launch(rows, cols, dz):
        run_kernel(config, rows, cols, dz)

    grad_hidden = torch.empty_like(hidden) if need_h else None
    grad_weight = torch.empty_like(weight) if need_w else None
    grad_bias = torch.zeros(vocab, dtype=torch.float32, device=device) if need_b else None
    triton_schedule.run_exact(
        plan, hidden, weight, launch, accumulate_mm, (grad_hidden, grad_weight, grad_bias),
        inv_scale,
    )  # fmt: skip
    undo_grad_scale(inv_scale, grad_weight, grad_bias)
    if need_b:
        grad_bias = grad_bias.to(bias.dtype)
    return grad_hidden, grad_weight, grad_bias


def _keep_lookup(
    bound: tuple[torch.Tensor, tuple[int, int]] | None,
    vocab: int,
    lse: torch.Tensor,
    targets: torch.Tensor,
    grad_rows: torch.Tensor,
    eps: float | None,
    z_loss: float = 0.0,
) -> Callable[[dict], torch.Tensor | None]:
    """config -> the pre-skip table of its block shape (None without a bound), built once per
    shape: the tuning run tries candidates of several shapes."""
    tables: dict[tuple[int, int], torch.Tensor] = {}

    def keep_for(cfg: dict) -> torch.Tensor | None:
        if bound is None:
            return None
        block = (cfg["BLOCK_M"], cfg["BLOCK_V"])
        if block not in tables:
            tables[block] = preskip_keep(*bound, block, vocab, lse, targets, grad_rows, eps, z_loss)
        return tables[block]

    return keep_for


def _count_chunk(counts: dict, flags: torch.Tensor, shape: tuple[int, int], config: dict) -> None:
    """Add one chunk's blocks, and those marked skipped, to ``counts``."""
    marks = flags[
        : triton.cdiv(shape[0], config["BLOCK_M"]), : triton.cdiv(shape[1], config["BLOCK_V"])
    ]
    counts["tiles"] += marks.numel()
    counts["skipped"] += int(marks.sum())
