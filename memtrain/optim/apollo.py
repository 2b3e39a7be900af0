"""APOLLO and APOLLO-Mini (Zhu et al. 2024): AdamW-like steps at SGD-like memory.

Adam's per-element scaling of the gradient is approximated per *channel*: the gradient is
projected by a random Gaussian matrix to rank r, AdamW moments run there, and each channel (row
or column on the side the projection keeps) of the raw gradient is multiplied by the ratio of
norms of the low-rank Adam update to the low-rank gradient. APOLLO-Mini uses rank 1 and one
ratio for the whole tensor. A norm-growth limiter caps each step's update norm at ``norm_growth``
times the previous one (0 turns it off). The projection is never stored: it is regenerated
from a seeded generator (seed, parameter index, step of the last refresh) and re-sampled every
``update_proj_gap`` steps; the moments are kept across re-samples, as APOLLO does.
Groups without ``rank`` get GaLoreAdamW's dense AdamW.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from memtrain.errors import MemtrainError
from memtrain.optim.base import init_step
from memtrain.optim.galore_adamw import GaLoreAdamW
from memtrain.optim.lowrank import effective_rank, project, projection_shape, projection_side
from memtrain.optim.moments import read_moments
from memtrain.optim.sharded import like
from memtrain.optim.subspace import seeded_generator

SCALE_TYPES = ("channel", "tensor")
APOLLO_DEFAULTS: dict[str, Any] = {"scale_type": "channel", "norm_growth": 1.01}
MINI_SCALE = math.sqrt(128.0)  # APOLLO-Mini's gradient scale factor alpha
NORM_FLOOR = 1e-8  # keeps the channel ratio finite for an all-zero channel


def apollo_projection(
    shape: tuple[int, int],
    rank: int,
    side: str,
    seed: int,
    key: int,
    refresh_step: int,
    device: torch.device,
    dtype: torch.dtype,
) -> torch.Tensor:
    """The random projection in GaLore layout, entries N(0, 1/r): the same for the same
    (seed, key, refresh_step) on any call, so it replays after a reload without being saved."""
    gen = seeded_generator(device, seed, key, refresh_step)
    proj_shape = projection_shape(shape, rank, side)
    r = effective_rank(shape, rank)
    proj = torch.randn(proj_shape, generator=gen, device=device, dtype=torch.float32)
    return proj.div_(math.sqrt(r)).to(dtype)


def fill_apollo_group(group: dict[str, Any]) -> None:
    for key, value in APOLLO_DEFAULTS.items():
        group.setdefault(key, value)
    if group["scale_type"] not in SCALE_TYPES:
        raise MemtrainError(
            f"APOLLO: unknown scale_type {group['scale_type']!r}; use one of "
            f"{', '.join(SCALE_TYPES)}"
        )
    if not float(group["norm_growth"]) >= 0:
        raise MemtrainError(f"APOLLO: norm_growth must be >= 0, got {group['norm_growth']!r}")


class APOLLO(GaLoreAdamW):
    """APOLLO on groups that set ``rank`` (``scale_type='tensor'`` with rank 1: APOLLO-Mini).

    Group keys: ``rank``, ``update_proj_gap`` (re-sampling period), ``scale`` (alpha),
    ``scale_type`` ('channel' or 'tensor'), ``norm_growth`` (limiter ratio, 0 = off),
    ``proj_type`` (which side is projected, GaLore's rule).
    """

    def __init__(self, params: Any, lr: float = 1e-3, **kwargs: Any):
        super().__init__(params, lr=lr, **kwargs)
        for group in self.param_groups:
            if "rank" in group:
                fill_apollo_group(group)

    def _adam_group(self, group: dict[str, Any], params: list[torch.Tensor]) -> None:
        if "rank" not in group:
            super()._adam_group(group, params)
            return
        for p in params:
            self._apollo_update(group, p)

    def _apollo_update(self, group: dict[str, Any], p: torch.Tensor) -> None:
        state = self.state[p]
        step = init_step(state)
        state["step"] += 1
        beta1, beta2 = group["betas"]
        grad = p.grad
        side = projection_side(p.shape, group["proj_type"])
        gap = int(group["update_proj_gap"])
        proj = apollo_projection(
            tuple(p.shape),
            int(group["rank"]),
            side,
            int(self.defaults["seed"]),
            self.param_index(p),
            step - step % gap,
            p.device,
            grad.dtype,
        )
        low = project(grad, like(proj, grad), side)
        avg, sq = read_moments(state, low, bits=32)
        avg.lerp_(low, 1.0 - beta1)
        sq.mul_(beta2).addcmul_(low, low, value=1.0 - beta2)
        t = step + 1
        correction = math.sqrt(1.0 - beta2**t) / (1.0 - beta1**t)
        adam = (avg / (sq.sqrt() + group["eps"])).mul_(correction)
        scaled = grad * self._ratio(group, adam, low, side)
        limit = float(group["norm_growth"])
        if limit > 0:
            norm = scaled.norm()
            if "prev_norm" in state:
                cap = state["prev_norm"].to(norm.dtype) * limit
                factor = torch.where(norm > cap, cap / norm, torch.ones_like(norm))
                scaled.mul_(factor.to(scaled.dtype))
                norm = torch.minimum(norm, cap)
            state["prev_norm"] = norm.float().clone()
        p.add_(scaled, alpha=-group["lr"] * float(group["scale"]))
        if group["weight_decay"] > 0.0:
            p.add_(p, alpha=-group["lr"] * group["weight_decay"])

    @staticmethod
    def _ratio(
        group: dict[str, Any], adam: torch.Tensor, low: torch.Tensor, side: str
    ) -> torch.Tensor:
        """||low-rank Adam update|| / ||low-rank gradient||, per channel or for the tensor,
        shaped to broadcast over the full gradient."""
        if group["scale_type"] == "tensor":
            return adam.norm() / (low.norm() + NORM_FLOOR)
        dim = 1 if side == "right" else 0  # the projected (rank) dimension
        ratio = adam.norm(dim=dim, keepdim=True) / (low.norm(dim=dim, keepdim=True) + NORM_FLOOR)
        return ratio
