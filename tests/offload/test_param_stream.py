"""Parameters streamed from host memory (memtrain.offload.params) on the CPU: between uses the
weights of streamed layers are their host copies, every step equals plain training, and the
activation modes run on streamed layers unchanged."""

from __future__ import annotations

import pytest
import torch

from memtrain.errors import MemtrainError
from memtrain.offload import LayerPolicy, OffloadPolicy, apply, offload_optimizer
from tests.offload.conftest import batch, make_model

LAYERS = 2
POOL = {"cpu": 8 << 20}


def _streamed(mode: dict) -> OffloadPolicy:
    on_host = {"params": "cpu", "grads": "cpu", "optimizer": "cpu"}
    return OffloadPolicy({f"block.{i}": LayerPolicy(**mode, **on_host) for i in range(LAYERS)})


def _train(model, optimizer, steps=3):
    ids = batch("llama")
    losses = []
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


MODES = {
    "keep": {},
    "swap": {"keep": 0.5, "swap": {"cpu": 0.5}},
    "tokenwise": {"keep": 0.5, "recompute": 0.5, "chunks": 2},
    "whole-layer": {"keep": 0.0, "full_recompute": True},
}


@pytest.mark.parametrize("mode", sorted(MODES))
def test_streamed_parameters_train_exactly(mode):
    reference = make_model("llama")
    want = _train(reference, torch.optim.SGD(reference.parameters(), lr=0.05, momentum=0.9))
    model = make_model("llama")
    with apply(model, _streamed(MODES[mode]), host_pool_bytes=POOL) as handle:
        streamer = handle.params
        optimizer = offload_optimizer(handle, torch.optim.SGD, lr=0.05, momentum=0.9)
        got = _train(model, optimizer)
        # between steps every streamed weight is its host copy
        for layer in streamer.layers:
            for param, host in zip(layer.params, layer.host, strict=True):
                assert param.data_ptr() == host.data_ptr()
        assert streamer.fetches >= 2 * LAYERS * 3  # in for forward and again for backward
        stats = handle.stats()["streamed_params"]
        assert stats["layers"] == [f"block.{i}" for i in range(LAYERS)]
    assert got == pytest.approx(want, rel=1e-6)
    for (name, a), b in zip(model.named_parameters(), reference.parameters(), strict=True):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-7), name


def test_forward_without_grad_streams_and_releases():
    model = make_model("llama")
    with apply(model, _streamed({}), host_pool_bytes=POOL) as handle:
        offload_optimizer(handle, torch.optim.SGD, lr=0.05)
        with torch.no_grad():
            logits = model(input_ids=batch("llama")).logits
        layer = handle.params.layers[0]
        assert not layer.resident and layer.params[0].data_ptr() == layer.host[0].data_ptr()
    assert torch.isfinite(logits).all()


def test_streaming_needs_gradients_off_the_device():
    policy = OffloadPolicy({"block.0": LayerPolicy(params="cpu")})
    with pytest.raises(MemtrainError) as raised:
        apply(make_model("llama"), policy)
    assert "\n" not in str(raised.value) and "gradients and optimizer states" in str(raised.value)


def test_parameters_on_nvme_are_refused_in_one_line():
    policy = OffloadPolicy(
        {"block.0": LayerPolicy(params="nvme", grads="cpu", optimizer="cpu")}, nvme_path="/tmp"
    )
    with pytest.raises(MemtrainError) as raised:
        apply(make_model("llama"), policy)
    assert "\n" not in str(raised.value) and "host memory (cpu) only" in str(raised.value)


def test_only_the_layer_in_use_and_the_next_are_on_the_device():
    """In forward a layer's weights are in place while it runs and back on the host after it;
    the next layer's are being fetched. In backward each layer's weights come back before its
    backward and leave once its gradients are accumulated."""
    model = make_model("llama", num_hidden_layers=3)
    policy = OffloadPolicy(
        {f"block.{i}": LayerPolicy(params="cpu", grads="cpu", optimizer="cpu") for i in range(3)}
    )
    seen = []
    with apply(model, policy, host_pool_bytes=POOL) as handle:
        optimizer = offload_optimizer(handle, torch.optim.SGD, lr=0.05)
        layers = handle.params.layers
        blocks = model.model.layers

        def probe(index, when):
            def hook(*_):
                seen.append((when, index, tuple(layer.resident for layer in layers)))

            return hook

        for i, block in enumerate(blocks):
            block.register_forward_hook(probe(i, "forward"))
            block.register_full_backward_hook(probe(i, "backward"))
        ids = batch("llama")
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        assert not any(layer.resident for layer in layers)
    forward = [s for s in seen if s[0] == "forward"]
    # probes run after the streamer's own post-forward hook: the layer that just ran is back
    # on the host, its successor is being fetched, nothing else is on the device
    assert forward == [
        ("forward", 0, (False, True, False)),
        ("forward", 1, (False, False, True)),
        ("forward", 2, (False, False, False)),
    ]
    backward = [s for s in seen if s[0] == "backward"]
    assert [s[1] for s in backward] == [2, 1, 0]
    for _, index, resident in backward:
        assert all(not r for r in resident[index + 1 :])  # later layers already released


def test_prepare_streams_blocks_when_the_budget_needs_it():
    """prepare() lets the planner put block weights on the host where its optimizer steps there:
    at a fifth of the peak the tiny model's blocks stream, and two SGD steps equal plain
    training (losses and updates)."""
    import memtrain
    from tests.families import family_ids, family_model

    shape = {
        "hidden_size": 64, "intermediate_size": 256, "num_attention_heads": 1,
        "num_key_value_heads": 1, "head_dim": 64,
    }  # fmt: skip
    ids = family_ids(512)
    reference = family_model("llama", **shape)
    before = {n: p.detach().clone() for n, p in reference.named_parameters()}
    optimizer = torch.optim.SGD(reference.parameters(), lr=0.05)
    want = []
    for _ in range(2):
        loss = reference(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        want.append(loss.item())
    model = family_model("llama", **shape)
    got = []
    with memtrain.prepare(
        model, seq=512, gpu_budget_fraction=0.2, optimizer="sgd:momentum=0", lr=0.05
    ) as prepared:
        streamed = [layer.name for layer in prepared.plan.layers if layer.params != "gpu"]
        assert streamed and all(name.startswith("block.") for name in streamed)
        assert prepared.handle.stats()["streamed_params"]["layers"] == streamed
        for _ in range(2):
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            prepared.optimizer.step()
            prepared.optimizer.zero_grad(set_to_none=True)
            got.append(loss.item())
    assert got == pytest.approx(want, rel=1e-5)
    for name, param in model.named_parameters():
        update, expected = (
            param.detach() - before[name],
            reference.get_parameter(name) - before[name],
        )
        bound = 1e-4 * expected.abs().max().item() + 2.5e-7 * before[name].abs().max().item()
        assert (update - expected).abs().max().item() <= bound, name


def test_prepare_with_the_host_step_overlapped_equals_it_after_backward():
    import memtrain
    from tests.families import family_ids, family_model

    shape = {
        "hidden_size": 64, "intermediate_size": 256, "num_attention_heads": 1,
        "num_key_value_heads": 1, "head_dim": 64,
    }  # fmt: skip
    ids = family_ids(512)
    results = []
    for overlap in (False, True):
        model = family_model("llama", **shape)
        with memtrain.prepare(
            model, seq=512, gpu_budget_fraction=0.2, optimizer="adamw", lr=1e-3,
            overlap_host_step=overlap,
        ) as prepared:  # fmt: skip
            assert prepared.optimizer.overlap == overlap
            for _ in range(2):
                model(input_ids=ids, labels=ids).loss.backward()
                prepared.optimizer.step()
                prepared.optimizer.zero_grad(set_to_none=True)
        results.append({n: p.detach().clone() for n, p in model.named_parameters()})
    for name in results[0]:
        assert torch.equal(results[0][name], results[1][name]), name
