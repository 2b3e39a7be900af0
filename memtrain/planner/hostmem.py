"""Host memory as the executor allocates it: the one source of truth for host-tier bytes.

The planner's host-tier constraint and ``predicted['peak_bytes']`` for ``cpu``/``cxl``/``nvme``
are built from these figures, and the executor (memtrain.offload) allocates by them:

- **activation pools** (cpu, cxl): one pinned :class:`~memtrain.offload.pool.HostPool` per tier,
  sized ``planned x (1 + POOL_MARGIN) + POOL_SLACK`` and rounded up to a page, where ``planned``
  is the bytes the plan's layers place on the tier (token-wise recompute: the stored tokens'
  saved tensors, the recomputed tokens' block input and every token's attention output, each at
  its own shares; memtrain.offload.policy.executed_host_bytes);
- **host optimizer** (memtrain.offload.optimizer.OffloadedOptimizer), per parameter whose layer
  puts its optimizer off the GPU: a float32 master copy and a gradient buffer in the parameter's
  dtype (bf16/fp16: 2 bytes a parameter; float32 parameters: 4) in plain host memory (``cpu``),
  and the optimizer's states on those float32 masters (``cpu``; ``cxl`` in a pool bound to that
  node; ``nvme`` in files);
- **host gradient staging** (:func:`grad_staging_bytes`), once for the largest host-placed
  parameter: the float32 transient its narrow gradient is widened into for its step (one
  parameter at a time), and with an overlapped host step (``overlap_host_step``), which keeps
  no per-parameter gradient buffers at all, the ring of ``GRAD_RING_SLOTS`` pinned slots in
  the parameter's dtype that gradients land in;
- **NVMe optimizer states in host memory**: streamed through it a layer at a time for the step
  (the next layer read ahead, the previous one written behind), so at most the states of
  ``NVME_STATE_WINDOW`` adjacent layers at once: for each layer ``j`` the states of the NVMe
  layers among ``j-1, j, j+1`` (:func:`nvme_state_window`), on top of everything else on the CPU;
  the executor never holds layers that are not adjacent together;
- **NVMe staging**: host buffers of the swap files being written and read back, at most the
  NVMe bytes of two adjacent layers at once.
"""

from __future__ import annotations

import math
import mmap

FLOAT32_BYTES = 4
# The activation pool's headroom over the planned bytes: alignment of pieces (512 bytes each) and
# rounding of token cuts, plus fragmentation of the best-fit free list.
# memtrain.offload.apply sizes its pools with exactly these numbers.
POOL_MARGIN = 0.05
POOL_SLACK = 4 << 20
PAGE = mmap.PAGESIZE
POOLED_TIERS = ("cpu", "cxl")  # tiers whose activations live in a pinned pool (NVMe: files)
# Layers whose NVMe-placed optimizer states are in host memory at once: the next one being read,
# the current one stepping, the previous one being written back
# (memtrain.offload.optimizer.NVME_WINDOW).
NVME_STATE_WINDOW = 3
# Pinned slots an overlapped host step receives gradients in, each sized for the largest host
# parameter (memtrain.offload.optimizer: a slot is reused once its parameter has stepped).
GRAD_RING_SLOTS = 4


def pool_bytes(planned: float) -> int:
    """Bytes of the pool the executor maps for ``planned`` activation bytes (0: no pool)."""
    if planned <= 0:
        return 0
    size = int(math.ceil(planned) * (1 + POOL_MARGIN)) + POOL_SLACK
    return (size + PAGE - 1) // PAGE * PAGE


def master_bytes(param_count: float) -> float:
    """One float32 copy of ``param_count`` parameters (the master weights)."""
    return FLOAT32_BYTES * float(param_count)


def grad_buffer_bytes(param_count: float, param_bytes: float) -> float:
    """The host gradient buffer of ``param_count`` parameters of ``param_bytes`` in all: in the
    parameters' dtype, never wider than float32 (the masters')."""
    if param_bytes <= 0:
        return master_bytes(param_count)
    return min(float(param_bytes), master_bytes(param_count))


def grad_staging_bytes(largest_param_bytes: float, itemsize: float, overlap: bool) -> float:
    """Host bytes for gradients beyond the per-parameter buffers, for the largest host-placed
    parameter (``largest_param_bytes`` in its dtype of ``itemsize`` bytes an element): the
    float32 transient a narrower gradient is widened into for its step, and when ``overlap``
    the ring of ``GRAD_RING_SLOTS`` slots in the gradient's dtype."""
    if largest_param_bytes <= 0 or itemsize <= 0:
        return 0.0
    count = largest_param_bytes / itemsize
    buffer = grad_buffer_bytes(count, largest_param_bytes)
    widened = master_bytes(count) if buffer < master_bytes(count) else 0.0
    return widened + (GRAD_RING_SLOTS * buffer if overlap else 0.0)


def host_state_estimate(state_bytes: float, param_bytes: float, param_count: float) -> float:
    """States of an optimizer stepping float32 masters, from its states on the parameters' own
    dtype: moments scale with the element size (exact for every elementwise optimizer up to
    their float32 ``step`` scalars). Plans made from a model use exact per-parameter formulas
    instead (memtrain.planner.pipeline)."""
    if param_count <= 0 or param_bytes <= 0:
        return float(state_bytes)
    itemsize = param_bytes / param_count
    return float(state_bytes) * FLOAT32_BYTES / itemsize


def optimizer_host_bytes(
    mode: dict[str, str],
    host_state: float,
    param_count: float,
    param_bytes: float,
    overlap: bool = False,
    masters: bool = True,
) -> dict[str, float]:
    """Host bytes per tier of one layer whose parameters, gradients and states are placed as
    ``mode`` says (a value of memtrain.planner.costmodel.STATE_MODES): float32 masters, gradient
    buffers in the parameters' dtype (none when ``overlap``: the ring of
    :func:`grad_staging_bytes` instead) and states. ``masters=False``: the optimizer steps the
    parameters in their own dtype (FSDP2's CPU offload steps each rank's shards where they
    live), so there is no float32 copy and ``host_state`` is on that dtype."""
    optimizer = mode["optimizer"]
    if optimizer == "gpu":
        return {}
    out = {"cpu": master_bytes(param_count) if masters else 0.0}
    if not overlap:
        out["cpu"] += grad_buffer_bytes(param_count, param_bytes)
    # NVMe states pass through host memory a few layers at a time: nvme_state_window
    out[optimizer] = out.get(optimizer, 0.0) + host_state
    if mode["params"] != "gpu":  # ZeRO-3: the parameters themselves live on the host too
        out["cpu"] += param_bytes
    return out


def nvme_state_window(j: int, n_layers: int) -> range:
    """Layers whose NVMe-placed states may be in host memory while layer ``j`` (of
    ``n_layers``, in the model's order) steps: it and its neighbours."""
    half = NVME_STATE_WINDOW // 2
    return range(max(0, j - half), min(n_layers, j + half + 1))


def nvme_state_peak(states: list[float]) -> float:
    """Most host bytes of NVMe-placed optimizer states at once, from each layer's states on
    NVMe (0 for a layer whose states are elsewhere), in the model's layer order."""
    n = len(states)
    return max((sum(states[k] for k in nvme_state_window(j, n)) for j in range(n)), default=0.0)
