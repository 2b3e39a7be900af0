"""Token-wise activation swap through saved-tensor hooks.

Every tensor a layer saves for backward passes through :meth:`SwapEngine.pack`. Its token
dimension (a dimension whose size is the current sequence or chunk length) is cut into ranges:
the first range stays on the GPU, the next ones go to the CPU pool, the CXL pool and NVMe, in the
shares the layer's policy gives. On a GPU the device-to-host copies run on a side stream right
away and the source is released once a later layer's compute has waited on the copy's event;
during backward, the first unpack in a layer starts the host-to-device prefetch of the layer
before it on a second stream. On the CPU the same code runs with synchronous copies.

Copies run in the tensor's memory order: a saved tensor is viewed as ``[outer, tokens, inner]``
over its own bytes (e.g. attention's ``[batch, heads, tokens, dim]`` views of a
``[batch, tokens, heads, dim]`` buffer), so each token range is one contiguous run per outer index
and moves with plain asynchronous memcpys. A copy of a permuted tensor through
``Tensor.copy_`` would first make a contiguous GPU temporary on the copy stream: extra memory,
held in that stream's own allocator pool, and an extra kernel on the copy stream.
"""

from __future__ import annotations

import contextlib
import math
import weakref
from dataclasses import dataclass, field
from typing import Any

import torch

from memtrain.offload.nvme import NvmeStore, SwapFile
from memtrain.offload.pool import Block, HostPool

ORDER = ("gpu", "cpu", "cxl", "nvme")
# Above this many outer slices (batch x heads before the token dimension in memory) a token
# range is first gathered on the compute stream instead of being copied slice by slice.
MAX_OUTER_SLICES = 16


def in_backward() -> bool:
    """True while the autograd engine runs a backward pass (e.g. during recomputation)."""
    return torch._C._current_graph_task_id() != -1


def cut_points(length: int, shares: dict[str, float]) -> list[tuple[str, int, int]]:
    """``(place, start, length)`` ranges covering ``length`` tokens in ORDER."""
    out = []
    cumulative = 0.0
    start = 0
    for place in ORDER:
        share = shares.get(place, 0.0)
        if share <= 0:
            continue
        cumulative += share
        end = length if cumulative >= 1 - 1e-9 else min(length, round(cumulative * length))
        if end > start:
            out.append((place, start, end - start))
            start = end
    if start < length:  # rounding left a tail: it goes to the last place used
        place, first, size = out[-1] if out else ("gpu", 0, 0)
        out[-1:] = [(place, first, size + length - start)]
    return out


@dataclass
class Piece:
    place: str
    start: int
    length: int
    data: torch.Tensor | None = None  # GPU keep part, or a view of a pool block
    block: Block | None = None
    swap_file: SwapFile | None = None


@dataclass
class LayerState:
    """One layer's policy shares and what it packed in the current step."""

    name: str
    shares: dict[str, float]
    position: int = -1
    step: int = -1
    packed: list[weakref.ref] = field(default_factory=list)
    pending: list[tuple[Any, torch.Tensor]] = field(default_factory=list)  # (event, source)
    prefetched: bool = False
    scopes: list[Any] = field(default_factory=list)
    stats: dict[str, int] = field(default_factory=dict)

    def reset(self) -> None:
        self.packed.clear()
        self.prefetched = False
        self.stats = {place: 0 for place in ORDER}


def memory_order(shape: tuple, stride: tuple) -> list[int]:
    """Dimensions from outermost to innermost in memory (size-1 dimensions first)."""
    return sorted(range(len(shape)), key=lambda d: (shape[d] != 1, -stride[d]))


class Packed:
    """A saved tensor cut into token ranges living in different places."""

    def __init__(self, engine: SwapEngine, layer: LayerState, tensor: torch.Tensor, dim: int):
        self.engine = engine
        self.layer = layer
        self.shape = tuple(tensor.shape)
        self.stride = tuple(torch.empty_like(tensor, device="meta").stride())
        self.dtype = tensor.dtype
        self.device = tensor.device
        self.dim = dim
        self.order = memory_order(self.shape, self.stride)
        at = self.order.index(dim)
        self.outer = math.prod(self.shape[d] for d in self.order[:at])
        self.inner = math.prod(self.shape[d] for d in self.order[at + 1 :])
        self.pieces: list[Piece] = []
        self.event = None
        self.ready: torch.Tensor | None = None  # prefetched full tensor
        self.ready_event = None
        self._result: weakref.ref | None = None
        # Saved-tensor slots holding this tensor (e.g. the one input of the q, k and v
        # projections): the rebuilt tensor stays referenced until the last of them is
        # unpacked, as autograd keeps an unmoved saved tensor; a dropped one would be fetched
        # from the host again, on demand, with compute waiting for it.
        self.users = 0
        self._held: torch.Tensor | None = None

    def rows(self, tensor: torch.Tensor) -> torch.Tensor:
        """``[outer, tokens, inner]`` view of a tensor laid out with this one's strides."""
        tokens = self.shape[self.dim]
        return tensor.permute(self.order).reshape(self.outer, tokens, self.inner)

    def piece_shape(self, piece: Piece) -> list[int]:
        return [self.outer, piece.length, self.inner]

    def nbytes(self, piece: Piece) -> int:
        return self.outer * piece.length * self.inner * self.dtype.itemsize

    def __del__(self) -> None:
        engine = getattr(self, "engine", None)
        if engine is None:
            return
        for piece in self.pieces:
            if piece.block is not None:
                engine.pools[piece.place].release(piece.block)
                piece.block = None


class Alias:
    """A saved view of bytes packed earlier: rebuilt from that tensor on unpack."""

    __slots__ = ("offset", "packed", "shape", "stride")

    def __init__(self, packed: Packed, shape: tuple, stride: tuple, offset: int) -> None:
        self.packed = packed
        self.shape = shape
        self.stride = stride
        self.offset = offset


class SwapEngine:
    """Owns the pools, the NVMe store and the copy streams; packs and unpacks saved tensors."""

    def __init__(
        self,
        device: torch.device,
        pools: dict[str, HostPool],
        nvme: NvmeStore | None,
    ) -> None:
        self.device = device
        self.pools = pools
        self.nvme = nvme
        self.cuda = device.type == "cuda"
        self.d2h = torch.cuda.Stream(device) if self.cuda else None
        self.h2d = torch.cuda.Stream(device) if self.cuda else None
        self.token_lengths: set[int] = set()
        self.excluded: set[int] = set()  # storage pointers never swapped (parameters)
        self.order: list[LayerState] = []
        self.step = 0
        self._identity: dict[int, list[tuple[weakref.ref, weakref.ref, int, int]]] = {}
        self.totals = {place: 0 for place in ORDER}

    # -- step and layer boundaries -------------------------------------------------------

    def start_step(self, seq: int, batch: int, params: list[torch.Tensor]) -> None:
        self.token_lengths = {seq, seq * batch}
        # FSDP2's sharded parameters are DTensors: their local shard holds the storage (the
        # unsharded weights a forward saves are Parameters, never swapped either)
        local = [p.to_local() if hasattr(p, "to_local") else p for p in params]
        self.excluded = {p.untyped_storage().data_ptr() for p in local}
        self.order.clear()
        self._identity.clear()
        self.step += 1
        if self.cuda:  # host blocks freed by last backward may be rewritten from now on
            self.d2h.wait_stream(self.h2d)

    def enter_layer(self, layer: LayerState) -> None:
        if layer.step != self.step:
            layer.reset()
            layer.step = self.step
            layer.position = len(self.order)
            self.order.append(layer)

    def finish_layer(self, layer: LayerState) -> None:
        """Release sources of earlier layers' copies (their events are awaited by compute).

        Called at the end of every planned layer, kept ones included: a layer's copies overlap
        the next layer's compute, and their full-size sources stay on the GPU until then.
        """
        for earlier in self.order:
            if earlier is not layer:
                self._release_sources(earlier)

    def finish_forward(self) -> None:
        for layer in self.order:
            self._release_sources(layer)

    def _release_sources(self, layer: LayerState) -> None:
        if not layer.pending:
            return
        if self.cuda:
            stream = torch.cuda.current_stream(self.device)
            for event, _ in layer.pending:
                if event is not None:
                    stream.wait_event(event)
        layer.pending.clear()

    @contextlib.contextmanager
    def token_lengths_added(self, lengths):
        """Treat these sizes as token dimensions too (inside sequence chunks)."""
        added = [n for n in lengths if n not in self.token_lengths]
        self.token_lengths.update(added)
        try:
            yield
        finally:
            self.token_lengths.difference_update(added)

    def hooks(self, layer: LayerState, choose=None):
        """Saved-tensor hooks; ``choose(tensor)`` gives each tensor's shares (default: the
        layer's)."""
        return torch.autograd.graph.saved_tensors_hooks(
            lambda t: self.pack(layer, t, choose and choose(t)), self.unpack
        )

    # -- pack ---------------------------------------------------------------------------

    def token_dim(self, tensor: torch.Tensor) -> int | None:
        for dim, size in enumerate(tensor.shape):
            if size in self.token_lengths:
                return dim
        return None

    def pack(self, layer: LayerState, tensor: torch.Tensor, shares=None) -> Any:
        shares = layer.shares if shares is None else shares
        if shares.get("gpu", 0.0) >= 1.0 or tensor.numel() == 0:
            return tensor
        if tensor.device.type == "meta":
            return tensor
        if (
            isinstance(tensor, torch.nn.Parameter)
            or tensor.untyped_storage().data_ptr() in self.excluded
        ):
            return tensor
        dim = self.token_dim(tensor)
        if dim is None:
            return tensor
        storage = tensor.untyped_storage()
        known = self._known(storage, tensor)
        if known is not None:
            base = known.packed if isinstance(known, Alias) else known
            base.users += 1
            return known  # bytes already packed in this step (another view, or another layer)
        packed = Packed(self, layer, tensor, dim)
        ranges = cut_points(tensor.shape[dim], shares)
        is_dense = tuple(tensor.stride()) == packed.stride
        dense = tensor
        if not is_dense:  # gather it once, on this stream
            dense = torch.empty_strided(
                packed.shape, packed.stride, dtype=tensor.dtype, device=tensor.device
            )
            dense.copy_(tensor)
        rows = packed.rows(dense)
        sources = []
        for _, start, length in ranges:
            source = rows.narrow(1, start, length)
            if packed.outer > MAX_OUTER_SLICES:
                source = source.contiguous()
            sources.append(source)
        if self.cuda and any(place != "gpu" for place, _, _ in ranges):
            self.d2h.wait_stream(torch.cuda.current_stream(self.device))
        for (place, start, length), source in zip(ranges, sources, strict=True):
            piece = Piece(place, start, length)
            if place == "gpu":
                whole = length == tensor.shape[dim]
                piece.data = (
                    source if whole else source.clone(memory_format=torch.contiguous_format)
                )
            elif place == "nvme":
                self._to_nvme(packed, piece, source)
            else:
                self._to_pool(packed, piece, source)
            packed.pieces.append(piece)
            nbytes = packed.nbytes(piece)
            layer.stats[place] = layer.stats.get(place, 0) + nbytes
            self.totals[place] += nbytes
        if self.cuda and packed.event is not None:
            layer.pending.append((packed.event, (tensor, sources)))
        layer.packed.append(weakref.ref(packed))
        if is_dense:  # later views can alias it
            start = tensor.storage_offset()
            entry = (weakref.ref(storage), weakref.ref(packed), start, start + tensor.numel())
            self._identity.setdefault(storage._cdata, []).append(entry)
        packed.users = 1
        return packed

    def _known(self, storage, tensor: torch.Tensor) -> Any:
        """A packed tensor whose bytes contain ``tensor``'s, as itself or an alias of it.

        Storage wrappers live exactly as long as their storage (PyObject preservation), so a
        dead weak reference means the address may have been reused: such entries never match.
        """
        entries = self._identity.get(storage._cdata)
        if not entries:
            return None
        start = tensor.storage_offset()
        end = (
            start
            + 1
            + sum((n - 1) * st for n, st in zip(tensor.shape, tensor.stride(), strict=True))
        )
        for storage_ref, packed_ref, first, last in entries:
            packed = packed_ref()
            if storage_ref() is not storage or packed is None or packed.dtype != tensor.dtype:
                continue
            if first <= start and end <= last:
                if (
                    start == first
                    and tuple(tensor.shape) == packed.shape
                    and tuple(tensor.stride()) == packed.stride
                ):
                    return packed
                return Alias(packed, tuple(tensor.shape), tuple(tensor.stride()), start - first)
        return None

    def _to_pool(self, packed: Packed, piece: Piece, source: torch.Tensor) -> None:
        pool = self.pools[piece.place]
        nbytes = packed.nbytes(piece)
        piece.block = pool.allocate(nbytes)
        target = pool.view(piece.block, nbytes).view(packed.dtype).view(packed.piece_shape(piece))
        piece.data = target
        if self.cuda:
            with torch.cuda.stream(self.d2h):
                copy_slices(target, source, non_blocking=True)
                packed.event = torch.cuda.Event()
                packed.event.record(self.d2h)
        else:
            copy_slices(target, source)

    def _to_nvme(self, packed: Packed, piece: Piece, source: torch.Tensor) -> None:
        if self.cuda:
            host = torch.empty(packed.piece_shape(piece), dtype=packed.dtype, pin_memory=True)
            with torch.cuda.stream(self.d2h):
                copy_slices(host, source, non_blocking=True)
                event = torch.cuda.Event()
                event.record(self.d2h)
            packed.event = event
            piece.swap_file = self.nvme.write(host, wait_for=event)
        else:
            piece.swap_file = self.nvme.write(source.clone(memory_format=torch.contiguous_format))

    # -- unpack -------------------------------------------------------------------------

    def unpack(self, packed: Any) -> torch.Tensor:
        if isinstance(packed, Alias):
            base = self.unpack(packed.packed)
            offset = base.storage_offset() + packed.offset
            return base.as_strided(packed.shape, packed.stride, offset)
        if not isinstance(packed, Packed):
            return packed
        earlier = packed._result() if packed._result is not None else None
        if earlier is not None:
            self._used(packed)
            return earlier
        self._prefetch_before(packed.layer)
        if packed.ready is None:
            self.prefetch(packed)
        out = packed.ready
        if self.cuda:
            torch.cuda.current_stream(self.device).wait_event(packed.ready_event)
        rows = packed.rows(out)
        for piece in packed.pieces:
            if piece.place == "gpu":
                rows.narrow(1, piece.start, piece.length).copy_(piece.data)
        packed.ready = None
        packed.ready_event = None
        packed._result = weakref.ref(out)
        packed._held = out
        self._used(packed)
        return out

    @staticmethod
    def _used(packed: Packed) -> None:
        """One slot unpacked; after the last one the rebuilt tensor lives as autograd wants."""
        packed.users -= 1
        if packed.users <= 0:
            packed._held = None

    def _prefetch_before(self, layer: LayerState) -> None:
        """The first unpack in a layer starts bringing back the layer before it."""
        if layer.prefetched:
            return
        layer.prefetched = True
        position = layer.position
        if 0 < position <= len(self.order):
            previous = self.order[position - 1]
            for ref in previous.packed:
                packed = ref()
                if packed is not None and packed.ready is None:
                    for piece in packed.pieces:
                        if piece.swap_file is not None:
                            piece.swap_file.prefetch()
            for ref in previous.packed:
                packed = ref()
                if packed is not None and packed.ready is None:
                    self.prefetch(packed)

    def prefetch(self, packed: Packed) -> None:
        """Allocate the full tensor and copy the host pieces into it (side stream on a GPU).

        The tensor is allocated on the compute stream, so its memory returns to the compute
        stream's pool (no per-stream fragmentation); the copy stream first waits for the work
        queued so far, and the block is marked as used by the copy stream until it is done.
        """
        out = torch.empty_strided(
            packed.shape, packed.stride, dtype=packed.dtype, device=packed.device
        )
        context = contextlib.nullcontext()
        if self.cuda:
            self.h2d.wait_stream(torch.cuda.current_stream(self.device))
            if packed.event is not None:
                self.h2d.wait_event(packed.event)
            context = torch.cuda.stream(self.h2d)
        rows = packed.rows(out)
        with context:
            for piece in packed.pieces:
                if piece.place == "gpu":
                    continue
                target = rows.narrow(1, piece.start, piece.length)
                if piece.swap_file is not None:
                    raw = piece.swap_file.result()
                    host = raw.view(packed.dtype).view(packed.piece_shape(piece))
                    copy_slices(target, host, non_blocking=self.cuda)
                    piece.data = host  # keeps the pinned read buffer alive for the copy
                    piece.swap_file = None
                else:
                    copy_slices(target, piece.data, non_blocking=self.cuda)
            if self.cuda:
                out.record_stream(self.h2d)
                packed.ready_event = torch.cuda.Event()
                packed.ready_event.record(self.h2d)
        packed.ready = out

    def close(self) -> None:
        self.order.clear()
        self._identity.clear()


def copy_slices(target: torch.Tensor, source: torch.Tensor, non_blocking: bool = False) -> None:
    """Copy ``[outer, tokens, inner]`` views whose every outer slice is contiguous.

    One copy when both sides are contiguous, else one per outer slice, so that no side needs a
    contiguous temporary (which ``Tensor.copy_`` would allocate on the current stream).
    """
    if target.is_contiguous() and source.is_contiguous():
        target.copy_(source, non_blocking=non_blocking)
        return
    for index in range(target.shape[0]):
        target[index].copy_(source[index], non_blocking=non_blocking)
