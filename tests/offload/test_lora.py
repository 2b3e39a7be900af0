"""prepare() on a PEFT LoRA model, the usual way to fine-tune: the plan runs, the fused loss
patches the causal LM inside the wrapper, and losses and the adapters' gradients equal the
unplanned PEFT model's. A LoRA-wrapped LM head keeps the stock loss (its output is more than
weight and bias), with a note."""

from __future__ import annotations

import pytest
import torch

import memtrain
from tests.families import family_ids, family_model

peft = pytest.importorskip("peft")

SEQ = 512
SHAPE = {
    "hidden_size": 64, "intermediate_size": 256, "moe_intermediate_size": 128,
    "num_attention_heads": 1, "num_key_value_heads": 1, "head_dim": 64,
}  # fmt: skip


def _lora_model(family: str, targets: list[str]) -> torch.nn.Module:
    torch.manual_seed(0)
    model = family_model(family, **SHAPE)
    config = peft.LoraConfig(r=8, lora_alpha=16, target_modules=targets, lora_dropout=0.0)
    torch.manual_seed(1)
    lora = peft.get_peft_model(model, config)
    for name, param in lora.named_parameters():  # B starts at zero: give it values to check
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.02)
    return lora.train()


def _step(model: torch.nn.Module, ids: torch.Tensor):
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads


@pytest.mark.parametrize(
    "family,targets,fused",
    [
        ("llama", ["q_proj", "v_proj", "o_proj"], True),
        ("mixtral", ["q_proj", "k_proj", "v_proj", "o_proj"], True),
        ("qwen3", ["q_proj", "v_proj", "lm_head"], False),
    ],
)
def test_lora_model_trains_exactly_under_a_plan(family, targets, fused):
    ids = family_ids(SEQ)
    want_loss, want = _step(_lora_model(family, targets), ids)
    assert want and all("lora_" in name for name in want)
    model = _lora_model(family, targets)
    prepared = memtrain.prepare(
        model, seq=SEQ, gpu_budget_fraction=0.5, optimizer="sgd", lr=0.0, state_offload=False
    )
    with prepared:
        blocks = [layer for layer in prepared.plan.layers if layer.kind == "block"]
        assert any(layer.full_recompute or layer.keep < 1 for layer in blocks)
        assert prepared.plan.fused_loss is fused
        assert any("fused loss off" in note for note in prepared.notes) is not fused
        got_loss, got = _step(model, ids)
    assert abs(got_loss - want_loss) <= 1e-5 * abs(want_loss)
    assert got.keys() == want.keys()
    for name, grad in want.items():
        assert (got[name] - grad).norm() <= 1e-5 * grad.norm(), name
    inner = model.get_base_model()
    assert "forward" not in vars(inner)  # the stock forward is back
