"""Per-layer memory and time of one training step (dry run on meta tensors, or measured)."""

from memtrain.optim.memory import (
    OptimizerSpec,
    optimizer_names,
    parse_optimizer_spec,
    register_state_formula,
    state_bytes_for,
)
from memtrain.profile.profiler import (
    default_loss,
    layers_from_patterns,
    profile_causal_lm,
    profile_model,
)
from memtrain.profile.result import LayerProfile, ProfileResult, SavedTensor, TimelinePoint

__all__ = [
    "LayerProfile",
    "OptimizerSpec",
    "ProfileResult",
    "SavedTensor",
    "TimelinePoint",
    "default_loss",
    "layers_from_patterns",
    "optimizer_names",
    "parse_optimizer_spec",
    "profile_causal_lm",
    "profile_model",
    "register_state_formula",
    "state_bytes_for",
]
