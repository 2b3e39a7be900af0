"""APOLLO / APOLLO-Mini against a float64 reference (channel and tensor scaling, limiter,
projection re-sampling), and input checks."""

from __future__ import annotations

import math

import pytest
import torch

from memtrain.errors import MemtrainError
from memtrain.optim import APOLLO, build_optimizer
from memtrain.optim.apollo import apollo_projection
from tests.optim.reference import mlp, split_groups


def reference_apollo(w, grads, projs, lr, scale, wd, tensor_wise, growth, eps=1e-6):
    """APOLLO written out in float64 for a tall weight (right projection ``G P^T``)."""
    b1, b2 = 0.9, 0.999
    w = w.clone()
    m = v = prev = None
    for t, (g, p) in enumerate(zip(grads, projs, strict=True), start=1):
        r = g @ p.T
        if m is None:
            m, v = torch.zeros_like(r), torch.zeros_like(r)
        m = b1 * m + (1 - b1) * r
        v = b2 * v + (1 - b2) * r * r
        adam = m / (v.sqrt() + eps) * math.sqrt(1 - b2**t) / (1 - b1**t)
        if tensor_wise:
            s = adam.norm() / (r.norm() + 1e-8)
        else:
            s = (adam.norm(dim=1) / (r.norm(dim=1) + 1e-8)).unsqueeze(1)
        upd = g * s
        if growth and prev is not None and upd.norm() > growth * prev:
            upd = upd * (growth * prev / upd.norm())
        prev = upd.norm().float().double()  # the optimizer keeps it in float32
        w = w - lr * scale * upd
        w = w - lr * wd * w
    return w


@pytest.mark.parametrize("tensor_wise", [False, True])
@pytest.mark.parametrize("growth", [0.0, 1.01])
def test_apollo_matches_a_float64_reference(tensor_wise: bool, growth: float) -> None:
    torch.manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(20, 8, dtype=torch.float64))
    rank = 1 if tensor_wise else 3
    keys = {"rank": rank, "update_proj_gap": 3, "scale": 2.0, "norm_growth": growth}
    keys["scale_type"] = "tensor" if tensor_wise else "channel"
    opt = APOLLO([{"params": [weight], **keys}], lr=0.01, weight_decay=0.1, seed=5)
    grads = [torch.randn(20, 8, dtype=torch.float64) * (1 + t) for t in range(7)]
    projs = [
        apollo_projection((20, 8), rank, "right", 5, 0, t - t % 3, weight.device, torch.float64)
        for t in range(7)
    ]
    assert not torch.equal(projs[2], projs[3])  # re-sampled at step 3
    assert torch.equal(projs[3], projs[5])
    expected = reference_apollo(weight.detach(), grads, projs, 0.01, 2.0, 0.1, tensor_wise, growth)
    for g in grads:
        weight.grad = g.clone()
        opt.step()
    torch.testing.assert_close(weight.detach(), expected, rtol=1e-12, atol=1e-12)


def test_the_limiter_caps_norm_growth() -> None:
    weight = torch.nn.Parameter(torch.zeros(16, 4))
    opt = APOLLO([{"params": [weight], "rank": 2, "norm_growth": 1.01}], lr=1.0)
    weight.grad = torch.ones(16, 4)
    opt.step()
    opt.state[weight]["prev_norm"].fill_(1e-3)  # the last step was tiny
    before = weight.detach().clone()
    opt.step()
    assert float(opt.state[weight]["prev_norm"]) == pytest.approx(1.01e-3, rel=1e-4)
    assert float((weight.detach() - before).norm()) == pytest.approx(1.01e-3, rel=1e-4)


def test_apollo_mini_spec_defaults() -> None:
    opt = build_optimizer(list(mlp().parameters()), "apollo-mini")
    group = next(g for g in opt.param_groups if "rank" in g)
    assert group["rank"] == 1 and group["scale_type"] == "tensor"
    assert group["scale"] == pytest.approx(math.sqrt(128))


def test_the_projection_is_not_stored() -> None:
    model = mlp()
    opt = APOLLO(split_groups(model, rank=2), lr=1e-2)
    x = torch.randn(8, 16)
    model(x).sum().backward()
    opt.step()
    assert set(opt.state[model[0].weight]) == {"step", "exp_avg", "exp_avg_sq", "prev_norm"}


@pytest.mark.parametrize(
    ("keys", "message"),
    [({"scale_type": "row"}, "scale_type"), ({"norm_growth": -1.0}, "norm_growth")],
)
def test_bad_group_keys_are_clear_errors(keys: dict, message: str) -> None:
    with pytest.raises(MemtrainError, match=message):
        APOLLO(split_groups(mlp(), rank=2, **keys), lr=1e-3)


def test_apollo_torch_when_installed() -> None:
    """apollo-torch's own optimizer, where it installs: same state layout (two rank-r
    moments per projected weight)."""
    apollo_torch = pytest.importorskip("apollo_torch")
    model = mlp()
    opt = apollo_torch.APOLLOAdamW(
        [
            {
                "params": [model[0].weight],
                "rank": 2,
                "proj": "random",
                "scale_type": "channel",
                "scale": 1,
                "update_proj_gap": 200,
                "proj_type": "std",
            }
        ],
        lr=1e-2,
    )
    model(torch.randn(8, 16)).sum().backward()
    opt.step()
    state = opt.state[model[0].weight]
    assert state["exp_avg"].shape == (40, 2)
