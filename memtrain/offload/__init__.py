"""memtrain.offload: execute a plan on an unmodified model.

Token-wise activation swap to pinned CPU memory, CXL memory and NVMe, whole-layer and token-wise
(MEMO) recompute, sequence-tiled token-local work, and optimizer states off the GPU.
"""

from memtrain.offload.apply import OffloadHandle, apply, offloaded
from memtrain.offload.policy import LayerPolicy, OffloadPolicy, policy_from_plan
from memtrain.offload.pool import HostPool

__all__ = [
    "HostPool",
    "LayerPolicy",
    "OffloadHandle",
    "OffloadPolicy",
    "apply",
    "offloaded",
    "policy_from_plan",
]
