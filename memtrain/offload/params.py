"""Parameters of planned layers kept in host memory and streamed to the device around each use.

For one-GPU runs where the plan puts a layer's ``params`` off the GPU: between uses each weight's
``.data`` is a (pinned) host copy in the model's dtype, so the device holds only the layers in use
and the one being fetched. A layer's weights are copied in on a side stream one layer ahead of
its forward (and one layer ahead of its backward, in reverse order), the compute stream waits for
that copy only where it needs them, and they go back to the host copy when the forward has passed
(training and evaluation) and when the layer's gradients have been accumulated. Autograd saves
the parameter objects themselves, so backward finds the weights fetched again. Their gradients
and the update are the host optimizer's (memtrain.offload.optimizer, states off the GPU): it
copies each gradient out as it is accumulated and writes the updated weights into the host copy.
On a CPU the same code runs with plain host tensors for both copies.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from memtrain.errors import MemtrainError


class _Layer:
    """One layer's streamed parameters and whether their device copies are in place."""

    def __init__(self, name: str, params: list[nn.Parameter], pin: bool) -> None:
        self.name = name
        self.params = params
        self.host = [torch.empty(p.shape, dtype=p.dtype, pin_memory=pin) for p in params]
        for host, param in zip(self.host, params, strict=True):
            host.copy_(param.detach())
        self.resident = False
        self.ready: Any = None  # CUDA event of the copy in, when one is in flight
        self.pending_grads = 0  # gradients still to accumulate in this backward

    @property
    def nbytes(self) -> int:
        return sum(h.numel() * h.element_size() for h in self.host)


class ParameterStreamer:
    """Streams the parameters of ``layers`` (name -> modules, in forward order) between host and
    ``device``. A parameter shared with a layer that stays on the device stays there too."""

    def __init__(
        self,
        layers: Sequence[tuple[str, list[nn.Module]]],
        device: torch.device,
        keep_on_device: set[nn.Parameter] = frozenset(),
    ) -> None:
        self.device = device
        pin = device.type == "cuda"
        claimed = set(keep_on_device)
        self.layers: list[_Layer] = []
        for name, modules in layers:
            params = []
            for module in modules:
                for param in module.parameters():
                    if param not in claimed:
                        claimed.add(param)
                        params.append(param)
            if params:
                self.layers.append(_Layer(name, params, pin))
        self.modules = {name: modules for name, modules in layers}
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self._hooks: list[Any] = []
        self._grad_hooks: list[Any] = []
        self._index = {layer.name: i for i, layer in enumerate(self.layers)}
        self.fetches = 0  # copies in, for stats and tests
        for layer in self.layers:
            self._release(layer)

    @property
    def host_bytes(self) -> int:
        return sum(layer.nbytes for layer in self.layers)

    # -- moving weights -----------------------------------------------------------------------
    def _fetch(self, layer: _Layer) -> None:
        """Start copying ``layer``'s weights to the device (no wait)."""
        if layer.resident:
            return
        targets = [torch.empty_like(h, device=self.device) for h in layer.host]
        if self.stream is not None:
            self.stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(self.stream):
                for target, host in zip(targets, layer.host, strict=True):
                    target.copy_(host, non_blocking=True)
                layer.ready = torch.cuda.Event()
                layer.ready.record(self.stream)
        else:
            for target, host in zip(targets, layer.host, strict=True):
                target.copy_(host)
        for param, target in zip(layer.params, targets, strict=True):
            param.data = target
        layer.resident = True
        self.fetches += 1

    def _wait(self, layer: _Layer) -> None:
        self._fetch(layer)
        if layer.ready is not None:
            torch.cuda.current_stream(self.device).wait_event(layer.ready)
            layer.ready = None

    def _release(self, layer: _Layer) -> None:
        if layer.ready is not None:  # fetched but never used: the copy must land before its
            # buffer returns to the allocator
            torch.cuda.current_stream(self.device).wait_event(layer.ready)
        for param, host in zip(layer.params, layer.host, strict=True):
            if param.grad is not None and param.grad.device != host.device:
                raise MemtrainError(
                    f"layer {layer.name}: its parameters live on the host between uses, so its "
                    "gradients must leave the device as they are made: plan its optimizer "
                    "states off the GPU (memtrain.offload_optimizer)"
                )
            param.data = host
        layer.resident = False
        layer.ready = None

    def _neighbour(self, layer: _Layer, step: int) -> _Layer | None:
        index = self._index[layer.name] + step
        return self.layers[index] if 0 <= index < len(self.layers) else None

    # -- hooks --------------------------------------------------------------------------------
    def install(self, in_backward) -> None:
        """Hook every streamed layer (``in_backward()`` tells a recompute from a forward)."""
        for layer in self.layers:
            first, last = self.modules[layer.name][0], self.modules[layer.name][-1]
            self._hooks.append(first.register_forward_pre_hook(self._pre(layer, in_backward)))
            self._hooks.append(last.register_forward_hook(self._post(layer, in_backward)))

    def _pre(self, layer: _Layer, in_backward):
        def hook(module, args):
            self._ensure_grad_hooks()
            self._wait(layer)
            if not in_backward():  # a recompute's successor is fetched by backward's hook
                following = self._neighbour(layer, 1)
                if following is not None:
                    self._fetch(following)

        return hook

    def _post(self, layer: _Layer, in_backward):
        def hook(module, args, output):
            if in_backward():  # a recompute: backward needs the weights next
                return
            trains = torch.is_grad_enabled() and any(p.requires_grad for p in layer.params)
            if trains:
                layer.pending_grads = sum(1 for p in layer.params if p.requires_grad)
                tensors = [t for t in _tensors(output) if t.requires_grad]
                if tensors:
                    tensors[0].register_hook(self._before_backward(layer))
            self._release(layer)

        return hook

    def _before_backward(self, layer: _Layer):
        def hook(grad):
            self._wait(layer)
            earlier = self._neighbour(layer, -1)
            if earlier is not None and earlier.pending_grads:
                self._fetch(earlier)
            return grad

        return hook

    def _ensure_grad_hooks(self) -> None:
        """Gradient hooks go on after the optimizer's (which moves each gradient to the host),
        so they are added at the first forward, when the optimizer exists."""
        if self._grad_hooks:
            return
        for layer in self.layers:
            for param in layer.params:
                if param.requires_grad:
                    self._grad_hooks.append(
                        param.register_post_accumulate_grad_hook(self._accumulated(layer))
                    )

    def _accumulated(self, layer: _Layer):
        def hook(param):
            layer.pending_grads = max(0, layer.pending_grads - 1)
            if layer.pending_grads == 0 and layer.resident:
                self._release(layer)

        return hook

    def stats(self) -> dict[str, Any]:
        return {
            "layers": [layer.name for layer in self.layers],
            "host_bytes": self.host_bytes,
            "fetches": self.fetches,
        }

    def remove(self) -> None:
        """Unhook, and put every weight back on the device as it was."""
        for hook in [*self._hooks, *self._grad_hooks]:
            hook.remove()
        self._hooks.clear()
        self._grad_hooks.clear()
        for layer in self.layers:
            for param, host in zip(layer.params, layer.host, strict=True):
                param.data = host.to(self.device)
            layer.resident = True


def _tensors(output: Any) -> list[torch.Tensor]:
    if isinstance(output, torch.Tensor):
        return [output]
    if isinstance(output, tuple | list):
        return [t for item in output for t in _tensors(item)]
    if isinstance(output, dict):
        return [t for item in output.values() for t in _tensors(item)]
    values = getattr(output, "values", None)
    if callable(values):
        return [t for item in values() for t in _tensors(item)]
    return []
