"""Chunked PyTorch path: bounded memory on the CPU and wherever Triton cannot run.

Rows are processed in chunks, so at most ``chunk_rows x V`` float32 logits exist at a time.
Forward keeps only the log-sum-exp of each row; backward recomputes each chunk's logits, turns
them into the softmax gradient and multiplies it straight into the two input gradients. The
z-loss ``c * lse^2`` needs nothing more: its logits gradient is ``2c * lse * softmax``, so each
row's softmax is scaled by ``1 + 2c * lse`` (:func:`prob_scale`). The
weight gradient is accumulated in float32 (one buffer the size of the weight) so that summing
many chunks does not lose precision in bf16/fp16.
"""

from __future__ import annotations

import torch

# Float32 logits held at once, in elements (64 MiB); chunks never drop below 16 rows.
LOGITS_BUDGET_ELEMENTS = 16 * 1024 * 1024


def chunk_rows_for(vocab: int, budget_elements: int | None = None) -> int:
    """Rows per chunk so that one chunk of float32 logits stays within the budget."""
    budget = LOGITS_BUDGET_ELEMENTS if budget_elements is None else budget_elements
    return max(16, budget // max(vocab, 1))


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Float32 for the low-precision dtypes, float64 kept as is."""
    return torch.promote_types(dtype, torch.float32)


def _chunk_logits(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    softcap: float | None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Float32 logits of one chunk, and tanh of the raw logits when softcapping (for backward)."""
    logits = (hidden @ weight.t()).to(_acc_dtype(hidden.dtype))
    if bias is not None:
        logits += bias
    if softcap is None:
        return logits, None
    tanh = torch.tanh(logits / softcap)
    return tanh * softcap, tanh


def row_losses(
    lse: torch.Tensor,
    target_logit: torch.Tensor,
    logit_sum: torch.Tensor | None,
    valid: torch.Tensor,
    label_smoothing: float,
    vocab: int,
    z_loss: float = 0.0,
) -> torch.Tensor:
    """Per-row loss from the row statistics; ignored rows get exactly 0.

    Label smoothing mixes in the mean of ``-log p`` over the vocabulary (``lse - mean logit``),
    as ``torch.nn.functional.cross_entropy`` does; the z-loss adds ``z_loss * lse^2``.
    """
    loss = lse - target_logit
    if label_smoothing > 0.0:
        smooth = lse - logit_sum / vocab
        loss = (1.0 - label_smoothing) * loss + label_smoothing * smooth
    if z_loss > 0.0:
        loss = loss + z_loss * lse * lse
    return torch.where(valid, loss, torch.zeros_like(loss))


def prob_scale(lse: torch.Tensor, z_loss: float) -> torch.Tensor:
    """``1 + 2 * z_loss * lse`` per row: the factor the z-loss puts on each softmax
    probability in the logits gradient (d(c * lse^2)/dz = 2c * lse * softmax)."""
    return 1.0 + 2.0 * z_loss * lse


def fp16_grad_scale(grad_rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A power of two that brings the largest row gradient into (1/2, 1], and its inverse.

    fp16 flushes values under 6e-8 to zero, and ``grad_row * softmax`` with a mean over many
    rows and a large vocabulary lands there; scaling by a power of two first is exact. (The
    Triton and cuBLAS backwards use it; this path works in float32.)
    """
    peak = grad_rows.abs().amax().clamp_min(torch.finfo(torch.float32).tiny)
    exponent = torch.ceil(torch.log2(peak))
    return torch.exp2(-exponent), torch.exp2(exponent)


def undo_grad_scale(inv_scale: torch.Tensor | None, *grads: torch.Tensor | None) -> None:
    """Multiply the gradients computed under :func:`fp16_grad_scale` back, in place (a no-op
    without a scale; ``None`` gradients are skipped)."""
    if inv_scale is None:
        return
    for grad in grads:
        if grad is not None:
            grad.mul_(inv_scale)


class ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Per-row losses of ``softcap(hidden @ weight.T + bias)`` against ``targets`` (-1 = ignore)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, softcap, label_smoothing, chunk_rows, z_loss):
        n_rows, vocab = hidden.shape[0], weight.shape[0]
        acc_dtype = _acc_dtype(hidden.dtype)
        losses = torch.empty(n_rows, dtype=acc_dtype, device=hidden.device)
        lse_all = torch.empty(n_rows, dtype=acc_dtype, device=hidden.device)
        valid_all = targets >= 0
        for start in range(0, n_rows, chunk_rows):
            stop = min(start + chunk_rows, n_rows)
            logits, _ = _chunk_logits(hidden[start:stop], weight, bias, softcap)
            lse = torch.logsumexp(logits, dim=-1)
            valid = valid_all[start:stop]
            safe = targets[start:stop].clamp(min=0)
            target_logit = logits.gather(1, safe[:, None]).squeeze(1)
            logit_sum = logits.sum(-1) if label_smoothing > 0.0 else None
            losses[start:stop] = row_losses(
                lse, target_logit, logit_sum, valid, label_smoothing, vocab, z_loss
            )
            lse_all[start:stop] = lse
        ctx.save_for_backward(hidden, weight, bias, targets, lse_all)
        ctx.softcap = softcap
        ctx.label_smoothing = label_smoothing
        ctx.chunk_rows = chunk_rows
        ctx.z_loss = z_loss
        return losses

    @staticmethod
    def backward(ctx, grad_losses):
        hidden, weight, bias, targets, lse_all = ctx.saved_tensors
        softcap, smoothing, chunk_rows = ctx.softcap, ctx.label_smoothing, ctx.chunk_rows
        n_rows, vocab = hidden.shape[0], weight.shape[0]
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        grad_hidden = torch.empty_like(hidden) if need_h else None
        acc_dtype = _acc_dtype(hidden.dtype)
        grad_weight = torch.zeros(weight.shape, dtype=acc_dtype, device=weight.device)
        grad_bias = torch.zeros(vocab, dtype=acc_dtype, device=weight.device)
        grad_losses = grad_losses.to(acc_dtype) * (targets >= 0)
        for start in range(0, n_rows, chunk_rows):
            stop = min(start + chunk_rows, n_rows)
            h = hidden[start:stop]
            logits, tanh = _chunk_logits(h, weight, bias, softcap)
            lse = lse_all[start:stop, None]
            grad = torch.exp(logits - lse)
            if ctx.z_loss > 0.0:
                grad *= prob_scale(lse, ctx.z_loss)
            if smoothing > 0.0:
                grad -= smoothing / vocab
            rows = torch.arange(stop - start, device=h.device)
            safe = targets[start:stop].clamp(min=0)
            grad[rows, safe] -= 1.0 - smoothing
            grad *= grad_losses[start:stop, None]
            if tanh is not None:
                grad *= 1.0 - tanh * tanh
            if need_b:
                grad_bias += grad.sum(0)
            grad = grad.to(hidden.dtype)
            if need_h:
                grad_hidden[start:stop] = grad @ weight
            if need_w:
                grad_weight += grad.t() @ h
        return (
            grad_hidden,
            grad_weight.to(weight.dtype) if need_w else None,
            grad_bias.to(bias.dtype) if need_b and bias is not None else None,
            None,
            None,
            None,
            None,
            None,
        )
