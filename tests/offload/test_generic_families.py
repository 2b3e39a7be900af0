"""prepare() on Hugging Face families that have no block adapter (older layouts, other attention
and MoE designs): the parts are found (OPT keeps them one module further down), the plan runs
them through the generic whole-layer modes, and the steps equal the unwrapped model's."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

import memtrain
from memtrain.models.build import causal_lm_layers
from tests.offload.conftest import train

SEQ = 512
VOCAB = 256
CONFIGS = {
    "opt": dict(
        hidden_size=64, ffn_dim=256, num_hidden_layers=2, num_attention_heads=4,
        word_embed_proj_dim=64, max_position_embeddings=1024,
    ),
    "falcon": dict(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_kv_heads=2,
        new_decoder_architecture=True,
    ),
    "bloom": dict(hidden_size=64, n_layer=2, n_head=4),
    "gptj": dict(n_embd=64, n_layer=2, n_head=4, rotary_dim=8, n_positions=1024),
    "gpt_bigcode": dict(n_embd=64, n_layer=2, n_head=4, n_positions=1024),
    "cohere": dict(
        hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2,
    ),
    "deepseek_v3": dict(
        hidden_size=64, intermediate_size=256, moe_intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, n_routed_experts=4,
        num_experts_per_tok=2, n_group=1, topk_group=1, q_lora_rank=32, kv_lora_rank=16,
        qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16, first_k_dense_replace=1,
    ),
}  # fmt: skip


def _model(family: str) -> torch.nn.Module:
    config = AutoConfig.for_model(family, vocab_size=VOCAB, **CONFIGS[family])
    for key, value in vars(config).items():  # dropout off: both runs must see the same step
        if isinstance(value, float) and ("dropout" in key or "pdrop" in key):
            setattr(config, key, 0.0)
    config.bos_token_id = config.eos_token_id = config.pad_token_id = None
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).float().train()


@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_family_without_an_adapter_trains_exactly_under_a_plan(family):
    ids = torch.randint(0, VOCAB, (1, SEQ), generator=torch.Generator().manual_seed(0))
    reference = train(_model(family), ids, steps=2)
    model = _model(family)
    kinds = [spec.kind for spec in causal_lm_layers(model)]
    assert kinds.count("embedding") == 1 and kinds.count("block") == 2 and kinds[-1] == "head"
    prepared = memtrain.prepare(
        model, seq=SEQ, gpu_budget_fraction=0.8, optimizer="sgd", lr=0.05, state_offload=False
    )
    with prepared:
        blocks = [layer for layer in prepared.plan.layers if layer.kind == "block"]
        assert any(layer.full_recompute or layer.keep < 1 for layer in blocks)
        got = train(model, ids, steps=2)
    for a, b in zip(got.losses, reference.losses, strict=True):
        assert abs(a.item() - b.item()) <= 1e-5 * abs(b.item())
    for step, (ga, gb) in enumerate(zip(got.grads, reference.grads, strict=True)):
        assert ga.keys() == gb.keys()
        scale = torch.stack([g.norm() for g in gb.values()]).max()
        for name, want in gb.items():
            # relative to the gradient, or to a thousandth of the largest one where the exact
            # gradient is zero and both runs hold rounding noise (e.g. a key projection's bias)
            floor = max(want.norm(), 1e-3 * scale)
            tolerance = 1e-5 if step == 0 else 1e-4
            assert (ga[name] - want).norm() <= tolerance * floor, (family, step, name)
