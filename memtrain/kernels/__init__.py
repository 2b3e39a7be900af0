"""memtrain.kernels: fused GPU kernels that cut activation memory (Triton, with torch fallbacks)."""

from memtrain.kernels.cross_entropy import (
    default_filter_eps,
    linear_cross_entropy,
    reference_linear_cross_entropy,
    triton_available,
)
from memtrain.kernels.cross_entropy.hf import (
    fused_loss_problem,
    patch_causal_lm_loss,
    unpatch_causal_lm_loss,
)

__all__ = [
    "default_filter_eps",
    "fused_loss_problem",
    "linear_cross_entropy",
    "patch_causal_lm_loss",
    "reference_linear_cross_entropy",
    "triton_available",
    "unpatch_causal_lm_loss",
]
