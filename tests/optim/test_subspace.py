"""Subspace finders: orthonormality, captured energy against the exact SVD, batching."""

from __future__ import annotations

import pytest
import torch

from memtrain.errors import MemtrainError
from memtrain.optim import subspace
from memtrain.optim.subspace import (
    captured_energy,
    exact_subspace,
    orthonormalize,
    seeded_generator,
    subspace_iteration,
)


def decaying(m: int, k: int, seed: int, power: float = 1.0) -> torch.Tensor:
    """A matrix with singular values i^-power, like a gradient's fast-decaying spectrum."""
    gen = torch.Generator().manual_seed(seed)
    u = torch.linalg.qr(torch.randn(m, m, generator=gen, dtype=torch.float64)).Q[:, : min(m, k)]
    v = torch.linalg.qr(torch.randn(k, k, generator=gen, dtype=torch.float64)).Q[:, : min(m, k)]
    s = torch.arange(1, min(m, k) + 1, dtype=torch.float64) ** -power
    return ((u * s) @ v.T).float()


def orthonormality_error(q: torch.Tensor) -> float:
    eye = torch.eye(q.shape[-1], dtype=q.dtype)
    return float((q.mT @ q - eye).abs().max())


@pytest.mark.parametrize("method", ["qr", "cholqr"])
def test_orthonormalize_keeps_the_span(method: str) -> None:
    y = torch.randn(3, 60, 8, generator=torch.Generator().manual_seed(0))
    q = orthonormalize(y, method)
    assert orthonormality_error(q) < 1e-5
    # same column space: projecting y onto span(q) changes it by < 1e-5 relative
    rebuilt = q @ (q.mT @ y)
    assert float((rebuilt - y).norm() / y.norm()) < 1e-5


def test_cholqr_falls_back_on_rank_deficient_columns() -> None:
    base = torch.randn(50, 3, generator=torch.Generator().manual_seed(1))
    y = torch.cat([base, base[:, :2] * 2.0], dim=1)[None]  # rank 3, 5 columns
    before = subspace.CHOLQR_FALLBACKS
    q = orthonormalize(y, "cholqr")
    assert orthonormality_error(q) < 1e-5
    assert subspace.CHOLQR_FALLBACKS == before + 1  # counted, not silent


def test_refresh_runs_in_full_float32_and_restores_the_setting() -> None:
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")
    try:
        seen = []
        real = subspace._products

        def spy(*args, **kwargs):
            seen.append(torch.get_float32_matmul_precision())
            return real(*args, **kwargs)

        subspace._products = spy
        subspace_iteration([decaying(20, 10, seed=0)], 2, iters=1)
        assert seen and set(seen) == {"highest"}
        assert torch.get_float32_matmul_precision() == "high"
    finally:
        subspace._products = real
        torch.set_float32_matmul_precision(before)


def test_unknown_orthonormalizer_is_a_clear_error() -> None:
    with pytest.raises(MemtrainError, match="qr"):
        orthonormalize(torch.randn(1, 4, 2), "svd")


def test_captured_energy_is_one_for_the_exact_subspace_and_less_otherwise() -> None:
    mat = decaying(40, 30, seed=2)
    assert captured_energy(mat, exact_subspace(mat, 5)) == pytest.approx(1.0, abs=1e-5)
    other = torch.linalg.qr(torch.randn(40, 5, generator=torch.Generator().manual_seed(3))).Q
    assert captured_energy(mat, other) < 0.5


@pytest.mark.parametrize("orth", ["qr", "cholqr"])
def test_cold_start_captures_the_top_subspace(orth: str) -> None:
    mats = [decaying(120, 80, seed=s) for s in range(3)]
    gens = [seeded_generator(torch.device("cpu"), 0, i) for i in range(3)]
    basis = subspace_iteration(mats, 10, iters=4, generators=gens, orth=orth)
    oversampled = subspace_iteration(mats, 10, iters=3, oversample=4, generators=gens, orth=orth)
    assert basis.shape == oversampled.shape == (3, 120, 10)
    for mat, q, q_over in zip(mats, basis, oversampled, strict=True):
        assert orthonormality_error(q) < 1e-5 and orthonormality_error(q_over) < 1e-5
        # thresholds: 99.5% of the exact top-10 energy (singular values 1/i: a slow decay),
        # 99.99% with 4 extra columns and the Rayleigh-Ritz selection
        assert captured_energy(mat, q) > 0.995
        assert captured_energy(mat, q_over) > 0.9999


@pytest.mark.parametrize("orth", ["qr", "cholqr"])
def test_warm_start_tracks_a_drifting_subspace(orth: str) -> None:
    old = decaying(100, 70, seed=4)
    drift = decaying(100, 70, seed=5)
    new = old + 0.3 * drift
    previous = exact_subspace(old, 8)[None]
    stale = captured_energy(new, previous[0])
    one = subspace_iteration([new], 8, previous=previous, iters=1, orth=orth)[0]
    two = subspace_iteration([new], 8, previous=previous, iters=2, orth=orth)[0]
    assert orthonormality_error(one) < 1e-5 and orthonormality_error(two) < 1e-5
    # thresholds: one warm iteration beats the stale basis; two reach 99% of the exact energy
    assert captured_energy(new, one) > stale + 0.01
    assert captured_energy(new, two) > 0.99
    oversampled = subspace_iteration([new], 8, previous=previous, iters=1, oversample=8)[0]
    assert captured_energy(new, oversampled) >= captured_energy(new, one) - 1e-4
    # columns keep the orientation of the previous basis
    assert bool(((two * previous[0]).sum(0) >= 0).all())


def test_batched_equals_one_at_a_time() -> None:
    mats = [decaying(64, 48, seed=s) for s in range(4)]
    gens = lambda: [seeded_generator(torch.device("cpu"), 7, i) for i in range(4)]  # noqa: E731
    batched = subspace_iteration(mats, 6, iters=2, generators=gens())
    single = [
        subspace_iteration([m], 6, iters=2, generators=[g])[0]
        for m, g in zip(mats, gens(), strict=True)
    ]
    for a, b in zip(batched, single, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_bfloat16_gradients_give_float32_orthonormal_bases() -> None:
    mat = decaying(96, 64, seed=6).to(torch.bfloat16)
    q = subspace_iteration([mat], 8, iters=2)[0]
    assert q.dtype == torch.float32
    assert orthonormality_error(q) < 1e-5
    assert captured_energy(mat, q) > 0.99
