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
    z_loss: float = 0.0,
    shift: bool = False,
) -> torch.Tensor:
    """Same contract as :func:`memtrain.kernels.cross_entropy`, with N x V logits in memory.

    The cross-entropy part is ``torch.nn.functional.cross_entropy`` itself (label smoothing
    included); the z-loss ``z_loss * logsumexp(logits)^2`` is added per valid row before the
    reduction, so it is averaged like the loss.
    """
    if shift:
        pad = torch.full_like(labels[..., :1], ignore_index)
        labels = torch.cat([labels[..., 1:], pad], dim=-1)
    logits = hidden.reshape(-1, hidden.shape[-1]) @ weight.t()
    if bias is not None:
        logits = logits + bias
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    flat = labels.reshape(-1)
    losses = torch.nn.functional.cross_entropy(
        logits, flat, ignore_index=ignore_index, reduction="none", label_smoothing=label_smoothing
    )
    valid = flat != ignore_index
    if z_loss:
        lse = torch.logsumexp(logits, dim=-1)
        losses = losses + torch.where(valid, z_loss * lse * lse, torch.zeros_like(lse))
    if reduction == "none":
        return losses.reshape(labels.shape)
    if reduction == "sum":
        return losses.sum()
    return losses.sum() / valid.sum()
