"""What the executor can run for a decoder block: the one place both sides read it.

Token-wise (MEMO) recompute and tiled whole-layer recompute call a block's parts as token-local
functions (memtrain.offload.memo), so they run only on decoder layers a block adapter describes
(memtrain.models.adapters). The profiler records these answers per layer and the planner offers
those modes only where they are true; the executor checks the same functions before it installs
them, so a plan never asks for what its executor refuses. Any other block still gets keep,
swap and whole-layer recompute (the generic path).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from torch import nn

from memtrain.models.adapters import adapt, adapter_problem, is_norm_module, token_local_module


def tokenwise_problem(layer: nn.Module, name: str = "") -> str | None:
    """Why token-wise recompute cannot run decoder layer ``layer`` (None: it can)."""
    problem = adapter_problem(layer)
    if problem:
        return (
            f"layer {name}: token-wise recompute cannot run {type(layer).__name__} ({problem}); "
            "plan whole-layer recompute for it instead"
        )
    return None


def tokenwise_modules_problem(modules: Sequence[nn.Module], name: str = "") -> str | None:
    """Why token-wise recompute cannot run a layer made of ``modules`` (None: it can)."""
    if len(modules) != 1:
        return f"layer {name}: token-wise recompute needs one module"
    return tokenwise_problem(modules[0], name)


def tiling_problem(modules: Sequence[nn.Module], chunks: int, name: str = "") -> str | None:
    """Why a layer made of ``modules`` cannot run its token-local work in ``chunks`` sequence
    chunks (None: it can): chunks cut the block's MLP (or mixture of experts), or a final
    norm (memtrain.offload.tiled)."""
    if (
        chunks > 1
        and not any(token_local_module(m) is not None for m in modules)
        and not (norm_tiling(modules))
    ):
        return (
            f"layer {name}: the plan tiles it into {chunks} chunks but it has no MLP "
            "submodule to tile"
        )
    return None


def norm_tiling(modules: Sequence[nn.Module]) -> bool:
    """Whether the layer is one normalization module, run in sequence chunks with only its
    input saved (memtrain.offload.tiled)."""
    return len(modules) == 1 and is_norm_module(modules[0])


@dataclass(frozen=True)
class BlockCapabilities:
    """What the executor can run for one layer beyond keep, swap and whole-layer recompute.

    ``tokenwise``: a share of the tokens recomputed (token-wise recompute), so recompute shares
    strictly between 0 and 1. ``tiling``: token-local work in sequence chunks, priced as the
    planner prices a tiled block (tiled recompute runs the whole block token-wise).
    ``window``: the block's attention window (None: full causal attention), which decides
    whether attention's backward runs in query chunks (:meth:`query_chunked`)."""

    tokenwise: bool
    tiling: bool
    window: int | None = None

    def query_chunked(self, seq: int) -> bool:
        """Whether token-wise and tiled recompute take this block's attention backward in query
        chunks at ``seq`` tokens (memtrain.offload.memo): everywhere but a sliding window
        shorter than the sequence, which runs flash attention's own whole-sequence kernel."""
        return self.tokenwise and (self.window is None or self.window >= seq)


def block_capabilities(modules: Sequence[nn.Module]) -> BlockCapabilities:
    """The executor's capabilities for a layer made of ``modules``."""
    tokenwise = tokenwise_modules_problem(modules) is None
    window = adapt(modules[0]).spec.window if tokenwise else None
    tiling = (tokenwise and tiling_problem(modules, 2) is None) or norm_tiling(modules)
    return BlockCapabilities(tokenwise, tiling, window)
