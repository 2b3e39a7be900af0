"""Token-wise recompute (MEMO) and sequence tiling reorder arithmetic: losses and gradients
must stay within REL (relative to the largest gradient entry) of the unmodified fp32 model, and
the recompute paths must store only what the scheme says."""

from __future__ import annotations

import pytest
import torch

from memtrain.errors import MemtrainError
from memtrain.offload import LayerPolicy, OffloadPolicy, apply
from memtrain.offload.memo import chunk_ranges
from tests.offload.conftest import (
    SEQ,
    TINY,
    assert_close,
    batch,
    make_model,
    padded_step,
    train,
)

REL = 1e-5  # fp32: slicing a matmul's rows changes summation order, never more than this
POOL = {"cpu": 8 << 20}

TOKENWISE = {
    "all_tokens_recomputed_anchors_on_cpu": lambda: LayerPolicy(
        keep=0.0, recompute=1.0, input_checkpoint={"cpu": 1.0}
    ),
    "half_recomputed": lambda: LayerPolicy(keep=0.5, recompute=0.5),
    "quarter_recomputed_rest_swapped": lambda: LayerPolicy(
        keep=0.25, swap={"cpu": 0.25, "nvme": 0.25}, recompute=0.25
    ),
    "chunked": lambda: LayerPolicy(keep=0.4, swap={"cpu": 0.2}, recompute=0.4, chunks=3),
}


def _blocks(make, n=2):
    return {f"block.{i}": make() for i in range(n)}


@pytest.mark.parametrize("mode", sorted(TOKENWISE))
def test_tokenwise_llama_matches_within_tolerance(mode, llama_reference, tmp_path):
    model = make_model("llama")
    policy = OffloadPolicy(_blocks(TOKENWISE[mode]), nvme_path=str(tmp_path))
    with apply(model, policy, host_pool_bytes=POOL):
        trace = train(model, batch("llama"))
    assert_close(llama_reference, trace, REL)


@pytest.mark.parametrize("family", ["qwen2", "mistral"])
def test_tokenwise_other_families(family):
    reference = train(make_model(family), batch(family))
    model = make_model(family)
    policy = OffloadPolicy(
        _blocks(lambda: LayerPolicy(keep=0.3, swap={"cpu": 0.3}, recompute=0.4, chunks=2))
    )
    with apply(model, policy, host_pool_bytes=POOL):
        assert_close(reference, train(model, batch(family)), REL)


def test_tokenwise_stores_only_block_input_attention_output_and_lse():
    """All tokens recomputed: per layer exactly h, the attention output and the lse leave."""
    model = make_model("llama")
    policy = OffloadPolicy(
        _blocks(lambda: LayerPolicy(keep=0.0, recompute=1.0, input_checkpoint={"cpu": 1.0}))
    )
    with apply(model, policy, host_pool_bytes=POOL) as handle:
        model(input_ids=batch("llama"), labels=batch("llama")).loss.backward()
        layers = handle.stats()["layers"]
    hidden, heads, head_dim = 64, 4, 16
    h_bytes = SEQ * hidden * 4
    attention = SEQ * heads * head_dim * 4
    lse = SEQ * heads * 4
    rope = 2 * SEQ * head_dim * 4  # cos and sin, shared by all layers: stored once
    assert layers["block.1"] == {"gpu": 0, "cpu": h_bytes + attention + lse, "cxl": 0, "nvme": 0}
    assert layers["block.0"]["cpu"] == h_bytes + attention + lse + rope


def test_tiled_mlp_matches_within_tolerance(llama_reference):
    model = make_model("llama")
    policy = OffloadPolicy(_blocks(lambda: LayerPolicy(keep=0.5, swap={"cpu": 0.5}, chunks=4)))
    calls = []
    hook = model.model.layers[0].mlp.down_proj.register_forward_hook(
        lambda m, a, o: calls.append(a[0].shape[1])
    )
    with apply(model, policy, host_pool_bytes=POOL):
        trace = train(model, batch("llama"))
    hook.remove()
    assert_close(llama_reference, trace, REL)
    assert calls[:4] == [6, 6, 6, 6]  # 24 tokens in 4 chunks, each chunk runs on its own


def test_tiling_under_whole_layer_recompute(llama_reference):
    model = make_model("llama")
    policy = OffloadPolicy(_blocks(lambda: LayerPolicy(keep=0.0, full_recompute=True, chunks=2)))
    with apply(model, policy):
        assert_close(llama_reference, train(model, batch("llama")), REL)


def test_tiled_whole_layer_recompute_with_input_on_host(llama_reference):
    model = make_model("llama")
    policy = OffloadPolicy(
        _blocks(
            lambda: LayerPolicy(
                keep=0.0, full_recompute=True, input_checkpoint={"cpu": 1.0}, chunks=3
            )
        )
    )
    with apply(model, policy, host_pool_bytes=POOL) as handle:
        assert_close(llama_reference, train(model, batch("llama")), REL)
        hidden = TINY["llama"]["hidden_size"]
        assert handle.stats()["layers"]["block.1"]["cpu"] == SEQ * hidden * 4  # the input only


WIDE = {"llama": {"intermediate_size": 1024}, "gpt2": {"n_embd": 64}}
WIDE_SEQ = 128


def _backward_peak(family: str, chunks: int) -> int:
    """Bytes allocated at the peak of one backward pass (CPU storages, allocator-style)."""
    from memtrain.profile.tracker import OpTracker

    model = make_model(family, **WIDE[family])
    ids = batch(family, seq=WIDE_SEQ)
    policy = OffloadPolicy(
        _blocks(lambda: LayerPolicy(keep=0.0, full_recompute=True, chunks=chunks))
    )
    with apply(model, policy):
        loss = model(input_ids=ids, labels=ids).loss
        tracker = OpTracker(None, track_memory=True, on_op=lambda *_: None, block=1)
        with tracker:
            loss.backward()
    return tracker.peak_bytes


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_tiled_whole_layer_recompute_holds_one_chunk_of_the_mlp(family):
    """Backward of a whole-layer recompute in 8 chunks rebuilds one chunk's MLP tensors at a
    time: its peak is below the untiled one by most of a block's MLP saved bytes."""
    if family == "llama":  # gate, up, act(gate) and act * up, fp32
        mlp_saved = WIDE_SEQ * 4 * WIDE["llama"]["intermediate_size"] * 4
    else:  # c_fc output, the GELU's intermediates (tanh approximation), fp32
        mlp_saved = WIDE_SEQ * 3 * 4 * WIDE["gpt2"]["n_embd"] * 4
    untiled, tiled = _backward_peak(family, 1), _backward_peak(family, 8)
    assert tiled <= untiled - 0.6 * mlp_saved, (untiled, tiled, mlp_saved)


def test_tokenwise_refuses_other_architectures():
    model = make_model("gpt2")
    policy = OffloadPolicy({"block.0": LayerPolicy(keep=0.5, recompute=0.5)})
    with pytest.raises(MemtrainError, match="no block adapter knows GPT2Block"):
        apply(model, policy)


@pytest.mark.parametrize("family", ["llama", "mistral"])
def test_tokenwise_with_padding_masks_is_exact(family):
    """Padded batches (a mask that is not the causal pattern) run through the chunked kernel
    with that mask: loss and gradients equal the unwrapped model's."""
    ids = batch(family)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    labels = ids.masked_fill(mask == 0, -100)

    want, want_grads = padded_step(make_model(family), ids, mask, labels)
    model = make_model(family)
    with apply(model, OffloadPolicy(_blocks(lambda: LayerPolicy(keep=0.5, recompute=0.5)))):
        got, got_grads = padded_step(model, ids, mask, labels)
    assert abs(got - want) <= 1e-5 * abs(want)
    for a, b in zip(got_grads, want_grads, strict=True):
        assert (a - b).norm() <= 1e-5 * b.norm() + 1e-12


def test_chunk_ranges_cover_exactly():
    assert chunk_ranges(0, 10, 3) == [(0, 3), (3, 6), (6, 10)]
    assert chunk_ranges(5, 7, 4) == [(5, 6), (6, 7)]
    assert chunk_ranges(3, 3, 2) == []


def test_tokenwise_with_repeated_kv_heads(llama_reference, monkeypatch):
    """Where the fused kernel cannot take fewer k/v heads, k and v are repeated per group."""
    from memtrain.offload import memo

    original = memo.BlockParts.__init__

    def no_native_gqa(self, *args, **kwargs):
        original(self, *args, **kwargs)
        self.native_gqa = False

    monkeypatch.setattr(memo.BlockParts, "__init__", no_native_gqa)
    model = make_model("llama")
    with apply(model, OffloadPolicy(_blocks(lambda: LayerPolicy(keep=0.5, recompute=0.5)))):
        assert_close(llama_reference, train(model, batch("llama")), REL)


@pytest.mark.parametrize(
    "make",
    [
        lambda: LayerPolicy(keep=0.0, recompute=1.0, full_recompute=True, chunks=3),
        lambda: LayerPolicy(keep=0.5, recompute=0.5, chunks=2),
    ],
    ids=["tiled-whole-block", "half-recomputed"],
)
def test_recomputed_chunks_are_rebuilt_under_the_forwards_autocast(make):
    """Backward rebuilds q, k, v and the post-attention work under the autocast the forward
    ran with (bfloat16 on float32 weights), so losses and gradients are the stock model's
    under the same autocast."""

    def run(model):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return train(model, batch("llama"), steps=2)

    reference = run(make_model("llama"))
    model = make_model("llama")
    with apply(model, OffloadPolicy(_blocks(make))):
        trace = run(model)
    # bfloat16 sums in another order: about 2% on the norm weights; without the forward's
    # autocast the rebuilt chunks run in float32 and those gradients are 39-153% off
    assert_close(reference, trace, 5e-2)


@pytest.mark.parametrize(
    "make",
    [
        lambda: LayerPolicy(keep=0.5, recompute=0.5, chunks=2),
        lambda: LayerPolicy(keep=0.0, recompute=1.0, full_recompute=True, chunks=3),
    ],
    ids=["half-recomputed", "tiled-whole-block"],
)
def test_residual_dropout_replays_in_the_rebuilt_chunks(make, monkeypatch):
    """Starcoder2's residual dropout draws a mask in every post-attention chunk; backward's
    rebuild replays it: the gradients equal those of checkpointed chunks (which restore the
    random state themselves) drawn from the same seed."""
    import memtrain.offload.memo as memo
    from tests.families import family_ids, family_model

    def step(force_checkpoints: bool):
        monkeypatch.setattr(memo, "_collects_routers", lambda: force_checkpoints)
        model = family_model("starcoder2", residual_dropout=0.3, num_hidden_layers=2).train()
        ids = family_ids()
        policy = OffloadPolicy(_blocks(make))
        torch.manual_seed(5)
        with apply(model, policy):
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    loss_a, grads_a = step(False)
    loss_b, grads_b = step(True)
    assert torch.equal(loss_a, loss_b)
    for name, grad in grads_b.items():
        torch.testing.assert_close(grads_a[name], grad, rtol=1e-5, atol=1e-7, msg=name)
