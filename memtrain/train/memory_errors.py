"""Running out of host or device memory, said in one line with the numbers.

PyTorch's allocators and ``mmap`` report exhaustion as a long RuntimeError, an
``OutOfMemoryError`` or a bare ``OSError``; the runner turns each into a :class:`MemtrainError`
that names what was being allocated, how much, what was free, and what to try.
"""

from __future__ import annotations

import errno
import re
from types import TracebackType

import torch

from memtrain.errors import MemtrainError
from memtrain.units import format_bytes

_CPU = re.compile(r"(?:can't allocate memory|not enough memory): you tried to allocate (\d+) bytes")
_TRIED = re.compile(r"Tried to allocate ([\d.]+ [KMGT]?i?B)")
_TOTAL = re.compile(r"total capacity of ([\d.]+ [KMGT]?i?B) of which ([\d.]+ [KMGT]?i?B) is free")


def host_available_bytes() -> int | None:
    """The host memory the kernel can hand out now (``MemAvailable``; None where unknown)."""
    try:
        with open("/proc/meminfo") as file:
            for line in file:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _free_host() -> str:
    free = host_available_bytes()
    return f"{format_bytes(free)} free" if free is not None else "free memory unknown"


def _pool_frame(tb: TracebackType | None) -> tuple[str, int] | None:
    """The host pool whose mapping failed: its name and size, read off the failing frame."""
    found = None
    while tb is not None:
        frame = tb.tb_frame
        pool = frame.f_locals.get("self")
        if type(pool).__name__ == "HostPool" and hasattr(pool, "capacity"):
            found = (getattr(pool, "name", "host"), int(pool.capacity))
        tb = tb.tb_next
    return found


def _device_line(exc: BaseException, device: torch.device | None) -> str:
    text = str(exc)
    tried = _TRIED.search(text)
    total = _TOTAL.search(text)
    parts = [f"tried to allocate {tried[1]}" if tried else "an allocation failed"]
    if total:
        parts.append(f"the GPU has {total[1]}, {total[2]} free")
    if device is not None and device.type == "cuda":
        parts.append(f"PyTorch held {format_bytes(torch.cuda.memory_allocated(device))}")
    return "; ".join(parts)


def out_of_memory(
    exc: BaseException, what: str, advice: str, device: torch.device | None = None
) -> MemtrainError | None:
    """The one-line error for ``exc`` when it is memory exhaustion while doing ``what`` (None
    when it is something else). ``advice`` is what to try."""
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return MemtrainError(
            f"{what} ran out of GPU memory ({_device_line(exc, device)}); {advice}"
        )
    if isinstance(exc, MemoryError):
        return MemtrainError(f"{what} ran out of host memory ({_free_host()}); {advice}")
    if isinstance(exc, OSError) and exc.errno == errno.ENOMEM:
        pool = _pool_frame(exc.__traceback__)
        asked = f"mapping the {pool[0]} pool of {format_bytes(pool[1])}" if pool else "a mapping"
        return MemtrainError(
            f"{what} ran out of host memory ({asked} failed; {_free_host()}); {advice}"
        )
    if isinstance(exc, RuntimeError):
        match = _CPU.search(str(exc))
        if match:
            return MemtrainError(
                f"{what} ran out of host memory (tried to allocate "
                f"{format_bytes(int(match[1]))}; {_free_host()}); {advice}"
            )
        if "out of memory" in str(exc) and "CUDA" in str(exc):
            return MemtrainError(
                f"{what} ran out of GPU memory ({_device_line(exc, device)}); {advice}"
            )
    return None


PREPARE_ADVICE = (
    "lower plan.cpu (the host memory the plan may use), data.seq or data.batch, or free memory "
    "on this machine"
)
STEP_ADVICE = (
    "lower data.batch or data.seq, or plan.gpu_budget_fraction / train.gpu_memory_limit so the "
    "plan swaps or recomputes more"
)
