"""What the executor can run for a decoder block: the one place both sides read it.

Token-wise (MEMO) recompute and tiled whole-layer recompute call a block's parts as token-local
functions (memtrain.offload.memo), so they run only on decoder layers whose parts they know: the
Llama family (Llama, Qwen2, Mistral) without q/k norms. The profiler records these answers per
layer and the planner offers those modes only where they are true; the executor checks the same
functions before it installs them, so a plan never asks for what its executor refuses.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from torch import nn

TOKENWISE_BLOCKS = ("LlamaDecoderLayer", "Qwen2DecoderLayer", "MistralDecoderLayer")
BLOCK_PARTS = ("input_layernorm", "post_attention_layernorm", "mlp")
ATTENTION_PARTS = ("q_proj", "k_proj", "v_proj", "o_proj")


def tokenwise_problem(layer: nn.Module, name: str = "") -> str | None:
    """Why token-wise recompute cannot run decoder layer ``layer`` (None: it can)."""
    kind = type(layer).__name__
    attn = getattr(layer, "self_attn", None)
    if (
        kind not in TOKENWISE_BLOCKS
        or attn is None
        or any(not hasattr(layer, n) for n in BLOCK_PARTS)
        or any(not hasattr(attn, n) for n in ATTENTION_PARTS)
    ):
        return (
            f"layer {name}: token-wise recompute supports {', '.join(TOKENWISE_BLOCKS)} "
            f"(got {kind}); plan whole-layer recompute for it instead"
        )
    if hasattr(attn, "q_norm") or hasattr(attn, "k_norm"):
        return f"layer {name}: attention with q/k norms is not supported"
    return None


def tokenwise_modules_problem(modules: Sequence[nn.Module], name: str = "") -> str | None:
    """Why token-wise recompute cannot run a layer made of ``modules`` (None: it can)."""
    if len(modules) != 1:
        return f"layer {name}: token-wise recompute needs one module"
    return tokenwise_problem(modules[0], name)


def tiling_problem(modules: Sequence[nn.Module], chunks: int, name: str = "") -> str | None:
    """Why a layer made of ``modules`` cannot run its token-local work in ``chunks`` sequence
    chunks (None: it can): chunks cut the ``.mlp`` submodule."""
    if chunks > 1 and not any(isinstance(getattr(m, "mlp", None), nn.Module) for m in modules):
        return (
            f"layer {name}: the plan tiles it into {chunks} chunks but it has no .mlp "
            "submodule to tile"
        )
    return None


@dataclass(frozen=True)
class BlockCapabilities:
    """What the executor can run for one layer beyond keep, swap and whole-layer recompute.

    ``tokenwise``: a share of the tokens recomputed (token-wise recompute), so recompute shares
    strictly between 0 and 1. ``tiling``: token-local work in sequence chunks, priced as the
    planner prices a tiled block (tiled recompute runs the whole block token-wise)."""

    tokenwise: bool
    tiling: bool


def block_capabilities(modules: Sequence[nn.Module]) -> BlockCapabilities:
    """The executor's capabilities for a layer made of ``modules``."""
    tokenwise = tokenwise_modules_problem(modules) is None
    return BlockCapabilities(tokenwise, tokenwise and tiling_problem(modules, 2) is None)
