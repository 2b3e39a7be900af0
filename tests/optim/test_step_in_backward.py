"""Optimizer step inside backward: same parameters as the ordinary step, fewer live grads."""

from __future__ import annotations

import pytest
import torch

from memtrain.errors import MemtrainError
from memtrain.optim import (
    APOLLO,
    COSMOS,
    FRUGAL,
    AdamW8bit,
    GaLoreAdamW,
    NaturalGaLore,
    register_step_in_backward,
)
from tests.optim.reference import batch, mlp, split_groups

MAKERS = {
    "torch-adamw": lambda m: torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.1),
    "torch-sgd": lambda m: torch.optim.SGD(m.parameters(), lr=1e-2, momentum=0.9),
    "galore-svd": lambda m: GaLoreAdamW(
        split_groups(m, rank=4, update_proj_gap=2, proj_method="svd"), lr=1e-2
    ),
    "galore-iter": lambda m: GaLoreAdamW(split_groups(m, rank=4, update_proj_gap=2), lr=1e-2),
    "frugal": lambda m: FRUGAL(split_groups(m, density=0.25, update_proj_gap=2), lr=1e-2),
    "frugal-8bit": lambda m: FRUGAL(
        split_groups(m, density=0.25, update_proj_gap=2), lr=1e-2, bits=8
    ),
    "galore-8bit": lambda m: GaLoreAdamW(
        split_groups(m, rank=4, update_proj_gap=2, proj_method="svd"), lr=1e-2, bits=8
    ),
    "adamw8bit": lambda m: AdamW8bit(m.parameters(), lr=1e-2),
    "apollo": lambda m: APOLLO(split_groups(m, rank=4, update_proj_gap=2), lr=1e-2),
    "apollo-mini": lambda m: APOLLO(split_groups(m, rank=1, scale_type="tensor"), lr=1e-2),
    "natural-galore": lambda m: NaturalGaLore(
        split_groups(m, rank=4, update_proj_gap=2, history=2, proj_method="svd"), lr=1e-2
    ),
    "cosmos": lambda m: COSMOS(split_groups(m, rank=4), lr=1e-2, weight_decay=0.1),
}


def _loss(model: torch.nn.Module, step: int) -> torch.Tensor:
    x, y = batch()
    return (model(x + 0.1 * step) - y).square().mean()


@pytest.mark.parametrize("name", sorted(MAKERS))
def test_step_in_backward_equals_the_ordinary_step(name: str) -> None:
    ordinary, inside = mlp(), mlp()
    opt_a, opt_b = MAKERS[name](ordinary), MAKERS[name](inside)
    handle = register_step_in_backward(inside, opt_b)
    for step in range(5):
        opt_a.zero_grad()
        _loss(ordinary, step).backward()
        opt_a.step()
        _loss(inside, step).backward()
        assert all(p.grad is None for p in inside.parameters())
    # same arithmetic per parameter; batching of refreshes differs only in rounding
    for a, b in zip(ordinary.parameters(), inside.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    handle.remove()
    _loss(inside, 0).backward()
    assert all(p.grad is not None for p in inside.parameters())


def _peak_live_grad_bytes(model: torch.nn.Module, step_inside: bool) -> int:
    params = list(model.parameters())
    opt = torch.optim.SGD(params, lr=1e-3)
    peak = 0

    def count(_: torch.Tensor) -> None:
        nonlocal peak
        live = sum(p.grad.numel() * p.grad.element_size() for p in params if p.grad is not None)
        peak = max(peak, live)

    counters = [p.register_post_accumulate_grad_hook(count) for p in params]
    handle = register_step_in_backward(model, opt) if step_inside else None
    _loss(model, 0).backward()
    if handle is None:
        opt.step()
    for c in counters:
        c.remove()
    return peak


def test_step_in_backward_keeps_fewer_gradients_alive() -> None:
    ordinary = _peak_live_grad_bytes(mlp(), step_inside=False)
    inside = _peak_live_grad_bytes(mlp(), step_inside=True)
    total = sum(p.numel() * 4 for p in mlp().parameters())
    assert ordinary == total
    # counters fire before the step hook, so the current grad plus none of the earlier ones
    largest = max(p.numel() * 4 for p in mlp().parameters())
    assert inside == largest < ordinary


def test_parameters_outside_the_optimizer_are_a_clear_error() -> None:
    model = mlp()
    opt = torch.optim.SGD([model[0].weight], lr=1e-3)
    with pytest.raises(MemtrainError, match="not in the optimizer"):
        register_step_in_backward(model, opt)


@pytest.mark.parametrize("name", sorted(MAKERS))
def test_learning_rate_of_the_current_groups_reaches_the_step_after_a_resume(name: str) -> None:
    """A resume replaces the optimizer's groups (load_state_dict); the schedule sets the
    learning rate on the new ones, and the in-backward step must take it from there."""
    model = mlp()
    optimizer = MAKERS[name](model)
    handle = register_step_in_backward(model, optimizer)
    _loss(model, 0).backward()
    optimizer.load_state_dict(optimizer.state_dict())
    for group in optimizer.param_groups:
        group["lr"] = 0.0
        group["weight_decay"] = 0.0
    before = [p.detach().clone() for p in model.parameters()]
    _loss(model, 1).backward()
    handle.remove()
    for a, b in zip(before, model.parameters(), strict=True):
        assert torch.equal(a, b)
