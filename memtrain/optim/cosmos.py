"""COSMOS (Liu et al. 2025): SOAP on the leading eigensubspace of the gradient, Muon on the rest.

For a weight ``W`` (``m x n``, taken with ``n <= m``; wider weights are handled transposed) it
keeps the first moment ``M`` (``m x n``), an ``n x r`` eigenbasis ``U`` of the gradient's second
moment with its ``r x r`` projection ``S``, and the second moment ``V`` (``m x r``) of the
gradient in that basis. Each step:

- ``U <- QR(b2 U S + (1 - b2) G^T G U)`` (one power step), ``S <- U^T (b2 U S U^T + (1 - b2)
  G^T G) U`` with the new ``U``, ``V <- b2 V + (1 - b2) (G U)^2``;
- ``A = (M U / c1) / sqrt((V + eps) / c2) U^T``: Adam in the rotated leading subspace (SOAP);
- ``B = NORM(NS5(R / ||R||))`` with ``R = M - M U U^T``: Muon's orthogonalised residual;
- ``W <- W - lr * NORM(A + gamma sqrt(m) B)``, where ``NORM(X) = sqrt(n) X / ||X||_F``.

``step_rms='paper'`` applies that last NORM as written (the step then has RMS ``1/sqrt(m)``, a
Muon-sized step that wants Muon-sized learning rates); ``'unit'`` (the default) scales it to RMS
1 so that AdamW learning rates carry over and one learning rate suits the dense groups too.
``U`` starts from a seeded random orthonormal basis and ``S`` at zero. Statistics and the basis
are float32 (float64 for float64 weights); ``M`` keeps the weight's dtype.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from memtrain.errors import MemtrainError
from memtrain.optim.base import init_step
from memtrain.optim.galore_adamw import GaLoreAdamW
from memtrain.optim.lowrank import effective_rank
from memtrain.optim.subspace import random_subspace, seeded_generator

STEP_RMS = ("unit", "paper")
COSMOS_DEFAULTS: dict[str, Any] = {"gamma": 0.2, "ns_steps": 5, "step_rms": "unit"}
NS_COEFFS = (3.4445, -4.7750, 2.0315)  # Muon's quintic Newton-Schulz coefficients
NORM_FLOOR = 1e-12


def newton_schulz(x: torch.Tensor, steps: int) -> torch.Tensor:
    """Approximate ``U V^T`` of ``x = U S V^T`` (Muon's quintic iteration; ``x`` is scaled to
    Frobenius norm at most 1 first so the iteration converges)."""
    a, b, c = NS_COEFFS
    y = x / (x.norm() + NORM_FLOOR)
    wide = y.shape[0] > y.shape[1]
    if wide:
        y = y.mT
    for _ in range(steps):
        gram = y @ y.mT
        y = a * y + (b * gram + c * gram @ gram) @ y
    return y.mT if wide else y


def frob_normalize(x: torch.Tensor, n: int) -> torch.Tensor:
    """COSMOS's NORM: ``sqrt(n) x / ||x||_F``."""
    return x * (math.sqrt(n) / (x.norm() + NORM_FLOOR))


def fill_cosmos_group(group: dict[str, Any]) -> None:
    for key, value in COSMOS_DEFAULTS.items():
        group.setdefault(key, value)
    if group["step_rms"] not in STEP_RMS:
        raise MemtrainError(
            f"COSMOS: unknown step_rms {group['step_rms']!r}; use one of {', '.join(STEP_RMS)}"
        )
    if not float(group["gamma"]) >= 0:
        raise MemtrainError(f"COSMOS: gamma must be >= 0, got {group['gamma']!r}")
    if int(group["ns_steps"]) < 0:
        raise MemtrainError(f"COSMOS: ns_steps must be >= 0, got {group['ns_steps']!r}")


def stat_dtype(weight: torch.Tensor) -> torch.dtype:
    return torch.float64 if weight.dtype == torch.float64 else torch.float32


class COSMOS(GaLoreAdamW):
    """COSMOS on groups that set ``rank``; dense groups get GaLoreAdamW's AdamW.

    Extra group keys: ``gamma`` (weight of the Muon part), ``ns_steps`` (Newton-Schulz
    iterations), ``step_rms`` ('unit' or 'paper'), ``scale`` (multiplies the step).
    """

    whole_matrices = True  # QR and Newton-Schulz of whole matrices

    def __init__(self, params: Any, lr: float = 1e-3, **kwargs: Any):
        super().__init__(params, lr=lr, **kwargs)
        for group in self.param_groups:
            if "rank" in group:
                fill_cosmos_group(group)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        gathered, loss = self._gathered_step(closure)
        return loss if gathered else super().step(closure)

    def _adam_group(self, group: dict[str, Any], params: list[torch.Tensor]) -> None:
        if "rank" not in group:
            super()._adam_group(group, params)
            return
        for p in params:
            self._cosmos_update(group, p)

    def _init_state(self, group: dict[str, Any], p: torch.Tensor) -> None:
        state = self.state[p]
        m, n = max(p.shape), min(p.shape)
        r = effective_rank(p.shape, int(group["rank"]))
        dtype = stat_dtype(p)
        gen = seeded_generator(p.device, int(self.defaults["seed"]), self.param_index(p), 0)
        state["exp_avg"] = torch.zeros_like(p, memory_format=torch.contiguous_format)
        state["basis"] = random_subspace(n, r, gen, p.device).to(dtype)
        state["basis_sq"] = torch.zeros((r, r), dtype=dtype, device=p.device)
        state["exp_avg_sq"] = torch.zeros((m, r), dtype=dtype, device=p.device)

    def _cosmos_update(self, group: dict[str, Any], p: torch.Tensor) -> None:
        state = self.state[p]
        step = init_step(state)
        if "basis" not in state:
            self._init_state(group, p)
        state["step"] += 1
        t = step + 1
        beta1, beta2 = group["betas"]
        state["exp_avg"].lerp_(p.grad, 1.0 - beta1)
        tall = p.shape[0] >= p.shape[1]
        dtype = stat_dtype(p)
        g = (p.grad if tall else p.grad.mT).to(dtype)
        mom = (state["exp_avg"] if tall else state["exp_avg"].mT).to(dtype)
        rows, cols = g.shape
        u, s = state["basis"], state["basis_sq"]
        gu = g @ u
        u_new = torch.linalg.qr(beta2 * (u @ s) + (1.0 - beta2) * (g.mT @ gu)).Q
        rot = u_new.mT @ u
        gu_new = g @ u_new
        s.copy_(beta2 * (rot @ s @ rot.mT) + (1.0 - beta2) * (gu_new.mT @ gu_new))
        u.copy_(u_new)
        sq = state["exp_avg_sq"]
        sq.mul_(beta2).addcmul_(gu_new, gu_new, value=1.0 - beta2)
        mu = mom @ u_new
        denom = ((sq + group["eps"]) / (1.0 - beta2**t)).sqrt_()
        soap = (mu / (1.0 - beta1**t) / denom) @ u_new.mT
        residual = mom - mu @ u_new.mT
        muon = frob_normalize(newton_schulz(residual, int(group["ns_steps"])), cols)
        combined = soap.add_(muon, alpha=float(group["gamma"]) * math.sqrt(rows))
        update = frob_normalize(combined, cols)
        if group["step_rms"] == "unit":
            update.mul_(math.sqrt(rows))
        if group["weight_decay"] > 0.0:
            p.mul_(1.0 - group["lr"] * group["weight_decay"])
        update = update if tall else update.mT
        p.add_(update.to(p.dtype), alpha=-group["lr"] * float(group["scale"]))
