"""A token-local module (a final norm) run over sequence chunks with only its input saved.

Forward writes each chunk's output into one tensor without autograd; backward rebuilds one chunk
at a time and writes its input gradient into one preallocated tensor, so neither the module's
own saved tensors nor its backward transients ever exist for more than a chunk, and no
full-length gradient is summed from slices. Weights get one gradient per step (they come in as
inputs), as their hooks expect.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from memtrain.offload.grad_sums import WeightGradSums
from memtrain.offload.memo import chunk_ranges


class _TokenChunked(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, forward, chunks, *params):
        ranges = chunk_ranges(0, x.shape[1], chunks)
        out = None
        for start, end in ranges:
            piece = forward(x[:, start:end])
            if out is None:
                out = piece.new_empty((piece.shape[0], x.shape[1], *piece.shape[2:]))
            out[:, start:end] = piece
        device = x.device.type
        ctx.autocast = (device, torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))
        ctx.forward, ctx.ranges, ctx.params = forward, ranges, params
        ctx.save_for_backward(x)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        (x,) = ctx.saved_tensors
        device, enabled, dtype = ctx.autocast
        weights = WeightGradSums(ctx.params, ctx.needs_input_grad[3:])
        grad_x = torch.empty_like(x) if ctx.needs_input_grad[0] else None
        for start, end in ctx.ranges:
            piece = x[:, start:end].detach().requires_grad_(grad_x is not None)
            with torch.enable_grad(), torch.autocast(device, dtype=dtype, enabled=enabled):
                y = ctx.forward(piece)
            inputs = ([piece] if grad_x is not None else []) + weights.wanted
            if not inputs or not y.requires_grad:
                if grad_x is not None:
                    grad_x[:, start:end] = 0
                continue
            grads = torch.autograd.grad(y, inputs, grad_out[:, start:end], allow_unused=True)
            if grad_x is not None:
                grad_x[:, start:end] = 0 if grads[0] is None else grads[0]
                grads = grads[1:]
            weights.add(grads)
        return (grad_x, None, None, *weights.result())


def token_chunked(forward: Callable, module: torch.nn.Module, chunks: int) -> Callable:
    """``forward`` (a token-local module's) over ``chunks`` sequence chunks (dim 1) of its
    input, saving only the input; plain ``forward`` without gradients or for short inputs."""

    def wrapper(x, *args, **kwargs):
        if args or kwargs or x.dim() < 2 or x.shape[1] < 2 or not torch.is_grad_enabled():
            return forward(x, *args, **kwargs)
        params = tuple(p for p in module.parameters() if p.requires_grad)
        return _TokenChunked.apply(x, forward, chunks, *params)

    return wrapper
