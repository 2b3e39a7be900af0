"""Accelerator presets: memory, compute rate and bandwidths, each with its source.

The profiler turns FLOP counts into times with these rates; the planner also reads the host-link
figures. Datasheet peaks are what vendors publish; ``achievable_*`` are what a large bf16 matrix
product or device copy reaches in practice, measured where noted, which is what times should use.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

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


_PRESETS: dict[str, DeviceSpec] = {
    spec.name: spec
    for spec in [
        DeviceSpec(
            name="h100-sxm-80g",
            memory_bytes=80 * GB,
            peak_bf16_flops=989 * TFLOPS,
            achievable_bf16_flops=790 * TFLOPS,
            peak_fp32_flops=67 * TFLOPS,
            hbm_bandwidth=3350 * GB,
            achievable_hbm_bandwidth=3000 * GB,
            host_to_device=55 * GB,
            device_to_host=55 * GB,
            host_link_duplex=90 * GB,
            pageable_host_link=17 * GB,
            interconnect_bandwidth=300 * GB,  # NVLink 4: 450 GB/s each way; all-to-all reaches less
            source=(
                "NVIDIA H100 datasheet (SXM5: 989 TFLOP/s dense bf16, 3.35 TB/s HBM3, 80 GB, "
                "PCIe Gen5 x16); achievable matmul 790 TFLOP/s, copy 3.0 TB/s and host link "
                "55 GB/s each way, 90 GB/s both ways, 16-18 GB/s pageable measured on an H100 80GB HBM3"
            ),
        ),
        DeviceSpec(
            name="h200",
            memory_bytes=141 * GB,
            peak_bf16_flops=989 * TFLOPS,
            achievable_bf16_flops=790 * TFLOPS,
            peak_fp32_flops=67 * TFLOPS,
            hbm_bandwidth=4800 * GB,
            achievable_hbm_bandwidth=4300 * GB,
            host_to_device=55 * GB,
            device_to_host=55 * GB,
            host_link_duplex=90 * GB,
            pageable_host_link=17 * GB,
            interconnect_bandwidth=300 * GB,  # NVLink 4, as on the H100 SXM
            source=(
                "NVIDIA H200 datasheet (SXM: 989 TFLOP/s dense bf16, 4.8 TB/s HBM3e, 141 GB, "
                "PCIe Gen5 x16); matmul 788 TFLOP/s and copy 4.3 TB/s measured on an H200; host "
                "link assumed as on the H100 (same PCIe Gen5 x16)"
            ),
        ),
        DeviceSpec(
            name="a100-80g",
            memory_bytes=80 * GB,
            peak_bf16_flops=312 * TFLOPS,
            achievable_bf16_flops=250 * TFLOPS,
            peak_fp32_flops=19.5 * TFLOPS,
            hbm_bandwidth=2039 * GB,
            achievable_hbm_bandwidth=1800 * GB,
            host_to_device=25 * GB,
            device_to_host=25 * GB,
            host_link_duplex=40 * GB,
            pageable_host_link=10 * GB,
            interconnect_bandwidth=200 * GB,  # NVLink 3: 300 GB/s each way
            source=(
                "NVIDIA A100 datasheet (SXM 80GB: 312 TFLOP/s dense bf16, 2.039 TB/s HBM2e, "
                "PCIe Gen4 x16 = 32 GB/s theoretical); achievable figures are typical, not measured here"
            ),
        ),
        DeviceSpec(
            name="a100-40g",
            memory_bytes=40 * GB,
            peak_bf16_flops=312 * TFLOPS,
            achievable_bf16_flops=250 * TFLOPS,
            peak_fp32_flops=19.5 * TFLOPS,
            hbm_bandwidth=1555 * GB,
            achievable_hbm_bandwidth=1400 * GB,
            host_to_device=25 * GB,
            device_to_host=25 * GB,
            host_link_duplex=40 * GB,
            pageable_host_link=10 * GB,
            interconnect_bandwidth=200 * GB,  # NVLink 3: 300 GB/s each way
            source=(
                "NVIDIA A100 datasheet (40GB: 312 TFLOP/s dense bf16, 1.555 TB/s HBM2, "
                "PCIe Gen4 x16); achievable figures are typical, not measured here"
            ),
        ),
        DeviceSpec(
            name="rtx-4090",
            memory_bytes=24 * GB,
            peak_bf16_flops=165.2 * TFLOPS,
            achievable_bf16_flops=150 * TFLOPS,
            peak_fp32_flops=82.6 * TFLOPS,
            hbm_bandwidth=1008 * GB,
            achievable_hbm_bandwidth=900 * GB,
            host_to_device=25 * GB,
            device_to_host=25 * GB,
            host_link_duplex=40 * GB,
            pageable_host_link=10 * GB,
            source=(
                "NVIDIA Ada Lovelace architecture whitepaper (RTX 4090: 165.2 TFLOP/s dense fp16/bf16 "
                "tensor, 82.6 TFLOP/s fp32, 1008 GB/s GDDR6X, 24 GB, PCIe Gen4 x16)"
            ),
        ),
        DeviceSpec(
            name="l4",
            memory_bytes=24 * GB,
            peak_bf16_flops=121 * TFLOPS,
            achievable_bf16_flops=100 * TFLOPS,
            peak_fp32_flops=30.3 * TFLOPS,
            hbm_bandwidth=300 * GB,
            achievable_hbm_bandwidth=270 * GB,
            host_to_device=25 * GB,
            device_to_host=25 * GB,
            host_link_duplex=40 * GB,
            pageable_host_link=10 * GB,
            source=(
                "NVIDIA L4 datasheet (121 TFLOP/s dense bf16, 30.3 TFLOP/s fp32, 300 GB/s GDDR6, "
                "24 GB, PCIe Gen4 x16)"
            ),
        ),
        DeviceSpec(
            name="cpu",
            memory_bytes=0,
            peak_bf16_flops=1 * TFLOPS,
            achievable_bf16_flops=0.2 * TFLOPS,
            peak_fp32_flops=1 * TFLOPS,
            hbm_bandwidth=50 * GB,
            achievable_hbm_bandwidth=20 * GB,
            host_to_device=float("inf"),
            device_to_host=float("inf"),
            host_link_duplex=float("inf"),
            pageable_host_link=float("inf"),
            source="a rough figure for a small server CPU; measured runs on the CPU use real times",
        ),
    ]
}

ALIASES = {
    "h100": "h100-sxm-80g",
    "h100-80g": "h100-sxm-80g",
    "a100": "a100-80g",
    "4090": "rtx-4090",
}


def device_names() -> list[str]:
    return sorted(_PRESETS)


def get_device(name: str) -> DeviceSpec:
    """Look up a preset by name (case-insensitive; a few common aliases accepted)."""
    key = ALIASES.get(name.lower(), name.lower())
    if key not in _PRESETS:
        raise MemtrainError(f"unknown hardware {name!r}; presets: {', '.join(device_names())}")
    return _PRESETS[key]
