"""A Triton kernel that stores the row-strided offsets the loss kernels compute, so a test can
check them at values past 2^31 without allocating that much memory."""

from __future__ import annotations

import triton
import triton.language as tl

from memtrain.kernels.cross_entropy.triton_tiles import grid_offsets


@triton.jit
def offsets_probe_kernel(out_ptr, row_start, stride, WIDE: tl.constexpr, BLOCK: tl.constexpr):
    """``out[i, j]`` = ``(row_start + i) * stride + j``, through ``grid_offsets`` (``WIDE``) or
    in plain int32 arithmetic (the control that shows what wrapping looks like)."""
    rows = row_start + tl.arange(0, BLOCK)
    cols = tl.arange(0, BLOCK)
    if WIDE:
        offs = grid_offsets(rows, cols, stride)
    else:
        offs = (rows[:, None] * stride + cols[None, :]).to(tl.int64)
    local = tl.arange(0, BLOCK)
    tl.store(out_ptr + grid_offsets(local, local, BLOCK), offs)
