"""Which layer is running: forward hooks on layer modules, gradient hooks for backward.

A layer's forward runs from its forward pre-hook to its post-hook. Its backward starts when the
gradient of its output arrives and ends when the gradient of its input is complete; both are
observed with tensor hooks, so nothing in the model's own autograd graph changes. Work outside
every layer is charged to a pseudo-layer: ``loss`` after the last layer (the loss function),
``other`` elsewhere (rotary tables, masks).

At every boundary the current memory source is asked for (live bytes now, peak since the last
boundary), which gives each layer's transient peak and the step's memory timeline.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import nn

from memtrain.models.build import LayerSpec


class MemorySource(Protocol):
    def boundary(self) -> tuple[int, int]:
        """Return (live bytes now, peak live bytes since the previous boundary)."""


class TrackedMemory:
    """Live bytes from an :class:`OpTracker` (meta tensors, or the CPU)."""

    def __init__(self, static_bytes: int):
        self.static_bytes = static_bytes
        self.tracker = None
        self._peak = 0

    def attach(self, tracker) -> None:
        self.tracker = tracker
        self._peak = self.live()

    def live(self) -> int:
        return self.static_bytes + (self.tracker.live_bytes if self.tracker else 0)

    def observe(self, tracker_live: int) -> None:
        self._peak = max(self._peak, self.static_bytes + tracker_live)

    def boundary(self) -> tuple[int, int]:
        live = self.live()
        peak = max(self._peak, live)
        self._peak = live
        return live, peak


class CudaMemory:
    """The CUDA caching allocator's own counters."""

    def __init__(self, device: torch.device):
        self.device = device

    def boundary(self) -> tuple[int, int]:
        live = torch.cuda.memory_allocated(self.device)
        peak = torch.cuda.max_memory_allocated(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        return live, peak


class Clock:
    """Wall time on the CPU, CUDA events on a GPU (read after a synchronise)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def mark(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def seconds(self, start, end) -> float:
        if self.cuda:
            return start.elapsed_time(end) / 1000.0
        return end - start


@dataclass
class ScopeStats:
    """What happened inside one layer (or pseudo-layer) during the step."""

    name: str
    kind: str
    forward_flops: float = 0.0
    backward_flops: float = 0.0
    forward_estimate_s: float = 0.0
    backward_estimate_s: float = 0.0
    attention_forward_estimate_s: float = 0.0
    forward_kernels: int = 0
    backward_kernels: int = 0
    forward_time_s: float = 0.0
    backward_time_s: float = 0.0
    forward_transient: int = 0
    backward_transient: int = 0
    input_bytes: int = 0
    output_bytes: int = 0
    input_storage: int | None = None
    _marks: dict = field(default_factory=dict)


def _first_tensor(obj) -> torch.Tensor | None:
    if isinstance(obj, torch.Tensor):
        return obj
    if isinstance(obj, dict):
        obj = list(obj.values())
    if isinstance(obj, (list, tuple)):
        for item in obj:
            found = _first_tensor(item)
            if found is not None:
                return found
    if hasattr(obj, "to_tuple"):  # transformers ModelOutput
        return _first_tensor(obj.to_tuple())
    return None


class LayerScopes:
    """Install the hooks, follow the current layer, and collect per-layer statistics."""

    def __init__(self, layers: list[LayerSpec], memory: MemorySource, clock: Clock):
        self.memory = memory
        self.clock = clock
        self.stats = [ScopeStats(spec.name, spec.kind) for spec in layers]
        self.stats.append(ScopeStats("loss", "loss"))
        self.stats.append(ScopeStats("other", "other"))
        self.loss_index = len(layers)
        self.other_index = len(layers) + 1
        self.last_layer_index = len(layers) - 1
        self.phase = "idle"
        self.current = self.other_index
        self._finished_last_forward = False
        self._open: tuple[int, int, object] | None = None  # (index, live at open, clock mark)
        self.global_peak = 0
        self.timeline: list[tuple[str, str, int]] = []
        self._intervals: list[tuple[int, str, object, object]] = []
        self._handles: list = []
        for index, spec in enumerate(layers):
            for module in spec.modules:
                self._hook(module, index)

    # -- hooks --------------------------------------------------------------------------------
    def _hook(self, module: nn.Module, index: int) -> None:
        def pre(mod, args, kwargs):
            if self.phase != "forward":
                return
            self._switch(index)
            tensor = _first_tensor((args, kwargs))
            stats = self.stats[index]
            if tensor is not None:
                stats.input_bytes = tensor.numel() * tensor.element_size()
                stats.input_storage = tensor.untyped_storage()._cdata
                if tensor.requires_grad:
                    tensor.register_hook(self._backward_end_hook(index))

        def post(mod, args, kwargs, output):
            if self.phase != "forward":
                return
            tensor = _first_tensor(output)
            stats = self.stats[index]
            if tensor is not None:
                stats.output_bytes = tensor.numel() * tensor.element_size()
                if tensor.requires_grad:
                    tensor.register_hook(self._backward_start_hook(index))
            gap = self.loss_index if index == self.last_layer_index else self.other_index
            self._switch(gap)

        self._handles.append(module.register_forward_pre_hook(pre, with_kwargs=True))
        self._handles.append(module.register_forward_hook(post, with_kwargs=True))

    def _backward_start_hook(self, index: int):
        def hook(grad):
            if self.phase == "backward":
                self._switch(index)

        return hook

    def _backward_end_hook(self, index: int):
        def hook(grad):
            if self.phase == "backward" and self.current == index:
                self._switch(self.other_index)

        return hook

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    # -- bookkeeping --------------------------------------------------------------------------
    def _close(self) -> None:
        if self._open is None:
            return
        index, live_at_open, mark = self._open
        live, peak = self.memory.boundary()
        self.global_peak = max(self.global_peak, peak)
        stats = self.stats[index]
        # CUDA events complete later: keep the marks and read the times in finish_times().
        self._intervals.append((index, self.phase, mark, self.clock.mark()))
        if self.phase == "forward":
            stats.forward_transient = max(stats.forward_transient, peak - live)
        else:
            stats.backward_transient = max(stats.backward_transient, peak - live_at_open)
        self.timeline.append((self.phase, stats.name, peak))
        self.timeline.append((self.phase, stats.name, live))
        self._open = None

    def _switch(self, index: int) -> None:
        if self._open is not None and self._open[0] == index:
            return
        self._close()
        live, peak = self.memory.boundary()
        self.global_peak = max(self.global_peak, peak)
        self.current = index
        self._open = (index, live, self.clock.mark())

    def begin(self, phase: str) -> None:
        self._close()
        self.phase = phase
        self._switch(self.other_index if phase == "forward" else self.loss_index)

    def end(self) -> None:
        self._close()
        self.phase = "idle"

    def finish_times(self) -> None:
        """Turn the recorded marks into per-layer times (after a CUDA synchronise)."""
        for index, phase, start, end in self._intervals:
            elapsed = self.clock.seconds(start, end)
            if phase == "forward":
                self.stats[index].forward_time_s += elapsed
            else:
                self.stats[index].backward_time_s += elapsed
        self._intervals.clear()

    def charge(self, flops: float, seconds: float, attention: bool = False) -> None:
        """Charge one op's FLOPs and estimated time to the current layer."""
        stats = self.stats[self.current]
        launched = 1 if seconds > 0 else 0
        if self.phase == "forward":
            stats.forward_flops += flops
            stats.forward_estimate_s += seconds
            if attention:
                stats.attention_forward_estimate_s += seconds
            stats.forward_kernels += launched
        elif self.phase == "backward":
            stats.backward_flops += flops
            stats.backward_estimate_s += seconds
            stats.backward_kernels += launched
