"""GaLore with Adafactor in the low-rank space; a drop-in for galore-torch's ``GaLoreAdafactor``.

Adafactor keeps factored second moments (one value per row and per column), so in the rank-r
space its state is ``m + r`` (or ``r + n``) numbers plus the projection. Hyper-parameters and
learning-rate rules are those of the Adafactor paper as galore-torch (and transformers) expose
them. Statistics and projections are float32 whatever the weight dtype, as in galore-torch.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch

from memtrain.errors import MemtrainError
from memtrain.optim.base import MemtrainOptimizer, grads_of, init_step
from memtrain.optim.galore_adamw import fill_lowrank_group, refresh_due
from memtrain.optim.lowrank import project, project_back, projection_side


def _rms(t: torch.Tensor) -> torch.Tensor:
    return t.norm(2) / (t.numel() ** 0.5)


class GaLoreAdafactor(MemtrainOptimizer):
    """Adafactor with GaLore gradient projection on groups that set ``rank``."""

    def __init__(
        self,
        params: Iterable[Any],
        lr: float | None = None,
        eps: tuple[float, float] = (1e-30, 1e-3),
        clip_threshold: float = 1.0,
        decay_rate: float = -0.8,
        beta1: float | None = None,
        weight_decay: float = 0.0,
        scale_parameter: bool = True,
        relative_step: bool = True,
        warmup_init: bool = False,
        seed: int = 0,
    ):
        if lr is not None and relative_step:
            raise MemtrainError("Adafactor: give lr only with relative_step=False")
        if lr is None and not relative_step:
            raise MemtrainError("Adafactor: relative_step=False needs an lr")
        if warmup_init and not relative_step:
            raise MemtrainError("Adafactor: warmup_init=True needs relative_step=True")
        defaults = {
            "lr": lr,
            "eps": tuple(eps),
            "clip_threshold": clip_threshold,
            "decay_rate": decay_rate,
            "beta1": beta1,
            "weight_decay": weight_decay,
            "scale_parameter": scale_parameter,
            "relative_step": relative_step,
            "warmup_init": warmup_init,
            "seed": seed,
        }
        super().__init__(params, defaults)
        for group in self.param_groups:
            if "rank" in group:
                fill_lowrank_group(group)

    @staticmethod
    def _lr(group: dict[str, Any], step: int, rms: torch.Tensor) -> float:
        size = group["lr"]
        if group["relative_step"]:
            floor = 1e-6 * step if group["warmup_init"] else 1e-2
            size = min(floor, 1.0 / math.sqrt(step))
        if group["scale_parameter"]:
            return max(group["eps"][1], float(rms)) * size
        return float(size)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = self._run_closure(closure)
        for group in self.param_groups:
            params = grads_of(group)
            if not params:
                continue
            lowrank = "rank" in group
            if lowrank:
                refresh_due(self, group, params, dtype_of=lambda p: torch.float32)
            for p in params:
                self._update(group, p, lowrank)
        return loss

    def _update(self, group: dict[str, Any], p: torch.Tensor, lowrank: bool) -> None:
        state = self.state[p]
        grad = p.grad.float()
        init_step(state)
        side = projection_side(p.shape, group["proj_type"]) if lowrank else ""
        if lowrank:
            grad = project(grad, state["projection"], side)
        factored = grad.dim() >= 2
        if "exp_avg_sq_row" not in state and "exp_avg_sq" not in state:
            if group["beta1"] is not None:
                state["exp_avg"] = torch.zeros_like(grad)
            if factored:
                state["exp_avg_sq_row"] = grad.new_zeros(grad.shape[:-1])
                state["exp_avg_sq_col"] = grad.new_zeros(grad.shape[:-2] + grad.shape[-1:])
            else:
                state["exp_avg_sq"] = torch.zeros_like(grad)
        weight = p.float() if p.dtype != torch.float32 else p
        state["step"] += 1
        step = int(state["step"].item())
        lr = self._lr(group, step, _rms(weight))
        beta2t = 1.0 - math.pow(step, group["decay_rate"])
        update = grad.square() + group["eps"][0]
        if factored:
            row, col = state["exp_avg_sq_row"], state["exp_avg_sq_col"]
            row.mul_(beta2t).add_(update.mean(dim=-1), alpha=1.0 - beta2t)
            col.mul_(beta2t).add_(update.mean(dim=-2), alpha=1.0 - beta2t)
            r_factor = (row / row.mean(dim=-1, keepdim=True)).rsqrt_().unsqueeze(-1)
            update = (r_factor * col.unsqueeze(-2).rsqrt()).mul_(grad)
        else:
            sq = state["exp_avg_sq"]
            sq.mul_(beta2t).add_(update, alpha=1.0 - beta2t)
            update = sq.rsqrt().mul_(grad)
        update.div_((_rms(update) / group["clip_threshold"]).clamp_(min=1.0))
        update.mul_(lr)
        if group["beta1"] is not None:
            avg = state["exp_avg"]
            avg.mul_(group["beta1"]).add_(update, alpha=1 - group["beta1"])
            update = avg
        if lowrank:
            update = project_back(update, state["projection"], side) * float(group["scale"])
        if group["weight_decay"] != 0:
            weight.add_(weight, alpha=-group["weight_decay"] * lr)
        weight.add_(-update)
        if weight is not p:
            p.copy_(weight)
