"""Natural GaLore: the Woodbury step against a direct float64 inverse of the empirical Fisher,
its limit (large damping) equal to GaLore, and input checks."""

from __future__ import annotations

import math

import pytest
import torch

from memtrain.errors import MemtrainError
from memtrain.optim import GaLoreAdamW, NaturalGaLore
from memtrain.optim.natural_galore import natural_gradient
from tests.optim.reference import mlp, split_groups, train


def reference_natural_galore(w, grads, rank, gap, history, damping, lr, scale, wd, eps=1e-6):
    """Float64, right projection of a tall weight, Fisher inverted directly (d x d)."""
    b1, b2 = 0.9, 0.999
    w = w.clone()
    m = v = proj = None
    past: list[torch.Tensor] = []
    for t, g in enumerate(grads):
        if t % gap == 0:
            proj = torch.linalg.svd(g, full_matrices=False)[2][:rank]
            past = []
        low = g @ proj.T
        past = (past + [low.reshape(-1)])[-history:]
        h = torch.stack(past)
        fisher = damping * torch.eye(low.numel(), dtype=g.dtype) + h.T @ h
        nat = torch.linalg.solve(fisher, low.reshape(-1)).view(low.shape)
        if m is None:
            m, v = torch.zeros_like(low), torch.zeros_like(low)
        m = b1 * m + (1 - b1) * nat
        v = b2 * v + (1 - b2) * nat * nat
        k = t + 1
        size = lr * math.sqrt(1 - b2**k) / (1 - b1**k)
        w = w - size * scale * ((m / (v.sqrt() + eps)) @ proj)
        w = w - lr * wd * w
    return w


def test_natural_galore_matches_a_float64_reference() -> None:
    torch.manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(24, 10, dtype=torch.float64))
    base = torch.randn(24, 3, dtype=torch.float64) @ torch.randn(3, 10, dtype=torch.float64)
    grads = [base + 0.3 * torch.randn(24, 10, dtype=torch.float64) for _ in range(9)]
    keys = {"rank": 3, "update_proj_gap": 4, "scale": 0.5, "proj_method": "svd"}
    keys |= {"history": 3, "damping": 0.05}
    opt = NaturalGaLore([{"params": [weight], **keys}], lr=0.05, weight_decay=0.1)
    expected = reference_natural_galore(weight.detach(), grads, 3, 4, 3, 0.05, 0.05, 0.5, 0.1)
    for g in grads:
        weight.grad = g.clone()
        opt.step()
    torch.testing.assert_close(weight.detach(), expected, rtol=1e-10, atol=1e-10)


def test_woodbury_equals_the_direct_inverse() -> None:
    gen = torch.Generator().manual_seed(3)
    h = torch.randn(4, 30, generator=gen, dtype=torch.float64)
    g = torch.randn(5, 6, generator=gen, dtype=torch.float64)
    direct = torch.linalg.solve(0.1 * torch.eye(30, dtype=torch.float64) + h.T @ h, g.reshape(-1))
    # the history stacks low-rank gradients shaped like g
    torch.testing.assert_close(natural_gradient(g, h.view(4, 5, 6), 0.1).reshape(-1), direct)


def test_large_damping_is_galore() -> None:
    """(lambda I + H^T H)^-1 g -> g / lambda, and Adam is scale-free once eps scales too."""
    a, b = mlp(dtype=torch.float64), mlp(dtype=torch.float64)
    keys = {"rank": 4, "update_proj_gap": 3, "proj_method": "svd"}
    galore = GaLoreAdamW(split_groups(a, **keys), lr=1e-2, eps=1e-6)
    natural = NaturalGaLore(split_groups(b, damping=1e12, **keys), lr=1e-2, eps=1e-18)
    for group in natural.param_groups:
        if "rank" not in group:
            group["eps"] = 1e-6  # dense groups see no Fisher step
    train(a, galore, 6)
    train(b, natural, 6)
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize(
    ("keys", "message"), [({"history": 0}, "history"), ({"damping": 0.0}, "damping")]
)
def test_bad_group_keys_are_clear_errors(keys: dict, message: str) -> None:
    with pytest.raises(MemtrainError, match=message):
        NaturalGaLore(split_groups(mlp(), rank=2, **keys), lr=1e-3)


def test_a_checkpoint_with_the_flat_history_resumes() -> None:
    """States saved when the history was one flat row per gradient load and step the same."""
    a, b = mlp(dtype=torch.float64), mlp(dtype=torch.float64)
    keys = {"rank": 4, "update_proj_gap": 5, "proj_method": "svd", "history": 3}
    first = NaturalGaLore(split_groups(a, **keys), lr=1e-2)
    train(a, first, steps=2)
    saved = first.state_dict()
    for state in saved["state"].values():
        if "history" in state:
            state["history"] = state["history"].reshape(state["history"].shape[0], -1)
    b.load_state_dict(a.state_dict())
    second = NaturalGaLore(split_groups(b, **keys), lr=1e-2)
    second.load_state_dict(saved)
    train(a, first, steps=2, start=2)
    train(b, second, steps=2, start=2)
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(p, q)
