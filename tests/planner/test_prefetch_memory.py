"""The backward of a layer that moves anything rebuilds the layer before it whole: the cut
tensors come back with their kept share. A layer that moves nothing triggers no fetch."""

from __future__ import annotations

import pytest

from memtrain.planner.costmodel import available_modes
from memtrain.planner.evaluate import LayerDecision, evaluate
from memtrain.planner.solve import solve
from tests.planner.helpers import GB, block, machine, problem

GiB = 2**30


def _moment(evaluation, name: str) -> float:
    return dict(evaluation.gpu_moments)[name]


def _swap(share: float) -> LayerDecision:
    return LayerDecision({"gpu": 1 - share, "cpu": share}, {"gpu": 1 - share, "cpu": share})


KEEP = LayerDecision({"gpu": 1.0}, {"gpu": 1.0})


def test_fetch_only_where_the_next_layer_moves_something():
    """Three blocks of 9 GB token bytes (1 anchor + 8 recomputable), nothing else."""
    prob = problem([block("b0"), block("b1"), block("b2")])
    hw = machine(gpu=200 * GB)
    cut = dict(evaluate(prob, hw, [_swap(0.5), _swap(0.5), KEEP]).gpu_moments)
    kept = dict(evaluate(prob, hw, [_swap(0.5), KEEP, KEEP]).gpu_moments)
    # b1 swaps half: b0's kept half (4.5) + b1's kept half (4.5) + its moved half rebuilt (4.5)
    # + its kept half held twice (4.5) + b0 fetched whole (4.5 moved + 4.5 kept share) = 27
    assert cut["backward b1"] == pytest.approx(27 * GB)
    # b1 keeps all: b0's kept half + b1 whole, and no fetch = 13.5
    assert kept["backward b1"] == pytest.approx(13.5 * GB)
    # b2 keeps all: b0 and b1 kept halves + b2 whole; b1 is not fetched during b2 = 18
    assert cut["backward b2"] == pytest.approx(18 * GB)


def test_solver_prices_the_fetch_like_the_evaluator():
    layers = [block(f"b{i}", transient=1 * GB) for i in range(4)]
    prob = problem(layers)
    hw = machine(gpu=40 * GB, cpu=200 * GB, link=30 * GB)
    result = solve(prob, hw, available_modes(hw), chunk_options=(1,), tie_identical=False)
    assert result.feasible
    again = evaluate(prob, hw, result.decisions)
    assert again.peaks["gpu"] == pytest.approx(result.evaluation.peaks["gpu"], rel=1e-9)
    assert again.peaks["gpu"] <= hw.usable("gpu") * (1 + 1e-6)


def test_tiled_forward_holds_its_swapped_token_local_bytes_whole():
    """A tiled block's copies keep their sources on the GPU until the next layer ends, so by its
    last chunk the swapped share of every chunk is there at once: chunks divide only the
    recomputed share in forward. One block, 8 GB token-local (recomputable, all tileable) + 1 GB
    anchor kept, 8 chunks, 60% of the rest swapped and 40% recomputed (input on the GPU)."""
    layer = block("b0", anchor=1 * GB, rest=8 * GB, checkpoint=0.5 * GB, tileable=8 / 9)
    prob = problem([layer])
    hw = machine(gpu=200 * GB)
    swap = LayerDecision({"gpu": 1.0}, {"cpu": 0.6, "rec": 0.4}, checkpoint={"gpu": 0.4})
    recompute = LayerDecision({"gpu": 1.0}, {"rec": 1.0}, checkpoint={"gpu": 1.0})
    held = _moment(evaluate(prob, hw, [swap], chunks=8), "forward b0")
    dropped = _moment(evaluate(prob, hw, [recompute], chunks=8), "forward b0")
    # Both hold the anchor and one chunk in flight; the swapping one stores 0.4 x 0.5 GB of
    # input instead of 0.5 GB and holds the swapped 4.8 GB whole: 7/8 of it beyond the
    # chunk's own share (the model before counted 1/8 of it, a difference of -0.3 GB).
    assert held - dropped == pytest.approx((0.2 - 0.5 + 4.8 * 7 / 8) * GB)
