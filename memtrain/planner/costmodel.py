"""The planner's cost model: live bytes per tier at every moment, and the step time.

Decision keys for layer ``j`` (all fractions in [0, 1]):
``(j, "a", tier)``  share of the layer's anchor bytes (its input) stored on ``tier``;
``(j, "x", tier)``  share of its recomputable bytes kept (``gpu``) or swapped to a host tier;
``(j, "x", "rec")`` share of its recomputable bytes recomputed in backward (1 = full recompute);
``(j, "c", tier)``  share of its tokens whose input is stored on ``tier`` for recompute (these
sum to the ``rec`` share; only layers whose input autograd does not save have such bytes);
``(j, "c", tier)``  share of its tokens whose input is stored on ``tier`` for recompute (these
sum to the ``rec`` share; only layers whose input autograd does not already save have bytes);
``(j, "m", mode)``  1 if the layer's parameters, gradients and optimizer states use ``mode``;
``(j, "f", "full")`` 1 if a block whose anchor is its stored attention output drops it and is
checkpointed whole instead (its anchor shares then sum to 0 and attention is recomputed).

Timeline, per layer in order, then backward in reverse:
forward ``j`` produces all of its saved bytes; the swapped part streams to the host during the
layer's own forward (``F_j`` window). Backward ``j`` needs all of them back: kept bytes are
there, swapped bytes of layer ``j-1`` are prefetched during backward ``j`` (``B_j`` window), the
recomputed part is rebuilt at its share of the forward time (less the attention kernels where
their outputs are stored: token-wise recompute starts from them). A window's transfers are hidden
behind its compute; only the excess costs time. Both directions share the host link
(``host_link_duplex``), each direction has its own limit, and CXL and NVMe add their own.
Sequence tiling with ``c`` chunks divides a block's tileable bytes in flight by ``c``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from memtrain.hardware.tiers import HOST_TIERS, HardwareModel
from memtrain.planner.hostmem import (
    POOL_MARGIN,
    POOL_SLACK,
    POOLED_TIERS,
    grad_staging_bytes,
    nvme_state_window,
    optimizer_host_bytes,
)
from memtrain.planner.linear import Lin, lin_sum
from memtrain.planner.problem import LayerCosts, PlanProblem

# Where a layer's parameters / gradients / optimizer states live, per state mode.
STATE_MODES: dict[str, dict[str, str]] = {
    "gpu": {"params": "gpu", "grads": "gpu", "optimizer": "gpu"},
    "opt:cpu": {"params": "gpu", "grads": "cpu", "optimizer": "cpu"},
    "opt:cxl": {"params": "gpu", "grads": "cpu", "optimizer": "cxl"},
    "opt:nvme": {"params": "gpu", "grads": "cpu", "optimizer": "nvme"},
    "all:cpu": {"params": "cpu", "grads": "cpu", "optimizer": "cpu"},
}
# Layers whose parameters may leave the GPU: memtrain.offload.params streams a layer's weights
# around its own forward and backward, which a decoder block has; embeddings, norms and heads
# (tied to the embedding, or read by the fused loss outside their forward) keep theirs.
STREAMED_KINDS = ("block",)


def available_tiers(hardware: HardwareModel) -> list[str]:
    return ["gpu", *[t for t in HOST_TIERS if hardware.capacity(t) > 0]]


def available_modes(
    hardware: HardwareModel,
    allow_state_offload: bool = True,
    allow_param_offload: bool = True,
    only: Sequence[str] | None = None,
) -> list[str]:
    """State placements to choose from; parameters leave the GPU only where allowed (ZeRO-3);
    ``only``: the placements the executing engine can run (None: all of them)."""
    tiers = set(available_tiers(hardware))
    if not allow_state_offload or "cpu" not in tiers:
        return ["gpu"]
    return [
        m
        for m in STATE_MODES
        if STATE_MODES[m]["optimizer"] in tiers
        and (allow_param_offload or STATE_MODES[m]["params"] == "gpu")
        and (only is None or m == "gpu" or m in only)
    ]


@dataclass
class Window:
    """Compute that can hide transfers, and the time each transfer resource needs."""

    label: str
    compute: Lin
    transfers: list[Lin]


@dataclass
class MemoryTerm:
    """Live bytes on ``tier`` at ``moment``.

    For GPU moments inside the step, ``prefix`` is the number of earlier layers whose kept bytes
    are still alive: the full value is ``gpu_static + sum(kept[:prefix]) + local``. Keeping the
    shared part out of every term makes the model linear in size instead of quadratic.
    """

    tier: str
    moment: str
    local: Lin
    prefix: int | None = None


@dataclass
class Terms:
    """Everything the step costs, as linear forms over decision keys."""

    compute: Lin  # seconds of GPU work including recompute and tiling overhead
    windows: list[Window]
    tail: list[Lin]  # optimizer step: the slowest of these runs after backward
    memory: list[MemoryTerm] = field(default_factory=list)
    gpu_static: Lin = field(default_factory=Lin)
    kept: list[Lin] = field(default_factory=list)  # per layer: bytes kept from forward to backward
    # per layer: bytes of the tensors it cuts (moved share and kept share), whole on the GPU
    # while its copies out run and again once they are fetched back
    copying: list[Lin] = field(default_factory=list)
    # Tie-break, not part of the step time: the seconds host tiers spend writing and reading
    # swapped bytes. Among equally fast plans it prefers fewer moved bytes and faster tiers.
    traffic: Lin = field(default_factory=Lin)
    # Per pooled host tier: the activation bytes its pinned pool is sized from.
    pools: dict[str, Lin] = field(default_factory=dict)

    def memory_values(self, values) -> list[tuple[str, str, float]]:
        """(tier, moment, bytes) of every memory term at concrete decisions."""
        static = self.gpu_static.value(values)
        prefix = [0.0]
        for form in self.kept:
            prefix.append(prefix[-1] + form.value(values))
        out = []
        for term in self.memory:
            value = term.local.value(values)
            if term.prefix is not None:
                value += static + prefix[term.prefix]
            out.append((term.tier, term.moment, value))
        return out


def pool_key(tier: str) -> tuple:
    """Decision key: 1 if ``tier`` has an activation pool (the plan swaps anything to it)."""
    return (-1, "pool", tier)


def pool_values(terms: Terms, values: dict) -> None:
    """Fill the pool keys from concrete decisions: a pool exists where bytes are swapped."""
    for tier, form in terms.pools.items():
        values[pool_key(tier)] = 1.0 if form.value(values) > 0.5 else 0.0


def _frac(j: int, group: str, tier: str) -> Lin:
    return Lin.var((j, group, tier))


def kept_bytes(layer: LayerCosts, j: int) -> Lin:
    """Bytes of layer ``j`` that stay on the GPU from its forward to its backward."""
    return (
        Lin(const=layer.fixed_bytes)
        + layer.anchor_bytes * _frac(j, "a", "gpu")
        + layer.recomputable_bytes * _frac(j, "x", "gpu")
        + layer.checkpoint_bytes * _frac(j, "c", "gpu")
    )


# Unit of the ``(j, "pref", "gpu")`` decision value: GiB, so the solver's variable is well scaled.
PREFETCH_UNIT = float(2**30)


def prefetch_values(terms: Terms, values: dict, n_layers: int) -> None:
    """Fill ``(j, "pref", "gpu")``: layer j-1's cut bytes (in GiB) where layer j moves
    anything (``(j, "moves", "gpu")`` is 1), else 0."""
    for j in range(1, n_layers):
        if values.get((j, "moves", "gpu"), 0.0) > 0.5:
            values[(j, "pref", "gpu")] = terms.copying[j - 1].value(values) / PREFETCH_UNIT
        else:
            values[(j, "pref", "gpu")] = 0.0


def swapped_bytes(layer: LayerCosts, j: int, tier: str) -> Lin:
    return (
        layer.anchor_bytes * _frac(j, "a", tier)
        + layer.recomputable_bytes * _frac(j, "x", tier)
        + layer.checkpoint_bytes * _frac(j, "c", tier)
    )


def tile_factor(layer: LayerCosts, chunks: int) -> float:
    """Share of a layer's in-flight token bytes that is live at once with ``chunks`` chunks."""
    if chunks <= 1 or not layer.tileable:
        return 1.0
    return (1.0 - layer.tileable_fraction) + layer.tileable_fraction / chunks


def tiled_backward_transient(layer: LayerCosts, phi: float) -> float:
    """Backward transient with ``phi`` of its tileable part live at once."""
    untiled = min(layer.untiled_backward_transient, layer.backward_transient)
    return untiled + phi * (layer.backward_transient - untiled)


def stored_query_grad(layer: LayerCosts, j: int) -> Lin:
    """The stored tokens' query gradient, whole while a block's attention backward runs in query
    chunks: the query bytes times the share of tokens not recomputed."""
    if layer.query_bytes <= 0:
        return Lin()
    return Lin(const=layer.query_bytes) - layer.query_bytes * _frac(j, "x", "rec")


def host_states(problem: PlanProblem, layer: LayerCosts) -> float:
    """A layer's optimizer-state bytes once placed off the GPU: on float32 masters, or on the
    parameters' own dtype where the host step has none (``problem.host_masters``)."""
    return layer.host_state_bytes if problem.host_masters else layer.state_bytes


def chunk_issue_time(pass_time: float, chunks: int, issue_s: float) -> float:
    """Seconds a layer pass of ``pass_time`` on the GPU takes beyond that when split into
    ``chunks`` sequence chunks, each taking ``issue_s`` of host time to issue: the GPU runs
    one chunk while the host issues the next, so the pass takes the longer of the two, and
    the chunks cost nothing more while the GPU work is longer."""
    if chunks <= 1:
        return 0.0
    return max(0.0, chunks * issue_s - max(pass_time, issue_s))


def _mode(j: int, mode: str) -> Lin:
    return Lin.var((j, "m", mode))


def _host_step_of(
    layer: LayerCosts, modes: list[str], hardware: HardwareModel
) -> list[tuple[str, float]]:
    """Seconds of ``layer``'s host optimizer step in each mode that puts its states off the
    GPU: the CPU streams parameters, gradients and states through DRAM; CXL and NVMe states are
    read and written back at their tier's rates."""
    cpu_bw = hardware.cpu_optimizer_bandwidth
    out = []
    for m in modes:
        where = STATE_MODES[m]["optimizer"]
        if where == "gpu":
            continue
        if where == "cpu":
            touched = 2 * layer.state_bytes + layer.grad_bytes + 2 * layer.param_bytes
            out.append((m, touched / cpu_bw))
        else:
            tier = hardware.tiers[where]
            seconds = (layer.grad_bytes + 2 * layer.param_bytes) / cpu_bw + layer.state_bytes * (
                1 / tier.read_bandwidth + 1 / tier.write_bandwidth
            )
            out.append((m, seconds))
    return out


def build_terms(
    problem: PlanProblem, hardware: HardwareModel, chunks: int, modes: list[str]
) -> Terms:
    tiers = available_tiers(hardware)
    host = [t for t in tiers if t != "gpu"]
    layers = problem.layers
    n = len(layers)

    def mode_sum(j: int, predicate) -> Lin:
        return lin_sum(_mode(j, m) for m in modes if predicate(STATE_MODES[m]))

    swapped = [{t: swapped_bytes(layer, j, t) for t in host} for j, layer in enumerate(layers)]
    swapped_total = [lin_sum(s.values()) for s in swapped]
    kept = [kept_bytes(layer, j) for j, layer in enumerate(layers)]
    copying_bytes = [
        swapped_total[j] + layer.token_bytes * Lin.var((j, "copy", "gpu"))
        for j, layer in enumerate(layers)
    ]

    # Static GPU bytes: parameters, gradients and optimizer states that stay on the GPU.
    static_parts = []
    for j, layer in enumerate(layers):
        static_parts.append(layer.param_bytes * mode_sum(j, lambda s: s["params"] == "gpu"))
        static_parts.append(layer.grad_bytes * mode_sum(j, lambda s: s["grads"] == "gpu"))
        static_parts.append(layer.state_bytes * mode_sum(j, lambda s: s["optimizer"] == "gpu"))
    gpu_static = lin_sum(static_parts)

    memory: list[MemoryTerm] = []
    windows: list[Window] = []
    compute_parts: list[Lin] = []
    h2d, d2h, duplex = hardware.host_to_device, hardware.device_to_host, hardware.host_link_duplex
    for j, layer in enumerate(layers):
        phi = tile_factor(layer, chunks)
        # Token bytes of this layer that are not kept: recomputed or swapped ones are on the
        # GPU only while the layer itself runs (chunk by chunk when tiled).
        in_flight = (
            layer.token_bytes
            - layer.anchor_bytes * _frac(j, "a", "gpu")
            - layer.recomputable_bytes * _frac(j, "x", "gpu")
            + lin_sum(layer.checkpoint_bytes * _frac(j, "c", t) for t in host)
        )
        streamed_params = layer.param_bytes * mode_sum(j, lambda s: s["params"] != "gpu")
        offloaded_grads = layer.grad_bytes * mode_sum(j, lambda s: s["grads"] != "gpu")
        uploaded_params = layer.param_bytes * mode_sum(j, lambda s: s["optimizer"] != "gpu")
        working = kept[j] + phi * in_flight + streamed_params
        # A token slice frees memory only as a compact copy, so while a partially moved layer
        # runs its kept share is on the GPU twice (forward: the copy beside the produced
        # tensors; backward: full tensors rebuilt beside it). ``(j, "copy", "gpu")`` is that
        # share: the kept share when the layer moves some tokens and keeps others, else 0.
        kept_copy = layer.token_bytes * Lin.var((j, "copy", "gpu"))
        # The previous layer's copies to the host overlap this layer's compute: every tensor
        # it cut (moved share and kept share alike) is still whole on the GPU until this
        # layer ends.
        copying = copying_bytes[j - 1] if j > 0 else Lin()
        # A layer's own swapped tensors stay whole on the GPU until the next layer ends (the
        # copies' sources), so by its last chunk the swapped share of every chunk's token-local
        # tensors is there at once; attention's tensors are whole in any case.
        held_swapped = Lin()
        if layer.tileable and chunks > 1 and layer.recomputable_bytes > 0:
            local = min(layer.recomputable_bytes, layer.tileable_fraction * layer.token_bytes)
            held_swapped = lin_sum((1.0 - 1.0 / chunks) * local * _frac(j, "x", t) for t in host)
        # Queries rebuilt a chunk at a time in backward are whole in forward.
        whole_queries = (1.0 - phi) * layer.query_bytes
        memory.append(
            MemoryTerm(
                "gpu",
                f"forward {layer.name}",
                working
                + held_swapped
                + kept_copy
                + phi * layer.forward_transient
                + copying
                + whole_queries,
                j,
            )
        )
        prefetch = swapped_total[j - 1] if j > 0 else Lin()
        # The first unpack of a layer that moved anything fetches the layer before it: its cut
        # tensors come back whole (kept share included) beside this layer's backward. A layer
        # that moved nothing unpacks nothing, so the one before it is fetched in its own turn.
        # ``(j, "pref", "gpu")`` is those bytes in GiB when layer j moves anything, else 0.
        fetched = PREFETCH_UNIT * Lin.var((j, "pref", "gpu")) if j > 0 else Lin()
        # Backward fetches a layer's host bytes whole (every swapped tensor, chunk tensors
        # of a tiled layer included, comes back at its first unpack); sequence chunks divide
        # only what is recomputed.
        working_backward = working + (1.0 - phi) * swapped_total[j]
        memory.append(
            MemoryTerm(
                "gpu",
                f"backward {layer.name}",
                working_backward
                + kept_copy
                + tiled_backward_transient(layer, phi)
                + layer.output_bytes
                + fetched
                + offloaded_grads
                + stored_query_grad(layer, j),
                j,
            )
        )

        tiled = layer.tileable and chunks > 1
        issue = hardware.tile_overhead_s
        extra_fwd = chunk_issue_time(layer.forward_time, chunks, issue) if tiled else 0.0
        extra_bwd = chunk_issue_time(layer.backward_time, chunks, issue) if tiled else 0.0
        extra_rec = chunk_issue_time(layer.recompute_time, chunks, issue) if tiled else 0.0
        recompute = (layer.recompute_time + extra_rec) * _frac(j, "x", "rec")
        if layer.droppable_anchor:  # whole-layer checkpointing also reruns attention
            recompute = recompute + (layer.forward_time - layer.recompute_time) * _frac(
                j, "f", "full"
            )
        compute_parts += [
            Lin(const=layer.forward_time + layer.backward_time + extra_fwd + extra_bwd),
            recompute,
        ]

        # Forward window: this layer's swap-out, plus parameters coming in (streamed, or the
        # updated copy from a host optimizer step, overlapped with the next step's forward).
        out_bytes = swapped_total[j]
        in_bytes = uploaded_params
        fwd = [out_bytes * (1 / d2h), in_bytes * (1 / h2d), (out_bytes + in_bytes) * (1 / duplex)]
        for t in host:
            fwd.append(swapped[j][t] * (1 / hardware.tiers[t].write_bandwidth))
        windows.append(
            Window(f"forward {layer.name}", Lin(const=layer.forward_time + extra_fwd), fwd)
        )

        # Backward window: prefetch of layer j-1's swapped bytes, streamed parameters,
        # gradients going to a host optimizer.
        in_bytes = prefetch + streamed_params
        out_bytes = offloaded_grads
        bwd = [in_bytes * (1 / h2d), out_bytes * (1 / d2h), (in_bytes + out_bytes) * (1 / duplex)]
        if j > 0:
            for t in host:
                bwd.append(swapped[j - 1][t] * (1 / hardware.tiers[t].read_bandwidth))
        windows.append(
            Window(
                f"backward {layer.name}",
                Lin(const=layer.backward_time + extra_bwd) + recompute,
                bwd,
            )
        )
    # The last layer's swapped bytes are needed right after its forward: nothing hides them.
    if n:
        last = swapped_total[n - 1]
        exposed = [last * (1 / d2h + 1 / h2d)]
        for t in host:
            bw = hardware.tiers[t]
            exposed.append(swapped[n - 1][t] * (1 / bw.write_bandwidth + 1 / bw.read_bandwidth))
        windows.append(Window("last layer round trip", Lin(), exposed))

    # Host tiers hold what the executor allocates there (memtrain.planner.hostmem): the pinned
    # activation pool sized from every swapped byte (with its margin, and its slack where the
    # tier has a pool at all: ``(-1, "pool", tier)`` is 1 then), the host optimizer's float32
    # masters, gradient buffers in the parameters' dtype (none with an overlapped host step)
    # and states, and on the CPU the staging buffers of NVMe swaps. Pools and optimizer buffers
    # live through the whole step, so one moment holds them all.
    pools: dict[str, Lin] = {}
    base: dict[str, list[Lin]] = {t: [] for t in host}
    for t in host:
        planned = lin_sum(swapped[j][t] for j in range(n))
        if t in POOLED_TIERS:
            pools[t] = planned
            base[t] += [(1 + POOL_MARGIN) * planned, Lin.var(pool_key(t), POOL_SLACK)]
        else:
            base[t].append(planned)
    for j, layer in enumerate(layers):
        for m in modes:
            placed = optimizer_host_bytes(
                STATE_MODES[m],
                host_states(problem, layer),
                layer.param_count,
                layer.param_bytes,
                problem.overlap_host_step,
                problem.host_masters,
            )
            for t, nbytes in placed.items():
                if nbytes and t in base:
                    base[t].append(nbytes * _mode(j, m))
    for t in host:
        memory.append(MemoryTerm(t, "start of backward", lin_sum(base[t])))
    # Gradient staging of the largest host-placed parameter (hostmem.grad_staging_bytes: its
    # float32 widening for the step, and the overlapped step's ring): one term per layer with
    # that layer's largest parameter, so the peak over them is the largest host-placed one's.
    staging = [Lin() for _ in layers]
    cpu = lin_sum(base["cpu"]) if "cpu" in host else Lin()
    for j, layer in enumerate(layers if "cpu" in host else []):
        itemsize = layer.param_bytes / layer.param_count if layer.param_count > 0 else 0.0
        largest = layer.largest_param_bytes or layer.param_bytes
        nbytes = grad_staging_bytes(largest, itemsize, problem.overlap_host_step)
        placed = [m for m in modes if STATE_MODES[m]["optimizer"] != "gpu"]
        if nbytes and placed:
            staging[j] = lin_sum(nbytes * _mode(j, m) for m in placed)
            memory.append(MemoryTerm("cpu", f"host gradients {layer.name}", cpu + staging[j]))
    if "nvme" in host and "cpu" in host:
        # NVMe swap files pass through host buffers: a layer's while it is written or read back,
        # beside the one before it (the prefetch of backward).
        cpu = lin_sum(base["cpu"])
        for j in range(n):
            staged = swapped[j]["nvme"] + (swapped[j - 1]["nvme"] if j > 0 else Lin())
            if staged.coef:
                memory.append(MemoryTerm("cpu", f"nvme staging {layers[j].name}", cpu + staged))
        # Optimizer states on NVMe stream through host memory for the step, a layer at a time:
        # while layer j steps, the states of the NVMe layers among its neighbours are there
        # (hostmem.nvme_state_window), on top of the masters, buffers and pools.
        nvme_modes = [m for m in modes if STATE_MODES[m]["optimizer"] == "nvme"]
        for j in range(n if nvme_modes else 0):
            window = lin_sum(
                host_states(problem, layers[k]) * _mode(k, m)
                for k in nvme_state_window(j, n)
                for m in nvme_modes
            )
            if window.coef:  # beside the stepping layer's gradient staging
                memory.append(
                    MemoryTerm("cpu", f"nvme states {layers[j].name}", cpu + window + staging[j])
                )
    memory.append(MemoryTerm("gpu", "optimizer step", Lin(), 0))

    # Optimizer step: on the GPU it streams params, grads and states through HBM; on the host
    # the CPU step streams them through DRAM, and CXL/NVMe states are read and written back.
    gpu_step, host_step = [], []
    hbm = hardware.device.achievable_hbm_bandwidth
    for j, layer in enumerate(layers):
        touched = 2 * layer.state_bytes + layer.grad_bytes + 2 * layer.param_bytes
        for m in modes:
            if STATE_MODES[m]["optimizer"] == "gpu":
                gpu_step.append(_mode(j, m) * (touched / hbm))
        host_step += [_mode(j, m) * t for m, t in _host_step_of(layer, modes, hardware)]
    traffic = lin_sum(
        swapped[j][t]
        * (1 / hardware.tiers[t].write_bandwidth + 1 / hardware.tiers[t].read_bandwidth)
        for j in range(n)
        for t in host
    )
    host_tail = [lin_sum(host_step)]
    if problem.overlap_host_step and host_step:
        # Each layer steps on the host once its gradients arrive, while backward goes on through
        # the layers before it: backward hides up to its own length, and the first layer's step
        # (its gradients arrive last) is never hidden.
        hidden = sum(layer.backward_time for layer in layers)
        first = lin_sum(_mode(0, m) * t for m, t in _host_step_of(layers[0], modes, hardware))
        host_tail = [lin_sum(host_step) + Lin(const=-hidden), first]
    return Terms(
        pools=pools,
        compute=lin_sum(compute_parts),
        windows=windows,
        tail=[lin_sum(gpu_step), *host_tail],
        memory=memory,
        gpu_static=gpu_static,
        kept=kept,
        copying=copying_bytes,
        traffic=traffic,
    )


def gpu_lower_bound(problem: PlanProblem, chunks: int) -> float:
    """Live GPU bytes no decision can avoid: the largest single layer's working set.

    Every layer's forward needs its input and its tileable share of saved bytes and transients
    on the GPU, whatever is kept, swapped or recomputed, and the loss needs its non-token bytes.
    """
    best = 0.0
    for layer in problem.layers:
        phi = tile_factor(layer, chunks)
        working = layer.fixed_bytes + phi * layer.token_bytes
        best = max(
            best,
            working + phi * layer.forward_transient + (1.0 - phi) * layer.query_bytes,
            working + tiled_backward_transient(layer, phi) + layer.output_bytes,
        )
    return best
