"""COSMOS against a float64 reference of the paper's update (tall and wide weights), and
input checks."""

from __future__ import annotations

import math

import pytest
import torch

from memtrain.errors import MemtrainError
from memtrain.optim import COSMOS
from memtrain.optim.subspace import random_subspace, seeded_generator
from tests.optim.reference import mlp, split_groups


def ns5(x: torch.Tensor, steps: int) -> torch.Tensor:
    a, b, c = 3.4445, -4.7750, 2.0315
    y = x / x.norm()
    flip = y.shape[0] > y.shape[1]
    y = y.T if flip else y
    for _ in range(steps):
        s = y @ y.T
        y = a * y + b * s @ y + c * s @ s @ y
    return y.T if flip else y


def reference_cosmos(w, grads, u0, lr, gamma, wd, unit, eps=1e-6):
    """The paper's equations in float64 (``w`` tall: m >= n, basis n x r)."""
    b1, b2 = 0.9, 0.999
    w = w.clone()
    m_rows, n = w.shape
    mom = torch.zeros_like(w)
    u, s = u0.clone(), torch.zeros(u0.shape[1], u0.shape[1], dtype=w.dtype)
    v = torch.zeros(m_rows, u0.shape[1], dtype=w.dtype)

    def norm(x):
        return math.sqrt(n) * x / x.norm()

    for t, g in enumerate(grads, start=1):
        mom = b1 * mom + (1 - b1) * g
        u_new = torch.linalg.qr(b2 * u @ s + (1 - b2) * g.T @ g @ u).Q
        s = u_new.T @ (b2 * u @ s @ u.T + (1 - b2) * g.T @ g) @ u_new
        u = u_new
        v = b2 * v + (1 - b2) * (g @ u) ** 2
        a = ((mom @ u) / (1 - b1**t) / ((v + eps) / (1 - b2**t)).sqrt()) @ u.T
        res = mom - mom @ u @ u.T
        b = norm(ns5(res / res.norm(), 5))
        step = norm(a + gamma * b * math.sqrt(m_rows))
        if unit:
            step = step * math.sqrt(m_rows)
        w = w * (1 - lr * wd) - lr * step
    return w


@pytest.mark.parametrize("wide", [False, True])
@pytest.mark.parametrize("step_rms", ["unit", "paper"])
def test_cosmos_matches_a_float64_reference(wide: bool, step_rms: str) -> None:
    torch.manual_seed(0)
    shape = (8, 20) if wide else (20, 8)
    weight = torch.nn.Parameter(torch.randn(shape, dtype=torch.float64))
    keys = {"rank": 3, "gamma": 0.3, "step_rms": step_rms}
    opt = COSMOS([{"params": [weight], **keys}], lr=0.01, weight_decay=0.1, seed=4)
    grads = [torch.randn(shape, dtype=torch.float64) for _ in range(6)]
    u0 = random_subspace(8, 3, seeded_generator(torch.device("cpu"), 4, 0, 0), weight.device)
    tall = (lambda x: x.T) if wide else (lambda x: x)
    expected = reference_cosmos(
        tall(weight.detach()),
        [tall(g) for g in grads],
        u0.double(),
        0.01,
        0.3,
        0.1,
        step_rms == "unit",
    )
    for g in grads:
        weight.grad = g.clone()
        opt.step()
    torch.testing.assert_close(tall(weight.detach()), expected, rtol=1e-10, atol=1e-10)


def test_the_basis_stays_orthonormal() -> None:
    model = mlp()
    opt = COSMOS(split_groups(model, rank=4), lr=1e-2)
    for _ in range(4):
        opt.zero_grad()
        model(torch.randn(8, 16)).square().mean().backward()
        opt.step()
    u = opt.state[model[0].weight]["basis"]
    torch.testing.assert_close(u.T @ u, torch.eye(4), atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    ("keys", "message"),
    [({"step_rms": "big"}, "step_rms"), ({"gamma": -1.0}, "gamma"), ({"ns_steps": -1}, "ns")],
)
def test_bad_group_keys_are_clear_errors(keys: dict, message: str) -> None:
    with pytest.raises(MemtrainError, match=message):
        COSMOS(split_groups(mlp(), rank=2, **keys), lr=1e-3)
