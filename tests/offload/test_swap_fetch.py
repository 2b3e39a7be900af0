"""A saved tensor that several autograd nodes share is brought back from the host once per
backward (re-fetching it on demand would stall compute on the copy and add traffic)."""

from __future__ import annotations

import torch
from torch import nn

from memtrain.offload.pool import HostPool
from memtrain.offload.swap import LayerState, SwapEngine

SEQ = 16


class SharedInput(nn.Module):
    """q, k and v projections of one normalised input (three nodes save the same tensor)."""

    def __init__(self) -> None:
        super().__init__()
        self.q, self.k, self.v = (nn.Linear(8, 8) for _ in range(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(x)
        return (self.q(h) * self.k(h)).sum() + self.v(h).pow(2).sum()


def _run(engine: SwapEngine | None, model: nn.Module, x: torch.Tensor):
    if engine is None:
        loss = model(x)
    else:
        engine.start_step(SEQ, 1, list(model.parameters()))
        layer = LayerState("block", {"cpu": 1.0})
        engine.enter_layer(layer)
        with engine.hooks(layer):
            loss = model(x)
        engine.finish_forward()
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters()]


def test_shared_saved_tensor_is_fetched_once_and_gradients_match():
    torch.manual_seed(0)
    model = SharedInput()
    x = torch.randn(1, SEQ, 8, requires_grad=True)
    reference = _run(None, model, x)
    model.zero_grad()
    engine = SwapEngine(torch.device("cpu"), {"cpu": HostPool(1 << 20, pin=False)}, None)
    fetched = []
    original = engine.prefetch

    def counting(packed):
        fetched.append(packed)
        original(packed)

    engine.prefetch = counting
    loss, grads = _run(engine, model, x)
    assert torch.equal(loss, reference[0])
    for got, want in zip(grads, reference[1], strict=True):
        assert torch.equal(got, want)
    # distinct packed tensors: tanh's output (saved by tanh and the three projections) and
    # the products' operands; each comes back exactly once
    assert len(fetched) == len({id(p) for p in fetched})
    assert len(fetched) >= 1
    shared = [p for p in fetched if p.shape == (1, SEQ, 8)]
    assert shared, "the shared input was not moved to the host"
