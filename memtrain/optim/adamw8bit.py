"""AdamW with both moments stored as blockwise 8-bit codes (2 bytes per value become ~1.016).

The arithmetic is torch's AdamW (eps inside the bias correction, decoupled weight decay before
the update) in float32; only the stored moments are quantised, so the step differs from AdamW by
the quantisation error of the moments alone.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch

from memtrain.optim.base import (
    MemtrainOptimizer,
    check_positive,
    check_unit_interval,
    grads_of,
    init_step,
)
from memtrain.optim.moments import read_moments, write_moments


class AdamW8bit(MemtrainOptimizer):
    """torch AdamW rules with 8-bit blockwise-quantised first and second moments."""

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.01,
    ):
        check_positive("lr", lr)
        check_unit_interval("betas[0]", betas[0])
        check_unit_interval("betas[1]", betas[1])
        defaults = {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay}
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = self._run_closure(closure)
        for group in self.param_groups:
            for p in grads_of(group):
                self._update(group, p)
        return loss

    def _update(self, group: dict[str, Any], p: torch.Tensor) -> None:
        beta1, beta2 = group["betas"]
        state = self.state[p]
        step = init_step(state) + 1
        state["step"] += 1
        grad = p.grad.float()
        avg, sq = read_moments(state, grad, bits=8)
        avg.lerp_(grad, 1.0 - beta1)
        sq.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
        write_moments(state, avg, sq, bits=8)
        denom = (sq.sqrt_() / math.sqrt(1.0 - beta2**step)).add_(group["eps"])
        update = avg.div_(denom).mul_(group["lr"] / (1.0 - beta1**step))
        if group["weight_decay"] != 0:
            p.mul_(1.0 - group["lr"] * group["weight_decay"])
        p.sub_(update.to(p.dtype))
