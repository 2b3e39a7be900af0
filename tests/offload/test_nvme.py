"""NVMe swap files: sizes verified on read-back, files removed after reading, at exit and after
a crash (by the next process that swaps under the same path)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from memtrain.errors import MemtrainError
from memtrain.offload.nvme import PREFIX, NvmeStore, deepspeed_aio

ROOT = Path(__file__).resolve().parents[2]

CHILD = textwrap.dedent(
    """
    import os, sys, torch
    from memtrain.offload.nvme import NvmeStore
    store = NvmeStore(sys.argv[1], backend="threads")
    store.write(torch.arange(1000, dtype=torch.float32)).write.result()
    print(store.directory, flush=True)
    if sys.argv[2] == "crash":
        os._exit(1)  # no atexit handlers, as after a kill
    """
)


def _child(tmp_path, how: str) -> str:
    result = subprocess.run(
        [sys.executable, "-c", CHILD, str(tmp_path), how],
        capture_output=True,
        text=True,
        cwd=str(ROOT),
        timeout=120,
    )
    return result.stdout.strip()


@pytest.fixture(params=["threads", "deepspeed"])
def backend(request) -> str:
    if request.param == "deepspeed" and deepspeed_aio() is None:
        pytest.skip("DeepSpeed async I/O is not built here")
    return request.param


def test_round_trip_and_file_removed_after_read(tmp_path, backend):
    store = NvmeStore(tmp_path, backend=backend)
    assert store.backend == backend
    try:
        data = torch.randn(64, 33)  # 8448 bytes: not a whole page
        swap = store.write(data.clone())
        back = swap.result().view(torch.float32).view(64, 33)
        assert torch.equal(back, data)
        assert store.files() == []
    finally:
        store.close()
    assert not list(tmp_path.glob(PREFIX + "*"))


def test_size_is_verified_on_read_back(tmp_path, backend):
    store = NvmeStore(tmp_path, backend=backend)
    try:
        swap = store.write(torch.ones(256))
        swap.write.result()
        with open(swap.path, "ab") as handle:
            handle.write(b"extra")
        with pytest.raises(MemtrainError, match=r"holds \d+ bytes, expected (1024|4096)"):
            swap.result()
    finally:
        store.close()


def test_directory_removed_at_exit(tmp_path):
    directory = _child(tmp_path, "exit")
    assert directory and not list(tmp_path.glob(PREFIX + "*"))


def test_directory_left_by_a_crash_is_removed_by_the_next_store(tmp_path):
    directory = _child(tmp_path, "crash")
    leftovers = list(tmp_path.glob(PREFIX + "*"))
    assert [str(p) for p in leftovers] == [directory]
    store = NvmeStore(tmp_path)
    try:
        assert [p.name for p in tmp_path.glob(PREFIX + "*")] == [store.directory.name]
    finally:
        store.close()
