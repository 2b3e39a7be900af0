"""A bounded host-memory pool the executor owns and reuses across steps.

One anonymous mapping of exactly the planned size (rounded to a page, never to a power of two),
optionally bound to a NUMA node before first touch, and registered with CUDA as pinned memory
when a GPU is present so device/host copies run asynchronously. Blocks are handed out best-fit
from a free list that coalesces on release, so a steady-state training loop reuses the same
bytes every step and the pool never grows.
"""

from __future__ import annotations

import bisect
import ctypes
import mmap
import threading
from dataclasses import dataclass

import torch

from memtrain.errors import MemtrainError
from memtrain.hardware.calibrate import host_memory_line
from memtrain.units import format_bytes

ALIGNMENT = 512  # bytes; covers every dtype and keeps blocks cache-line and DMA friendly
PAGE = mmap.PAGESIZE


def _round_up(value: int, multiple: int) -> int:
    return (value + multiple - 1) // multiple * multiple


@dataclass(frozen=True)
class Block:
    offset: int
    size: int


class HostPool:
    """Fixed-size host buffer with a best-fit allocator.

    ``numa_node`` binds the pages to that node (CXL memory); ``pin`` registers the buffer with
    CUDA (default: when CUDA is available).
    """

    def __init__(
        self,
        nbytes: int,
        *,
        name: str = "cpu",
        numa_node: int | None = None,
        pin: bool | None = None,
    ) -> None:
        if nbytes <= 0:
            raise MemtrainError(f"{name} pool size must be positive, got {nbytes}")
        self.name = name
        self.capacity = _round_up(int(nbytes), PAGE)
        self.numa_node = numa_node
        try:
            self._mmap = mmap.mmap(-1, self.capacity)
        except (OSError, ValueError, OverflowError) as exc:
            reason = getattr(exc, "strerror", None) or str(exc)
            raise MemtrainError(
                f"cannot map {format_bytes(self.capacity)} of host memory for the {name} pool "
                f"({reason}); this host has {host_memory_line()}: re-plan with a smaller "
                f"{name} budget (memtrain calibrate records what can be pinned)"
            ) from None
        self._cbuf = (ctypes.c_char * self.capacity).from_buffer(self._mmap)
        self.address = ctypes.addressof(self._cbuf)
        if numa_node is not None:
            from memtrain.offload.numa import bind

            try:
                bind(self.address, self.capacity, numa_node)
            except MemtrainError:
                self._release_mapping()
                raise
        self.buffer = torch.frombuffer(self._cbuf, dtype=torch.uint8)
        self.pinned = False
        if pin is None:
            pin = torch.cuda.is_available()
        if pin:
            self._pin()
        self._lock = threading.Lock()  # blocks are released from autograd's device threads
        self._free: list[tuple[int, int]] = [(0, self.capacity)]  # sorted by offset
        self.in_use = 0
        self.high_water = 0
        self.allocations = 0

    def _pin(self) -> None:
        rc = torch.cuda.cudart().cudaHostRegister(self.address, self.capacity, 0)
        code = int(rc.value if hasattr(rc, "value") else rc)
        if code != 0:
            raise MemtrainError(
                f"cannot pin {format_bytes(self.capacity)} of host memory for the {self.name} "
                f"pool (CUDA error {code}); this host has {host_memory_line()}: lower the "
                "plan's host tier size or raise the locked-memory limit (ulimit -l)"
            )
        self.pinned = True

    def allocate(self, nbytes: int) -> Block:
        """A block of at least ``nbytes`` (aligned); raises when the pool is full."""
        size = _round_up(max(int(nbytes), 1), ALIGNMENT)
        with self._lock:
            block = self._take(size)
        if block is None:
            raise MemtrainError(
                f"the {self.name} swap pool is full: {format_bytes(size)} requested, "
                f"{format_bytes(self.capacity - self.in_use)} free of "
                f"{format_bytes(self.capacity)}; the plan's host bytes do not match this model "
                "or batch (re-plan, or pass a larger host_pool_bytes)"
            )
        return block

    def _take(self, size: int) -> Block | None:
        best = -1
        for index, (_, free) in enumerate(self._free):
            if free >= size and (best < 0 or free < self._free[best][1]):
                best = index
                if free == size:
                    break
        if best < 0:
            return None
        offset, free = self._free[best]
        if free == size:
            del self._free[best]
        else:
            self._free[best] = (offset + size, free - size)
        self.in_use += size
        self.high_water = max(self.high_water, self.in_use)
        self.allocations += 1
        return Block(offset, size)

    def release(self, block: Block) -> None:
        with self._lock:
            self._give_back(block)

    def _give_back(self, block: Block) -> None:
        entry = (block.offset, block.size)
        index = bisect.bisect_left(self._free, entry)
        self._free.insert(index, entry)
        # Coalesce with the right, then the left neighbour.
        if index + 1 < len(self._free):
            off, size = self._free[index]
            nxt_off, nxt_size = self._free[index + 1]
            if off + size == nxt_off:
                self._free[index] = (off, size + nxt_size)
                del self._free[index + 1]
        if index > 0:
            prev_off, prev_size = self._free[index - 1]
            off, size = self._free[index]
            if prev_off + prev_size == off:
                self._free[index - 1] = (prev_off, prev_size + size)
                del self._free[index]
        self.in_use -= block.size

    def view(self, block: Block, nbytes: int) -> torch.Tensor:
        """The first ``nbytes`` of a block as a uint8 tensor."""
        return self.buffer.narrow(0, block.offset, nbytes)

    @property
    def free_blocks(self) -> int:
        return len(self._free)

    def _release_mapping(self) -> None:
        self._cbuf = None
        try:
            self._mmap.close()
        except BufferError:  # a tensor view still exists; the mapping goes with it
            pass

    def close(self) -> None:
        """Unpin and unmap. Views handed out earlier must not be used afterwards."""
        if self._mmap is None:
            return
        if self.pinned:
            torch.cuda.cudart().cudaHostUnregister(self.address)
            self.pinned = False
        self.buffer = None
        self._release_mapping()
        self._mmap = None
