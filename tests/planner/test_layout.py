"""Buffer offsets: never overlapping in space while alive together, never worse than best-fit."""

from __future__ import annotations

import random

import pytest

from memtrain.errors import MemtrainError
from memtrain.planner.layout import Buffer, assign_offsets, best_fit, live_bytes_bound


def _no_clash(buffers, offsets, alignment):
    def span(b):
        size = -(-b.size // alignment) * alignment
        return offsets[b.name], offsets[b.name] + size

    for i, a in enumerate(buffers):
        for b in buffers[i + 1 :]:
            if a.start < b.end and b.start < a.end:
                (a0, a1), (b0, b1) = span(a), span(b)
                assert a1 <= b0 or b1 <= a0, (a, b)


def _random_buffers(seed, n=10):
    rng = random.Random(seed)
    out = []
    for i in range(n):
        start = rng.randrange(0, 12)
        out.append(Buffer(f"b{i}", rng.randrange(1, 64) * 512, start, start + rng.randrange(1, 6)))
    return out


@pytest.mark.parametrize("seed", range(4))
def test_layouts_are_valid_and_bounded(seed):
    buffers = _random_buffers(seed)
    layout = assign_offsets(buffers, time_limit=5)
    _no_clash(buffers, layout.offsets, 512)
    fit = best_fit(buffers, 512)
    _no_clash(buffers, fit, 512)
    fit_total = max(fit[b.name] + b.size for b in buffers)
    assert live_bytes_bound(buffers, 512) <= layout.total_bytes <= fit_total


@pytest.mark.parametrize("seed", [7, 9])
def test_mip_beats_best_fit_where_greedy_fragments(seed):
    """Instances where largest-first best fit leaves holes: the MIP packs them tighter."""
    buffers = _random_buffers(seed, n=8)
    fit = best_fit(buffers, 512)
    fit_total = max(fit[b.name] + b.size for b in buffers)
    assert fit_total > live_bytes_bound(buffers, 512)
    layout = assign_offsets(buffers, time_limit=10)
    _no_clash(buffers, layout.offsets, 512)
    assert layout.method == "mip"
    assert layout.total_bytes < fit_total


def test_time_limit_zero_falls_back_to_best_fit():
    buffers = _random_buffers(9, n=8)
    layout = assign_offsets(buffers, time_limit=0)
    assert layout.method == "best-fit"
    _no_clash(buffers, layout.offsets, 512)


def test_nested_lifetimes_stack_exactly():
    """The pinned host pool: layer j's bytes live from forward j to backward j."""
    n = 12
    buffers = [Buffer(f"l{j}", (j + 1) * 4096, j, 2 * n - j) for j in range(n)]
    layout = assign_offsets(buffers)
    assert layout.total_bytes == sum(b.size for b in buffers) == layout.lower_bound


def test_bad_buffers_are_rejected():
    with pytest.raises(MemtrainError, match="end > start"):
        assign_offsets([Buffer("x", 10, 3, 3)])
    with pytest.raises(MemtrainError, match="twice"):
        assign_offsets([Buffer("x", 10, 0, 1), Buffer("x", 10, 0, 1)])
