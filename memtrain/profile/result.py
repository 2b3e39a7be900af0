"""The profiler's result: one type for dry runs and measured runs, saved as versioned JSON.

The planner reads this file, so every field is documented and the schema carries a version.
All sizes are bytes, all times seconds, all counts per training step of one micro-batch.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from memtrain.errors import ConfigError, check_schema

SCHEMA = "memtrain.profile"
SCHEMA_VERSION = 1


# Substrings of the ATen op names of fused attention kernels (flash, cuDNN, memory-efficient,
# SDPA); the planner and the executor classify saved tensors by them alike.
ATTENTION_OP_MARKERS = ("attention", "attn", "sdpa", "flash")


def is_attention_op(op: str) -> bool:
    """Whether a saved tensor's producing op is a fused attention kernel."""
    lowered = op.lower()
    return any(marker in lowered for marker in ATTENTION_OP_MARKERS)


@dataclass
class SavedTensor:
    """One tensor kept for backward by a layer.

    ``nbytes`` is the size of its storage the first time that storage is saved; a storage saved
    again (twice, or through a view) has ``nbytes == 0`` so sums never double count.
    ``token_dim`` is the dimension that grows with the sequence (``None`` if none does).
    ``op`` names the ATen op that produced the tensor (e.g. the attention kernel for its output
    and log-sum-exp), so executors and the planner can tell which tensor is which.
    """

    shape: list[int]
    dtype: str
    nbytes: int
    token_dim: int | None
    is_layer_input: bool
    op: str


@dataclass
class LayerProfile:
    """What one layer costs in a training step."""

    name: str
    kind: str  # embedding | block | norm | head | loss | other
    param_bytes: int
    grad_bytes: int
    optimizer_state_bytes: int
    saved_bytes: int  # activations saved for backward (parameters excluded, storages once)
    saved_tensors: list[SavedTensor]
    input_bytes: int  # bytes of the layer's (first) input activation
    output_bytes: int  # bytes of the layer's (first) output activation
    forward_transient_bytes: int  # peak inside forward above what is live when forward ends
    backward_transient_bytes: int  # peak inside backward above what is live when it starts
    forward_flops: float
    backward_flops: float
    forward_time_s: float  # measured, or estimated from FLOPs and bytes on the target device
    backward_time_s: float
    param_count: int = 0
    # Forward seconds of the layer's attention kernels (part of forward_time_s): what a
    # token-wise recompute that keeps the attention output does not run again.
    attention_forward_time_s: float = 0.0
    # What the executor can run for this layer beyond keep, swap and whole-layer recompute
    # (memtrain.models.blocks): a recompute share strictly between 0 and 1 (token-wise
    # recompute), and sequence chunks (tiling). Profiles saved before these fields existed
    # read as True, which is what the planner assumed for every layer then, so their plans stay
    # as they were; the planner uses them only for "block" layers.
    tokenwise: bool = True
    tiling: bool = True
    # Token-wise and tiled recompute take attention's backward in query chunks for this block
    # (memtrain.models.blocks.BlockCapabilities.query_chunked). Older profiles read False: the
    # whole-sequence backward, priced as before.
    query_chunked: bool = False

    @property
    def token_scaled_saved_bytes(self) -> int:
        """Saved bytes that have a token dimension (what token-wise swapping can move)."""
        return sum(t.nbytes for t in self.saved_tensors if t.token_dim is not None)


@dataclass
class TimelinePoint:
    """Live device bytes at one moment of the step (for plots and the simulated peak)."""

    phase: str  # forward | backward | optimizer
    layer: str
    live_bytes: int


@dataclass
class ProfileResult:
    """A per-layer account of one training step."""

    model: str
    mode: str  # "dry-run" | "measured"
    device: str  # where it ran: meta | cpu | cuda
    target: str  # hardware preset whose rates turned FLOPs into times (or the real device)
    batch: int
    seq: int
    dtype: str
    optimizer: str
    layers: list[LayerProfile]
    param_count: int
    param_bytes: int
    grad_bytes: int
    optimizer_state_bytes: int
    saved_bytes: int
    largest_transient_bytes: int
    predicted_peak_bytes: int  # weights + grads + states + saved + largest transient
    simulated_peak_bytes: int | None  # peak of the live-bytes timeline (dry run: simulated)
    measured_peak_bytes: int | None  # torch.cuda.max_memory_allocated in a measured CUDA run
    step_time_s: float
    timeline: list[TimelinePoint] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    schema: str = SCHEMA
    schema_version: int = SCHEMA_VERSION

    def layer(self, name: str) -> LayerProfile:
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise KeyError(name)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self, path: str | Path | None = None, indent: int | None = 1) -> str:
        text = json.dumps(self.to_dict(), indent=indent)
        if path is not None:
            Path(path).write_text(text)
        return text

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ProfileResult:
        check_schema(data, SCHEMA, SCHEMA_VERSION, "profile", "memtrain profile")
        data = dict(data)
        data["layers"] = [
            LayerProfile(
                **{
                    **layer,
                    "saved_tensors": [SavedTensor(**t) for t in layer["saved_tensors"]],
                }
            )
            for layer in data["layers"]
        ]
        data["timeline"] = [TimelinePoint(**p) for p in data.get("timeline", [])]
        return cls(**data)

    @classmethod
    def from_json(cls, path_or_text: str | Path) -> ProfileResult:
        text = str(path_or_text)
        if not text.lstrip().startswith("{"):
            try:
                text = Path(path_or_text).read_text()
            except OSError as exc:
                raise ConfigError(f"{path_or_text}: cannot read profile ({exc.strerror})") from None
        try:
            return cls.from_dict(json.loads(text))
        except json.JSONDecodeError as exc:
            raise ConfigError(f"profile is not valid JSON ({exc.msg})") from None
