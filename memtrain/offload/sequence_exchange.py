"""Ulysses' head/token exchange for the attention calls memtrain makes itself.

Under DeepSpeed's Ulysses each of a sequence group's ``K`` ranks holds ``L`` consecutive tokens
(rank ``r``: ``[r L, (r+1) L)``, memtrain.train.sequence_parallel.UlyssesSP.shard), and the
model's attention runs on all tokens of ``heads / K`` heads between two all-to-alls. Token-wise
recompute calls the attention kernels itself (memtrain.offload.memo), so it makes the same
exchange around them with DeepSpeed's all-to-all (``single_all_to_all``): q, k and v go from
``(batch, heads, L, dim)`` to ``(batch, heads / K, K L, dim)``, and the output and the
gradients come back. Rank ``r`` takes the ``r``-th block of heads, so each query head keeps
its key/value head when the kv heads split evenly over the ranks.
"""

from __future__ import annotations

from typing import Any

import torch

from memtrain.errors import ConfigError


class HeadExchange:
    """The all-to-alls of one sequence-parallel group (``group``, ``degree`` ranks)."""

    def __init__(self, group: Any, degree: int) -> None:
        self.group = group
        self.degree = degree

    def check_heads(self, heads: int, kv_heads: int, name: str) -> None:
        """Heads that do not split evenly over the ranks are refused in one line."""
        if heads % self.degree or kv_heads % self.degree:
            raise ConfigError(
                f"layer {name}: token-wise recompute under sequence parallelism "
                f"{self.degree} needs the {heads} attention heads and {kv_heads} key/value "
                "heads to split evenly over the ranks; give the plan more GPU memory "
                "(plan.gpu_budget) or set plan.enabled=false"
            )

    def to_heads(self, x: torch.Tensor) -> torch.Tensor:
        """``(batch, heads, L, dim)`` on each rank -> ``(batch, heads / K, K L, dim)``."""
        from deepspeed.sequence.layer import single_all_to_all

        y = single_all_to_all(x.transpose(1, 2).contiguous(), 2, 1, 0, self.group)
        return y.transpose(1, 2)

    def to_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """``(batch, heads / K, K L, dim)`` -> ``(batch, heads, L, dim)`` on each rank."""
        from deepspeed.sequence.layer import single_all_to_all

        y = single_all_to_all(x.transpose(1, 2).contiguous(), 1, 2, 0, self.group)
        return y.transpose(1, 2)
