"""patch_causal_lm_loss on small random-weight Hugging Face models against their stock loss."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from transformers.modeling_outputs import CausalLMOutputWithPast  # noqa: E402

from memtrain.errors import MemtrainError  # noqa: E402
from memtrain.kernels import patch_causal_lm_loss, unpatch_causal_lm_loss  # noqa: E402
from memtrain.models import build_causal_lm, load_config  # noqa: E402

TINY = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    vocab_size=500,
)
# ||fused - stock|| / ||stock|| for the loss and every parameter gradient (float32 models).
TOL = 1e-5


def tiny_model(preset: str):
    config = load_config(preset)
    for key, value in TINY.items():
        setattr(config, key, value)
    if getattr(config, "layer_types", None) is not None:
        config.layer_types = config.layer_types[: TINY["num_hidden_layers"]]
    return build_causal_lm(config, "fp32", "cpu", attn_implementation="eager")


def loss_and_grads(model, **inputs):
    model.zero_grad(set_to_none=True)
    out = model(**inputs)
    out.loss.backward()
    grads = [p.grad.detach().clone() for p in model.parameters()]
    return out, grads


def rel(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize("preset", ["llama-3.2-1b", "qwen2.5-7b", "mistral-7b", "gemma-2-2b"])
def test_fused_loss_matches_stock(preset):
    model = tiny_model(preset)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, TINY["vocab_size"], (2, 19), generator=g)
    labels = ids.clone()
    labels[0, :6] = -100
    stock, stock_grads = loss_and_grads(model, input_ids=ids, labels=labels)
    patch_causal_lm_loss(model, impl="torch")
    fused, fused_grads = loss_and_grads(model, input_ids=ids, labels=labels)
    assert fused.logits is None
    assert rel(fused.loss, stock.loss) < TOL
    assert max(rel(a, b) for a, b in zip(fused_grads, stock_grads, strict=True)) < TOL
    # num_items_in_batch (gradient accumulation): summed and divided, as the stock loss does
    n_items = torch.tensor(40)
    stock_sum = unpatch_causal_lm_loss(model)(
        input_ids=ids, labels=labels, num_items_in_batch=n_items
    )
    patch_causal_lm_loss(model, impl="torch")
    fused_sum = model(input_ids=ids, labels=labels, num_items_in_batch=n_items)
    assert rel(fused_sum.loss, stock_sum.loss) < TOL


def test_gemma2_softcap_is_honoured():
    model = tiny_model("gemma-2-2b")
    assert model.config.final_logit_softcapping
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(40)  # logits large enough for the cap to bite
    ids = torch.randint(0, TINY["vocab_size"], (1, 12), generator=torch.Generator().manual_seed(1))
    stock = model(input_ids=ids, labels=ids).loss
    patch_causal_lm_loss(model, impl="torch")
    fused = model(input_ids=ids, labels=ids).loss
    assert rel(fused, stock) < TOL
    # the cap changes the loss noticeably here, so a fused loss without it would have failed
    unpatch_causal_lm_loss(model)
    model.config.final_logit_softcapping = None
    assert rel(model(input_ids=ids, labels=ids).loss, stock) > 1e-2


def test_without_labels_stock_forward_runs_and_unpatch_restores():
    model = tiny_model("llama-3.2-1b")
    ids = torch.randint(0, TINY["vocab_size"], (1, 8))
    patch_causal_lm_loss(model, impl="torch")
    out = model(input_ids=ids)
    assert out.logits.shape == (1, 8, TINY["vocab_size"])
    unpatch_causal_lm_loss(model)
    assert model(input_ids=ids, labels=ids).logits is not None


def test_unsupported_model_is_refused():
    model = build_causal_lm(load_config("gpt2"), "fp32", "meta")
    with pytest.raises(MemtrainError, match="model_type='gpt2'") as raised:
        patch_causal_lm_loss(model)
    assert "\n" not in str(raised.value)


def test_patched_model_is_freed_without_garbage_collection():
    """The patched forward holds the model weakly: dropping the model frees it by reference
    counting (on a GPU: its memory comes back at once, not at the next collection)."""
    import gc
    import weakref

    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=64,
    )  # fmt: skip
    model = LlamaForCausalLM(config)
    patch_causal_lm_loss(model)
    ids = torch.randint(0, 64, (1, 8))
    model(input_ids=ids, labels=ids).loss.backward()
    assert model(input_ids=ids).logits.shape == (1, 8, 64)  # stock forward without labels
    ref = weakref.ref(model)
    gc.disable()
    try:
        del model
        assert ref() is None
    finally:
        gc.enable()


BASE = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=97,
    bos_token_id=0,
    eos_token_id=1,
    pad_token_id=0,
)
MOE = dict(num_experts_per_tok=2, output_router_logits=True, router_aux_loss_coef=0.5)
# model_type -> config values beyond BASE (MoE ones route through 4 small experts)
FAMILIES = {
    "llama": {},
    "mistral": {},
    "mixtral": dict(MOE, num_local_experts=4),
    "qwen2": {},
    "qwen3": dict(head_dim=8),
    "qwen3_moe": dict(MOE, num_experts=4, moe_intermediate_size=32, head_dim=8),
    "gemma": dict(head_dim=8),
    "gemma2": dict(head_dim=8, final_logit_softcapping=2.0, attn_implementation="eager"),
    "gemma3_text": dict(head_dim=8, final_logit_softcapping=2.0, sliding_window=8),
    "phi3": {},
    "olmo2": {},
    "gpt_neox": dict(tie_word_embeddings=False),
    "starcoder2": {},
    "granite": dict(logits_scaling=4.0),
    "granitemoe": dict(MOE, num_local_experts=4, logits_scaling=4.0),
}


def family_model(model_type: str, **overrides):
    from transformers import AutoConfig

    values = {**BASE, **FAMILIES[model_type], **overrides}
    attn = values.pop("attn_implementation", "auto")
    config = AutoConfig.for_model(model_type, **values)
    return build_causal_lm(config, "fp32", "cpu", attn_implementation=attn, seed=0)


def family_batch() -> dict:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(2, BASE["vocab_size"], (2, 13), generator=g)
    labels = ids.clone()
    labels[0, :4] = -100
    labels[1, -2] = -100
    return dict(input_ids=ids, labels=labels)


@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_every_family_matches_stock(model_type):
    model = family_model(model_type)
    batch = family_batch()
    stock, stock_grads = loss_and_grads(model, **batch)
    patch_causal_lm_loss(model, impl="torch")
    fused, fused_grads = loss_and_grads(model, **batch)
    assert fused.logits is None
    assert type(fused) is type(stock)
    assert rel(fused.loss, stock.loss) < TOL
    assert max(rel(a, b) for a, b in zip(fused_grads, stock_grads, strict=True)) < TOL
    if "output_router_logits" in FAMILIES[model_type]:  # the router loss is kept, and returned
        assert stock.aux_loss.item() > 0
        assert rel(fused.aux_loss, stock.aux_loss) < TOL
        assert len(fused.router_logits) == len(stock.router_logits) == BASE["num_hidden_layers"]


def test_scale_and_cap_are_read_from_the_config():
    """Granite divides the logits by logits_scaling, Gemma 3 caps them: a fused loss without
    either would differ from the stock one by far more than the tolerance."""
    for model_type, key, value in [
        ("granite", "logits_scaling", 0.05),
        ("gemma3_text", "final_logit_softcapping", 0.5),
    ]:
        model = family_model(model_type, **{key: value}, tie_word_embeddings=False)
        with torch.no_grad():
            model.get_output_embeddings().weight.mul_(40)  # logits large enough to be changed
        stock = model(**family_batch()).loss
        patch_causal_lm_loss(model, impl="torch")
        assert rel(model(**family_batch()).loss, stock) < TOL
        unpatch_causal_lm_loss(model)
        setattr(model.config, key, 1.0 if key == "logits_scaling" else None)
        assert rel(model(**family_batch()).loss, stock) > 1e-2


def test_head_bias_and_untied_head():
    model = family_model("llama", tie_word_embeddings=False)
    head = model.get_output_embeddings()
    head.bias = torch.nn.Parameter(torch.randn(BASE["vocab_size"]))
    stock, stock_grads = loss_and_grads(model, **family_batch())
    patch_causal_lm_loss(model, impl="torch")
    fused, fused_grads = loss_and_grads(model, **family_batch())
    assert rel(fused.loss, stock.loss) < TOL
    assert max(rel(a, b) for a, b in zip(fused_grads, stock_grads, strict=True)) < TOL


def test_moe_num_items_in_batch_and_router_flag():
    """Summed cross-entropy over num_items_in_batch plus the weighted router loss, as the
    stock forward; with output_router_logits=False neither aux_loss nor router logits."""
    model = family_model("qwen3_moe")
    n_items = torch.tensor(17)
    stock, stock_grads = loss_and_grads(model, **family_batch(), num_items_in_batch=n_items)
    patch_causal_lm_loss(model, impl="torch")
    fused, fused_grads = loss_and_grads(model, **family_batch(), num_items_in_batch=n_items)
    assert rel(fused.loss, stock.loss) < TOL
    assert max(rel(a, b) for a, b in zip(fused_grads, stock_grads, strict=True)) < TOL
    quiet = model(**family_batch(), output_router_logits=False)
    unpatch_causal_lm_loss(model)
    expected = model(**family_batch(), output_router_logits=False)
    assert quiet.aux_loss is None and not quiet.router_logits
    assert rel(quiet.loss, expected.loss) < TOL


def test_forward_with_unknown_logit_processing_is_refused():
    from transformers import LlamaForCausalLM

    class Odd(LlamaForCausalLM):
        def forward(self, input_ids=None, labels=None, **kwargs):
            outputs = self.model(input_ids=input_ids, **kwargs)
            hidden_states = outputs.last_hidden_state
            logits = self.lm_head(hidden_states)
            logits = logits.clamp(-5, 5)
            loss = self.loss_function(logits, labels, self.vocab_size, **kwargs)
            return CausalLMOutputWithPast(loss=loss, logits=logits)

    model = Odd(family_model("llama").config)
    with pytest.raises(MemtrainError, match="model_type='llama'.*clamp") as raised:
        patch_causal_lm_loss(model)
    assert "\n" not in str(raised.value)
