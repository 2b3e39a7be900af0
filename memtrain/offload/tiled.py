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

from memtrain.offload.chunk_replay import token_chunks
from memtrain.offload.memo import chunk_ranges


def token_chunked(forward: Callable, module: torch.nn.Module, chunks: int) -> Callable:
    """``forward`` (a token-local module's) over ``chunks`` sequence chunks (dim 1) of its
    input, saving only the input; plain ``forward`` without gradients or for short inputs."""

    def wrapper(x, *args, **kwargs):
        if args or kwargs or x.dim() < 2 or x.shape[1] < 2 or not torch.is_grad_enabled():
            return forward(x, *args, **kwargs)
        params = [p for p in module.parameters() if p.requires_grad]
        return token_chunks(forward, chunk_ranges(0, x.shape[1], chunks), [x], params)

    return wrapper
