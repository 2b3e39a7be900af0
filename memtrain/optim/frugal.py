"""FRUGAL: full-rank updates by gradient splitting.

Each 2-D weight's gradient is split into a small *state-full* part, updated by AdamW with moments
kept only for that part, and the rest, updated by a *state-free* rule (signSGD or SGD). Every
update is therefore full rank while the optimizer state is that of the subspace. The subspace
is chosen per weight every ``update_proj_gap`` steps by ``proj_type``:

- ``svd``: top singular subspace of the gradient (GaLore's choice; warm-started iteration),
- ``random``: a random orthonormal projection,
- ``columns``: a random subset of columns (coordinate subspace),
- ``blocks``: a random contiguous band of rows (cheapest: a view, no gather).

Its size is ``density`` (fraction of the smaller side for projections, of columns or rows for
coordinates) or an explicit ``rank``. When the subspace changes the AdamW moments are carried
into the new subspace (``moment_transfer='project'``, see :mod:`memtrain.optim.subspace_transfer`)
and the bias correction keeps counting; ``'reset'`` zeroes them and restarts the bias correction,
as FRUGAL's own code does. ``bits=8`` keeps the moments as blockwise 8-bit codes. Groups without
``density`` or ``rank`` are plain AdamW (embeddings, norms and the head stay state-full, as in
FRUGAL).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch

from memtrain.errors import MemtrainError
from memtrain.optim.base import (
    MemtrainOptimizer,
    check_positive,
    check_unit_interval,
    grads_of,
    init_step,
)
from memtrain.optim.lowrank import (
    add_projected_back,
    basis_to_projection,
    project,
    projection_side,
    refresh_projections,
    subspace_size,
)
from memtrain.optim.moments import (
    check_bits,
    drop_moments,
    has_moments,
    read_moments,
    write_moments,
)
from memtrain.optim.subspace import random_subspace, seeded_generator
from memtrain.optim.subspace_transfer import (
    transfer_columns,
    transfer_projected,
    transfer_rows,
)

FRUGAL_PROJ_TYPES = ("svd", "random", "columns", "blocks")
FREE_RULES = ("signsgd", "sgd")
MOMENT_TRANSFERS = ("project", "reset")
SPLIT_DEFAULTS: dict[str, Any] = {
    "update_proj_gap": 200,
    "proj_type": "svd",
    "free_update": "signsgd",
    "free_lr_scale": 1.0,
    "moment_transfer": "project",
    "proj_iters": 2,
    "proj_cold_iters": 4,
    "proj_oversample": 0,
    "proj_orth": "cholqr",
}


def fill_split_group(group: dict[str, Any]) -> None:
    for key, value in SPLIT_DEFAULTS.items():
        group.setdefault(key, value)
    if group.get("rank") is not None and group.get("density") is not None:
        raise MemtrainError("FRUGAL: give either rank or density for a group, not both")
    if group.get("density") is not None and not 0.0 < float(group["density"]) <= 1.0:
        raise MemtrainError(f"FRUGAL: density must be in (0, 1], got {group['density']!r}")
    if group["proj_type"] not in FRUGAL_PROJ_TYPES:
        raise MemtrainError(
            f"FRUGAL: unknown proj_type {group['proj_type']!r}; "
            f"use one of {', '.join(FRUGAL_PROJ_TYPES)}"
        )
    if group["free_update"] not in FREE_RULES:
        raise MemtrainError(
            f"FRUGAL: unknown free_update {group['free_update']!r}; use one of {FREE_RULES}"
        )
    if group["moment_transfer"] not in MOMENT_TRANSFERS:
        raise MemtrainError(
            f"FRUGAL: unknown moment_transfer {group['moment_transfer']!r}; "
            f"use one of {', '.join(MOMENT_TRANSFERS)}"
        )
    if int(group["update_proj_gap"]) < 1:
        raise MemtrainError(f"update_proj_gap must be >= 1, got {group['update_proj_gap']!r}")
    for p in group["params"]:
        if p.dim() != 2:
            raise MemtrainError(
                f"FRUGAL splits 2-D weights only, got shape {tuple(p.shape)}; "
                "put it in a group without density/rank"
            )


def is_split_group(group: dict[str, Any]) -> bool:
    return group.get("density") is not None or group.get("rank") is not None


class FRUGAL(MemtrainOptimizer):
    """AdamW on a subspace of each split weight, signSGD/SGD on the rest (torch AdamW rules:
    eps inside the bias correction, decoupled weight decay before the update)."""

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        seed: int = 0,
        bits: int = 32,
    ):
        check_positive("lr", lr)
        check_unit_interval("betas[0]", betas[0])
        check_unit_interval("betas[1]", betas[1])
        defaults = {
            "lr": lr,
            "betas": tuple(betas),
            "eps": eps,
            "weight_decay": weight_decay,
            "seed": seed,
            "bits": check_bits(bits),
        }
        super().__init__(params, defaults)
        for group in self.param_groups:
            if is_split_group(group):
                fill_split_group(group)

    whole_matrices = True  # row bands and subspace swaps read whole matrices

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        gathered, loss = self._gathered_step(closure)
        if gathered:
            return loss
        loss = self._run_closure(closure)
        for group in self.param_groups:
            params = grads_of(group)
            if not params:
                continue
            if group["weight_decay"] != 0:
                torch._foreach_mul_(params, 1.0 - group["lr"] * group["weight_decay"])
            if is_split_group(group):
                self._refresh(group, params)
                for p in params:
                    self._split_update(group, p)
            else:
                for p in params:
                    self._dense_update(group, p)
        return loss

    # -- subspace selection -------------------------------------------------------------------

    def _refresh(self, group: dict[str, Any], params: list[torch.Tensor]) -> None:
        gap = int(group["update_proj_gap"])
        kind = group["proj_type"]
        seed = int(self.defaults["seed"])
        due = []
        for p in params:
            state = self.state[p]
            step = init_step(state)
            if step % gap == 0 or not has_moments(state):
                due.append((p, step))
        if not due:
            return
        if kind == "svd":
            items = [
                (self.param_index(p), step, p.grad, self.state[p].get("projection"), "")
                for p, step in due
            ]
            fresh = self._svd_projections(group, items)
        for p, step in due:
            state = self.state[p]
            size = subspace_size(tuple(p.shape), group)
            gen = seeded_generator(p.device, seed, self.param_index(p), step)
            if kind == "svd":
                new = fresh[self.param_index(p)].to(p.dtype)
            elif kind == "random":
                side = projection_side(p.shape, "std")
                dim = p.shape[1] if side == "right" else p.shape[0]
                basis = random_subspace(dim, size, gen, p.device)
                new = basis_to_projection(basis, side).to(p.dtype)
            elif kind == "columns":
                perm = torch.randperm(p.shape[1], generator=gen, device=p.device)
                new = perm[:size].sort().values
            else:
                cpu_gen = seeded_generator(torch.device("cpu"), seed, self.param_index(p), step)
                new = torch.randint(0, p.shape[0] - size + 1, (), generator=cpu_gen)
            key = {"columns": "indices", "blocks": "block_start"}.get(kind, "projection")
            if key not in state:
                state[key] = new.contiguous().clone()
                continue
            old = state[key].clone()
            state[key].copy_(new)
            if has_moments(state):
                if group["moment_transfer"] == "reset":
                    drop_moments(state)
                else:
                    self._transfer(group, p, old, state[key])

    def _transfer(
        self, group: dict[str, Any], p: torch.Tensor, old: torch.Tensor, new: torch.Tensor
    ) -> None:
        """Carry the moments of subspace ``old`` into subspace ``new``."""
        state = self.state[p]
        bits = int(group.get("bits", 32))
        first, second = read_moments(state, state.get("exp_avg", p), bits)
        kind = group["proj_type"]
        if kind == "columns":
            first, second = transfer_columns(first, second, old, new)
        elif kind == "blocks":
            first, second = transfer_rows(first, second, int(old), int(new))
        else:
            side = projection_side(p.shape, "std")
            first, second = transfer_projected(first, second, old, new, side)
        if bits == 8:
            write_moments(state, first, second, bits)
        else:
            state["exp_avg"], state["exp_avg_sq"] = first.contiguous(), second.contiguous()

    def _svd_projections(self, group: dict[str, Any], items: list) -> dict[int, torch.Tensor]:
        """Top singular subspaces (warm-started iteration), one batched call per rank."""
        by_rank: dict[int, list] = {}
        for key, step, grad, prev, _ in items:
            item = (key, step, grad, prev, projection_side(grad.shape, "std"))
            by_rank.setdefault(subspace_size(tuple(grad.shape), group), []).append(item)
        fresh: dict[int, torch.Tensor] = {}
        for rank, members in by_rank.items():
            fresh.update(
                refresh_projections(
                    members,
                    rank=rank,
                    method="iter",
                    seed=int(self.defaults["seed"]),
                    iters=int(group["proj_iters"]),
                    cold_iters=int(group["proj_cold_iters"]),
                    oversample=int(group["proj_oversample"]),
                    orth=group["proj_orth"],
                )
            )
        return fresh

    # -- updates ------------------------------------------------------------------------------

    def _adam_direction(
        self, group: dict[str, Any], state: dict[str, Any], grad: torch.Tensor, since: int
    ) -> torch.Tensor:
        """AdamW's normalised step for ``grad`` (already lr-scaled), ``since`` steps into the
        current moments."""
        beta1, beta2 = group["betas"]
        bits = int(group.get("bits", 32))
        out_dtype = grad.dtype
        if bits == 8:
            grad = grad.float()
        avg, sq = read_moments(state, grad, bits)
        avg.lerp_(grad, 1.0 - beta1)
        sq.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
        write_moments(state, avg, sq, bits)
        denom = (sq.sqrt() / math.sqrt(1.0 - beta2**since)).add_(group["eps"])
        return (avg / denom).mul_(group["lr"] / (1.0 - beta1**since)).to(out_dtype)

    def _dense_update(self, group: dict[str, Any], p: torch.Tensor) -> None:
        state = self.state[p]
        step = init_step(state) + 1
        state["step"] += 1
        p.sub_(self._adam_direction(group, state, p.grad, step))

    def _free_direction(self, group: dict[str, Any], residual: torch.Tensor) -> torch.Tensor:
        scale = group["lr"] * float(group["free_lr_scale"])
        if group["free_update"] == "signsgd":
            return residual.sign().mul_(scale)
        return residual.mul(scale)

    def _split_update(self, group: dict[str, Any], p: torch.Tensor) -> None:
        state = self.state[p]
        step = init_step(state)
        since = step + 1
        if group["moment_transfer"] == "reset":
            since = step % int(group["update_proj_gap"]) + 1
        state["step"] += 1
        grad = p.grad
        kind = group["proj_type"]
        if kind in ("svd", "random"):
            side = projection_side(p.shape, "std")
            proj = state["projection"]
            low = project(grad, proj, side)
            residual = grad.clone()
            add_projected_back(residual, low, proj, side, alpha=-1.0)
            p.sub_(self._free_direction(group, residual))
            del residual
            direction = self._adam_direction(group, state, low, since)
            add_projected_back(p, direction, proj, side, alpha=-1.0)
            return
        update = self._free_direction(group, grad)
        if kind == "columns":
            idx = state["indices"]
            sub = grad.index_select(1, idx)
            update.index_copy_(1, idx, self._adam_direction(group, state, sub, since))
        else:
            start = int(state["block_start"])
            size = subspace_size(tuple(p.shape), group)
            rows = slice(start, start + size)
            update[rows] = self._adam_direction(group, state, grad[rows], since)
        p.sub_(update)
