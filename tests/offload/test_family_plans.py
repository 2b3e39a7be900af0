"""prepare() on every decoder family with a block adapter, as a user calls it: plans at half and
a quarter of the unplanned peak execute, with the fused loss on, and the steps equal the
unwrapped model's (float32, relative error <= 1e-5). A block without an adapter still trains
under a budget through the generic whole-layer modes."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import memtrain
from memtrain.models.blocks import block_capabilities
from memtrain.offload.modes import TiledRecompute, TokenwiseRecompute
from memtrain.profile.result import LayerProfile
from tests.families import FAMILIES, family_ids, family_model
from tests.offload.conftest import Trace, train

LR = 0.05  # tests.offload.conftest.train's learning rate
SEQ = 512  # with SHAPE: activations, not weights, make the peak (as in real runs)
SHAPE = {
    "hidden_size": 64, "intermediate_size": 256, "moe_intermediate_size": 128,
    "num_attention_heads": 1, "num_key_value_heads": 1, "head_dim": 64,
}  # fmt: skip


def _model(family: str) -> nn.Module:
    shape = dict(SHAPE)
    if family == "gpt_neox":
        shape["num_key_value_heads"] = shape["num_attention_heads"]
    return family_model(family, **shape)


def _prepare(model, fraction: float, offload: bool):
    return memtrain.prepare(
        model,
        seq=SEQ,
        gpu_budget_fraction=fraction,
        hardware="h100-sxm-80g",
        optimizer="sgd:momentum=0",  # what tests.offload.conftest.train steps with
        lr=LR,
        fused_loss=True,
        build_optimizer=offload,
        state_offload=offload,
    )


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def assert_close(want: Trace, got: Trace, rel: float = 1e-5, later: float = 1e-4) -> None:
    """Losses and the first step's gradients within ``rel`` relative error (norm of the
    difference over the norm of the reference); later steps' gradients within ``later``: they
    start from parameters that already differ by the first update's rounding, which tiny q/k
    norms amplify (Gemma 3 reaches 1.2e-5 in its second step with the fused loss alone)."""
    for a, b in zip(got.losses, want.losses, strict=True):
        assert _relative(a, b) <= rel
    for step, (ga, gb) in enumerate(zip(got.grads, want.grads, strict=True)):
        assert ga.keys() == gb.keys()
        for name in ga:
            assert _relative(ga[name], gb[name]) <= (rel if step == 0 else later), name


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_half_budget_plan_trains_exactly(family):
    ids = family_ids(SEQ)
    reference = train(_model(family), ids, steps=2)
    model = _model(family)
    with _prepare(model, 0.5, offload=False) as prepared:
        blocks = [layer for layer in prepared.plan.layers if layer.kind == "block"]
        assert any(layer.full_recompute or layer.keep < 1 for layer in blocks)
        assert_close(reference, train(model, ids, steps=2))


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_quarter_budget_plan_trains_exactly(family):
    """A quarter of the peak: at these sizes weights and gradients alone come near it (a tiny
    mixture of experts holds 23% of its peak in them), so gradients and SGD states go to the
    host, whose step consumes them; losses and updates equal the unwrapped model's."""
    ids = family_ids(SEQ)
    reference = _model(family)
    before = {n: p.detach().clone() for n, p in reference.named_parameters()}
    expected = train(reference, ids, steps=2)
    model = _model(family)
    losses = []
    with _prepare(model, 0.25, offload=True) as prepared:
        blocks = [layer for layer in prepared.plan.layers if layer.kind == "block"]
        assert all(layer.keep < 1 or layer.full_recompute or layer.params != "gpu"
                   for layer in blocks)  # fmt: skip
        for _ in range(2):
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            losses.append(loss.detach().clone())
            prepared.optimizer.step()
            prepared.optimizer.zero_grad(set_to_none=True)
    for a, b in zip(losses, expected.losses, strict=True):
        assert _relative(a, b) <= 1e-5
    for name, param in model.named_parameters():
        want = reference.get_parameter(name).detach() - before[name]
        got = param.detach() - before[name]
        # two updates, the second from parameters the first rounded (see assert_close), plus
        # the rounding of the parameters themselves, an ulp per step (the host updates a copy)
        bound = 1e-4 * want.abs().max().item() + 2.5e-7 * before[name].abs().max().item()
        assert (got - want).abs().max().item() <= bound, name


class CustomBlock(nn.Module):
    """A decoder block no adapter knows: the executor may only keep, swap or recompute it
    whole."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, 4, batch_first=True)
        self.ff = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        causal = torch.ones(x.shape[1], x.shape[1], dtype=torch.bool).triu(1)
        x = x + self.attn(h, h, h, attn_mask=causal, need_weights=False)[0]
        return x + self.ff(x)


class CustomLM(nn.Module):
    def __init__(self, vocab: int = 97, dim: int = 32, depth: int = 4) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.layers = nn.ModuleList(CustomBlock(dim) for _ in range(depth))
        self.head = nn.Linear(dim, vocab)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(input_ids)
        for layer in self.layers:
            x = layer(x)
        return self.head(x)


def _custom_steps(model, ids, steps=2):
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    losses, grads = [], []
    for _ in range(steps):
        logits = model(ids)
        loss = nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
        loss.backward()
        losses.append(loss.detach().clone())
        grads.append([p.grad.detach().clone() for p in model.parameters()])
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return losses, grads


def test_block_without_adapter_trains_under_a_budget_through_the_generic_path():
    from memtrain.models.build import LayerSpec
    from memtrain.planner import PlanOptions
    from memtrain.planner.pipeline import PlanRequest, plan_model
    from memtrain.profile import profile_model

    ids = torch.randint(0, 97, (1, 256), generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    reference = CustomLM()
    torch.manual_seed(0)
    model = CustomLM()
    assert not block_capabilities([model.layers[0]]).tokenwise

    def loss_fn(output, inputs):
        ids = inputs["input_ids"]
        return nn.functional.cross_entropy(output[:, :-1].flatten(0, 1), ids[:, 1:].flatten())

    twin = copy.deepcopy(model)  # a measured profile steps the model it measures
    layers = [LayerSpec(f"layers.{i}", "block", [block]) for i, block in enumerate(twin.layers)]
    profile = profile_model(
        twin, {"input_ids": ids}, seq=256, loss_fn=loss_fn, optimizer="sgd", layers=layers
    )
    blocks = [layer for layer in profile.layers if layer.kind == "block"]
    assert len(blocks) == 4 and not any(layer.tokenwise for layer in blocks)
    planned = plan_model(
        profile,
        PlanRequest(
            seq=256,
            optimizers=("sgd",),
            gpu_budget_fraction=0.5,
            options=PlanOptions(allow_param_offload=False, allow_state_offload=False),
        ),
    )
    entries = [layer for layer in planned.plan.layers if layer.kind == "block"]
    assert any(layer.full_recompute or layer.keep < 1 for layer in entries)
    assert all(layer.chunks == 1 and (layer.full_recompute or layer.recompute <= 1e-6)
               for layer in entries)  # fmt: skip
    want = _custom_steps(reference, ids)
    named = {f"layers.{i}": block for i, block in enumerate(model.layers)}
    with memtrain.apply(model, planned.plan, profile=profile, layers=named):
        got = _custom_steps(model, ids)
    for a, b in zip(want[0], got[0], strict=True):
        assert abs(a.item() - b.item()) <= 1e-5 * abs(a.item())
    for ga, gb in zip(want[1], got[1], strict=True):
        for a, b in zip(ga, gb, strict=True):
            assert (a - b).abs().max() <= 1e-5 * a.abs().max() + 1e-12


def test_capabilities_agree_with_the_executor():
    for family in sorted(FAMILIES):
        block = family_model(family, num_hidden_layers=1).base_model.layers[0]
        capabilities = block_capabilities([block])
        assert capabilities.tokenwise == TokenwiseRecompute.supports([block])
        assert capabilities.tiling == TiledRecompute.supports([block], 2)
    custom = CustomBlock(32)
    assert not TokenwiseRecompute.supports([custom])
    assert not TiledRecompute.supports([custom], 2)


def test_old_profiles_read_as_capable():
    fields = {
        "name": "block.0", "kind": "block", "param_bytes": 0, "grad_bytes": 0,
        "optimizer_state_bytes": 0, "saved_bytes": 0, "saved_tensors": [], "input_bytes": 0,
        "output_bytes": 0, "forward_transient_bytes": 0, "backward_transient_bytes": 0,
        "forward_flops": 0.0, "backward_flops": 0.0, "forward_time_s": 0.0,
        "backward_time_s": 0.0,
    }  # fmt: skip
    layer = LayerProfile(**fields)
    assert layer.tokenwise and layer.tiling


class Wrapped(nn.Module):
    """A user's own decoder block around a stock one: no adapter knows its class."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.gate = nn.Parameter(torch.ones(()))

    def forward(self, hidden_states, *args, **kwargs):
        return self.inner(hidden_states * self.gate, *args, **kwargs)


def _wrapped_llama() -> nn.Module:
    model = _model("llama")
    layers = model.model.layers
    for i, layer in enumerate(layers):
        layers[i] = Wrapped(layer)
    return model


def test_prepare_plans_the_model_as_it_is_with_custom_blocks():
    """prepare() dry-runs a meta copy of the live model (not one rebuilt from its config), so
    blocks the user changed are planned, and run, through the generic whole-layer modes."""
    ids = family_ids(SEQ)
    reference = train(_wrapped_llama(), ids, steps=2)
    model = _wrapped_llama()
    with _prepare(model, 0.5, offload=False) as prepared:
        names = {p for p, _ in model.named_parameters()}
        assert any(name.endswith("gate") for name in names)
        blocks = [layer for layer in prepared.plan.layers if layer.kind == "block"]
        assert any(layer.full_recompute or layer.keep < 1 for layer in blocks)
        assert all(layer.chunks == 1 and (layer.full_recompute or layer.recompute <= 1e-6)
                   for layer in blocks)  # fmt: skip
        assert_close(reference, train(model, ids, steps=2))


def test_fused_loss_where_the_model_allows_it():
    """By default prepare() fuses the loss where the stock one can be reproduced, and plans the
    stock loss (with a note) where it cannot; insisting on it there is a one-line error."""
    from memtrain.errors import MemtrainError
    from tests.offload.conftest import make_model

    gpt2 = make_model("gpt2")
    with memtrain.prepare(gpt2, seq=32, gpu_budget_fraction=0.8, optimizer="sgd") as prepared:
        assert not prepared.fused_loss
        assert any(note.startswith("fused loss off:") for note in prepared.notes)
    with pytest.raises(MemtrainError) as raised:
        memtrain.prepare(make_model("gpt2"), seq=32, fused_loss=True, optimizer="sgd")
    assert "\n" not in str(raised.value) and "fused_loss=False" in str(raised.value)
    with memtrain.prepare(_model("phi3"), seq=64, gpu_budget_fraction=0.8, optimizer="sgd") as p:
        assert p.fused_loss
