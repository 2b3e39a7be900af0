"""Carry Adam moments from an old subspace into a new one instead of restarting them.

A subspace switch would otherwise throw away what the moments learned. The first moment is a
linear statistic, so it moves exactly: ``M_new = P_new^T P_old M_old`` (the old moment seen
from the new basis). The second moment is a per-coordinate variance: with ``C = P_new^T P_old``
and coordinates taken as independent, the variance of ``C x`` is ``(C * C) v``, which is never
negative and needs no clamp. Coordinate subspaces (columns, row blocks) are the same rule
with a 0/1 selection ``C``: a column kept keeps its moments, a new one starts at zero.
"""

from __future__ import annotations

import torch


def _work_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def transfer_projected(
    first: torch.Tensor,
    second: torch.Tensor,
    old: torch.Tensor,
    new: torch.Tensor,
    side: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Moments of a GaLore-layout projection (right: ``G P^T``, left: ``P^T G``) moved from
    projection ``old`` to ``new``."""
    dtype = _work_dtype(first)
    old, new = old.to(dtype), new.to(dtype)
    m, v = first.to(dtype), second.to(dtype)
    if side == "right":  # low = G P^T, P is r x n
        c = old @ new.mT  # r_old x r_new
        out = m @ c, v @ c.square()
    else:  # low = P^T G, P is m x r
        c = new.mT @ old  # r_new x r_old
        out = c @ m, c.square() @ v
    return out[0].to(first.dtype), out[1].to(second.dtype)


def selection(new: torch.Tensor, old: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """0/1 matrix ``C[i, j] = new[i] == old[j]`` (coordinate indices)."""
    return (new.unsqueeze(1) == old.unsqueeze(0)).to(dtype)


def transfer_columns(
    first: torch.Tensor, second: torch.Tensor, old: torch.Tensor, new: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Moments of the gradient columns ``old`` moved to columns ``new``."""
    c = selection(new, old, _work_dtype(first))
    return (
        (first.to(c.dtype) @ c.mT).to(first.dtype),
        (second.to(c.dtype) @ c.mT).to(second.dtype),
    )


def transfer_rows(
    first: torch.Tensor, second: torch.Tensor, old_start: int, new_start: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Moments of a band of rows starting at ``old_start`` moved to the band at ``new_start``."""
    rows = torch.arange(first.shape[0], device=first.device)
    c = selection(rows + new_start, rows + old_start, _work_dtype(first))
    return (c @ first.to(c.dtype)).to(first.dtype), (c @ second.to(c.dtype)).to(second.dtype)
