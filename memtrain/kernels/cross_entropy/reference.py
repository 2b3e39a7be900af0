"""Plain PyTorch linear cross-entropy that builds the full logits.

It is the definition the fused paths are tested against: run it on float64 copies of the inputs
to get a reference whose own rounding error is far below anything the kernels produce.
"""

from __future__ import annotations

import torch


def reference_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    softcap: float | None = None,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    shift: bool = False,
) -> torch.Tensor:
    """Same contract as :func:`memtrain.kernels.cross_entropy`, with N x V logits in memory."""
    if shift:
        pad = torch.full_like(labels[..., :1], ignore_index)
        labels = torch.cat([labels[..., 1:], pad], dim=-1)
    logits = hidden.reshape(-1, hidden.shape[-1]) @ weight.t()
    if bias is not None:
        logits = logits + bias
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    loss = torch.nn.functional.cross_entropy(
        logits,
        labels.reshape(-1),
        ignore_index=ignore_index,
        reduction=reduction,
        label_smoothing=label_smoothing,
    )
    if reduction == "none":
        loss = loss.reshape(labels.shape)
    return loss
