"""Top-r singular subspaces of gradient matrices: exact, cold randomized, or warm-started.

GaLore and FRUGAL need, every T steps, an orthonormal basis of the dominant r-dimensional column
space of each projected gradient. A full SVD per matrix is exact but slow; here the same
subspace comes from a few subspace (power) iterations started from the previous basis, with all
matrices of one shape batched into a single stack of QR / eigen decompositions. Matrix products
run in float32 so the basis is orthonormal to float32 accuracy whatever the gradient dtype.

Every function works on the *left* subspace of ``M`` (shape ``m x k``, basis ``m x r``); callers
wanting the right subspace pass ``G.mT``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch

from memtrain.errors import MemtrainError

ORTHONORMALIZERS = ("qr", "cholqr")


def seeded_generator(device: torch.device, *seed_parts: int) -> torch.Generator:
    """A generator whose stream depends only on ``seed_parts``, so refreshes replay exactly
    after a checkpoint reload without storing generator state."""
    seed = 0x9E3779B97F4A7C15
    for part in seed_parts:
        seed = (seed * 0x100000001B3 + int(part) + 0x632BE59BD9B4E019) % (1 << 63)
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    return gen


# How often Cholesky QR broke down and Householder QR took over (benchmarks report it).
CHOLQR_FALLBACKS = 0


@contextlib.contextmanager
def full_float32() -> Iterator[None]:
    """Float32 products without TF32: Cholesky QR squares the condition number, and energies
    near 1 must not carry TF32's 1e-3 relative error. Restores the caller's setting."""
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before)


def _cholesky_qr3(y: torch.Tensor) -> torch.Tensor | None:
    """Shifted Cholesky QR, then Cholesky QR twice (Fukaya et al.'s shifted CholeskyQR3):
    orthonormal to float32 accuracy for condition numbers up to about 1e6; None where it breaks
    down (nearly dependent columns), for the caller to fall back."""
    q = y
    for shift in (1e-3, 0.0, 0.0):
        gram = q.mT @ q
        if shift:
            diag = gram.diagonal(dim1=-2, dim2=-1)
            diag.add_(diag.sum(-1, keepdim=True) * shift + torch.finfo(y.dtype).tiny)
        chol, info = torch.linalg.cholesky_ex(gram)
        if bool(info.any()):
            return None
        q = torch.linalg.solve_triangular(chol.mT, q, upper=True, left=False)
    eye = torch.eye(q.shape[-1], dtype=q.dtype, device=q.device)
    error = (q.mT @ q - eye).abs().amax()
    if not bool(error < 1e-4):
        return None
    return q


def orthonormalize(y: torch.Tensor, method: str = "qr") -> torch.Tensor:
    """Orthonormal basis of the columns of each matrix in ``y`` (``b x m x l``, float32).

    ``qr`` is Householder QR (stable for any conditioning). ``cholqr`` is shifted Cholesky QR3:
    only batched GEMMs and ``l x l`` factorisations, several times faster on GPUs. Its result
    is checked; where it breaks down it falls back to Householder QR (counted, never silent).
    """
    global CHOLQR_FALLBACKS
    if method == "qr":
        return torch.linalg.qr(y, mode="reduced").Q
    if method == "cholqr":
        q = _cholesky_qr3(y)
        if q is None:
            CHOLQR_FALLBACKS += 1
            return torch.linalg.qr(y, mode="reduced").Q
        return q
    raise MemtrainError(f"unknown orthonormalizer {method!r}; use one of {ORTHONORMALIZERS}")


def _products(mats: Sequence[torch.Tensor], q: torch.Tensor, transpose: bool) -> torch.Tensor:
    """Stack of ``M_i @ q_i`` (or ``M_i^T @ q_i``) in float32, one GEMM per matrix so the
    gradients are never copied into a stack."""
    m, k = mats[0].shape
    rows = k if transpose else m
    out = torch.empty((len(mats), rows, q.shape[-1]), dtype=torch.float32, device=q.device)
    for i, mat in enumerate(mats):
        a = mat.mT if transpose else mat
        if a.dtype != torch.float32:
            a = a.float()
        torch.matmul(a, q[i], out=out[i])
    return out


def _gaussian(
    count: int,
    shape: tuple[int, int],
    generators: Sequence[torch.Generator] | None,
    device: torch.device,
) -> torch.Tensor:
    if generators is None:
        return torch.randn((count, *shape), device=device, dtype=torch.float32)
    return torch.stack(
        [torch.randn(shape, generator=g, device=device, dtype=torch.float32) for g in generators]
    )


def _rayleigh_ritz(mats: Sequence[torch.Tensor], q: torch.Tensor, rank: int) -> torch.Tensor:
    """Best rank-``rank`` basis inside span(q): rotate by the eigenvectors of (Q^T M)(Q^T M)^T,
    largest first, so the result is ordered like singular vectors."""
    b = _products(mats, q, transpose=True)  # (batch, k, l) = M^T Q
    gram = b.mT @ b  # (batch, l, l) = Q^T M M^T Q
    _, vecs = torch.linalg.eigh(gram)
    top = vecs[..., -rank:].flip(-1)
    return q @ top


def subspace_iteration(
    mats: Sequence[torch.Tensor],
    rank: int,
    previous: torch.Tensor | None = None,
    iters: int = 1,
    oversample: int = 0,
    generators: Sequence[torch.Generator] | None = None,
    orth: str = "qr",
) -> torch.Tensor:
    """Top-``rank`` left singular subspace of every matrix in ``mats`` (all the same shape).

    ``previous`` (``b x m x rank``): the bases of the last refresh; when given, ``iters``
    iterations ``Q <- orth(M orth(M^T Q))`` start from it (plus ``oversample`` random columns), so a
    slowly drifting subspace needs one or two. Without it (cold start) the start is a Gaussian
    sketch of the range, ``M @ Omega``. Extra columns, if any, are dropped by a Rayleigh-Ritz
    step that keeps the best ``rank`` directions (it costs an ``l x l`` eigendecomposition per
    matrix, slow on GPUs; without extra columns no decomposition but the orthonormalization runs).
    ``generators``: one per matrix, so a matrix gets the same random start whether it is
    refreshed alone or in a batch. Returns ``b x m x rank`` float32 with orthonormal columns.
    """
    if not mats:
        raise MemtrainError("subspace_iteration needs at least one matrix")
    with full_float32():
        return _iterate(mats, rank, previous, iters, oversample, generators, orth)


def _iterate(
    mats: Sequence[torch.Tensor],
    rank: int,
    previous: torch.Tensor | None,
    iters: int,
    oversample: int,
    generators: Sequence[torch.Generator] | None,
    orth: str,
) -> torch.Tensor:
    m, k = mats[0].shape
    rank = min(rank, m, k)
    device = mats[0].device
    extra = max(0, min(oversample, min(m, k) - rank))
    if previous is None:
        sketch = _gaussian(len(mats), (k, rank + extra), generators, device)
        q = orthonormalize(_products(mats, sketch, transpose=False), orth)
    else:
        q = previous.to(torch.float32)
        if extra:
            noise = _gaussian(len(mats), (m, extra), generators, device)
            q = torch.cat([q, noise], dim=-1)
    for _ in range(iters):
        # orthonormalize after each product: M M^T Q would square the condition number
        z = orthonormalize(_products(mats, q, transpose=True), orth)
        q = orthonormalize(_products(mats, z, transpose=False), orth)
    if extra:
        q = _rayleigh_ritz(mats, q, rank)
    elif not iters:
        q = orthonormalize(q, orth)
    return _fix_signs(q, previous)


def _fix_signs(q: torch.Tensor, previous: torch.Tensor | None) -> torch.Tensor:
    """Flip columns to point like the previous basis (so Adam moments kept across a refresh
    keep their meaning), or, on a cold start, so each column's largest entry is positive.
    Makes the result independent of how a factorisation happened to choose signs."""
    if previous is not None:
        ref = (q * previous.to(q.dtype)).sum(dim=-2)
    else:
        ref = q.gather(-2, q.abs().argmax(dim=-2, keepdim=True)).squeeze(-2)
    signs = torch.where(ref < 0, -1.0, 1.0).to(q.dtype)
    return q * signs.unsqueeze(-2)


def exact_subspace(mat: torch.Tensor, rank: int) -> torch.Tensor:
    """Top-``rank`` left singular vectors from a full float32 SVD (the reference method)."""
    u, _, _ = torch.linalg.svd(mat.float(), full_matrices=False)
    return u[:, :rank]


def random_subspace(
    m: int, rank: int, generator: torch.Generator, device: torch.device
) -> torch.Tensor:
    """A uniformly random orthonormal ``m x rank`` basis (FRUGAL's random projection)."""
    gauss = torch.randn((m, rank), generator=generator, device=device, dtype=torch.float32)
    return torch.linalg.qr(gauss, mode="reduced").Q


def captured_energy(mat: torch.Tensor, basis: torch.Tensor) -> float:
    """||basis^T M||_F^2 divided by the sum of the top-r squared singular values of M.

    1.0 means the basis spans an exact top-r left singular subspace; it measures what matters
    for the optimizer (gradient energy kept) without caring about the basis' rotation. Computed
    in float64; a basis that is not quite orthonormal (a bf16 projection) can read above 1.
    """
    mat = mat.double()  # float64: the ratio is read to 1e-4 and more
    basis = basis.double()
    rank = basis.shape[-1]
    kept = (basis.mT @ mat).square().sum()
    best = torch.linalg.svdvals(mat)[:rank].square().sum()
    return float(kept / best)
