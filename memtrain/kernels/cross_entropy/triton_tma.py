"""Persistent Triton kernels that load their tiles through tensor descriptors (TMA on Hopper).

Same mathematics as ``triton_fwd`` (online log-sum-exp) and ``triton_bwd`` (exact logits
gradient), with two changes that matter for the matrix units' utilisation:

* Operand tiles come through tensor descriptors: on a Hopper GPU the copy engine moves them into
  shared memory, without address arithmetic or masks in the kernel (rows, columns and hidden
  positions past the end read as zeros, and the dZ store is clipped to the chunk).
* The forward's programs walk their vocabulary slice in one flat loop over (tile, hidden
  step), so the software pipeline keeps loading the next tile's operands while the current
  tile's epilogue runs, instead of draining and refilling at every tile. The backward's kernel
  can also run persistently (a program per multiprocessor, tiles in turn), its loops flattened
  or warp-specialized; which variant is fastest is measured, not assumed (``triton_function``).

Descriptors need 16-byte aligned rows (``D * itemsize % 16 == 0``); :func:`tma_supported` says
when they can be used. The filter and its cell maxima stay with the pointer kernels.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_wait
from triton.tools.tensor_descriptor import TensorDescriptor

from memtrain.kernels.cross_entropy.triton_launch import RepeatLaunch
from memtrain.kernels.cross_entropy.triton_tiles import (
    bias_softcap,
    fold_row_stats,
    grid_offsets,
    logits_grad,
    store_row_stats,
)


def tma_shape_ok(dtype: torch.dtype, dim: int) -> bool:
    """Whether the descriptor kernels take this dtype (bf16/fp16) and hidden size (rows of a
    multiple of 16 bytes)."""
    low = dtype in (torch.bfloat16, torch.float16)
    return low and (dim * torch.empty((), dtype=dtype).element_size()) % 16 == 0


def tma_supported(hidden: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether the descriptor kernels can take these operands (also contiguous)."""
    contiguous = hidden.is_contiguous() and weight.is_contiguous()
    return contiguous and tma_shape_ok(hidden.dtype, hidden.shape[1])


@triton.jit
def _forward_tma_kernel(
    h_desc,
    w_desc,
    bias_ptr,
    targets_ptr,
    max_ptr,
    sumexp_ptr,
    target_logit_ptr,
    logit_sum_ptr,
    n_rows,
    vocab,
    dim,
    cols_per_split,
    splits,
    softcap,
    HAS_BIAS: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    NEED_SUM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_D: tl.constexpr,
    UPCAST: tl.constexpr,
):
    pid = tl.program_id(0)
    pid_s = pid % splits
    pid_m = pid // splits
    row0 = pid_m * BLOCK_M
    rows = row0 + tl.arange(0, BLOCK_M)
    row_mask = rows < n_rows
    targets = tl.load(targets_ptr + rows, mask=row_mask, other=-1)
    col_start = pid_s * cols_per_split
    col_stop = tl.minimum(col_start + cols_per_split, vocab)
    k_steps = tl.cdiv(dim, BLOCK_D)
    steps = tl.cdiv(col_stop - col_start, BLOCK_V) * k_steps

    run_max = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    run_sum = tl.zeros((BLOCK_M,), dtype=tl.float32)
    target_logit = tl.zeros((BLOCK_M,), dtype=tl.float32)
    logit_sum = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_V), dtype=tl.float32)
    for i in range(0, steps):
        k = i % k_steps
        v0 = col_start + (i // k_steps) * BLOCK_V
        h = h_desc.load([row0, k * BLOCK_D])
        w = w_desc.load([v0, k * BLOCK_D])
        if UPCAST:
            h, w = h.to(tl.float32), w.to(tl.float32)
        acc = tl.dot(h, w.T, acc)
        if k == k_steps - 1:
            cols = v0 + tl.arange(0, BLOCK_V)
            col_mask = cols < col_stop
            safe_cols = tl.minimum(cols, vocab - 1)
            logits, _ = bias_softcap(acc, bias_ptr, safe_cols, softcap, HAS_BIAS, HAS_SOFTCAP)
            logits = tl.where(col_mask[None, :], logits, float("-inf"))
            hit = cols[None, :] == targets[:, None]
            run_max, run_sum, target_logit, logit_sum, _ = fold_row_stats(
                logits, col_mask[None, :], hit, run_max, run_sum, target_logit, logit_sum,
                NEED_SUM,
            )  # fmt: skip
            acc = tl.zeros((BLOCK_M, BLOCK_V), dtype=tl.float32)

    store_row_stats(
        pid_s.to(tl.int64) * n_rows + rows, row_mask, max_ptr, sumexp_ptr, target_logit_ptr, logit_sum_ptr,
        run_max, run_sum, target_logit, logit_sum, NEED_SUM,
    )  # fmt: skip


@triton.jit
def _store_grad_tile(
    acc, local_r0, local_c0, dz_desc, dz_ptr, bias_ptr, targets_ptr, lse_ptr, grad_rows_ptr,
    row_start, row_stop, col_start, col_stop, vocab, stride_dz, softcap, smoothing, inv_vocab,
    z_loss, HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_V: tl.constexpr, TMA_STORE: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    """Turn one tile of raw products into its logits gradient and store it in the chunk.

    ``PDL``: the kernel was launched while the previous kernel on the stream may still run
    (programmatic dependent launch); its products only read hidden and weight, which nothing
    in the backward writes, but the row statistics and the dZ buffer may belong to the
    previous kernel, so the tile waits for it to finish first (at once after the first wait).
    """
    if PDL:
        gdc_wait()
    rows = row_start + local_r0 + tl.arange(0, BLOCK_M)
    cols = col_start + local_c0 + tl.arange(0, BLOCK_V)
    row_mask = rows < row_stop
    safe_cols = tl.minimum(cols, vocab - 1)
    logits, tanh = bias_softcap(acc, bias_ptr, safe_cols, softcap, HAS_BIAS, HAS_SOFTCAP)
    lse = tl.load(lse_ptr + rows, mask=row_mask, other=0.0)
    targets = tl.load(targets_ptr + rows, mask=row_mask, other=-1)
    grad_rows = tl.load(grad_rows_ptr + rows, mask=row_mask, other=0.0)
    dz = logits_grad(
        logits, tanh, cols, lse, targets, grad_rows, smoothing, inv_vocab, z_loss, HAS_SOFTCAP
    )
    if TMA_STORE:
        dz_desc.store([local_r0, local_c0], dz.to(dz_desc.dtype))
    else:
        local_rows = local_r0 + tl.arange(0, BLOCK_M)
        local_cols = local_c0 + tl.arange(0, BLOCK_V)
        mask = row_mask[:, None] & (cols < col_stop)[None, :]
        ptrs = dz_ptr + grid_offsets(local_rows, local_cols, stride_dz)
        tl.store(ptrs, dz.to(dz_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _grad_logits_tma_kernel(
    h_desc,
    w_desc,
    dz_desc,
    dz_ptr,
    bias_ptr,
    targets_ptr,
    lse_ptr,
    grad_rows_ptr,
    row_start,
    row_stop,
    col_start,
    col_stop,
    vocab,
    dim,
    stride_dz,
    softcap,
    smoothing,
    inv_vocab,
    z_loss,
    programs,
    HAS_BIAS: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_D: tl.constexpr,
    UPCAST: tl.constexpr,
    TMA_STORE: tl.constexpr,
    PDL: tl.constexpr,
    FLAT: tl.constexpr,
    FLATTEN: tl.constexpr,
    WARP_SPECIALIZE: tl.constexpr,
):
    """Tiles ``pid, pid + programs, ...`` of the chunk (row tiles vary fastest, so programs that
    run together share a few weight blocks); ``programs`` = tiles gives one tile per program.

    ``FLAT`` writes the two loops as one over (tile, hidden step), as in the forward: the
    software pipeline then loads the next tile's first operands while this tile's epilogue
    runs, instead of draining and refilling at every tile. Otherwise the tile loop may take
    Triton's own ``FLATTEN`` or ``WARP_SPECIALIZE``."""
    pid = tl.program_id(0)
    tiles_m = tl.cdiv(row_stop - row_start, BLOCK_M)
    tiles = tiles_m * tl.cdiv(col_stop - col_start, BLOCK_V)
    k_steps = tl.cdiv(dim, BLOCK_D)
    if FLAT:
        steps = tl.cdiv(tiles - pid, programs) * k_steps
        acc = tl.zeros((BLOCK_M, BLOCK_V), dtype=tl.float32)
        for i in range(0, steps):
            k = i % k_steps
            tile = pid + (i // k_steps) * programs
            local_r0 = (tile % tiles_m) * BLOCK_M
            local_c0 = (tile // tiles_m) * BLOCK_V
            h = h_desc.load([row_start + local_r0, k * BLOCK_D])
            w = w_desc.load([col_start + local_c0, k * BLOCK_D])
            if UPCAST:
                h, w = h.to(tl.float32), w.to(tl.float32)
            acc = tl.dot(h, w.T, acc)
            if k == k_steps - 1:
                _store_grad_tile(
                    acc, local_r0, local_c0, dz_desc, dz_ptr, bias_ptr, targets_ptr, lse_ptr,
                    grad_rows_ptr, row_start, row_stop, col_start, col_stop, vocab, stride_dz,
                    softcap, smoothing, inv_vocab, z_loss, HAS_BIAS, HAS_SOFTCAP, BLOCK_M, BLOCK_V,
                    TMA_STORE, PDL,
                )  # fmt: skip
                acc = tl.zeros((BLOCK_M, BLOCK_V), dtype=tl.float32)
    else:
        for tile in tl.range(
            pid, tiles, programs, flatten=FLATTEN, warp_specialize=WARP_SPECIALIZE
        ):
            local_r0 = (tile % tiles_m) * BLOCK_M
            local_c0 = (tile // tiles_m) * BLOCK_V
            acc = tl.zeros((BLOCK_M, BLOCK_V), dtype=tl.float32)
            for k in range(0, k_steps):
                h = h_desc.load([row_start + local_r0, k * BLOCK_D])
                w = w_desc.load([col_start + local_c0, k * BLOCK_D])
                if UPCAST:
                    h, w = h.to(tl.float32), w.to(tl.float32)
                acc = tl.dot(h, w.T, acc)
            _store_grad_tile(
                acc, local_r0, local_c0, dz_desc, dz_ptr, bias_ptr, targets_ptr, lse_ptr,
                grad_rows_ptr, row_start, row_stop, col_start, col_stop, vocab, stride_dz,
                softcap, smoothing, inv_vocab, z_loss, HAS_BIAS, HAS_SOFTCAP, BLOCK_M, BLOCK_V, TMA_STORE,
                PDL,
            )  # fmt: skip


class Descriptors:
    """Tensor descriptors of hidden and weight for one launch setting, built once per call, and
    of the dZ chunks (one per chunk shape: most chunks of a backward share one, and building
    it is part of each launch's host time); and the call's compiled logits-gradient kernels,
    launched directly after the first launch (the call's tensors, hence their dtypes and
    alignment, stay the same)."""

    def __init__(self, hidden: torch.Tensor, weight: torch.Tensor, config: dict):
        bm, bv, bd = config["BLOCK_M"], config["BLOCK_V"], config["BLOCK_D"]
        self.hidden = TensorDescriptor.from_tensor(hidden, [bm, bd])
        self.weight = TensorDescriptor.from_tensor(weight, [bv, bd])
        self.block = [bm, bv]
        self.dtype = hidden.dtype
        self._chunks: dict[tuple, TensorDescriptor] = {}
        self.launch = RepeatLaunch(_grad_logits_tma_kernel)
        self._settings: dict[int, tuple] = {}

    def settings(self, config: dict, has_bias: bool, has_softcap: bool) -> tuple[tuple, dict]:
        """The logits-gradient kernel's constexpr values (in its parameter order) and launch
        options for ``config``, worked out once per call (this call's dtype, bias, softcap)."""
        entry = self._settings.get(id(config))
        if entry is None or entry[0] is not config:
            constexprs = (
                has_bias, has_softcap, config["BLOCK_M"], config["BLOCK_V"], config["BLOCK_D"],
                config["upcast"] and self.dtype == torch.bfloat16,
                config.get("tma_store", False), config.get("pdl", False), config.get("flat", False),
                config.get("flatten", False), config.get("warp_specialize", False),
            )  # fmt: skip
            options = dict(num_warps=config["num_warps"], num_stages=config["num_stages"])
            if config.get("pdl"):
                options["launch_pdl"] = True
            entry = self._settings[id(config)] = (config, constexprs, options)
        return entry[1], entry[2]

    def chunk(self, dz: torch.Tensor, rows: int, cols: int) -> TensorDescriptor:
        """The descriptor of the top left ``rows x cols`` of the buffer ``dz``."""
        key = (dz.data_ptr(), dz.stride(0), rows, cols)
        if key not in self._chunks:
            self._chunks[key] = TensorDescriptor(dz, [rows, cols], [dz.stride(0), 1], self.block)
        return self._chunks[key]

    def release_chunks(self) -> None:
        """Drop the chunk descriptors (each holds its buffer alive) and the kernels compiled
        for them."""
        self._chunks.clear()
        self.launch.clear()


def forward_tma(
    hidden, weight, bias, targets, softcap, need_sum, config, splits, cols_per_split, parts
) -> None:
    """Fill ``parts`` (4 x splits x N float32: max, sum of exponentials, target logit, sum of
    logits) like the pointer forward kernel."""
    n_rows, dim = hidden.shape
    desc = Descriptors(hidden, weight, config)
    row_blocks = triton.cdiv(n_rows, config["BLOCK_M"])
    _forward_tma_kernel[(row_blocks * splits,)](
        desc.hidden, desc.weight, bias if bias is not None else hidden, targets,
        parts[0], parts[1], parts[2], parts[3], n_rows, weight.shape[0], dim,
        cols_per_split, splits, float(softcap) if softcap is not None else 1.0,
        HAS_BIAS=bias is not None, HAS_SOFTCAP=softcap is not None, NEED_SUM=need_sum,
        BLOCK_M=config["BLOCK_M"], BLOCK_V=config["BLOCK_V"], BLOCK_D=config["BLOCK_D"],
        UPCAST=config["upcast"] and hidden.dtype == torch.bfloat16,
        num_warps=config["num_warps"], num_stages=config["num_stages"],
    )  # fmt: skip


def grad_logits_tma(
    config: dict,
    desc: Descriptors,
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    lse: torch.Tensor,
    grad_rows: torch.Tensor,
    dz: torch.Tensor,
    rows: tuple[int, int],
    cols: tuple[int, int],
    softcap: float | None,
    smoothing: float,
    z_loss: float = 0.0,
) -> None:
    """Write the exact logits gradient of ``rows x cols`` into ``dz`` (the chunk's top left)."""
    (r0, r1), (c0, c1) = rows, cols
    bm, bv = config["BLOCK_M"], config["BLOCK_V"]
    dz_desc = desc.chunk(dz, r1 - r0, c1 - c0)
    tiles = triton.cdiv(r1 - r0, bm) * triton.cdiv(c1 - c0, bv)
    persistent = config.get("persistent") or config.get("flat")
    programs = min(tiles, config["programs"]) if persistent else tiles
    constexprs, options = desc.settings(config, bias is not None, softcap is not None)
    sizes = (r0, r1, c0, c1, r1 - r0, c1 - c0, dz.stride(0), programs)
    # Everything Triton specializes on that can differ between launches of one call: integers
    # (divisibility by 16, equality to 1; the chunk bounds set the dZ store's vector width),
    # the buffer's alignment, the settings. The call's other tensors stay the same.
    key = (id(config), dz.data_ptr() % 16, *(-1 if x == 1 else x % 16 for x in sizes))
    args = (
        desc.hidden, desc.weight, dz_desc, dz, bias if bias is not None else hidden, targets,
        lse, grad_rows, r0, r1, c0, c1, weight.shape[0], hidden.shape[1], dz.stride(0),
        float(softcap) if softcap is not None else 1.0, float(smoothing), 1.0 / weight.shape[0],
        float(z_loss), programs, *constexprs,
    )  # fmt: skip
    desc.launch(key, (programs, 1, 1), args, options)
