"""Block adapters: one small class per decoder family says what its block is made of.

Token-wise (MEMO) recompute and tiled recompute run a decoder block as token-local pieces around
one attention call: ``qkv`` (norms, projections, q/k norms, rotary embedding) before it and
``post`` (output projection, residuals, norms, MLP or MoE experts) after it. The stock forward
cannot be cut there, so each family's adapter spells the pieces out from the block's own
submodules; ``attention`` says what the attention call is (heads, scale, sliding window, logit
softcap). A block whose class has no adapter runs the generic whole-layer modes only.

Register an adapter for a new family with :func:`register_adapter`.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

MLP_NAMES = ("mlp", "block_sparse_moe", "feed_forward")


def is_norm_module(module: nn.Module) -> bool:
    """A normalization over the hidden dimension (LayerNorm, RMSNorm and their family
    variants): per-token work, so it runs on any token range."""
    if isinstance(module, nn.LayerNorm | nn.RMSNorm):
        return True
    name = type(module).__name__.lower()
    return name.endswith(("rmsnorm", "layernorm")) and not any(True for _ in module.children())


def token_local_module(layer: nn.Module) -> nn.Module | None:
    """The block's MLP or mixture of experts: per-token work, so it runs on any token range."""
    return next(
        (m for m in (getattr(layer, n, None) for n in MLP_NAMES) if isinstance(m, nn.Module)),
        None,
    )


@dataclass(frozen=True)
class AttentionSpec:
    """The attention call between a block's token-local pieces (always causal).

    ``window``: a key at most ``window - 1`` positions behind its query is seen (Hugging Face's
    sliding window), None for full causal attention; ``softcap``: scores pass through
    ``softcap * tanh(score / softcap)`` before the softmax."""

    heads: int
    kv_heads: int
    head_dim: int
    scale: float
    window: int | None = None
    softcap: float | None = None

    @property
    def groups(self) -> int:
        return self.heads // self.kv_heads


class BlockAdapter:
    """A decoder block as token-local functions of token ranges (the Llama layout).

    Subclasses override only what their family does differently."""

    family: ClassVar[str] = "llama"
    block_types: ClassVar[tuple[str, ...]] = ()
    attention_name: ClassVar[str] = "self_attn"
    parts: ClassVar[tuple[str, ...]] = ("input_layernorm", "post_attention_layernorm")
    attention_parts: ClassVar[tuple[str, ...]] = ("q_proj", "k_proj", "v_proj", "o_proj")

    def __init__(self, layer: nn.Module) -> None:
        self.layer = layer
        self.attn = getattr(layer, self.attention_name)
        self.mlp = token_local_module(layer)
        module = sys.modules[type(self.attn).__module__]
        self.rope: Callable = module.apply_rotary_pos_emb
        self.spec = self.attention_spec()

    # -- what the executor checks ---------------------------------------------------------
    @classmethod
    def problem(cls, layer: nn.Module) -> str | None:
        """Why this adapter cannot run ``layer`` (None: it can)."""
        attn = getattr(layer, cls.attention_name, None)
        missing = [n for n in cls.parts if not hasattr(layer, n)]
        if token_local_module(layer) is None:
            missing.append("mlp")
        missing += [
            f"{cls.attention_name}.{n}" for n in cls.attention_parts if not hasattr(attn, n)
        ]
        if attn is None or missing:
            return f"its {cls.family} block lacks {', '.join(missing) or cls.attention_name}"
        if getattr(attn, "attention_dropout", 0.0):  # a config value: in eval mode too, since
            # the block may be planned before model.train()
            return "attention dropout is on"
        if getattr(attn, "is_causal", True) is False:
            return "its attention is bidirectional"
        return None

    def attention_spec(self) -> AttentionSpec:
        attn = self.attn
        config = getattr(attn, "config", None)
        if hasattr(attn, "sliding_window"):
            window = attn.sliding_window
        else:
            window = getattr(config, "sliding_window", None)
        if not getattr(config, "use_sliding_window", True):
            window = None
        heads = config.num_attention_heads
        return AttentionSpec(
            heads=heads,
            kv_heads=getattr(config, "num_key_value_heads", None) or heads,
            head_dim=self.head_dim(),
            scale=float(attn.scaling),
            window=window,
            softcap=getattr(attn, "attn_logit_softcapping", None),
        )

    def head_dim(self) -> int:
        return self.attn.head_dim

    # -- the block, token-local -----------------------------------------------------------
    def heads(self, x: torch.Tensor) -> torch.Tensor:
        """(batch, tokens, heads * dim) -> (batch, heads, tokens, dim)."""
        return x.view(*x.shape[:2], -1, self.spec.head_dim).transpose(1, 2)

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k, v of normed hidden states ``x``, each (batch, heads, tokens, dim)."""
        attn = self.attn
        q, k = self.heads(attn.q_proj(x)), self.heads(attn.k_proj(x))
        if hasattr(attn, "q_norm"):  # per-head q/k norms (Qwen3, Gemma 3)
            q, k = attn.q_norm(q), attn.k_norm(k)
        return q, k, self.heads(attn.v_proj(x))

    def qkv(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        q, k, v = self.project(self.layer.input_layernorm(h))
        q, k = self.rope(q, k, cos, sin)
        return q, k, v

    def attention_output(self, a: torch.Tensor) -> torch.Tensor:
        return self.attn.o_proj(a)

    def post(self, h: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        scale = getattr(self.layer, "residual_multiplier", 1.0)
        h2 = h + self.attention_output(a) * scale if scale != 1.0 else h + self.attention_output(a)
        out = self.mlp(self.layer.post_attention_layernorm(h2))
        return h2 + out * scale if scale != 1.0 else h2 + out


class LlamaAdapter(BlockAdapter):
    """Pre-norm blocks with separate q/k/v projections: Llama, Mistral, Mixtral, Qwen2, Qwen3
    and Qwen3-MoE (per-head q/k norms), Granite and GraniteMoE (residual multiplier)."""

    block_types = (
        "LlamaDecoderLayer",
        "MistralDecoderLayer",
        "MixtralDecoderLayer",
        "Qwen2DecoderLayer",
        "Qwen3DecoderLayer",
        "Qwen3MoeDecoderLayer",
        "GraniteDecoderLayer",
        "GraniteMoeDecoderLayer",
    )


class Starcoder2Adapter(BlockAdapter):
    """Llama layout with LayerNorms, biases and a residual dropout after the output projection."""

    family = "starcoder2"
    block_types = ("Starcoder2DecoderLayer",)

    def attention_output(self, a: torch.Tensor) -> torch.Tensor:
        attn = self.attn
        out = attn.o_proj(a)
        return nn.functional.dropout(out, p=attn.residual_dropout, training=attn.training)


class Phi3Adapter(BlockAdapter):
    """One fused q/k/v projection; residual dropouts around attention and MLP."""

    family = "phi3"
    block_types = ("Phi3DecoderLayer",)
    attention_parts = ("qkv_proj", "o_proj")

    def project(self, x):
        spec = self.spec
        qkv = self.attn.qkv_proj(x)
        q_size, kv_size = spec.heads * spec.head_dim, spec.kv_heads * spec.head_dim
        q, k, v = qkv.split([q_size, kv_size, kv_size], dim=-1)
        return self.heads(q), self.heads(k), self.heads(v)

    def post(self, h, a):
        layer = self.layer
        h2 = h + layer.resid_attn_dropout(self.attn.o_proj(a))
        return h2 + layer.resid_mlp_dropout(self.mlp(layer.post_attention_layernorm(h2)))


class Olmo2Adapter(BlockAdapter):
    """No input norm; q/k norms over the whole projection; norms after attention and MLP."""

    family = "olmo2"
    block_types = ("Olmo2DecoderLayer",)
    parts = ("post_attention_layernorm", "post_feedforward_layernorm")

    def qkv(self, h, cos, sin):
        attn = self.attn
        q = self.heads(attn.q_norm(attn.q_proj(h)))
        k = self.heads(attn.k_norm(attn.k_proj(h)))
        q, k = self.rope(q, k, cos, sin)
        return q, k, self.heads(attn.v_proj(h))

    def post(self, h, a):
        layer = self.layer
        h2 = h + layer.post_attention_layernorm(self.attn.o_proj(a))
        return h2 + layer.post_feedforward_layernorm(self.mlp(h2))


class GemmaAdapter(BlockAdapter):
    """Gemma 2 and Gemma 3: norms before and after attention and MLP; Gemma 2 softcaps the
    attention scores, Gemma 3 norms q and k per head; sliding-window layers alternate."""

    family = "gemma"
    block_types = ("Gemma2DecoderLayer", "Gemma3DecoderLayer")
    parts = (
        "input_layernorm",
        "post_attention_layernorm",
        "pre_feedforward_layernorm",
        "post_feedforward_layernorm",
    )

    def post(self, h, a):
        layer = self.layer
        h2 = h + layer.post_attention_layernorm(self.attn.o_proj(a))
        out = layer.post_feedforward_layernorm(self.mlp(layer.pre_feedforward_layernorm(h2)))
        return h2 + out


class GPTNeoXAdapter(BlockAdapter):
    """Fused q/k/v interleaved per head, partial rotary, parallel or sequential residual."""

    family = "gpt_neox"
    block_types = ("GPTNeoXLayer",)
    attention_name = "attention"
    attention_parts = ("query_key_value", "dense")

    def head_dim(self) -> int:
        return self.attn.head_size

    def qkv(self, h, cos, sin):
        x = self.layer.input_layernorm(h)
        dim = self.spec.head_dim
        qkv = self.attn.query_key_value(x).view(*x.shape[:2], -1, 3 * dim).transpose(1, 2)
        q, k, v = qkv.chunk(3, dim=-1)
        q, k = self.rope(q, k, cos, sin)
        return q, k, v

    def post(self, h, a):
        layer = self.layer
        attn_out = layer.post_attention_dropout(self.attn.dense(a))
        if layer.use_parallel_residual:
            mlp_out = layer.post_mlp_dropout(self.mlp(layer.post_attention_layernorm(h)))
            return mlp_out + attn_out + h
        h2 = attn_out + h
        return layer.post_mlp_dropout(self.mlp(layer.post_attention_layernorm(h2))) + h2


ADAPTERS: list[type[BlockAdapter]] = [
    LlamaAdapter,
    Starcoder2Adapter,
    Phi3Adapter,
    Olmo2Adapter,
    GemmaAdapter,
    GPTNeoXAdapter,
]


def register_adapter(adapter: type[BlockAdapter]) -> type[BlockAdapter]:
    """Teach the executor a new decoder block (usable as a class decorator); it is consulted
    before the built-in adapters."""
    ADAPTERS.insert(0, adapter)
    return adapter


def adapter_class(layer: nn.Module) -> type[BlockAdapter] | None:
    """The adapter for ``layer``'s block type, None for a block without one."""
    kind = type(layer).__name__
    return next((a for a in ADAPTERS if kind in a.block_types), None)


def adapter_problem(layer: nn.Module) -> str | None:
    """Why no adapter can run ``layer`` token-wise (None: one can)."""
    adapter = adapter_class(layer)
    if adapter is None:
        return f"no block adapter knows {type(layer).__name__}"
    return adapter.problem(layer)


def adapt(layer: nn.Module) -> BlockAdapter:
    adapter = adapter_class(layer)
    assert adapter is not None, type(layer).__name__
    return adapter(layer)


def adapted_families() -> list[str]:
    """Block class names with an adapter (for messages and docs)."""
    return [kind for adapter in ADAPTERS for kind in adapter.block_types]
