"""GaLore with Adam moments in the low-rank space; a drop-in for galore-torch's ``GaLoreAdamW``.

Parameter groups that carry ``rank`` are projected: the gradient ``G`` of each 2-D weight is
mapped to rank r, Adam runs there, and the normalised update is mapped back, scaled by ``scale``
and added to the weight in one GEMM. The projection is refreshed every ``update_proj_gap`` steps
(``proj_method='iter'``: a warm-started subspace iteration batched over equal shapes, the
default; ``'svd'``: galore-torch's full SVD). Groups without ``rank`` get the same AdamW (galore
-torch's variant: eps outside the bias correction, weight decay after the update).
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
    PROJ_METHODS,
    add_projected_back,
    check_proj_type,
    project,
    projection_side,
    refresh_projections,
)
from memtrain.optim.moments import check_bits, read_moments, write_moments
from memtrain.optim.sharded import full, like, local

# Keys a projected group may set; the values are what galore-torch users get by default.
LOWRANK_DEFAULTS: dict[str, Any] = {
    "update_proj_gap": 200,
    "scale": 1.0,
    "proj_type": "std",
    "proj_method": "iter",
    "proj_iters": 2,
    "proj_cold_iters": 4,
    "proj_oversample": 0,
    "proj_orth": "cholqr",
}


def fill_lowrank_group(group: dict[str, Any]) -> None:
    """Complete and validate a projected group's keys (galore-torch requires all four)."""
    for key, value in LOWRANK_DEFAULTS.items():
        group.setdefault(key, value)
    if int(group["rank"]) < 1:
        raise MemtrainError(f"rank must be a positive integer, got {group['rank']!r}")
    if int(group["update_proj_gap"]) < 1:
        raise MemtrainError(f"update_proj_gap must be >= 1, got {group['update_proj_gap']!r}")
    check_proj_type(group["proj_type"])
    if group["proj_method"] not in PROJ_METHODS:
        raise MemtrainError(
            f"unknown proj_method {group['proj_method']!r}; use one of {', '.join(PROJ_METHODS)}"
        )
    for p in group["params"]:
        projection_side(p.shape, group["proj_type"])


def refresh_due(
    optimizer: MemtrainOptimizer, group: dict[str, Any], params: list[torch.Tensor], dtype_of
) -> None:
    """Recompute the projection of every parameter whose refresh is due this step, batched."""
    gap = int(group["update_proj_gap"])
    items = []
    for p in params:
        state = optimizer.state[p]
        step = init_step(state)
        if "projection" in state and step % gap != 0:
            continue
        side = projection_side(p.shape, group["proj_type"])
        prev = state.get("projection")
        prev = None if prev is None else local(prev)  # replicated: every rank holds it whole
        items.append((optimizer.param_index(p), step, full(p.grad), prev, side))
    if not items:
        return
    fresh = refresh_projections(
        items,
        rank=int(group["rank"]),
        method=group["proj_method"],
        seed=int(optimizer.defaults.get("seed", 0)),
        iters=int(group["proj_iters"]),
        cold_iters=int(group["proj_cold_iters"]),
        oversample=int(group["proj_oversample"]),
        orth=group["proj_orth"],
    )
    for p in params:
        key = optimizer.param_index(p)
        if key in fresh:
            state = optimizer.state[p]
            new = like(fresh[key].to(dtype_of(p)), p.grad)
            if "projection" in state:
                state["projection"].copy_(new)
            else:
                state["projection"] = new.contiguous().clone()


class GaLoreAdamW(MemtrainOptimizer):
    """AdamW with GaLore gradient projection on groups that set ``rank``.

    Same constructor and group keys as galore-torch (``rank``, ``update_proj_gap``, ``scale``,
    ``proj_type``), plus ``proj_method`` ('iter' or 'svd'), ``proj_iters`` (warm iterations),
    ``proj_cold_iters``, ``proj_oversample`` and ``proj_orth`` ('qr' or 'cholqr'), and
    ``seed`` for the random starts.
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
        correct_bias: bool = True,
        seed: int = 0,
        no_deprecation_warning: bool = True,
        bits: int = 32,
    ):
        check_positive("lr", lr)
        check_unit_interval("betas[0]", betas[0])
        check_unit_interval("betas[1]", betas[1])
        if eps < 0:
            raise MemtrainError(f"eps must be >= 0, got {eps!r}")
        defaults = {
            "lr": lr,
            "betas": tuple(betas),
            "eps": eps,
            "weight_decay": weight_decay,
            "correct_bias": correct_bias,
            "seed": seed,
            "bits": check_bits(bits),
        }
        super().__init__(params, defaults)
        for group in self.param_groups:
            if "rank" in group:
                fill_lowrank_group(group)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = self._run_closure(closure)
        for group in self.param_groups:
            params = grads_of(group)
            if params:
                self._adam_group(group, params)
        return loss

    def _adam_group(self, group: dict[str, Any], params: list[torch.Tensor]) -> None:
        lowrank = "rank" in group
        if lowrank:
            refresh_due(self, group, params, dtype_of=lambda p: p.grad.dtype)
        grads, avgs, sqs, sizes = [], [], [], []
        beta1, beta2 = group["betas"]
        for p in params:
            state = self.state[p]
            step = init_step(state) + 1
            grad = p.grad
            if lowrank:
                side = projection_side(p.shape, group["proj_type"])
                grad = project(grad, state["projection"], side)
            if int(group.get("bits", 32)) != 8:
                read_moments(state, grad, bits=32)
            state["step"] += 1
            size = group["lr"]
            if group["correct_bias"]:
                size = size * math.sqrt(1.0 - beta2**step) / (1.0 - beta1**step)
            grads.append(grad)
            avgs.append(state.get("exp_avg"))
            sqs.append(state.get("exp_avg_sq"))
            sizes.append(size)
        if int(group.get("bits", 32)) == 8:
            self._quantized_update(group, params, grads, sizes)
            return
        torch._foreach_mul_(avgs, beta1)
        torch._foreach_add_(avgs, grads, alpha=1.0 - beta1)
        torch._foreach_mul_(sqs, beta2)
        torch._foreach_addcmul_(sqs, grads, grads, value=1.0 - beta2)
        denoms = torch._foreach_sqrt(sqs)
        torch._foreach_add_(denoms, group["eps"])
        del grads
        if lowrank:
            normed = torch._foreach_div(avgs, denoms)
            del denoms
            for p, n, size in zip(params, normed, sizes, strict=True):
                side = projection_side(p.shape, group["proj_type"])
                proj = self.state[p]["projection"]
                add_projected_back(p, n, proj, side, alpha=-size * float(group["scale"]))
        else:
            torch._foreach_addcdiv_(params, avgs, denoms, [-s for s in sizes])
        if group["weight_decay"] > 0.0:
            torch._foreach_add_(params, params, alpha=-group["lr"] * group["weight_decay"])

    def _quantized_update(
        self,
        group: dict[str, Any],
        params: list[torch.Tensor],
        grads: list[torch.Tensor],
        sizes: list[float],
    ) -> None:
        """The same step with 8-bit moments: dequantise, update in float32, re-quantise."""
        beta1, beta2 = group["betas"]
        lowrank = "rank" in group
        for p, grad, size in zip(params, grads, sizes, strict=True):
            state = self.state[p]
            grad = grad.float()
            avg, sq = read_moments(state, grad, bits=8)
            avg.lerp_(grad, 1.0 - beta1)
            sq.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
            write_moments(state, avg, sq, bits=8)
            normed = avg.div_(sq.sqrt_().add_(group["eps"])).to(p.dtype)
            if lowrank:
                side = projection_side(p.shape, group["proj_type"])
                alpha = -size * float(group["scale"])
                add_projected_back(p, normed, state["projection"], side, alpha=alpha)
            else:
                p.add_(normed, alpha=-size)
        if group["weight_decay"] > 0.0:
            torch._foreach_add_(params, params, alpha=-group["lr"] * group["weight_decay"])
