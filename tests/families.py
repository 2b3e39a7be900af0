"""Tiny random-weight configs of every decoder family the executor has a block adapter for,
shaped so each family's peculiarity is exercised: sliding windows shorter than the sequence,
q/k norms, softcaps, residual multipliers, fused projections, mixtures of experts with their
router's auxiliary loss on."""

from __future__ import annotations

from typing import Any

import torch

SEQ = 48  # longer than every sliding window below
VOCAB = 211
BASE: dict[str, Any] = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": VOCAB,
    "bos_token_id": 0,
    "eos_token_id": 1,
    "pad_token_id": 0,
}
WINDOW = 16
MOE = {"num_experts_per_tok": 2, "output_router_logits": True, "router_aux_loss_coef": 0.1}
LAYER_TYPES = ["sliding_attention", "full_attention"] * 2
FAMILIES: dict[str, dict[str, Any]] = {
    "llama": {"head_dim": 8},
    "mistral": {"head_dim": 8, "sliding_window": WINDOW},
    "mixtral": {"head_dim": 8, "num_local_experts": 4, "sliding_window": None, **MOE},
    "qwen2": {},
    "qwen3": {"head_dim": 8},
    "qwen3_moe": {
        "head_dim": 8, "num_experts": 4, "moe_intermediate_size": 32, "decoder_sparse_step": 1,
        **MOE,
    },
    "gemma2": {
        "head_dim": 8, "sliding_window": WINDOW, "query_pre_attn_scalar": 8,
        "attn_logit_softcapping": 5.0, "final_logit_softcapping": 3.0, "layer_types": LAYER_TYPES,
    },
    "gemma3_text": {
        "head_dim": 8, "sliding_window": WINDOW, "query_pre_attn_scalar": 8,
        "layer_types": LAYER_TYPES,
    },
    "phi3": {},
    "olmo2": {},
    "gpt_neox": {"num_key_value_heads": 4},
    "starcoder2": {"sliding_window": WINDOW},
    "granite": {
        "residual_multiplier": 0.5, "attention_multiplier": 0.2, "logits_scaling": 2.0,
        "embedding_multiplier": 2.0,
    },
    "granitemoe": {
        "residual_multiplier": 0.5, "attention_multiplier": 0.2, "logits_scaling": 2.0,
        "num_local_experts": 4, **MOE,
    },
}  # fmt: skip
# attention the stock model runs as reference: eager where SDPA would drop a softcap
REFERENCE_ATTENTION = {"gemma2": "eager"}


def family_config(family: str, **overrides: Any):
    from transformers import AutoConfig

    values = {**BASE, **FAMILIES[family], **overrides}
    if "layer_types" in values:
        values["layer_types"] = (LAYER_TYPES * values["num_hidden_layers"])[
            : values["num_hidden_layers"]
        ]
    return AutoConfig.for_model(family, **values)


def family_model(family: str, dtype: str = "fp32", **overrides: Any) -> torch.nn.Module:
    from memtrain.models import build_causal_lm

    attention = REFERENCE_ATTENTION.get(family, "auto")
    return build_causal_lm(family_config(family, **overrides), dtype, "cpu", attention, seed=0)


def family_ids(seq: int = SEQ, size: int = 1, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(2, VOCAB, (size, seq), generator=generator)
