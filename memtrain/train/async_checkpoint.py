"""Checkpoints written while training goes on.

A checkpoint's state (model, optimizer with its host-held states, master weights and GaLore or
FRUGAL projectors, RNG and data position) is copied into host memory between two steps, pinned
where CUDA is present and plain CPU tensors otherwise (one code path), and a background thread
writes that copy through :func:`save_checkpoint`, so the crash guarantees are the synchronous
ones. At most one write is in flight: the next snapshot waits for it, so the host copy's buffers
are reused from one checkpoint to the next. A write that fails is reported as one line at the
next checkpoint or when the run ends; the previous checkpoints stay as they were.
"""

from __future__ import annotations

import copy
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from memtrain.errors import MemtrainError
from memtrain.train.checkpoint import save_checkpoint
from memtrain.train.memory_errors import host_available_bytes
from memtrain.units import format_bytes

Note = Callable[[str], None]


def _key(tensor: torch.Tensor) -> tuple:
    """Identity of a tensor's bytes: tied weights are two tensors over one storage."""
    return (
        tensor.device,
        tensor.untyped_storage().data_ptr(),
        tensor.storage_offset(),
        tuple(tensor.shape),
        tuple(tensor.stride()),
        tensor.dtype,
    )


def tensor_bytes(tree: Any) -> int:
    """Bytes a host copy of ``tree``'s tensors takes (shared ones counted once)."""
    seen: dict[tuple, int] = {}

    def visit(value: Any) -> None:
        if isinstance(value, torch.Tensor):
            seen.setdefault(_key(value), value.numel() * value.element_size())
        elif isinstance(value, dict):
            for item in value.values():
                visit(item)
        elif isinstance(value, list | tuple):
            for item in value:
                visit(item)

    visit(tree)
    return sum(seen.values())


class HostSnapshot:
    """Copies a state tree into host buffers it keeps and reuses (same shapes, same order)."""

    def __init__(self, pin: bool) -> None:
        self.pin, self.buffers, self.used = pin, [], 0

    def take(self, tree: Any) -> Any:
        """A copy of ``tree`` that later steps cannot change: containers rebuilt, tensors copied
        into host buffers, other leaves deep-copied."""
        self.used = 0
        memo: dict[tuple, torch.Tensor] = {}
        with torch.no_grad():
            out = self._copy(tree, memo)
        if any(t.device.type == "cuda" for t in _tensors(tree)):
            torch.cuda.synchronize()  # non-blocking copies into pinned buffers land here
        return out

    def _copy(self, value: Any, memo: dict[tuple, torch.Tensor]) -> Any:
        if isinstance(value, torch.Tensor):
            key = _key(value)
            if key not in memo:
                buffer = self._buffer(value)
                buffer.copy_(value.detach(), non_blocking=value.device.type == "cuda")
                memo[key] = buffer
            return memo[key]
        if isinstance(value, dict):
            out = dict() if type(value) is dict else copy.copy(value)  # OrderedDict stays one
            out.clear()
            out.update((k, self._copy(v, memo)) for k, v in value.items())
            return out
        if isinstance(value, list):
            return [self._copy(v, memo) for v in value]
        if isinstance(value, tuple) and not hasattr(value, "_fields"):
            return tuple(self._copy(v, memo) for v in value)
        if value is None or isinstance(value, bool | int | float | str | bytes):
            return value
        return copy.deepcopy(value)

    def _buffer(self, like: torch.Tensor) -> torch.Tensor:
        index, self.used = self.used, self.used + 1
        if index < len(self.buffers):
            old = self.buffers[index]
            if old.shape == like.shape and old.dtype == like.dtype:
                return old
        buffer = torch.empty(like.shape, dtype=like.dtype, pin_memory=self.pin)
        if index < len(self.buffers):
            self.buffers[index] = buffer
        else:
            self.buffers.append(buffer)
        return buffer


def _tensors(tree: Any):
    if isinstance(tree, torch.Tensor):
        yield tree
    elif isinstance(tree, dict):
        for item in tree.values():
            yield from _tensors(item)
    elif isinstance(tree, list | tuple):
        for item in tree:
            yield from _tensors(item)


class CheckpointWriter:
    """Writes checkpoints through :func:`save_checkpoint`, in the background or not.

    ``background``: snapshot to host memory and write in a thread (at most one in flight; the
    next :meth:`write` waits for it). Without it, or where the snapshot would not fit the host's
    free memory (noted once per checkpoint), the write happens before :meth:`write` returns.
    """

    def __init__(self, keep: int, background: bool, note: Note, pin: bool | None = None) -> None:
        self.keep, self.background, self.note = keep, background, note
        pin = torch.cuda.is_available() if pin is None else pin
        self.snapshot = HostSnapshot(pin)
        self.thread: threading.Thread | None = None
        self.pending: tuple[int, Path] | None = None  # step and file of the write in flight
        self.failure: str | None = None
        self.waited_s = 0.0  # training time spent waiting for a previous write
        self.written = 0

    def write(self, path: Path, state: dict[str, Any]) -> None:
        """Write ``state`` (the client state with the model and optimizer) as the checkpoint
        of ``state["step"]`` beside ``path``."""
        started = time.perf_counter()
        self.wait()
        self.waited_s += time.perf_counter() - started
        step = int(state["step"])
        if not self.background:
            self._save(path, state, step)
            return
        need = tensor_bytes(state) - sum(
            b.numel() * b.element_size() for b in self.snapshot.buffers
        )
        free = host_available_bytes()
        if free is not None and need > free:
            self.note(
                f"checkpoint {step}: its host copy needs {format_bytes(need)} more and "
                f"{format_bytes(free)} is free; written synchronously"
            )
            self._save(path, state, step)
            return
        try:
            copied = self.snapshot.take(state)
        except RuntimeError as exc:  # the host allocator or pinning refused
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            self.note(
                f"checkpoint {step}: could not copy {format_bytes(tensor_bytes(state))} to host "
                f"memory ({first}); written synchronously"
            )
            self.snapshot.buffers.clear()
            self._save(path, state, step)
            return
        self.pending = (step, path)
        self.thread = threading.Thread(
            target=self._run, args=(path, copied, step), name=f"checkpoint-{step}", daemon=False
        )
        self.thread.start()

    def _run(self, path: Path, state: dict[str, Any], step: int) -> None:
        try:
            self._save(path, state, step)
        except MemtrainError as exc:
            self.failure = str(exc)

    def _save(self, path: Path, state: dict[str, Any], step: int) -> None:
        try:
            save_checkpoint(path, state, keep=self.keep)
        except OSError as exc:
            size = tensor_bytes(state)
            raise MemtrainError(
                f"writing checkpoint {step} ({format_bytes(size)} of tensors) to {path.parent} "
                f"failed ({exc.strerror or exc}); the previous checkpoints are kept: free space "
                "there or set train.out_dir elsewhere"
            ) from None
        self.written += 1

    def wait(self) -> None:
        """Block until the write in flight is on disk; raise its failure as one line."""
        if self.thread is not None:
            self.thread.join()
            self.thread, self.pending = None, None
        if self.failure is not None:
            failure, self.failure = self.failure, None
            raise MemtrainError(failure)

    def close(self, interrupted: bool = False) -> None:
        """Wait for the last write (noting why on an interrupt); a failure here is noted, not
        raised, so it never hides the error that stopped the run."""
        if self.pending is not None and interrupted:
            step, path = self.pending
            self.note(f"waiting for checkpoint {step} to reach {path.parent} before stopping")
        try:
            self.wait()
        except MemtrainError as exc:
            self.note(str(exc))
