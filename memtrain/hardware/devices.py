"""Accelerator presets: memory, compute rate and bandwidths, each with its source.

The profiler turns FLOP counts into times with these rates; the planner also reads the host-link
figures. Datasheet peaks are what vendors publish; ``achievable_*`` are what a large bf16 matrix
product or device copy reaches in practice, measured where noted, which is what times should use.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml

from memtrain.errors import MemtrainError

GB = 10**9
TFLOPS = 10**12


@dataclass(frozen=True)
class DeviceSpec:
    """One accelerator model. Rates in FLOP/s, bandwidths in bytes/s, memory in bytes."""

    name: str
    memory_bytes: int
    peak_bf16_flops: float
    achievable_bf16_flops: float
    peak_fp32_flops: float
    hbm_bandwidth: float
    achievable_hbm_bandwidth: float
    host_to_device: float
    device_to_host: float
    host_link_duplex: float
    pageable_host_link: float
    source: str
    # Fused causal attention reaches this share of the achievable matmul rate (measured on an
    # H100 80GB HBM3 with PyTorch 2.11: forward 429, backward 444 TFLOP/s against 790; assumed
    # the same on other GPUs).
    attention_efficiency: float = 0.55
    # Host time to issue one kernel from eager PyTorch: the floor of a layer's time when its
    # kernels are short (measured with a Hugging Face Llama block at 4096 tokens on an H100
    # host: about 55 us per kernel in forward, where Python runs the model, and 15 us in
    # backward, where the autograd engine does).
    host_forward_op_s: float = 55e-6
    host_backward_op_s: float = 15e-6
    # Bytes/s one GPU moves in NCCL collectives to the GPUs of its node (bus bandwidth, each
    # direction), for multi-GPU plans (ZeRO gathers, gradient reductions, sequence-parallel
    # all-to-all). The default is a PCIe Gen4 figure for GPUs without NVLink; presets with
    # NVLink set a conservative share of its per-direction rate. Across nodes, give the
    # network's rate instead (e.g. 400 Gb/s InfiniBand per GPU: about 45 GB/s).
    interconnect_bandwidth: float = 20 * GB

    def attention_rate(self, dtype_bytes: int) -> float:
        """FLOP/s of a fused attention kernel at this element size."""
        return self.matmul_rate(dtype_bytes) * self.attention_efficiency

    def matmul_rate(self, dtype_bytes: int) -> float:
        """FLOP/s a large matrix product reaches at this element size (fp32 uses TF32 off)."""
        return self.achievable_bf16_flops if dtype_bytes <= 2 else self.peak_fp32_flops * 0.9

    def to_dict(self) -> dict:
        return asdict(self)


# devices.yaml key suffix -> DeviceSpec field suffix, unit
_UNITS = (("_gb", "_bytes", GB), ("_tflops", "_flops", TFLOPS), ("_gb_s", "", GB))


def _load_presets() -> tuple[dict[str, DeviceSpec], dict[str, str]]:
    """``devices.yaml``: rates in TFLOP/s, bandwidths in GB/s, memory in GB."""
    raw = yaml.safe_load(Path(__file__).with_name("devices.yaml").read_text())
    aliases = raw.pop("aliases")
    presets = {}
    for name, entry in raw.items():
        values: dict[str, Any] = {"name": name, "source": entry.pop("source")}
        for key, value in entry.items():
            for suffix, field_suffix, unit in _UNITS:
                if key.endswith(suffix):
                    values[key.removesuffix(suffix) + field_suffix] = value * unit
        presets[name] = DeviceSpec(**values)
    return presets, aliases


_PRESETS, ALIASES = _load_presets()


def device_names() -> list[str]:
    return sorted(_PRESETS)


def get_device(name: str) -> DeviceSpec:
    """Look up a preset by name (case-insensitive; a few common aliases accepted)."""
    key = ALIASES.get(name.lower(), name.lower())
    if key not in _PRESETS:
        raise MemtrainError(f"unknown hardware {name!r}; presets: {', '.join(device_names())}")
    return _PRESETS[key]
