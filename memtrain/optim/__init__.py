"""Memory-lean optimizers: GaLore (low-rank projected Adam/Adafactor) and FRUGAL (gradient
splitting), stepping inside backward, and a factory that builds any optimizer from a spec.

Importing this package registers the state-byte formulas ``galore``, ``galore-adafactor`` and
``frugal`` with :mod:`memtrain.profile.optimizer_state`.
"""

from memtrain.optim.factory import (
    build_optimizer,
    lowrank_targets,
    param_state_specs,
    predicted_state_bytes,
)
from memtrain.optim.frugal import FRUGAL
from memtrain.optim.galore_adafactor import GaLoreAdafactor
from memtrain.optim.galore_adamw import GaLoreAdamW
from memtrain.optim.state_formulas import register_formulas
from memtrain.optim.step_in_backward import StepInBackward, register_step_in_backward
from memtrain.optim.subspace import captured_energy, subspace_iteration

register_formulas()

__all__ = [
    "FRUGAL",
    "GaLoreAdafactor",
    "GaLoreAdamW",
    "StepInBackward",
    "build_optimizer",
    "captured_energy",
    "lowrank_targets",
    "param_state_specs",
    "predicted_state_bytes",
    "register_step_in_backward",
    "subspace_iteration",
]
