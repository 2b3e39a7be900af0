"""Whether the Triton kernels can run here (imported by every path that may pick them)."""

from __future__ import annotations

import importlib.util

import torch


def triton_available(device: torch.device) -> bool:
    """Whether the Triton kernels can run on ``device`` (CUDA, or the CPU interpreter)."""
    if importlib.util.find_spec("triton") is None:
        return False
    from memtrain.kernels.cross_entropy.triton_function import interpreting

    if interpreting():
        return device.type == "cpu"
    return device.type == "cuda"
