"""patch_causal_lm_loss on small random-weight Hugging Face models against their stock loss."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

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
    with pytest.raises(MemtrainError, match="supports llama"):
        patch_causal_lm_loss(model)


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
