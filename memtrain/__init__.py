"""memtrain: train large PyTorch models in less GPU memory.

profile -> plan -> execute. Public names are re-exported here and imported lazily, so
``import memtrain`` stays fast and does not pull in transformers or the solver.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS: dict[str, str] = {
    "MemtrainError": "memtrain.errors",
    "ProfileResult": "memtrain.profile",
    "LayerProfile": "memtrain.profile",
    "profile_model": "memtrain.profile",
    "profile_causal_lm": "memtrain.profile",
    "register_state_formula": "memtrain.optim.memory",
    "build_causal_lm": "memtrain.models",
    "load_config": "memtrain.models",
    "get_device": "memtrain.hardware",
    "HardwareModel": "memtrain.hardware",
    "build_hardware": "memtrain.hardware",
    "load_hardware": "memtrain.hardware",
    "calibrate": "memtrain.hardware",
    "HardwareRequest": "memtrain.hardware",
    "make_plan": "memtrain.planner",
    "Plan": "memtrain.planner",
    "PlanOptions": "memtrain.planner",
    "PlanInfeasible": "memtrain.planner",
    "PlanRequest": "memtrain.planner.pipeline",
    "plan_model": "memtrain.planner.pipeline",
    "write_plan_plot": "memtrain.planner.plot",
    "GaLoreAdamW": "memtrain.optim",
    "GaLoreAdafactor": "memtrain.optim",
    "FRUGAL": "memtrain.optim",
    "build_optimizer": "memtrain.optim",
    "register_step_in_backward": "memtrain.optim",
    "linear_cross_entropy": "memtrain.kernels",
    "patch_causal_lm_loss": "memtrain.kernels",
    "apply": "memtrain.offload",
    "offloaded": "memtrain.offload",
    "LayerPolicy": "memtrain.offload",
    "OffloadPolicy": "memtrain.offload",
    "offload_optimizer": "memtrain.offload",
    "deepspeed_config": "memtrain.offload",
    "prepare": "memtrain.train",
    "Prepared": "memtrain.train",
    "run_recipe": "memtrain.train",
    "load_recipe": "memtrain.train",
    "planned_trainer": "memtrain.train.hf",
    "MemtrainCallback": "memtrain.train.hf",
    "Parallelism": "memtrain.planner.distributed",
    "per_rank_profile": "memtrain.planner.distributed",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'memtrain' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
