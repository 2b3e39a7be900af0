"""Chunk schedules of the exact Triton backward: loop order, and where the hidden gradient's
float32 accumulator lives.

The backward forms the logits gradient dZ one chunk (rows x vocabulary columns) at a time and
contracts it twice: ``dH[rows] += dZ @ W[cols]`` into a float32 accumulator and
``dW[cols] (+)= dZ.T @ H[rows]`` straight into the weight gradient. Two loop orders:

* ``"rows"``: row blocks outer, vocabulary inner. The accumulator holds one row block (rows x D
  float32) and takes part of the workspace, so a small workspace means short row blocks: thin
  products that fill part of the GPU, and one more pass over dW per row block.
* ``"vocab"``: vocabulary chunks outer, row tiles inner. The accumulator covers all N rows but
  costs no workspace: it sits in memory that the two gradients own and have not written yet.
  Its first rows fill the hidden gradient's storage (N x D in bf16/fp16 holds N/2 x D in
  float32), the others the weight gradient's last rows, the *tail*. Tail columns go into dH
  like any others, but their dW products wait until dH is final and the tail is free again;
  their logits gradient is then formed once more for dW alone, an extra 2·N·|tail|·D FLOPs
  (|tail| ~ N columns: 0.8% of the work at N=8192, V=256000). All of the workspace goes to dZ.

Either way each dH element is rounded once (from float32), and dW once per row block or tile.

Everything runs in order on the caller's stream. Running the two products on side streams over
two dZ buffers, so that a product whose grid fills part of the GPU overlaps the next kernel, was
measured on an H200 and lost: 193 ms against 73 at 16 MiB (N=8192, V=256000), the events and
stream switches cost more launch time than the overlap saved (docs/benchmarks.md).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from memtrain.kernels.cross_entropy.chunked import undo_grad_scale

# "auto", "rows" or "vocab" (benchmarks force one).
ORDER = "auto"
# (rows, cols) to force the chunk shape (benchmarks); None plans from the workspace.
CHUNK_PLAN: tuple[int, int] | None = None
# Rows per tile of the vocabulary order: long enough that the dH product (rows x D) covers the
# GPU a couple of times, short enough that the chunk keeps many vocabulary columns.
VOCAB_ORDER_ROWS = 2048
# The vocabulary order is used when its tail (recomputed for dW) is at most this share of V.
MAX_TAIL_SHARE = 0.25

Launch = Callable[[tuple[int, int], tuple[int, int], torch.Tensor], None]
Accumulate = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], None]


@dataclass(frozen=True)
class ChunkPlan:
    """Loop order, rows per tile and vocabulary columns per chunk."""

    order: str
    rows: int
    cols: int

    def workspace_bytes(self, dim: int, itemsize: int, in_place: bool) -> int:
        """Scratch memory: the dZ chunk, plus the row block's accumulator in row order."""
        acc = self.rows * dim * 4 if self.order == "rows" and not in_place else 0
        return self.rows * self.cols * itemsize + acc


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _fit(total: int, cap: int, granule: int) -> int:
    """A multiple of ``granule``, at most ``max(cap, granule)``, that splits ``total`` into
    near-equal parts."""
    cap = max(granule, cap // granule * granule)
    if cap >= total:
        return _cdiv(total, granule) * granule
    return min(cap, _cdiv(_cdiv(total, _cdiv(total, cap)), granule) * granule)


def tail_start(n_rows: int, vocab: int, rows: int, cols: int) -> tuple[int, int]:
    """(rows of the accumulator in the hidden gradient's storage, first tail column).

    The first ``n_first`` rows (whole tiles, at most N/2) sit in the hidden gradient, the other
    ``n_rows - n_first`` in the weight gradient from the returned column on (a chunk boundary,
    so the tail is whole chunks): each float32 row takes the bytes of two rows of the dtype.
    """
    n_first = (n_rows // 2) // rows * rows
    need = 2 * (n_rows - n_first)
    return n_first, max(vocab - need, 0) // cols * cols


def vocab_order_fits(
    n_rows: int, vocab: int, rows: int, cols: int, needs: tuple[bool, bool], in_place: bool
) -> bool:
    """Whether the accumulator fits the gradients' unwritten storage with a tail of at most
    ``MAX_TAIL_SHARE`` of the vocabulary (always, when no accumulator is needed)."""
    need_h, need_w = needs
    if not need_h or in_place:
        return True
    if not need_w:
        return False  # no weight gradient whose storage could hold the accumulator
    _, start = tail_start(n_rows, vocab, rows, cols)
    return start >= cols and vocab - start <= MAX_TAIL_SHARE * vocab


def plan_exact(
    n_rows: int,
    vocab: int,
    dim: int,
    itemsize: int,
    budget: int,
    granule: int,
    needs: tuple[bool, bool],
) -> ChunkPlan:
    """The chunk plan for a workspace of ``budget`` bytes (see the module docstring)."""
    in_place = itemsize >= 4
    if CHUNK_PLAN is not None:
        rows, cols = CHUNK_PLAN
        vocab_ok = vocab_order_fits(n_rows, vocab, rows, cols, needs, in_place)
        order = "rows" if ORDER == "rows" or not vocab_ok else "vocab"
        return ChunkPlan(order, rows, cols)
    per_logit = itemsize
    max_cols = _cdiv(vocab, granule) * granule
    acc_row = 4 * dim if needs[0] and not in_place else 0
    rows = _fit(n_rows, budget // 2 // acc_row if acc_row else n_rows, granule)
    left = max(budget - rows * acc_row, 0)
    cols = min(_fit(vocab, left // (per_logit * rows), granule), max_cols)
    by_rows = ChunkPlan("rows", rows, cols)
    # Row blocks as long as the vocabulary order's tiles (or all rows): no tail to recompute.
    if ORDER == "rows" or (ORDER == "auto" and rows >= min(VOCAB_ORDER_ROWS, n_rows)):
        return by_rows
    rows = _fit(n_rows, VOCAB_ORDER_ROWS, granule)
    cols = min(_fit(vocab, budget // (per_logit * rows), granule), max_cols)
    if vocab_order_fits(n_rows, vocab, rows, cols, needs, in_place):
        return ChunkPlan("vocab", rows, cols)
    return by_rows


def run_exact(
    plan: ChunkPlan,
    hidden: torch.Tensor,
    weight: torch.Tensor,
    launch: Launch,
    accumulate: Accumulate,
    grads: tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None],
    inv_scale: torch.Tensor | None,
) -> None:
    """Fill the hidden, weight and bias gradients (those not None) chunk by chunk.

    ``launch((r0, r1), (c0, c1), dz)`` writes that chunk's logits gradient into the top left of
    ``dz``; ``accumulate(acc, a, b)`` is ``acc += a @ b`` with a float32 ``acc``. The bias
    gradient (float32) is summed from each chunk; ``inv_scale`` undoes the fp16 gradient scale
    of dH (the caller undoes it for the others).
    """
    # Rows of the buffer stay a multiple of 16 bytes (tensor-descriptor stores need that).
    # Zeroed once: the padding columns past the vocabulary are read by whole-tile products
    # against masked (zero) weight rows, and uninitialised memory there may hold NaN or inf.
    shape = (min(plan.rows, hidden.shape[0]), min(plan.cols, -(-weight.shape[0] // 16) * 16))
    dz = torch.zeros(shape, dtype=hidden.dtype, device=hidden.device)
    runner = _run_vocab_order if plan.order == "vocab" else _run_row_order
    runner(plan, hidden, weight, launch, accumulate, grads, inv_scale, dz)


def _chunk(dz, launch, rows, cols, grad_bias) -> torch.Tensor:
    """One chunk's logits gradient (a view of ``dz``), added into the bias gradient if any."""
    (r0, r1), (c0, c1) = rows, cols
    launch(rows, cols, dz)
    chunk = dz[: r1 - r0, : c1 - c0]
    if grad_bias is not None:
        grad_bias[c0:c1] += chunk.sum(0, dtype=torch.float32)
    return chunk


def _weight_product(grad_weight, chunk, hidden_rows, cols, first: bool) -> None:
    c0, c1 = cols
    if first:
        torch.mm(chunk.t(), hidden_rows, out=grad_weight[c0:c1])
    else:
        grad_weight[c0:c1].addmm_(chunk.t(), hidden_rows)


def _run_row_order(plan, hidden, weight, launch, accumulate, grads, inv_scale, dz):
    grad_hidden, grad_weight, grad_bias = grads
    n_rows, dim = hidden.shape
    vocab = weight.shape[0]
    in_place = hidden.dtype == torch.float32
    acc_all = None
    if grad_hidden is not None and not in_place:
        acc_all = torch.empty((plan.rows, dim), dtype=torch.float32, device=hidden.device)
    for r0 in range(0, n_rows, plan.rows):
        r1 = min(r0 + plan.rows, n_rows)
        acc = None
        if grad_hidden is not None:
            acc = grad_hidden[r0:r1] if in_place else acc_all[: r1 - r0]
            acc.zero_()
        for c0 in range(0, vocab, plan.cols):
            c1 = min(c0 + plan.cols, vocab)
            chunk = _chunk(dz, launch, (r0, r1), (c0, c1), grad_bias)
            if acc is not None:
                accumulate(acc, chunk, weight[c0:c1])
            if grad_weight is not None:
                _weight_product(grad_weight, chunk, hidden[r0:r1], (c0, c1), r0 == 0)
        if acc is not None:
            undo_grad_scale(inv_scale, acc)
            if not in_place:
                grad_hidden[r0:r1].copy_(acc)


def _accumulator_tiles(plan, hidden, weight, grad_hidden, grad_weight):
    """Float32 accumulator views, one per row tile, the first tail column, and the two parts of
    the accumulator (None for float32, which accumulates in the hidden gradient itself)."""
    n_rows, dim = hidden.shape
    vocab = weight.shape[0]
    starts = range(0, n_rows, plan.rows)
    if grad_hidden is None:
        return [None for _ in starts], vocab, None, None
    if hidden.dtype == torch.float32:
        return [grad_hidden[r0 : r0 + plan.rows] for r0 in starts], vocab, None, None
    n_first, start = tail_start(n_rows, vocab, plan.rows, plan.cols)
    first = grad_hidden.view(-1)[: 2 * n_first * dim].view(torch.float32).view(n_first, dim)
    n_second = n_rows - n_first
    second = grad_weight[start:].view(-1)[: 2 * n_second * dim]
    second = second.view(torch.float32).view(n_second, dim)
    tiles = []
    for r0 in starts:
        r1 = min(r0 + plan.rows, n_rows)
        tiles.append(first[r0:r1] if r0 < n_first else second[r0 - n_first : r1 - n_first])
    return tiles, start, first, second


def _run_vocab_order(plan, hidden, weight, launch, accumulate, grads, inv_scale, dz):
    grad_hidden, grad_weight, grad_bias = grads
    n_rows = hidden.shape[0]
    vocab = weight.shape[0]
    accs, start, first, second = _accumulator_tiles(plan, hidden, weight, grad_hidden, grad_weight)
    for acc in (first, second) if first is not None else accs:
        if acc is not None:
            acc.zero_()
    tiles = [(r0, min(r0 + plan.rows, n_rows)) for r0 in range(0, n_rows, plan.rows)]
    for c0 in range(0, vocab, plan.cols):
        c1 = min(c0 + plan.cols, vocab)
        weight_now = grad_weight is not None and c0 < start
        for (r0, r1), acc in zip(tiles, accs, strict=True):
            chunk = _chunk(dz, launch, (r0, r1), (c0, c1), grad_bias)
            if acc is not None:
                accumulate(acc, chunk, weight[c0:c1])
            if weight_now:
                _weight_product(grad_weight, chunk, hidden[r0:r1], (c0, c1), r0 == 0)
    if grad_hidden is None:
        return
    if first is None:  # float32: accumulated in place
        undo_grad_scale(inv_scale, grad_hidden)
    else:
        undo_grad_scale(inv_scale, first, second)
        _compact_into(grad_hidden, first, dz)
        grad_hidden[first.shape[0] :].copy_(second)
    if grad_weight is None or start >= vocab:
        return
    # The tail's storage held the accumulator until now: its dW products, logits again.
    for c0 in range(start, vocab, plan.cols):
        c1 = min(c0 + plan.cols, vocab)
        for r0, r1 in tiles:
            chunk = _chunk(dz, launch, (r0, r1), (c0, c1), None)
            _weight_product(grad_weight, chunk, hidden[r0:r1], (c0, c1), r0 == 0)


def _compact_into(grad_hidden: torch.Tensor, first: torch.Tensor, dz: torch.Tensor) -> None:
    """Round the float32 rows that share the hidden gradient's storage into its first rows.

    Output row ``i`` overwrites the bytes of float32 row ``i / 2``; going through the rows in
    order, in blocks staged through the dZ buffer, every row is read before it is overwritten.
    """
    n_first, dim = first.shape
    stage_flat = dz.view(-1)
    block = stage_flat.numel() // dim
    if block == 0:
        stage_flat = torch.empty(dim, dtype=grad_hidden.dtype, device=grad_hidden.device)
        block = 1
    for a in range(0, n_first, block):
        b = min(a + block, n_first)
        stage = stage_flat[: (b - a) * dim].view(b - a, dim)
        stage.copy_(first[a:b])
        grad_hidden[a:b].copy_(stage)
