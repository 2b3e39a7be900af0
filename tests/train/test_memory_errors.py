"""Running out of host or device memory in ``memtrain run``: one line with the numbers."""

from __future__ import annotations

import errno
import re

import pytest
import torch

from memtrain.errors import MemtrainError
from memtrain.train import load_recipe, run_recipe
from memtrain.train.memory_errors import STEP_ADVICE, out_of_memory

from .test_run_and_resume import _write

CUDA_OOM = (
    "CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 79.19 GiB of "
    "which 1.06 GiB is free. Including non-PyTorch memory, this process has 78.12 GiB memory in "
    "use.\nOf the allocated memory 76.50 GiB is allocated by PyTorch"
)
CPU_OOM = (
    "[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate memory: you "
    "tried to allocate 68719476736 bytes. Error code 12 (Cannot allocate memory)"
)


def test_messages_carry_the_numbers():
    gpu = out_of_memory(torch.cuda.OutOfMemoryError(CUDA_OOM), "step 3", STEP_ADVICE)
    assert str(gpu).startswith("step 3 ran out of GPU memory (tried to allocate 2.00 GiB")
    assert "79.19 GiB, 1.06 GiB free" in str(gpu) and "data.batch" in str(gpu)
    host = out_of_memory(RuntimeError(CPU_OOM), "step 3", STEP_ADVICE)
    assert "host memory (tried to allocate 64.00 GiB" in str(host)
    assert out_of_memory(RuntimeError("shapes do not match"), "step 3", STEP_ADVICE) is None
    assert out_of_memory(OSError(errno.ENOENT, "gone"), "step 3", STEP_ADVICE) is None
    for error in (gpu, host):
        assert "\n" not in str(error)


@pytest.mark.parametrize(("raised", "words"), [(CUDA_OOM, "GPU memory"), (CPU_OOM, "host memory")])
def test_a_step_out_of_memory_is_one_line(tmp_path, monkeypatch, raised, words):
    from memtrain.train.strategy import SingleProcess

    real = SingleProcess.step

    def step(self, ids):
        if self.optimizer.state:  # the second step
            kind = torch.cuda.OutOfMemoryError if "CUDA" in raised else RuntimeError
            raise kind(raised)
        return real(self, ids)

    monkeypatch.setattr(SingleProcess, "step", step)
    recipe = load_recipe(_write(tmp_path, "oom"), ["schedule.steps=3"])
    with pytest.raises(MemtrainError) as info:
        run_recipe(recipe, progress=False)
    message = str(info.value)
    assert message.startswith(f"step 2 ran out of {words}") and "\n" not in message
    assert info.value.__context__ is None and info.value.__cause__ is None


def test_a_host_pool_that_cannot_be_mapped_is_one_line(tmp_path, monkeypatch):
    import memtrain.offload.pool as pool

    def refuse(fileno, length, *args, **kwargs):
        raise OSError(errno.ENOMEM, "Cannot allocate memory")

    monkeypatch.setattr(pool.mmap, "mmap", refuse)
    recipe = load_recipe(_write(tmp_path, "pool"), ["schedule.steps=1"])
    with pytest.raises(MemtrainError) as info:
        run_recipe(recipe, progress=False)
    message = str(info.value)  # the pool's own line, or the runner's where the pool has none
    assert "host memory" in message and "cpu pool" in message and "\n" not in message
    assert re.search(r"\d+\.\d+ [KMG]iB", message)
