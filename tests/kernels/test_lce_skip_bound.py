"""The filtered Triton backward skips blocks that the forward's logit maxima prove negligible.

:func:`preskip_keep` (plain torch) is checked against a brute-force look at every probability.
The kernels run in Triton's CPU interpreter (``interpret_worker.py preskip``): the gradients
with the bound must equal those without it bit for bit (the same blocks are skipped, only
earlier), stay within the float64 tolerances, and on peaked inputs the bound must skip most
blocks, or it would cost a table for nothing.
"""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("triton")

from memtrain.kernels.cross_entropy.triton_bwd import BOUND_SLACK, preskip_keep  # noqa: E402
from tests.kernels.interpret_worker import PRESKIP_CASES, run_interpreted  # noqa: E402


def _pad(z: torch.Tensor, block: tuple[int, int], value: float) -> torch.Tensor:
    """``z`` padded with ``value`` to whole blocks, viewed as [row blocks, bm, col blocks, bv]."""
    (bm, bv), (n, v) = block, z.shape
    rb, cb = -(-n // bm), -(-v // bv)
    out = z.new_full((rb * bm, cb * bv), value)
    out[:n, :v] = z
    return out.view(rb, bm, cb, bv)


def _cell_max(z: torch.Tensor, targets: torch.Tensor, cell: tuple[int, int]) -> torch.Tensor:
    """What the forward records: the largest logit of each cell, rows with a target only."""
    z = torch.where(targets[:, None] >= 0, z, float("-inf"))
    return _pad(z, cell, float("-inf")).amax((1, 3))


def _negligible(z, lse, targets, grad_rows, block, eps) -> torch.Tensor:
    """Per block: no live row (grad_rows != 0) has a probability >= eps or its target there."""
    live = grad_rows != 0
    probs = torch.where(live[:, None], torch.exp(z - lse[:, None]), 0.0)
    small = _pad(probs, block, 0.0).amax((1, 3)) < eps
    hits = torch.zeros_like(small)
    rows = torch.nonzero(live & (targets >= 0)).flatten()
    hits[rows // block[0], targets[rows].long() // block[1]] = True
    return small & ~hits


def _problem(kind: str, n: int = 77, v: int = 301, seed: int = 0):
    """Logits, their log-sum-exp, targets (some ignored) and row gradients (some zero)."""
    g = torch.Generator().manual_seed(seed)
    z = 2.0 * torch.randn(n, v, generator=g)
    targets = torch.randint(0, v, (n,), generator=g, dtype=torch.int32)
    if kind == "peaked":  # log-sum-exp near 30, off-target probabilities near exp(-28)
        z[torch.arange(n), targets.long()] += 30.0 + torch.rand(n, generator=g)
    targets[torch.rand(n, generator=g) < 0.15] = -1
    grad_rows = torch.randn(n, generator=g) * (targets >= 0)
    grad_rows[20:30] = 0.0  # valid targets without gradient
    return z, torch.logsumexp(z, -1), targets, grad_rows


SHAPES = [
    ((16, 32), (16, 32)),
    ((16, 64), (32, 16)),
    ((32, 16), (16, 64)),
    ((16, 16), (64, 32)),
    ((64, 64), (16, 16)),
    ((8, 8), (32, 32)),
]


@pytest.mark.parametrize("cell, block", SHAPES)
@pytest.mark.parametrize("kind, eps", [("random", 1e-2), ("random", 0.2), ("peaked", 1e-6)])
def test_keep_table_skips_only_negligible_blocks(cell, block, kind, eps):
    z, lse, targets, grad_rows = _problem(kind)
    keep = preskip_keep(
        _cell_max(z, targets, cell), cell, block, z.shape[1], lse, targets, grad_rows, eps
    )
    negligible = _negligible(z, lse, targets, grad_rows, block, eps)
    assert keep.dtype == torch.uint8 and keep.shape == negligible.shape
    skipped = keep == 0
    assert not (skipped & ~negligible).any(), "skipped a block that holds a target or prob >= eps"
    whole_cells = block[0] % cell[0] == 0 and block[1] % cell[1] == 0
    if kind == "peaked" and whole_cells:  # the bound must be of use, not just safe
        assert skipped.sum() >= 0.6 * negligible.sum() > 0


def test_keep_table_is_tight_for_one_row_cells():
    """With one-row cells equal to the blocks the bound is the row's own largest probability:
    the table then keeps exactly the blocks that are not negligible, but for those within the
    rounding margin of eps."""
    z, lse, targets, grad_rows = _problem("random", seed=1)
    eps, block = 0.05, (1, 8)
    table = _cell_max(z, targets, block)
    keep = preskip_keep(table, block, block, z.shape[1], lse, targets, grad_rows, eps)
    negligible = _negligible(z, lse, targets, grad_rows, block, eps)
    margin = (table - lse[:, None] - math.log(eps)).abs()
    near = table.isfinite() & (margin <= BOUND_SLACK * (1 + table.abs()))
    assert ((keep == 0) == negligible)[~near].all()
    assert negligible.sum() > 0 and near.sum() < 0.05 * near.numel()


def test_rows_without_gradient_and_nan():
    """A block of rows without gradient is skipped whatever its logits and targets; a NaN
    bound keeps its block."""
    z, lse, targets, grad_rows = _problem("random", n=48, v=64)
    grad_rows[16:32] = 0.0
    table = _cell_max(z, targets, (16, 16))
    table[0, 1] = float("nan")
    keep = preskip_keep(table, (16, 16), (16, 16), 64, lse, targets, grad_rows, 1e-30)
    assert (keep[1] == 0).all()
    assert keep[0, 1] == 1
    assert (keep[0] == 1).all() and (keep[2] == 1).all()  # eps 1e-30 keeps every live block


# ----------------------------------------------------------------------------- interpreter


@pytest.fixture(scope="module")
def runs():
    return run_interpreted("preskip")


@pytest.mark.parametrize("name", sorted(PRESKIP_CASES))
def test_preskip_matches_plain_filter_exactly(runs, name):
    result = runs[name]
    assert all(d == 0.0 for d in result["diff"].values()), result["diff"]
    on, off = result["stats_on"], result["stats_off"]
    assert off["pre_skipped"] == 0 and on["tiles"] == off["tiles"] > 0
    assert on["skipped"] == off["skipped"] and on["pre_skipped"] <= on["skipped"]


@pytest.mark.parametrize("name", sorted(PRESKIP_CASES))
def test_preskip_within_float64_tolerance(runs, name):
    result = runs[name]
    bad = {k: e for k, e in result["errors"].items() if not e < result["tol"]}
    assert not bad, f"{name}: {bad} (tolerance {result['tol']})"


@pytest.mark.parametrize("name", sorted(PRESKIP_CASES))
def test_preskip_share(runs, name):
    on = runs[name]["stats_on"]
    assert on["pre_skipped"] >= runs[name]["min_share"] * on["tiles"], on
