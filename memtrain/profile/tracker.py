"""A dispatch-level observer of one training step: FLOPs, estimated op times, live bytes.

Every ATen op passes through :class:`OpTracker`. It

* counts FLOPs with PyTorch's own formulas (``torch.utils.flop_counter``), halving causal
  attention because fused kernels skip the masked half;
* estimates each op's time on a target device as a roofline, ``max(FLOPs / rate, bytes / bandwidth)``;
* optionally tracks live tensor storage, the way a caching allocator sees it: a storage is allocated
  when an op first returns it and freed when its last reference dies (a weak-reference finaliser),
  with sizes rounded up to the allocator's 512-byte blocks. On meta tensors this simulates device
  memory without allocating any.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import flop_registry

from memtrain.hardware.devices import DeviceSpec

aten = torch.ops.aten

ALLOCATOR_BLOCK = 512  # the CUDA caching allocator rounds every block up to a multiple of this
KERNEL_LAUNCH_S = 4e-6  # fixed cost charged to every op that launches a kernel

_ZERO_COST = {
    aten.detach,
    aten.alias,
    aten._unsafe_view,
    aten.lift_fresh,
    aten.empty,
    aten.empty_strided,
    aten.empty_like,
    aten.scalar_tensor,
    aten._local_scalar_dense,
}


def round_block(nbytes: int, block: int = ALLOCATOR_BLOCK) -> int:
    return -(-nbytes // block) * block if block > 1 else nbytes


def _attention_flops(func, args, kwargs) -> float:
    """FLOPs of a fused SDPA kernel, forward (2 matmuls) or backward (5), grouped heads allowed.

    PyTorch's own formula requires equal query and key heads; fused kernels on GPUs and CPUs
    take grouped key/value heads (GQA) as they are, so the count is made from the query's heads.
    """
    names = [a.name for a in func._schema.arguments]
    bound = dict(zip(names, args, strict=False))
    bound.update(kwargs)
    query, key = bound["query"], bound["key"]
    batch, heads, q_len, head_dim = query.shape
    matmuls = 5 if func._overloadpacket.__name__.endswith("_backward") else 2
    return 2.0 * matmuls * batch * heads * q_len * key.shape[-2] * head_dim


def _is_causal(func, args, kwargs) -> bool:
    if "is_causal" in kwargs:
        return bool(kwargs["is_causal"])
    for index, argument in enumerate(func._schema.arguments):
        if argument.name == "is_causal":
            return bool(args[index]) if index < len(args) else bool(argument.default_value)
    return False


def op_flops(func, args, kwargs, out) -> float:
    """FLOPs of one ATen op call (0 for ops without a formula: elementwise work is bytes-bound)."""
    packet = func._overloadpacket
    if packet.__name__.startswith("_scaled_dot_product_"):
        flops = _attention_flops(func, args, kwargs)
        return flops * 0.5 if _is_causal(func, args, kwargs) else flops
    formula = flop_registry.get(packet)
    if formula is None:
        return 0.0
    return float(formula(*args, **kwargs, out_val=out))


def _tensor_bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class OpTracker(TorchDispatchMode):
    """Observe every op of a step; see the module docstring."""

    def __init__(
        self,
        device_spec: DeviceSpec | None,
        track_memory: bool,
        on_op: Callable[[float, float, bool], None],
        on_alloc: Callable[[int], None] | None = None,
        block: int = ALLOCATOR_BLOCK,
    ):
        super().__init__()
        self.spec = device_spec
        self.track_memory = track_memory
        self.on_op = on_op  # (flops, estimated seconds, is attention) -> None
        self.on_alloc = on_alloc  # live bytes after an allocation -> None
        self.block = block
        self.live_bytes = 0
        self.peak_bytes = 0
        self._live: dict[int, int] = {}
        self._producer: dict[int, str] = {}

    # -- memory -----------------------------------------------------------------------------
    def _free(self, key: int) -> None:
        self.live_bytes -= self._live.pop(key, 0)

    def producer(self, tensor: torch.Tensor) -> str:
        """Name of the ATen op that created this tensor's storage ("" if made outside)."""
        return self._producer.get(tensor.untyped_storage()._cdata, "")

    def _forget(self, key: int) -> None:
        self._producer.pop(key, None)

    def _record_outputs(self, name: str, inputs: list, outputs: list) -> None:
        """Note the producer of every new storage an op returns, and (when tracking memory)
        allocate it; storages shared with an input are views or in-place results."""
        input_keys = {t.untyped_storage()._cdata for t in inputs if isinstance(t, torch.Tensor)}
        for t in outputs:
            if not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()
            key = storage._cdata
            if key in input_keys:
                continue
            if key not in self._producer:
                self._producer[key] = name
                weakref.finalize(storage, self._forget, key)
            if not self.track_memory or key in self._live:
                continue
            size = round_block(storage.nbytes(), self.block)
            self._live[key] = size
            self.live_bytes += size
            weakref.finalize(storage, self._free, key)
            if self.live_bytes > self.peak_bytes:
                self.peak_bytes = self.live_bytes
            if self.on_alloc is not None:
                self.on_alloc(self.live_bytes)

    # -- time ---------------------------------------------------------------------------------
    def _estimate_seconds(self, func, flops: float, inputs: list, outputs: list) -> float:
        if self.spec is None or func.is_view or func._overloadpacket in _ZERO_COST:
            return 0.0
        tensors = [t for t in inputs + outputs if isinstance(t, torch.Tensor)]
        moved = sum(_tensor_bytes(t) for t in tensors)
        seconds = moved / self.spec.achievable_hbm_bandwidth
        if flops:
            elem = min((t.element_size() for t in tensors if t.is_floating_point()), default=2)
            if func._overloadpacket.__name__.startswith("_scaled_dot_product_"):
                rate = self.spec.attention_rate(elem)
            else:
                rate = self.spec.matmul_rate(elem)
            seconds = max(seconds, flops / rate)
        return seconds + KERNEL_LAUNCH_S

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        inputs, _ = tree_flatten((args, kwargs))
        outputs, _ = tree_flatten(out)
        self._record_outputs(func._overloadpacket.__name__, inputs, outputs)
        flops = op_flops(func, args, kwargs, out)
        attention = func._overloadpacket.__name__.startswith("_scaled_dot_product_")
        self.on_op(flops, self._estimate_seconds(func, flops, inputs, outputs), attention)
        return out
