"""Memory-lean optimizers: GaLore (low-rank projected Adam/Adafactor), Natural GaLore, APOLLO,
COSMOS, FRUGAL (gradient splitting) and 8-bit AdamW, stepping inside backward, a factory that builds any optimizer from a spec, and
:mod:`memtrain.optim.memory`, the bytes every optimizer keeps and allocates.

Public names are imported on first use, so the profiler and planner read
``memtrain.optim.memory`` without loading the optimizers.
"""

from __future__ import annotations

import importlib
from typing import Any

# public name -> submodule that defines it
_EXPORTS: dict[str, str] = {
    "APOLLO": "apollo",
    "AdamW8bit": "adamw8bit",
    "COSMOS": "cosmos",
    "FRUGAL": "frugal",
    "NaturalGaLore": "natural_galore",
    "GaLoreAdafactor": "galore_adafactor",
    "GaLoreAdamW": "galore_adamw",
    "StepInBackward": "step_in_backward",
    "build_optimizer": "factory",
    "captured_energy": "subspace",
    "lowrank_targets": "lowrank",
    "param_state_specs": "memory",
    "predicted_state_bytes": "memory",
    "register_step_in_backward": "step_in_backward",
    "subspace_iteration": "subspace",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'memtrain.optim' has no attribute {name!r}")
    return getattr(importlib.import_module(f"memtrain.optim.{module}"), name)
