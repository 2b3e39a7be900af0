"""Every decoder family with a block adapter runs token-wise and tiled recompute exactly: loss
and gradients (router auxiliary loss included) equal the unwrapped model's in float32, with
sliding windows shorter than the sequence, softcaps, q/k norms and padded batches."""

from __future__ import annotations

import pytest
import torch

from memtrain.models.blocks import block_capabilities
from memtrain.offload import LayerPolicy, OffloadPolicy, apply
from tests.families import FAMILIES, family_ids, family_model
from tests.offload.conftest import assert_close, padded_step, train

REL = 1e-5
POOL = {"cpu": 8 << 20}
LAYERS = 4
POLICIES = {
    "tokenwise": lambda: LayerPolicy(keep=0.3, swap={"cpu": 0.3}, recompute=0.4, chunks=2),
    "tiled": lambda: LayerPolicy(keep=0.0, full_recompute=True, chunks=3),
}


def _policy(make) -> OffloadPolicy:
    return OffloadPolicy({f"block.{i}": make() for i in range(LAYERS)})


def _blocks(model) -> list[torch.nn.Module]:
    return list(model.base_model.layers)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_family_runs_every_mode(family):
    model = family_model(family, num_hidden_layers=1)
    capabilities = block_capabilities(_blocks(model)[:1])
    assert capabilities.tokenwise and capabilities.tiling


@pytest.mark.parametrize("mode", sorted(POLICIES))
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_family_matches_unwrapped_model(family, mode):
    ids = family_ids()
    reference = train(family_model(family), ids, steps=2)
    model = family_model(family)
    with apply(model, _policy(POLICIES[mode]), host_pool_bytes=POOL) as handle:
        trace = train(model, ids, steps=2)
        modes = set(handle.stats()["modes"].values()) if "modes" in handle.stats() else None
    assert_close(reference, trace, REL)
    if modes is not None:
        assert modes == {"tokenwise" if mode == "tokenwise" else "full_recompute"}


@pytest.mark.parametrize("mode", sorted(POLICIES))
@pytest.mark.parametrize("family", ["mistral", "mixtral", "gemma2", "gemma3_text", "phi3"])
def test_padded_batches_match(family, mode):
    """A padding mask (not the causal pattern) goes to the chunked kernel with the mask; the
    router's auxiliary loss sees the padding as the stock model's does."""
    ids = family_ids(size=2)
    mask = torch.ones_like(ids)
    mask[0, :5] = 0
    labels = ids.masked_fill(mask == 0, -100)
    labels[0, 5] = -100  # predicted from a padding position, whose attention sees no key: each
    # kernel fills such rows its own way (zeros here and in SDPA, a uniform mix in eager)

    want, want_grads = padded_step(family_model(family), ids, mask, labels)
    model = family_model(family)
    with apply(model, _policy(POLICIES[mode]), host_pool_bytes=POOL):
        got, got_grads = padded_step(model, ids, mask, labels)
    assert abs(got - want) <= REL * abs(want)
    for a, b in zip(got_grads, want_grads, strict=True):
        assert (a - b).abs().max() <= REL * b.abs().max() + 1e-12


def test_a_fused_kernel_that_refuses_the_shapes_falls_back_to_exact_chunks(monkeypatch):
    """Head sizes or dtypes a fused kernel does not take never stop a planned layer: the first
    refusal switches that layer to the chunked exact attention (out-of-memory errors are not
    refusals and still raise)."""
    from memtrain.offload.attention import FlashAttention

    calls = []

    def refuse(self, q, k, v):
        calls.append(q.shape)
        raise RuntimeError("no kernel for these shapes")

    monkeypatch.setattr(FlashAttention, "forward", refuse)
    ids = family_ids()
    reference = train(family_model("qwen3"), ids, steps=2)
    model = family_model("qwen3")
    with apply(model, _policy(POLICIES["tokenwise"]), host_pool_bytes=POOL) as handle:
        trace = train(model, ids, steps=2)
        assert handle.stats()["attention_kernels"] == ["chunked"]
    assert_close(reference, trace, REL)
    assert len(calls) == 2 * LAYERS  # each layer asked once (native, then repeated k/v heads)


def test_out_of_memory_in_a_fused_kernel_is_not_a_refusal(monkeypatch):
    from memtrain.offload.attention import FlashAttention

    def out_of_memory(self, q, k, v):
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(FlashAttention, "forward", out_of_memory)
    model = family_model("llama")
    with apply(model, _policy(POLICIES["tokenwise"]), host_pool_bytes=POOL):
        with pytest.raises(torch.OutOfMemoryError):
            model(input_ids=family_ids(), labels=family_ids())


def test_attention_dropout_means_the_generic_path_in_any_mode():
    """A block with attention dropout is planned and run whole-layer even if it is in eval mode
    when planned (from_pretrained returns models in eval mode; training turns dropout on)."""
    model = family_model("starcoder2", attention_dropout=0.1, num_hidden_layers=1).eval()
    capabilities = block_capabilities(_blocks(model))
    assert not capabilities.tokenwise and not capabilities.tiling
