"""Sequence chunks that backward rebuilds one at a time: the forward's autocast and random
state replayed, weight gradients summed, and one function for token-local work.

A custom autograd function that rebuilds and differentiates its chunks itself takes the
weights as inputs and returns each one's gradient once, so the gradient hooks the executor
relies on (host gradient buffers, the overlapped host step, streamed weights) fire once per
step, as they do for a plain layer. Sums are kept in float32 or wider.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence

import torch


def autocast_state(device_type: str) -> tuple[str, bool, torch.dtype]:
    """The autocast a forward runs under, to rebuild its chunks under in backward."""
    return (
        device_type,
        torch.is_autocast_enabled(device_type),
        torch.get_autocast_dtype(device_type),
    )


def replayed_autocast(state: tuple[str, bool, torch.dtype]):
    device_type, enabled, dtype = state
    return torch.autocast(device_type, dtype=dtype, enabled=enabled)


def rng_state(device: torch.device) -> tuple:
    """The CPU random state, and the device's where it has its own."""
    gpu = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), gpu


@contextlib.contextmanager
def replayed_rng(state: tuple, device: torch.device):
    """Run with ``state`` as the random state, and put the caller's back afterwards."""
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.set_rng_state(state[0])
        if state[1] is not None:
            torch.cuda.set_rng_state(state[1], device)
        yield


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


class _TokenChunks(torch.autograd.Function):
    """``fn`` over token ranges (dim 1) of its inputs, see :func:`token_chunks`."""

    @staticmethod
    def forward(ctx, fn, ranges, count, *tensors):
        inputs, params = tensors[:count], tensors[count:]
        device = inputs[0].device
        out = None
        ctx.rng = []  # each chunk's random state: its dropouts replay in backward
        for lo, hi in ranges:
            ctx.rng.append(rng_state(device))
            piece = fn(*(x[:, lo:hi] for x in inputs))
            if out is None:
                out = piece.new_empty((piece.shape[0], inputs[0].shape[1], *piece.shape[2:]))
            out[:, lo:hi] = piece
        ctx.fn, ctx.ranges, ctx.count, ctx.params = fn, ranges, count, params
        ctx.autocast = autocast_state(device.type)
        ctx.save_for_backward(*inputs)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        inputs, count = ctx.saved_tensors, ctx.count
        needs = ctx.needs_input_grad[3:]
        weights = WeightGradSums(ctx.params, needs[count:])
        grads_in = [
            torch.empty_like(x) if need else None
            for x, need in zip(inputs, needs[:count], strict=True)
        ]
        device = inputs[0].device
        for (lo, hi), rng in reversed(list(zip(ctx.ranges, ctx.rng, strict=True))):
            pieces = [
                x[:, lo:hi].detach().requires_grad_(g is not None)
                for x, g in zip(inputs, grads_in, strict=True)
            ]
            with replayed_rng(rng, device), torch.enable_grad():
                with replayed_autocast(ctx.autocast):
                    y = ctx.fn(*pieces)
            leaves = [p for p, g in zip(pieces, grads_in, strict=True) if g is not None]
            targets = [g for g in grads_in if g is not None]
            if not y.requires_grad or not (leaves or weights.wanted):
                for target in targets:
                    target[:, lo:hi] = 0
                continue
            grads = list(
                torch.autograd.grad(
                    y, leaves + weights.wanted, grad_out[:, lo:hi], allow_unused=True
                )
            )
            for target in targets:
                piece = grads.pop(0)
                target[:, lo:hi] = 0 if piece is None else piece
            weights.add(grads)
            del y, grads, pieces
        return (None, None, None, *grads_in, *weights.result())


def token_chunks(
    fn: Callable[..., torch.Tensor],
    ranges: Sequence[tuple[int, int]],
    inputs: Sequence[torch.Tensor],
    params: Sequence[torch.Tensor],
) -> torch.Tensor:
    """``fn``, token-local work, over the token ``ranges`` (dim 1) of ``inputs``, joined: forward
    without autograd, saving only the inputs; backward rebuilds one range at a time under the
    forward's autocast and random state (dropouts replay) and writes the inputs' gradients into
    whole tensors, where ranges cut from the inputs would each give a full-size gradient to sum.
    ``params``: the weights ``fn`` may use, each given one gradient per step."""
    return _TokenChunks.apply(fn, list(ranges), len(inputs), *inputs, *params)
