"""Autograd wrapper around the Triton forward and backward kernels, and their launch settings.

Block shapes are picked per GPU on first use: each candidate runs once to compile and is then
timed on the caller's own tensors (CUDA events, best of two), and the fastest is kept for that
kernel, dtype and hidden size, in memory and on disk (``tuning_cache``: a later process on the
same GPU and versions reuses it without timing). ``TUNING_LOG`` records what was measured. With the gradient
filter the forward also records the largest logit per cell for the backward's bound (see
``triton_bwd``; ``triton_bwd.PRESKIP = False`` turns that off).
"""

from __future__ import annotations

import copy
import math
import os
from collections.abc import Callable

import torch

from memtrain.kernels.cross_entropy import triton_bwd, tuning_cache
from memtrain.kernels.cross_entropy.chunked import row_losses
from memtrain.kernels.cross_entropy.reductions import full_precision_reductions
from memtrain.kernels.cross_entropy.triton_bwd import backward_grads
from memtrain.kernels.cross_entropy.triton_fwd import empty_cell_max, forward_row_stats
from memtrain.kernels.cross_entropy.triton_tma import tma_supported

# Workspace of the backward pass (logits-gradient chunk + float32 hidden-gradient accumulator).
# The filtered path has more fixed cost per chunk (block lists, two sparse launches), so larger
# chunks pay off there: on an H100 at N=8192, V=256000 it ran 47 ms with 256 MiB, 53 with 64.
DEFAULT_WORKSPACE_BYTES = 64 * 1024 * 1024
DEFAULT_FILTER_WORKSPACE_BYTES = 256 * 1024 * 1024
# Problems smaller than this many logits run the first candidate without timing the others.
TUNE_MIN_LOGITS = 1 << 26
# Tuning: each timing spans at least this long, and each candidate keeps its best of the rounds
# (one chunk timed twice picked a setting 29% slower on its chunk on an H200).
TUNE_SPAN_MS = 2.0
TUNE_ROUNDS = 3

TUNING_LOG: dict[tuple, dict] = {}
_CHOSEN: dict[tuple, dict] = {}


def interpreting() -> bool:
    """True when Triton runs its kernels in the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _config(
    bm, bv, bd, warps, stages, precision, sparse_bd=128, upcast=False, programs=0, tma=False
):  # fmt: skip
    return dict(
        BLOCK_M=bm, BLOCK_V=bv, BLOCK_D=bd, num_warps=warps, num_stages=stages,
        SPARSE_BLOCK_D=sparse_bd, sparse_num_warps=8, sparse_num_stages=3,
        dot_precision=precision, upcast=upcast, target_programs=programs, tma=tma,
    )  # fmt: skip


# The interpreter runs the tensor-descriptor kernels instead of the pointer ones (tests): False,
# or a dict of backward variant flags (see TMA_VARIANTS; {} is the plain variant).
INTERPRET_TMA: dict | bool = False
# (BLOCK_M, BLOCK_V, BLOCK_D, warps, stages) of the tensor-descriptor kernels; tried first.
# Measured on an H200 (N=8192, D=2304, V=256000, bf16; docs/benchmarks.md): forward 14.5 ms at
# 256 x 128 (16.1-19.3 for the others), 15.7-17.5 for the best pointer kernel.
TMA_SHAPES = [(256, 128, 64, 8, 3), (128, 256, 64, 8, 3), (128, 256, 64, 8, 4)]
# Backward variants of each shape (the forward ignores them): {"persistent": False} runs one
# tile per program; persistent ones take "tma_store" (dZ through a descriptor), "flatten" and
# "warp_specialize" (Triton's loop transformations); {"flat": True} is the persistent kernel
# written as one loop over (tile, hidden step), like the forward. On an H200 (2816 x 7168
# chunk) the flat one took 0.142 ms, the plain persistent one 0.147-0.160 and the best pointer
# kernel 0.160; over a whole backward the logits-gradient kernels went from 18.1 to 14.4 ms
# (N=8192, D=2304, V=256000, docs/benchmarks.md). Triton's own flatten/warp_specialize and the
# descriptor store measured 0.22-0.30 ms and are not offered. "pdl": launched as a programmatic
# dependent launch (Hopper), so a kernel's setup and first products overlap the end of the
# previous kernel on the stream; it waits for that kernel before touching anything it may have
# written. On an H200 it was faster in all 12 pairs timed (0.1-2.6%; docs/benchmarks.md).
TMA_VARIANTS = [{"persistent": True, "pdl": True}, {"flat": True, "pdl": True}]


def tma_capable_device() -> bool:
    """Hopper (compute capability 9.0) or newer: tensor descriptors map to the copy engine
    there; the descriptor kernels were measured on nothing older."""
    return torch.cuda.is_available() and torch.cuda.get_device_capability() >= (9, 0)


def candidate_configs(dtype: torch.dtype, tma: bool = False, variants: bool = True) -> list[dict]:
    """Launch settings to choose from: tensor-core tiles on a GPU, small tiles in the
    interpreter (so tests on odd shapes go through every masking path and chunk boundary).

    ``tma``: the caller can take the tensor-descriptor kernels (``triton_tma``; bf16/fp16 only),
    whose persistent grids get one program per multiprocessor. ``variants``: one candidate
    per backward variant of each shape (the forward has no variants).
    """
    if interpreting():
        use_tma = tma and INTERPRET_TMA is not False
        cfg = _config(16, 32, 16, 4, 1, "ieee", sparse_bd=16, upcast=True, programs=8, tma=use_tma)
        return [dict(cfg, **INTERPRET_TMA) if use_tma else cfg]
    sms = torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count
    if dtype == torch.float32:
        tf32 = torch.backends.cuda.matmul.allow_tf32
        precision = "tf32" if tf32 else "ieee"
        shapes = [(128, 128, 32, 8, 3), (64, 128, 32, 4, 3)]
        return [_config(*s, precision, sparse_bd=64, programs=4 * sms) for s in shapes]
    shapes = [
        (128, 256, 64, 8, 3),
        (128, 256, 64, 8, 4),
        (128, 256, 128, 8, 2),
        (128, 128, 64, 8, 4),
        (256, 128, 64, 8, 3),
        (128, 128, 64, 4, 4),
    ]
    pointer = [_config(*s, "ieee", programs=4 * sms) for s in shapes]
    if not tma or not tma_capable_device():
        return pointer
    # The forward's programs each own one slice of the vocabulary: many slices, so the last wave
    # of them is short. The backward's persistent variants run a program per multiprocessor.
    tma_configs = [
        dict(_config(*s, "ieee", programs=16 * sms, tma=True), programs=sms, **variant)
        for s in TMA_SHAPES
        for variant in (TMA_VARIANTS if variants else [{}])
    ]
    return tma_configs + pointer


class ConfigPicker:
    """Chooses launch settings for one kernel by timing the candidates on real inputs."""

    def __init__(self, kind: str, dtype: torch.dtype, key: tuple, size: int, tma: bool = False):
        self.candidates = candidate_configs(dtype, tma, variants=kind == "backward")
        self.key = (kind, str(dtype), *key, tma)
        self.size = size
        blocks = [c[k] for c in self.candidates for k in ("BLOCK_M", "BLOCK_V")]
        self.granule = math.lcm(*blocks)
        self.min_block = math.gcd(*blocks)
        # The finest grid every candidate's blocks are made of (cells of the forward's bound).
        self.cell = tuple(
            math.gcd(*(c[k] for c in self.candidates)) for k in ("BLOCK_M", "BLOCK_V")
        )

    def for_chunk(self, shape: tuple[int, int]) -> ConfigPicker:
        """The same picker, choosing separately for chunks of ``shape``: how well a grid fills
        the GPU depends on the chunk (a persistent grid over 224 tiles leaves 40 of 132
        programs one tile short), so a choice made on one chunk shape is not reused for
        another."""
        picker = copy.copy(self)
        picker.key = (*self.key, "chunk", *shape)
        return picker

    def __call__(self, run: Callable[[dict], object]) -> dict:
        if self.key in _CHOSEN:
            return _CHOSEN[self.key]
        if len(self.candidates) == 1 or self.size < TUNE_MIN_LOGITS:
            return self.candidates[0]
        cached = tuning_cache.lookup(self.key, self.candidates)
        if cached is not None:
            _CHOSEN[self.key] = cached
            TUNING_LOG[self.key] = {"chosen": _name(cached), "ms": "from the disk cache"}
            return cached
        timings: dict[str, float | str] = {}
        ready = []
        for cfg in self.candidates:
            try:
                run(cfg)  # compiles
            except Exception as exc:  # e.g. too much shared memory on a smaller GPU
                timings[_name(cfg)] = f"failed: {type(exc).__name__}"
                continue
            ready.append(cfg)
        if ready:
            # A small problem runs often enough per timing to span TUNE_SPAN_MS, after a
            # warm-up that brings the clocks up; candidates take turns over TUNE_ROUNDS
            # rounds (drift hits all alike) and keep their best round.
            reps = max(1, math.ceil(TUNE_SPAN_MS / max(_time(run, ready[0], 1), 1e-3)))
            _time(run, ready[0], max(reps, 3))
            for _ in range(TUNE_ROUNDS):
                for cfg in ready:
                    ms = _time(run, cfg, reps) / reps
                    timings[_name(cfg)] = min(timings.get(_name(cfg), math.inf), ms)
        measured = {k: v for k, v in timings.items() if isinstance(v, float)}
        if not measured:
            raise RuntimeError(f"no launch setting for {self.key} ran: {timings}")
        chosen = next(c for c in self.candidates if _name(c) == min(measured, key=measured.get))
        _CHOSEN[self.key] = chosen
        TUNING_LOG[self.key] = {"chosen": _name(chosen), "ms": timings}
        tuning_cache.store(self.key, chosen, timings)
        return chosen


def _time(run: Callable[[dict], object], cfg: dict, reps: int) -> float:
    """Milliseconds (CUDA events) of ``reps`` back-to-back runs of ``cfg``."""
    start = torch.cuda.Event(enable_timing=True)
    stop = torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        run(cfg)
    stop.record()
    stop.synchronize()
    return start.elapsed_time(stop)


def _name(cfg: dict) -> str:
    name = "{BLOCK_M}x{BLOCK_V}x{BLOCK_D}/w{num_warps}/s{num_stages}".format(**cfg)
    if not cfg.get("tma"):
        return name
    flags = ("persistent", "flat", "pdl", "tma_store", "flatten", "warp_specialize")
    return name + "/tma" + "".join(f"/{f}" for f in flags if cfg.get(f))


class TritonLinearCrossEntropy(torch.autograd.Function):
    """Per-row losses of ``softcap(hidden @ weight.T + bias)`` against ``targets`` (-1 = ignore)."""

    @staticmethod
    def forward(
        ctx, hidden, weight, bias, targets, softcap, label_smoothing, filter_eps, workspace_bytes,
        z_loss=0.0,
    ):  # fmt: skip
        need_sum = label_smoothing > 0.0
        flags = (bias is not None, softcap is not None, need_sum)
        n_rows, dim = hidden.shape
        vocab = weight.shape[0]
        # The filtered backward skips blocks bounded by the forward's cell maxima.
        record = filter_eps is not None and triton_bwd.PRESKIP and any(ctx.needs_input_grad[:3])
        tma = not record and tma_supported(hidden, weight)  # cell maxima: pointer kernel only
        picker = ConfigPicker("forward", hidden.dtype, (dim, *flags), n_rows * vocab, tma)
        cell = picker.cell

        def run(cfg):
            cell_max = empty_cell_max(n_rows, vocab, cell, hidden.device) if record else None
            stats = forward_row_stats(
                hidden, weight, bias, targets, softcap, need_sum, cfg, cell_max, cell
            )
            return stats, cell_max

        cfg = picker(run)
        (lse, target_logit, logit_sum), cell_max = run(cfg)
        losses = row_losses(
            lse, target_logit, logit_sum, targets >= 0, label_smoothing, vocab, z_loss
        )
        ctx.save_for_backward(hidden, weight, bias, targets, lse, cell_max)
        ctx.settings = (softcap, label_smoothing, filter_eps, workspace_bytes, cell, z_loss)
        return losses

    @staticmethod
    def backward(ctx, grad_losses):
        hidden, weight, bias, targets, lse, cell_max = ctx.saved_tensors
        softcap, smoothing, filter_eps, workspace_bytes, cell, z_loss = ctx.settings
        grad_rows = (grad_losses.float() * (targets >= 0)).contiguous()
        n_rows, dim = hidden.shape
        # With the pre-skip, skipped blocks cost next to nothing: its own best shape.
        key = (dim, bias is not None, softcap is not None, filter_eps is not None)
        key += (cell_max is not None,)
        # The filter's block marks come from the pointer kernel only.
        tma = filter_eps is None and tma_supported(hidden, weight)
        picker = ConfigPicker("backward", hidden.dtype, key, n_rows * weight.shape[0], tma)
        with full_precision_reductions():
            grads = backward_grads(
                hidden, weight, bias, targets, lse, grad_rows, softcap, smoothing, filter_eps,
                tuple(ctx.needs_input_grad[:3]), picker, workspace_bytes,
                (cell_max, cell) if cell_max is not None else None, z_loss,
            )  # fmt: skip
        return (*grads, None, None, None, None, None, None)
