"""memtrain.kernels: fused GPU kernels that cut activation memory (Triton, with torch fallbacks)."""

from memtrain.kernels.linear_cross_entropy import (
    default_filter_eps,
    linear_cross_entropy,
    reference_linear_cross_entropy,
    triton_available,
)

__all__ = [
    "default_filter_eps",
    "linear_cross_entropy",
    "reference_linear_cross_entropy",
    "triton_available",
]
