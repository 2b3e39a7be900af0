"""FRUGAL: the split update against a float64 reference, full-rank updates, input checks."""

from __future__ import annotations

import math

import pytest
import torch

from memtrain.errors import MemtrainError
from memtrain.optim import FRUGAL
from memtrain.optim.lowrank import subspace_size
from tests.optim.reference import mlp, split_groups, train


def _reference_step(
    w: torch.Tensor,
    g: torch.Tensor,
    state: dict,
    subspace,
    since: int,
    lr: float,
    wd: float,
    free: str,
) -> torch.Tensor:
    """One FRUGAL step in float64: split, AdamW (torch rules) on the part, free rule on the rest.

    ``subspace`` is (kind, data) as the optimizer chose it; the reference re-derives the split.
    """
    b1, b2, eps = 0.9, 0.999, 1e-8
    kind, data = subspace
    if kind == "columns":
        part = g[:, data]
    elif kind == "blocks":
        part = g[data]
    else:  # right projection of a tall weight
        part = g @ data.T
    if "m" not in state:
        state["m"] = torch.zeros_like(part)
        state["v"] = torch.zeros_like(part)
    state["m"] = b1 * state["m"] + (1 - b1) * part
    state["v"] = b2 * state["v"] + (1 - b2) * part * part
    denom = state["v"].sqrt() / math.sqrt(1 - b2**since) + eps
    adam = lr / (1 - b1**since) * state["m"] / denom
    rest = g.clone()
    if kind == "columns":
        rest[:, data] = 0  # overwritten by the AdamW part below
    elif kind == "blocks":
        rest[data] = 0
    else:
        rest = g - part @ data  # the residual outside the projected subspace
    free_step = lr * (rest.sign() if free == "signsgd" else rest)
    w = w * (1 - lr * wd) - free_step
    if kind == "columns":
        w[:, data] -= adam
    elif kind == "blocks":
        w[data] -= adam
    else:
        w = w - adam @ data
    return w


def _subspace_of(state: dict, kind: str, shape: tuple[int, int], group: dict):
    if kind == "columns":
        return kind, state["indices"]
    if kind == "blocks":
        start = int(state["block_start"])
        return kind, slice(start, start + subspace_size(shape, group))
    return kind, state["projection"].double()


def _reference_transfer(state: dict, old, new, transfer: str) -> None:
    """Moments carried from subspace ``old`` to ``new`` in float64, written out per kind."""
    if "m" not in state:
        return
    if transfer == "reset":
        del state["m"], state["v"]
        return
    kind, before = old
    _, after = new
    m, v = state["m"], state["v"]
    if kind == "columns":
        cols = before.tolist()
        keep = [cols.index(j) if j in cols else None for j in after.tolist()]
        state["m"] = torch.stack([m[:, k] if k is not None else 0 * m[:, 0] for k in keep], 1)
        state["v"] = torch.stack([v[:, k] if k is not None else 0 * v[:, 0] for k in keep], 1)
    elif kind == "blocks":
        rows = range(before.start, before.stop)
        pick = [i - before.start if i in rows else None for i in range(after.start, after.stop)]
        state["m"] = torch.stack([m[k] if k is not None else 0 * m[0] for k in pick])
        state["v"] = torch.stack([v[k] if k is not None else 0 * v[0] for k in pick])
    else:  # right projection: low = G P^T
        c = before @ after.T
        state["m"], state["v"] = m @ c, v @ (c * c)


@pytest.mark.parametrize("transfer", ["project", "reset"])
@pytest.mark.parametrize("kind", ["svd", "random", "columns", "blocks"])
@pytest.mark.parametrize("free", ["signsgd", "sgd"])
def test_frugal_matches_a_float64_reference(kind: str, free: str, transfer: str) -> None:
    torch.manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(20, 8, dtype=torch.float64))
    group = {"params": [weight], "density": 0.25, "proj_type": kind, "free_update": free}
    group["update_proj_gap"] = 3
    group["moment_transfer"] = transfer
    opt = FRUGAL([group], lr=0.01, weight_decay=0.1)
    expected = weight.detach().clone()
    ref_state: dict = {}
    previous = None
    for t in range(10):
        grad = torch.randn(20, 8, dtype=torch.float64)
        weight.grad = grad.clone()
        opt.step()
        sub = _subspace_of(opt.state[weight], kind, (20, 8), opt.param_groups[0])
        if previous is not None and t % 3 == 0:
            _reference_transfer(ref_state, previous, sub, transfer)
        previous = (kind, sub[1].clone() if isinstance(sub[1], torch.Tensor) else sub[1])
        since = t % 3 + 1 if transfer == "reset" else t + 1
        expected = _reference_step(expected, grad, ref_state, sub, since, 0.01, 0.1, free)
        # float64: relative error below 1e-12 after every step
        err = (weight.detach() - expected).norm() / expected.norm()
        assert float(err) < 1e-12, (t, float(err))


def test_projected_moments_follow_the_subspace() -> None:
    """The first moment moved into the new subspace equals the old one seen from it."""
    model = mlp()
    opt = FRUGAL(split_groups(model, density=0.25, proj_type="random", update_proj_gap=2), lr=1e-2)
    train(model, opt, 2)
    state = opt.state[model[0].weight]
    old_proj, old_avg = state["projection"].clone(), state["exp_avg"].clone()
    opt.step()  # step 2 (same gradient): new projection, moments carried before the update
    full = old_avg @ old_proj  # the old first moment in weight space (right projection)
    carried = (state["exp_avg"] - 0.1 * (model[0].weight.grad @ state["projection"].T)) / 0.9
    torch.testing.assert_close(carried, full @ state["projection"].T, rtol=1e-4, atol=1e-6)


def test_frugal_update_is_full_rank() -> None:
    model = mlp()
    opt = FRUGAL(split_groups(model, rank=2, proj_type="svd"), lr=1e-2)
    before = model[0].weight.detach().clone()
    train(model, opt, 1)
    delta = model[0].weight.detach() - before
    assert int(torch.linalg.matrix_rank(delta)) == min(delta.shape)  # 16, not the rank 2


def test_moments_reset_when_the_subspace_changes() -> None:
    model = mlp()
    keys = {"density": 0.25, "proj_type": "columns", "update_proj_gap": 2}
    opt = FRUGAL(split_groups(model, moment_transfer="reset", **keys), lr=1e-2)
    train(model, opt, 2)
    state = opt.state[model[0].weight]
    old = state["indices"].clone()
    assert float(state["exp_avg"].abs().sum()) > 0
    train(model, opt, 1, start=2)  # step 2: new columns, moments restarted from this gradient
    grad_part = model[0].weight.grad[:, state["indices"]]
    torch.testing.assert_close(state["exp_avg"], 0.1 * grad_part, rtol=1e-6, atol=0)
    assert not torch.equal(old, state["indices"])


def test_subspace_sizes() -> None:
    group = {"proj_type": "columns", "density": 0.25}
    assert subspace_size((40, 16), group) == 4
    assert subspace_size((40, 16), {"proj_type": "blocks", "density": 0.25}) == 10
    assert subspace_size((40, 16), {"proj_type": "svd", "rank": 100}) == 16


@pytest.mark.parametrize(
    ("keys", "message"),
    [
        ({"density": 1.5}, "density"),
        ({"density": 0.2, "rank": 3}, "either"),
        ({"density": 0.2, "proj_type": "std"}, "proj_type"),
        ({"density": 0.2, "free_update": "adam"}, "free_update"),
        ({"density": 0.2, "moment_transfer": "keep"}, "moment_transfer"),
    ],
)
def test_bad_group_keys_are_clear_errors(keys: dict, message: str) -> None:
    with pytest.raises(MemtrainError, match=message):
        FRUGAL(split_groups(mlp(), **keys), lr=1e-3)
