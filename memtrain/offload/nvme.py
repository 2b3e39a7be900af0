"""Swap files on NVMe: asynchronous writes and reads through a thread pool.

Every swapped piece is one file in a directory owned by this process
(``<path>/memtrain-swap-<pid>-<random>``). A file is deleted as soon as it has been read back
(or its tensor is dropped unread), the directory at ``close()``, at interpreter exit, and,
after a crash, by the next process that opens a store under the same path (directories whose
process no longer exists are removed). Sizes are checked on read-back.
"""

from __future__ import annotations

import atexit
import itertools
import os
import secrets
import shutil
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch

from memtrain.errors import MemtrainError
from memtrain.units import format_bytes

PREFIX = "memtrain-swap-"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_directories(root: Path) -> list[Path]:
    """Delete swap directories left by processes that no longer run (after a crash)."""
    removed = []
    for entry in root.glob(PREFIX + "*"):
        parts = entry.name[len(PREFIX) :].split("-")
        if not parts or not parts[0].isdigit() or not entry.is_dir():
            continue
        if int(parts[0]) != os.getpid() and not _pid_alive(int(parts[0])):
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
    return removed


def check_path(path: str | Path, need_bytes: int = 0) -> Path:
    """Fail before training when the NVMe path is missing, not writable or too full."""
    root = Path(path)
    if not root.is_dir():
        raise MemtrainError(f"NVMe swap path {root} does not exist; create it or plan another path")
    if not os.access(root, os.W_OK | os.X_OK):
        raise MemtrainError(f"NVMe swap path {root} is not writable by this user")
    free = shutil.disk_usage(root).free
    if need_bytes > free:
        raise MemtrainError(
            f"NVMe swap path {root} has {format_bytes(free)} free but the plan writes "
            f"{format_bytes(need_bytes)} per step; free space or plan a smaller NVMe share"
        )
    return root


class SwapFile:
    """One piece written to disk; reading it back returns a CPU tensor of the same bytes."""

    def __init__(self, store: NvmeStore, path: Path, nbytes: int, write: Future) -> None:
        self.store = store
        self.path = path
        self.nbytes = nbytes
        self.write = write
        self.read: Future | None = None

    def prefetch(self) -> None:
        if self.read is None:
            self.read = self.store.pool.submit(self.store._read, self)

    def result(self) -> torch.Tensor:
        """The bytes as a uint8 CPU tensor (waits for the read); the file is removed."""
        self.prefetch()
        return self.read.result()

    def __del__(self) -> None:
        store = getattr(self, "store", None)
        if store is not None and not store.closed:
            store.discard(self)


class NvmeStore:
    """Thread-pool swap files under one directory."""

    def __init__(self, path: str | Path, *, need_bytes: int = 0, workers: int = 4) -> None:
        root = check_path(path, need_bytes)
        remove_stale_directories(root)
        self.directory = root / f"{PREFIX}{os.getpid()}-{secrets.token_hex(4)}"
        self.directory.mkdir()
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="memtrain-nvme")
        self._counter = itertools.count()
        self._lock = threading.Lock()
        self.closed = False
        self.bytes_written = 0
        self.live_files = 0
        atexit.register(self.close)

    def write(self, data: torch.Tensor, wait_for: object = None) -> SwapFile:
        """Write a CPU tensor's bytes asynchronously; ``wait_for`` (a CUDA event) is awaited
        in the worker thread before reading ``data``."""
        nbytes = data.numel() * data.element_size()
        path = self.directory / f"{next(self._counter)}.bin"
        with self._lock:
            self.live_files += 1
            self.bytes_written += nbytes
        future = self.pool.submit(self._write, path, data, wait_for)
        return SwapFile(self, path, nbytes, future)

    @staticmethod
    def _write(path: Path, data: torch.Tensor, wait_for: object) -> None:
        if wait_for is not None:
            wait_for.synchronize()
        raw = data.contiguous().view(-1).view(torch.uint8).numpy()
        try:
            with open(path, "wb") as handle:
                handle.write(memoryview(raw))
        except OSError as exc:
            raise MemtrainError(f"writing swap file {path} failed ({exc.strerror})") from None

    def _read(self, swap: SwapFile) -> torch.Tensor:
        swap.write.result()  # surfaces write errors
        size = swap.path.stat().st_size
        if size != swap.nbytes:
            raise MemtrainError(
                f"swap file {swap.path} holds {size} bytes, expected {swap.nbytes}; "
                "the NVMe path was modified during training"
            )
        out = torch.empty(swap.nbytes, dtype=torch.uint8, pin_memory=torch.cuda.is_available())
        with open(swap.path, "rb") as handle:
            got = handle.readinto(memoryview(out.numpy()))
        if got != swap.nbytes:
            raise MemtrainError(f"swap file {swap.path}: read {got} of {swap.nbytes} bytes")
        self._unlink(swap)
        return out

    def _unlink(self, swap: SwapFile) -> None:
        try:
            swap.path.unlink()
        except FileNotFoundError:
            return
        with self._lock:
            self.live_files -= 1

    def discard(self, swap: SwapFile) -> None:
        """Remove a file whose tensor was dropped without being read."""
        if swap.read is not None and swap.read.done():
            return
        try:
            swap.write.add_done_callback(lambda _: self._unlink(swap))
        except RuntimeError:  # interpreter shutting down
            pass

    def files(self) -> list[Path]:
        return sorted(self.directory.glob("*.bin")) if self.directory.exists() else []

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.pool.shutdown(wait=True)
        shutil.rmtree(self.directory, ignore_errors=True)
        atexit.unregister(self.close)
