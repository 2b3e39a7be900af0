"""memtrain.offload: execute a plan on an unmodified model.

Token-wise activation swap to pinned CPU memory, CXL memory and NVMe, whole-layer and token-wise
(MEMO) recompute, sequence-tiled token-local work, and optimizer states off the GPU (our own CPU
step, a generated DeepSpeed ZeRO-Offload/Infinity config, or FSDP2's per-block CPU offload).
"""

from memtrain.offload.apply import OffloadHandle, apply, offloaded
from memtrain.offload.deepspeed import deepspeed_config
from memtrain.offload.fsdp import shard_as_planned
from memtrain.offload.optimizer import OffloadedOptimizer, offload_optimizer
from memtrain.offload.policy import LayerPolicy, OffloadPolicy, policy_from_plan
from memtrain.offload.pool import HostPool

__all__ = [
    "HostPool",
    "LayerPolicy",
    "OffloadHandle",
    "OffloadPolicy",
    "OffloadedOptimizer",
    "apply",
    "deepspeed_config",
    "offload_optimizer",
    "offloaded",
    "policy_from_plan",
    "shard_as_planned",
]
