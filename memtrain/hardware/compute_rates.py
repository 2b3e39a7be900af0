"""Measure the rates the profiler prices compute with: a large matrix product, fused causal
attention (forward and backward) and a device copy.

Dry runs turn FLOP counts into times with a device preset's ``achievable_bf16_flops`` and
``attention_efficiency``; a GPU of the same name can differ from the preset (clocks, power cap,
a neighbour's load, another software stack), and a cost model off by 30% picks the wrong plans.
``memtrain calibrate`` runs these on the device it plans for and writes what it measured into the
hardware YAML. Each function takes its device, so the same code is exercised on the CPU.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class ComputeRates:
    """FLOP/s of a large matrix product and of causal attention (forward + backward, counted
    as the profiler counts them), and bytes/s of a device copy (read + write)."""

    matmul: float
    attention: float
    copy: float

    @property
    def attention_efficiency(self) -> float:
        """Attention's rate as a share of the matrix product's (what DeviceSpec stores)."""
        return self.attention / self.matmul


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _seconds(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    """Median wall time of ``fn`` over ``repeats`` runs after one warm-up run."""
    fn()
    _synchronize(device)
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        _synchronize(device)
        times.append(time.perf_counter() - started)
    times.sort()
    return times[len(times) // 2]


def matmul_rate(
    device: torch.device, dtype: torch.dtype = torch.bfloat16, size: int = 8192, repeats: int = 5
) -> float:
    """FLOP/s of a ``size`` x ``size`` x ``size`` product (2 * size^3 FLOPs)."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    out = torch.empty(size, size, device=device, dtype=dtype)
    seconds = _seconds(lambda: torch.mm(a, b, out=out), device, repeats)
    return 2.0 * size**3 / seconds


def attention_flops(batch: int, heads: int, seq: int, head_dim: int) -> float:
    """Forward + backward FLOPs of causal attention as the profiler counts them: the forward's
    two products over the causal half (2 * 2 * s^2 * d / 2 per head), the backward 2.5x that."""
    forward = 2.0 * batch * heads * seq * seq * head_dim
    return 3.5 * forward


def attention_rate(
    device: torch.device,
    dtype: torch.dtype = torch.bfloat16,
    seq: int = 16384,
    heads: int = 32,
    kv_heads: int = 8,
    head_dim: int = 128,
    repeats: int = 3,
) -> float:
    """FLOP/s of fused causal attention forward + backward (grouped-query shapes of an 8B
    Llama by default), through scaled_dot_product_attention with the backends it picks."""
    shape = (1, heads, seq, head_dim)
    kv_shape = (1, kv_heads, seq, head_dim)
    q = torch.randn(shape, device=device, dtype=dtype, requires_grad=True)
    k = torch.randn(kv_shape, device=device, dtype=dtype, requires_grad=True)
    v = torch.randn(kv_shape, device=device, dtype=dtype, requires_grad=True)
    grad = torch.randn(shape, device=device, dtype=dtype)
    gqa = kv_heads != heads

    def step() -> None:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        out.backward(grad)
        q.grad = k.grad = v.grad = None

    seconds = _seconds(step, device, repeats)
    return attention_flops(1, heads, seq, head_dim) / seconds


def copy_rate(device: torch.device, size_bytes: int = 2**30, repeats: int = 5) -> float:
    """Bytes/s of a device-to-device copy, counting bytes read and written."""
    src = torch.empty(size_bytes // 4, device=device, dtype=torch.float32).uniform_()
    dst = torch.empty_like(src)
    seconds = _seconds(lambda: dst.copy_(src), device, repeats)
    return 2.0 * size_bytes / seconds


def measure_compute_rates(device: torch.device, *, small: bool = False) -> ComputeRates:
    """All three rates on ``device``; ``small`` uses shapes a CPU finishes in a second."""
    if small:
        return ComputeRates(
            matmul=matmul_rate(device, torch.float32, size=256, repeats=3),
            attention=attention_rate(
                device, torch.float32, seq=256, heads=4, kv_heads=2, head_dim=32, repeats=2
            ),
            copy=copy_rate(device, size_bytes=16 * 2**20, repeats=3),
        )
    return ComputeRates(
        matmul=matmul_rate(device), attention=attention_rate(device), copy=copy_rate(device)
    )
