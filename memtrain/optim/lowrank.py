"""Which weights and which side of their gradients get projected, the matching shapes, and
the products. Shared by the optimizers and by :mod:`memtrain.optim.memory`, which sizes their
states from the same rules.

GaLore layout (shared with galore-torch so checkpoints of either read the same way): a *right*
projection is ``P`` of shape ``r x n`` and the low-rank gradient is ``G P^T`` (``m x r``); a
*left* projection is ``P`` of shape ``m x r`` and the low-rank gradient is ``P^T G`` (``r x n``).
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from memtrain.errors import MemtrainError
from memtrain.optim.sharded import settled
from memtrain.optim.subspace import seeded_generator, subspace_iteration

PROJ_TYPES = ("std", "reverse_std", "left", "right")
PROJ_METHODS = ("iter", "svd")


def check_proj_type(proj_type: str) -> str:
    if proj_type not in PROJ_TYPES:
        raise MemtrainError(f"unknown proj_type {proj_type!r}; use one of {', '.join(PROJ_TYPES)}")
    return proj_type


def projection_side(shape: Sequence[int], proj_type: str) -> str:
    """'left' or 'right' for a gradient of ``shape`` (galore-torch's rule for each proj_type)."""
    check_proj_type(proj_type)
    if len(shape) != 2:
        raise MemtrainError(
            f"low-rank projection needs 2-D parameters, got shape {tuple(shape)}; "
            "put other parameters in a group without 'rank'"
        )
    tall = shape[0] >= shape[1]
    if proj_type == "std":
        return "right" if tall else "left"
    if proj_type == "reverse_std":
        return "left" if tall else "right"
    return proj_type


def effective_rank(shape: Sequence[int], rank: int) -> int:
    if int(rank) < 1:
        raise MemtrainError(f"rank must be a positive integer, got {rank!r}")
    return min(int(rank), shape[0], shape[1])


def low_rank_shape(shape: Sequence[int], rank: int, side: str) -> tuple[int, int]:
    r = effective_rank(shape, rank)
    return (shape[0], r) if side == "right" else (r, shape[1])


def projection_shape(shape: Sequence[int], rank: int, side: str) -> tuple[int, int]:
    r = effective_rank(shape, rank)
    return (r, shape[1]) if side == "right" else (shape[0], r)


def subspace_size(shape: tuple[int, ...], group: dict[str, Any]) -> int:
    """FRUGAL's state-full part: rank (svd/random) or number of columns/rows (columns/blocks)."""
    kind = group["proj_type"]
    full = {"columns": shape[1], "blocks": shape[0]}.get(kind, min(shape))
    if group.get("rank") is not None:
        return max(1, min(int(group["rank"]), full))
    return max(1, min(full, round(float(group["density"]) * full)))


def lowrank_targets(model: nn.Module, targets: str | None = None) -> list[tuple[str, nn.Parameter]]:
    """Weights to project: ``targets`` is a regular expression on parameter names (2-D only);
    by default the ``nn.Linear`` weights inside ``ModuleList`` containers, minus any weight
    tied to an embedding."""
    if targets:
        try:
            pattern = re.compile(str(targets))
        except re.error as exc:
            raise MemtrainError(
                f"targets={targets!r} is not a valid regular expression: {exc}"
            ) from None
        chosen = [
            (n, p)
            for n, p in model.named_parameters()
            if p.requires_grad and p.dim() == 2 and pattern.search(n)
        ]
    else:
        embedded = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
        in_blocks: set[int] = set()
        for container in model.modules():
            if isinstance(container, nn.ModuleList):
                for m in container.modules():
                    if isinstance(m, nn.Linear) and id(m.weight) not in embedded:
                        in_blocks.add(id(m.weight))
        chosen = [
            (n, p) for n, p in model.named_parameters() if id(p) in in_blocks and p.requires_grad
        ]
    if not chosen:
        raise MemtrainError(
            "no 2-D weights to project: the model has no nn.Linear inside a ModuleList; "
            "pass targets=<regex on parameter names>"
        )
    return chosen


def project(grad: torch.Tensor, proj: torch.Tensor, side: str) -> torch.Tensor:
    """The low-rank gradient; for a row-sharded gradient a left projection sums over the
    ranks' rows (one all-reduce of the small result), a right one stays in each rank's rows."""
    return grad @ proj.mT if side == "right" else settled(proj.mT @ grad)


def project_back(low: torch.Tensor, proj: torch.Tensor, side: str) -> torch.Tensor:
    return low @ proj if side == "right" else proj @ low


def add_projected_back(
    param: torch.Tensor, low: torch.Tensor, proj: torch.Tensor, side: str, alpha: float
) -> None:
    """``param += alpha * project_back(low)`` as one GEMM, so no full-size update is stored."""
    if side == "right":
        param.addmm_(low, proj, alpha=alpha)
    else:
        param.addmm_(proj, low, alpha=alpha)


def basis_to_projection(basis: torch.Tensor, side: str) -> torch.Tensor:
    """Left-subspace basis (``m x r`` of the projected-side matrix) to GaLore layout."""
    return basis.mT if side == "right" else basis


def projection_to_basis(proj: torch.Tensor, side: str) -> torch.Tensor:
    return proj.mT if side == "right" else proj


def exact_projection(grad: torch.Tensor, rank: int, side: str) -> torch.Tensor:
    """Singular vectors of one SVD of ``grad`` itself (float32, or float64 for float64
    gradients), taken exactly as galore-torch takes them so signs match too."""
    mat = grad if grad.dtype == torch.float64 else grad.float()
    u, _, vh = torch.linalg.svd(mat, full_matrices=False)
    return vh[:rank] if side == "right" else u[:, :rank]


def refresh_projections(
    items: Sequence[tuple[int, int, torch.Tensor, torch.Tensor | None, str]],
    rank: int,
    method: str,
    seed: int,
    iters: int,
    cold_iters: int,
    oversample: int,
    orth: str,
) -> dict[int, torch.Tensor]:
    """New float32 projections (GaLore layout) for many gradients at once.

    ``items``: ``(key, step, grad, previous projection or None, side)``; ``key`` (the
    parameter's index in the optimizer) and ``step`` seed its random start, so results do not
    depend on batching and replay exactly after a reload.
    With ``method='iter'`` gradients of one shape, side and warm/cold status share one batched
    subspace iteration; ``method='svd'`` runs a full SVD per matrix, as galore-torch does.
    """
    if method not in PROJ_METHODS:
        raise MemtrainError(f"unknown proj_method {method!r}; use one of {PROJ_METHODS}")
    out: dict[int, torch.Tensor] = {}
    if method == "svd":
        for key, _, grad, _, side in items:
            out[key] = exact_projection(grad, effective_rank(grad.shape, rank), side)
        return out
    buckets: dict[tuple, list] = defaultdict(list)
    for key, step, grad, prev, side in items:
        bucket = (tuple(grad.shape), side, prev is None, grad.device)
        buckets[bucket].append((key, step, grad, prev))
    for (_, side, cold, device), members in buckets.items():
        mats = [g.mT if side == "right" else g for _, _, g, _ in members]
        previous = None
        if not cold:
            previous = torch.stack([projection_to_basis(p, side) for *_, p in members]).float()
        gens = [seeded_generator(device, seed, key, step) for key, step, _, _ in members]
        basis = subspace_iteration(
            mats,
            rank,
            previous=previous,
            iters=cold_iters if cold else iters,
            oversample=oversample,
            generators=gens,
            orth=orth,
        )
        for i, (key, *_) in enumerate(members):
            out[key] = basis_to_projection(basis[i], side)
    return out
