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


AIO_ALIGNMENT = 4096  # O_DIRECT: sizes and addresses in whole pages


def deepspeed_aio(build: bool = False):
    """DeepSpeed's async I/O op where it is installed and usable, else None.

    ``build=False`` takes it only when it needs no compilation (prebuilt, or built before and
    cached by PyTorch's extension loader); building it takes minutes.
    """
    try:
        from deepspeed.git_version_info import installed_ops
        from deepspeed.ops.op_builder import AsyncIOBuilder
    except Exception:  # deepspeed absent, or it cannot initialise its accelerator here
        return None
    builder = AsyncIOBuilder()
    if not builder.is_compatible(verbose=False):
        return None
    if not (build or installed_ops.get("async_io")):
        from torch.utils.cpp_extension import _get_build_directory

        cached = Path(_get_build_directory(builder.name, verbose=False)) / f"{builder.name}.so"
        if not cached.exists():
            return None
    try:
        return builder.load(verbose=False)
    except Exception:
        return None


class _AioFiles:
    """Whole-file reads and writes through DeepSpeed's libaio handles, one per worker thread.

    O_DIRECT needs page-aligned buffers and sizes, so data is staged in an aligned buffer and
    files are padded to a whole page; the logical size is checked on read-back.
    """

    def __init__(self, module) -> None:
        self.module = module
        self.local = threading.local()

    def _handle(self):
        handle = getattr(self.local, "handle", None)
        if handle is None:
            handle = self.module.aio_handle(1 << 20, 8, False, True, 1)
            self.local.handle = handle
        return handle

    @staticmethod
    def padded(nbytes: int) -> int:
        return -(-nbytes // AIO_ALIGNMENT) * AIO_ALIGNMENT

    def _aligned(self, nbytes: int) -> torch.Tensor:
        size = self.padded(nbytes)
        raw = torch.empty(size + AIO_ALIGNMENT, dtype=torch.uint8)
        shift = (-raw.data_ptr()) % AIO_ALIGNMENT
        return raw.narrow(0, shift, size)

    def write(self, path: Path, raw: torch.Tensor) -> None:
        staged = self._aligned(raw.numel())
        staged[: raw.numel()].copy_(raw)
        if self._handle().sync_pwrite(staged, str(path)) < 0:
            raise MemtrainError(f"writing swap file {path} through DeepSpeed async I/O failed")

    def read(self, path: Path, nbytes: int) -> torch.Tensor:
        staged = self._aligned(nbytes)
        if self._handle().sync_pread(staged, str(path)) < 0:
            raise MemtrainError(f"reading swap file {path} through DeepSpeed async I/O failed")
        out = torch.empty(nbytes, dtype=torch.uint8, pin_memory=torch.cuda.is_available())
        out.copy_(staged[:nbytes])
        return out


class NvmeStore:
    """Swap files under one directory, written and read asynchronously by a thread pool.

    ``backend="threads"`` (and ``"auto"``) use plain files; ``"deepspeed"`` uses DeepSpeed's
    async I/O (libaio, O_DIRECT) through a single worker. ``auto`` does not pick DeepSpeed on its
    own: several workers each holding a DeepSpeed aio handle were seen to hang a training step.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        need_bytes: int = 0,
        workers: int = 4,
        backend: str = "auto",
    ) -> None:
        if backend not in ("auto", "threads", "deepspeed"):
            raise MemtrainError(f"unknown NVMe backend {backend!r}; use auto, threads or deepspeed")
        root = check_path(path, need_bytes)
        self.aio = None
        if backend == "deepspeed":
            module = deepspeed_aio(build=True)
            if module is None:
                raise MemtrainError(
                    "DeepSpeed async I/O is not available (install deepspeed and libaio-dev)"
                )
            self.aio = _AioFiles(module)
        self.backend = "deepspeed" if self.aio is not None else "threads"
        remove_stale_directories(root)
        self.directory = root / f"{PREFIX}{os.getpid()}-{secrets.token_hex(4)}"
        self.directory.mkdir()
        if self.aio is not None:
            workers = 1  # one DeepSpeed aio handle; it queues and overlaps the I/O itself
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

    def _write(self, path: Path, data: torch.Tensor, wait_for: object) -> None:
        if wait_for is not None:
            wait_for.synchronize()
        raw = data.contiguous().view(-1).view(torch.uint8)
        if self.aio is not None:
            self.aio.write(path, raw)
            return
        try:
            with open(path, "wb") as handle:
                handle.write(memoryview(raw.numpy()))
        except OSError as exc:
            raise MemtrainError(f"writing swap file {path} failed ({exc.strerror})") from None

    def _read(self, swap: SwapFile) -> torch.Tensor:
        swap.write.result()  # surfaces write errors
        size = swap.path.stat().st_size
        expected = swap.nbytes if self.aio is None else self.aio.padded(swap.nbytes)
        if size != expected:
            raise MemtrainError(
                f"swap file {swap.path} holds {size} bytes, expected {expected}; "
                "the NVMe path was modified during training"
            )
        if self.aio is not None:
            out = self.aio.read(swap.path, swap.nbytes)
        else:
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
