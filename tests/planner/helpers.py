"""Small planner instances with known numbers, built directly in the planner's terms."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from memtrain.hardware.devices import get_device
from memtrain.hardware.tiers import HardwareModel, MemoryTier
from memtrain.planner.problem import LayerCosts, PlanProblem
from tests.tiny_models import tiny_config, write_tiny_config

GB = 10**9
# A two-layer Llama config (untied head) for planner tests that profile a real model.
TINY_LLAMA = tiny_config("llama", tie_word_embeddings=False)


def write_tiny_llama(directory: Path) -> str:
    """TINY_LLAMA as a config.json in ``directory``; its path (what load_config reads)."""
    return write_tiny_config(directory, "llama", tie_word_embeddings=False)


def block(
    name: str,
    *,
    anchor: float = 1 * GB,
    rest: float = 8 * GB,
    checkpoint: float = 0.0,
    fwd: float = 0.1,
    bwd: float = 0.2,
    params: float = 0.0,
    transient: float = 0.0,
    tileable: float = 0.0,
) -> LayerCosts:
    return LayerCosts(
        name=name,
        kind="block",
        anchor_bytes=anchor,
        recomputable_bytes=rest,
        fixed_bytes=0.0,
        checkpoint_bytes=checkpoint,
        tileable_fraction=tileable,
        forward_transient=transient,
        backward_transient=transient,
        output_bytes=0.0,
        forward_time=fwd,
        backward_time=bwd,
        recompute_time=fwd,
        param_bytes=params,
        grad_bytes=params,
        state_bytes=2 * params,
    )


def problem(layers: list[LayerCosts]) -> PlanProblem:
    return PlanProblem(layers=layers, tokens=1000, fused_loss=False)


def machine(
    gpu: float,
    cpu: float | None = 1000 * GB,
    link: float = 50 * GB,
    duplex: float | None = None,
    cxl: float | None = None,
) -> HardwareModel:
    """A GPU with exactly ``gpu`` usable bytes (no margin, no reserve) and the given host."""
    tiers = {"gpu": MemoryTier("gpu", int(gpu), 3000 * GB, 3000 * GB)}
    if cpu:
        tiers["cpu"] = MemoryTier("cpu", int(cpu), 200 * GB, 200 * GB)
    if cxl:
        tiers["cxl"] = MemoryTier("cxl", int(cxl), 20 * GB, 20 * GB)
    return HardwareModel(
        device=get_device("h100-sxm-80g"),
        tiers=tiers,
        host_to_device=link,
        device_to_host=link,
        host_link_duplex=duplex if duplex is not None else 2 * link,
        allocator_margin=0.0,
        gpu_reserved_bytes=0,
    )


def with_gpu(hardware: HardwareModel, gpu: float) -> HardwareModel:
    return replace(
        hardware,
        tiers={**hardware.tiers, "gpu": replace(hardware.tiers["gpu"], capacity_bytes=int(gpu))},
    )
