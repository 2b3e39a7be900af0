"""Autograd wrapper around the Triton forward and backward kernels, and their launch settings."""

from __future__ import annotations

import os

import torch

from memtrain.kernels.linear_cross_entropy.chunked import row_losses
from memtrain.kernels.linear_cross_entropy.triton_bwd import backward_grads
from memtrain.kernels.linear_cross_entropy.triton_fwd import forward_row_stats

# Workspace of the backward pass (logits-gradient chunk + float32 hidden-gradient accumulator).
DEFAULT_WORKSPACE_BYTES = 64 * 1024 * 1024


def interpreting() -> bool:
    """True when Triton runs its kernels in the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def launch_config(dtype: torch.dtype) -> dict:
    """Block shapes and pipelining for the kernels: large tensor-core tiles on a GPU, small
    tiles in the interpreter so that tests on odd shapes exercise every masking path."""
    tf32 = torch.backends.cuda.matmul.allow_tf32
    precision = "tf32" if dtype == torch.float32 and tf32 else "ieee"
    if interpreting():
        return dict(
            BLOCK_M=16, BLOCK_V=32, BLOCK_D=16, SPARSE_BLOCK_D=16, num_warps=4, num_stages=1,
            sparse_num_warps=4, sparse_num_stages=1, target_programs=8,
            dot_precision="ieee", upcast=True,
        )  # fmt: skip
    big = dtype != torch.float32
    return dict(
        BLOCK_M=128,
        BLOCK_V=256 if big else 128,
        BLOCK_D=64 if big else 32,
        SPARSE_BLOCK_D=128 if big else 64,
        num_warps=8,
        num_stages=3,
        sparse_num_warps=8,
        sparse_num_stages=3,
        target_programs=4 * torch.cuda.get_device_properties(0).multi_processor_count,
        dot_precision=precision,
        upcast=False,
    )


class TritonLinearCrossEntropy(torch.autograd.Function):
    """Per-row losses of ``softcap(hidden @ weight.T + bias)`` against ``targets`` (-1 = ignore)."""

    @staticmethod
    def forward(
        ctx, hidden, weight, bias, targets, softcap, label_smoothing, filter_eps, workspace_bytes
    ):
        config = launch_config(hidden.dtype)
        need_sum = label_smoothing > 0.0
        lse, target_logit, logit_sum = forward_row_stats(
            hidden, weight, bias, targets, softcap, need_sum, config
        )
        valid = targets >= 0
        losses = row_losses(lse, target_logit, logit_sum, valid, label_smoothing, weight.shape[0])
        ctx.save_for_backward(hidden, weight, bias, targets, lse)
        ctx.settings = (softcap, label_smoothing, filter_eps, workspace_bytes)
        return losses

    @staticmethod
    def backward(ctx, grad_losses):
        hidden, weight, bias, targets, lse = ctx.saved_tensors
        softcap, smoothing, filter_eps, workspace_bytes = ctx.settings
        grad_rows = (grad_losses.float() * (targets >= 0)).contiguous()
        grads = backward_grads(
            hidden, weight, bias, targets, lse, grad_rows, softcap, smoothing, filter_eps,
            tuple(ctx.needs_input_grad[:3]), launch_config(hidden.dtype), workspace_bytes,
        )  # fmt: skip
        return (*grads, None, None, None, None, None)
