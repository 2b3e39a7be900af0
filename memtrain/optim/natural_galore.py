"""Natural GaLore (Das 2024): GaLore whose low-rank gradient is first preconditioned by the
inverse empirical Fisher of the last few low-rank gradients.

With ``H`` the ``s`` most recent projected gradients (flattened, one per row, the current one
included) and damping ``lambda``, the natural gradient is
``(lambda I + H^T H)^-1 g = (g - H^T (lambda I + H H^T)^-1 H g) / lambda`` (Woodbury), so only
an ``s x s`` system is solved, never one of the low-rank space's size. Adam then runs on the
natural gradient exactly as in :class:`GaLoreAdamW`. The history is ``s`` low-rank matrices per
weight (priced by :mod:`memtrain.optim.memory`); it is emptied when the projection is refreshed,
since older gradients live in the previous subspace.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from memtrain.errors import MemtrainError
from memtrain.optim.base import init_step
from memtrain.optim.galore_adamw import GaLoreAdamW, refresh_due
from memtrain.optim.lowrank import add_projected_back, project, projection_side
from memtrain.optim.moments import read_moments
from memtrain.optim.sharded import settled, stacked_zeros

NATURAL_DEFAULTS: dict[str, Any] = {"history": 10, "damping": 1e-3}


def natural_gradient(low: torch.Tensor, history: torch.Tensor, damping: float) -> torch.Tensor:
    """``(damping I + H^T H)^-1 g`` through Woodbury, in float32 (float64 for float64 input);
    ``history`` is ``k`` low-rank gradients stacked on dim 0 (the current one among them), each
    shaped like ``low`` (row-sharded like it, where it is: the ``k x k`` products then sum over
    the ranks' rows in one all-reduce each)."""
    dtype = torch.float64 if low.dtype == torch.float64 else torch.float32
    g = low.to(dtype)
    h = history.to(dtype)
    gram = settled(torch.einsum("kmr,jmr->kj", h, h))
    gram.diagonal().add_(damping)
    coef = torch.linalg.solve(gram, settled(torch.einsum("kmr,mr->k", h, g)))
    return (g - torch.einsum("k,kmr->mr", coef, h)) / damping


def fill_natural_group(group: dict[str, Any]) -> None:
    for key, value in NATURAL_DEFAULTS.items():
        group.setdefault(key, value)
    if int(group["history"]) < 1:
        raise MemtrainError(f"Natural GaLore: history must be >= 1, got {group['history']!r}")
    if not float(group["damping"]) > 0:
        raise MemtrainError(f"Natural GaLore: damping must be positive, got {group['damping']!r}")


class NaturalGaLore(GaLoreAdamW):
    """GaLoreAdamW with an inverse-empirical-Fisher step in the low-rank space.

    Extra group keys: ``history`` (``s``, gradients kept) and ``damping`` (``lambda``).
    """

    def __init__(self, params: Any, lr: float = 1e-3, **kwargs: Any):
        super().__init__(params, lr=lr, **kwargs)
        for group in self.param_groups:
            if "rank" in group:
                fill_natural_group(group)

    def _adam_group(self, group: dict[str, Any], params: list[torch.Tensor]) -> None:
        if "rank" not in group:
            super()._adam_group(group, params)
            return
        refresh_due(self, group, params, dtype_of=lambda p: p.grad.dtype)
        for p in params:
            self._natural_update(group, p)
        if group["weight_decay"] > 0.0:
            torch._foreach_add_(params, params, alpha=-group["lr"] * group["weight_decay"])

    def _natural_update(self, group: dict[str, Any], p: torch.Tensor) -> None:
        state = self.state[p]
        step = init_step(state)
        state["step"] += 1
        side = projection_side(p.shape, group["proj_type"])
        low = project(p.grad, state["projection"], side)
        size = int(group["history"])
        if "history" not in state:
            state["history"] = stacked_zeros(size, low)
        elif state["history"].dim() == 2:  # a checkpoint of the flat layout (before 2026-12-05)
            state["history"] = state["history"].view(-1, *low.shape)
        since = step % int(group["update_proj_gap"])  # steps since the last refresh
        state["history"][since % size].copy_(low)
        filled = state["history"][: min(size, since + 1)]
        natural = natural_gradient(low, filled, float(group["damping"])).to(low.dtype)
        beta1, beta2 = group["betas"]
        avg, sq = read_moments(state, low, bits=32)
        avg.lerp_(natural, 1.0 - beta1)
        sq.mul_(beta2).addcmul_(natural, natural, value=1.0 - beta2)
        t = step + 1
        alpha = group["lr"] * float(group["scale"])
        if group["correct_bias"]:
            alpha *= math.sqrt(1.0 - beta2**t) / (1.0 - beta1**t)
        normed = avg / (sq.sqrt() + group["eps"])
        add_projected_back(p, normed, state["projection"], side, alpha=-alpha)
