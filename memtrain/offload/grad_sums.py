"""Weight gradients summed over sequence chunks that backward rebuilds one at a time.

A custom autograd function that rebuilds and differentiates its chunks itself takes the
weights as inputs and returns each one's gradient once, so the gradient hooks the executor
relies on (host gradient buffers, the overlapped host step, streamed weights) fire once per
step, as they do for a plain layer. Sums are kept in float32 or wider.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


class WeightGradSums:
    """Sums for the weights of ``params`` whose ``needs`` flag is set (the function's
    ``needs_input_grad`` for them)."""

    def __init__(self, params: Sequence[torch.Tensor], needs: Sequence[bool]) -> None:
        self.params = list(params)
        self.needs = list(needs)
        self.wanted = [p for p, need in zip(self.params, self.needs, strict=True) if need]
        self._sums: list[torch.Tensor | None] = [None] * len(self.wanted)

    def add(self, grads: Sequence[torch.Tensor | None]) -> None:
        """One chunk's gradients, in the order of ``wanted`` (None: the chunk did not use it)."""
        for i, grad in enumerate(grads):
            if grad is None:
                continue
            if self._sums[i] is None:
                self._sums[i] = grad.to(torch.promote_types(grad.dtype, torch.float32))
            else:
                self._sums[i].add_(grad)

    def result(self) -> list[torch.Tensor | None]:
        """One entry per weight of ``params``, in its own dtype (None where not wanted or
        unused), for the function's backward to return."""
        sums = iter(self._sums)
        out: list[torch.Tensor | None] = []
        for param, need in zip(self.params, self.needs, strict=True):
            total = next(sums) if need else None
            out.append(None if total is None else total.to(param.dtype))
        return out
