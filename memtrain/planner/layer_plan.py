"""``LayerPlan``: one layer's decisions, ``Plan.layers[i]`` (its dict: docs/plan-format.md)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from memtrain.errors import ConfigError


@dataclass
class LayerPlan:
    name: str
    kind: str
    keep: float  # share of the token-dim saved bytes kept on the GPU
    swap: dict[str, float]  # share swapped to each host tier
    recompute: float  # share recomputed
    full_recompute: bool
    input_checkpoint: dict[str, float]  # where the input of recomputed tokens is stored
    chunks: int
    params: str
    grads: str
    optimizer: str
    token_saved_bytes: int
    input_checkpoint_bytes: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LayerPlan:
        try:
            return cls(**data)
        except TypeError as exc:
            name = data.get("name") if isinstance(data, Mapping) else None
            raise ConfigError(f"plan layer {name!r}: missing or unknown fields ({exc})") from None
