"""GaLoreAdamW / GaLoreAdafactor: math against a float64 reference, against galore-torch, and
input checks."""

from __future__ import annotations

import math

import pytest
import torch

from memtrain.errors import MemtrainError
from memtrain.optim import GaLoreAdafactor, GaLoreAdamW, captured_energy
from tests.optim.reference import galore_torch_module, mlp, split_groups, train


def reference_galore_adamw(
    weight: torch.Tensor,
    grads: list[torch.Tensor],
    rank: int,
    gap: int,
    scale: float,
    lr: float,
    betas: tuple[float, float],
    eps: float,
    weight_decay: float,
) -> torch.Tensor:
    """GaLore-Adam written out step by step in float64 (right projection, tall weight)."""
    w = weight.double().clone()
    m = v = proj = None
    b1, b2 = betas
    for t, grad in enumerate(grads):
        g = grad.double()
        if t % gap == 0:
            _, _, vh = torch.linalg.svd(g, full_matrices=False)
            proj = vh[:rank]  # r x n
        low = g @ proj.T
        if m is None:
            m, v = torch.zeros_like(low), torch.zeros_like(low)
        m = b1 * m + (1 - b1) * low
        v = b2 * v + (1 - b2) * low * low
        step = t + 1
        size = lr * math.sqrt(1 - b2**step) / (1 - b1**step)
        w = w - size * scale * ((m / (v.sqrt() + eps)) @ proj)
        w = w - lr * weight_decay * w
    return w


def test_galore_adamw_matches_a_float64_reference() -> None:
    torch.manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(30, 12, dtype=torch.float64))
    grads = [torch.randn(30, 4, dtype=torch.float64) @ torch.randn(4, 12, dtype=torch.float64)]
    grads += [grads[0] + 0.3 * torch.randn(30, 12, dtype=torch.float64) for _ in range(6)]
    keys = {"rank": 3, "update_proj_gap": 3, "scale": 0.5, "proj_type": "std", "proj_method": "svd"}
    opt = GaLoreAdamW([{"params": [weight], **keys}], lr=0.05, weight_decay=0.1)
    expected = reference_galore_adamw(
        weight.detach(), grads, 3, 3, 0.5, 0.05, (0.9, 0.999), 1e-6, 0.1
    )
    for g in grads:
        weight.grad = g.clone()
        opt.step()
    # float64 throughout: relative error below 1e-10
    err = (weight.detach() - expected).norm() / expected.norm()
    assert float(err) < 1e-10


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_galore_adamw_matches_galore_torch(weight_decay: float) -> None:
    reference = galore_torch_module("adamw")
    keys = {"rank": 4, "update_proj_gap": 3, "scale": 0.5, "proj_type": "std"}
    theirs, ours = mlp(), mlp()
    ref_opt = reference.AdamW(
        split_groups(theirs, **keys),
        lr=1e-2,
        weight_decay=weight_decay,
        no_deprecation_warning=True,
    )
    our_opt = GaLoreAdamW(
        split_groups(ours, **keys, proj_method="svd"), lr=1e-2, weight_decay=weight_decay
    )
    train(theirs, ref_opt, 10)
    train(ours, our_opt, 10)
    # float32, 10 steps with 4 refreshes: parameters agree to 1e-6 absolute (rounding only)
    for a, b in zip(theirs.parameters(), ours.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"lr": 1e-2, "relative_step": False, "scale_parameter": False, "beta1": 0.9},
        {"weight_decay": 0.05},
    ],
)
def test_galore_adafactor_matches_galore_torch(kwargs: dict) -> None:
    reference = galore_torch_module("adafactor")
    keys = {"rank": 4, "update_proj_gap": 3, "scale": 0.5, "proj_type": "std"}
    theirs, ours = mlp(), mlp()
    ref_opt = reference.Adafactor(split_groups(theirs, **keys), **kwargs)
    our_opt = GaLoreAdafactor(split_groups(ours, **keys, proj_method="svd"), **kwargs)
    train(theirs, ref_opt, 8)
    train(ours, our_opt, 8)
    for a, b in zip(theirs.parameters(), ours.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    ("proj_type", "shapes"),
    [
        ("std", {(40, 16): (40, 4), (12, 40): (4, 40)}),
        ("reverse_std", {(40, 16): (4, 16), (12, 40): (12, 4)}),
        ("left", {(40, 16): (4, 16), (12, 40): (4, 40)}),
        ("right", {(40, 16): (40, 4), (12, 40): (12, 4)}),
    ],
)
def test_projection_side_follows_proj_type(proj_type: str, shapes: dict) -> None:
    model = mlp()
    opt = GaLoreAdamW(split_groups(model, rank=4, proj_type=proj_type), lr=1e-3)
    train(model, opt, 1)
    for weight in (model[0].weight, model[2].weight):
        assert tuple(opt.state[weight]["exp_avg"].shape) == shapes[tuple(weight.shape)]


def test_iterative_refresh_captures_the_gradient_energy() -> None:
    model = mlp()
    keys = {"rank": 4, "update_proj_gap": 2, "proj_iters": 2}
    opt = GaLoreAdamW(split_groups(model, **keys), lr=1e-2)
    train(model, opt, 5)  # refreshes at steps 0, 2 and 4; the last one is warm
    weight = model[0].weight  # tall: right projection, basis = projection^T
    proj = opt.state[weight]["projection"]
    assert proj.shape == (4, 16)
    torch.testing.assert_close(proj @ proj.T, torch.eye(4), rtol=0, atol=1e-5)
    # threshold: >= 99% of the exact top-4 energy of the gradient it was computed from
    assert captured_energy(weight.grad.T, proj.T) > 0.99


def test_projected_update_has_the_projection_rank() -> None:
    model = mlp()
    opt = GaLoreAdamW(split_groups(model, rank=3, update_proj_gap=100), lr=1e-2)
    before = model[0].weight.detach().clone()
    train(model, opt, 3)
    assert int(torch.linalg.matrix_rank(model[0].weight.detach() - before)) == 3


@pytest.mark.parametrize(
    ("keys", "message"),
    [
        ({"rank": 0}, "rank"),
        ({"rank": 4, "proj_type": "full"}, "proj_type"),
        ({"rank": 4, "proj_method": "eig"}, "proj_method"),
        ({"rank": 4, "update_proj_gap": 0}, "update_proj_gap"),
    ],
)
def test_bad_group_keys_are_clear_errors(keys: dict, message: str) -> None:
    with pytest.raises(MemtrainError, match=message):
        GaLoreAdamW(split_groups(mlp(), **keys), lr=1e-3)


def test_one_dimensional_parameters_cannot_be_projected() -> None:
    model = mlp()
    with pytest.raises(MemtrainError, match="2-D"):
        GaLoreAdamW([{"params": [model[0].bias], "rank": 2}], lr=1e-3)


def test_adafactor_lr_rules_are_checked() -> None:
    with pytest.raises(MemtrainError, match="relative_step"):
        GaLoreAdafactor(mlp().parameters(), lr=1e-3)
