"""Plans for decoder blocks that token-wise recompute and tiling cannot run: the planner offers
such blocks only keep, swap and whole-layer recompute in one chunk, so every plan it makes is one
the executor accepts, and a budget those modes cannot meet is the planner's PlanInfeasible."""

from __future__ import annotations

import pytest
import torch

import memtrain
from memtrain.models import build_causal_lm
from memtrain.models.blocks import TOKENWISE_BLOCKS, block_capabilities
from memtrain.offload.modes import TiledRecompute, TokenwiseRecompute
from memtrain.planner.plan import PlanInfeasible
from memtrain.profile.result import LayerProfile
from tests.offload.conftest import assert_close, train

VOCAB = 211
LR = 0.05  # tests.offload.conftest.train's learning rate
SEQ = 128
BASE = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 8,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": VOCAB,
    "bos_token_id": 0,
    "eos_token_id": 1,
}
# family -> (config overrides, whether the fused loss patch supports it)
FAMILIES = {
    "gemma2": ({"head_dim": 8, "sliding_window": 4096}, True),
    "qwen3": ({"head_dim": 8}, True),
    "phi3": ({"pad_token_id": 0}, False),
    "olmo2": ({}, False),
    "gpt_neox": ({"pad_token_id": 0}, False),
    "starcoder2": ({}, False),
    "granite": ({}, False),
}


def _model(family: str, **overrides) -> torch.nn.Module:
    from transformers import AutoConfig

    values = {**BASE, **FAMILIES[family][0], **overrides}
    return build_causal_lm(AutoConfig.for_model(family, **values), "fp32", "cpu", seed=0)


def _ids() -> torch.Tensor:
    return torch.randint(2, VOCAB, (1, SEQ), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_capabilities_agree_with_the_executor(family):
    model = _model(family, num_hidden_layers=1)
    block = model.base_model.layers[0]
    capabilities = block_capabilities([block])
    assert capabilities.tokenwise == TokenwiseRecompute.supports([block])
    assert capabilities.tiling == TiledRecompute.supports([block], 2)
    assert not capabilities.tokenwise and not capabilities.tiling


def test_llama_blocks_run_everything():
    from tests.offload.conftest import make_model

    for family in ("llama", "qwen2", "mistral"):
        block = make_model(family).model.layers[0]
        assert type(block).__name__ in TOKENWISE_BLOCKS
        assert block_capabilities([block]).tokenwise and block_capabilities([block]).tiling


def _prepare(model, family: str, fraction: float, offload: bool):
    return memtrain.prepare(
        model,
        seq=SEQ,
        gpu_budget_fraction=fraction,
        hardware="h100-sxm-80g",
        optimizer="sgd:momentum=0",  # what tests.offload.conftest.train steps with
        lr=LR,
        fused_loss=FAMILIES[family][1],
        build_optimizer=offload,
        state_offload=offload,
    )


def _check_blocks(plan) -> list:
    blocks = [layer for layer in plan.layers if layer.kind == "block"]
    assert blocks
    for layer in blocks:  # whole-layer modes only, in one chunk
        assert layer.chunks == 1
        assert layer.full_recompute or layer.recompute <= 1e-6, layer
    return blocks


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_half_budget_plan_trains_exactly(family):
    reference = train(_model(family), _ids(), steps=2)
    model = _model(family)
    with _prepare(model, family, 0.5, offload=False) as prepared:
        blocks = _check_blocks(prepared.plan)
        assert any(layer.full_recompute or layer.keep < 1 for layer in blocks)
        assert_close(reference, train(model, _ids(), steps=2), rel=1e-5)


@pytest.mark.parametrize("offload", [False, True], ids=["grads-on-gpu", "grads-on-host"])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_quarter_budget(family, offload):
    """A quarter of the peak is about what whole-layer modes can save for these models (Llama,
    which the executor tiles and recomputes token-wise, gets further): either the planner says
    in one line that nothing fits, or its plan runs and the step equals the unwrapped model's
    (losses, and gradients: through SGD's updates where a host step consumes them)."""
    reference = _model(family)
    before = {n: p.detach().clone() for n, p in reference.named_parameters()}
    expected = train(reference, _ids(), steps=2)
    model = _model(family)
    try:
        prepared = _prepare(model, family, 0.25, offload=offload)
    except PlanInfeasible as exc:
        assert "\n" not in str(exc) and str(exc).startswith("no plan fits")
        return
    with prepared:
        _check_blocks(prepared.plan)
        if not offload:
            assert_close(expected, train(model, _ids(), steps=2), rel=1e-5)
            return
        losses = []
        for _ in range(2):
            loss = model(input_ids=_ids(), labels=_ids()).loss
            loss.backward()
            losses.append(loss.detach().clone())
            prepared.optimizer.step()
            prepared.optimizer.zero_grad(set_to_none=True)
    for a, b in zip(expected.losses, losses, strict=True):
        assert abs(a.item() - b.item()) <= 1e-5 * abs(a.item())
    for name, param in model.named_parameters():
        want = reference.get_parameter(name).detach() - before[name]
        got = param.detach() - before[name]
        # plus the rounding of the parameters themselves (the host step updates a copy)
        bound = 1e-5 * want.abs().max().item() + 1e-7 * before[name].abs().max().item()
        assert (got - want).abs().max().item() <= bound, name


def test_budget_only_partial_modes_meet_is_the_planners_infeasible():
    """Two blocks at a long sequence: Llama fits half its peak by tiling, Gemma-2, which the
    executor tiles not, cannot, and the planner says so (not the executor)."""
    from tests.offload.conftest import make_model

    options = dict(seq=256, gpu_budget_fraction=0.5, optimizer="sgd", fused_loss=True)
    llama = make_model("llama", hidden_size=32, intermediate_size=64, head_dim=8)
    with memtrain.prepare(llama, **options) as prepared:  # tiled
        assert max(layer.chunks for layer in prepared.plan.layers) > 1
    gemma = _model("gemma2", num_hidden_layers=2)
    with pytest.raises(PlanInfeasible) as raised:
        memtrain.prepare(gemma, **options)
    assert "\n" not in str(raised.value)


def test_old_profiles_read_as_capable():
    fields = {
        "name": "block.0",
        "kind": "block",
        "param_bytes": 0,
        "grad_bytes": 0,
        "optimizer_state_bytes": 0,
        "saved_bytes": 0,
        "saved_tensors": [],
        "input_bytes": 0,
        "output_bytes": 0,
        "forward_transient_bytes": 0,
        "backward_transient_bytes": 0,
        "forward_flops": 0.0,
        "backward_flops": 0.0,
        "forward_time_s": 0.0,
        "backward_time_s": 0.0,
    }
    layer = LayerProfile(**fields)
    assert layer.tokenwise and layer.tiling
