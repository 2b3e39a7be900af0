"""8-bit blockwise states: the code, AdamW8bit against a float64 reference that quantises its
moments the same way, and 8-bit GaLore/FRUGAL close to their 32-bit selves."""

from __future__ import annotations

import math

import pytest
import torch

from memtrain.errors import MemtrainError
from memtrain.optim import FRUGAL, AdamW8bit, GaLoreAdamW
from memtrain.optim.quant8 import BLOCK, dequantize, quantize, quantized_bytes
from tests.optim.reference import mlp, split_groups, train


@pytest.mark.parametrize("signed", [True, False])
def test_round_trip_keeps_relative_precision(signed: bool) -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1000, generator=gen) * torch.logspace(-3, 0, 1000)
    x = x if signed else x.abs()
    codes, absmax = quantize(x, signed)
    assert codes.dtype == torch.uint8 and codes.shape == x.shape
    assert absmax.shape == (math.ceil(1000 / BLOCK),) and absmax.dtype == torch.float32
    back = dequantize(codes, absmax, signed)
    assert float(((back - x).abs() / x.abs()).median()) < 0.03
    assert bool((back.abs() <= absmax.repeat_interleave(BLOCK)[:1000] + 1e-7).all())
    assert quantized_bytes(1000) == 1000 + 4 * 4


def _relative_gap(a: torch.nn.Module, b: torch.nn.Module) -> float:
    flat_a = torch.cat([p.detach().reshape(-1) for p in a.parameters()])
    flat_b = torch.cat([p.detach().reshape(-1) for p in b.parameters()])
    return float((flat_a - flat_b).norm() / flat_a.norm())


def reference_adamw8bit(w, grads, lr, wd, eps=1e-8):
    """torch AdamW in float64 whose moments are stored through the same 8-bit code."""
    b1, b2 = 0.9, 0.999
    w = w.clone()
    m = v = torch.zeros_like(w)
    for t, g in enumerate(grads, start=1):
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        m_used, v_used = m, v
        m = dequantize(*quantize(m, True), True).double()
        v = dequantize(*quantize(v, False), False).double()
        denom = v_used.sqrt() / math.sqrt(1 - b2**t) + eps
        w = w * (1 - lr * wd) - lr / (1 - b1**t) * m_used / denom
    return w


def test_adamw8bit_matches_a_reference_with_the_same_quantisation() -> None:
    torch.manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(30, 20))
    grads = [torch.randn(30, 20) for _ in range(5)]
    opt = AdamW8bit([weight], lr=1e-2, weight_decay=0.1)
    expected = reference_adamw8bit(weight.detach().double(), [g.double() for g in grads], 1e-2, 0.1)
    for g in grads:
        weight.grad = g.clone()
        opt.step()
    torch.testing.assert_close(weight.detach().double(), expected, rtol=1e-5, atol=1e-5)


def test_adamw8bit_stays_close_to_adamw() -> None:
    a, b = mlp(), mlp()
    train(a, torch.optim.AdamW(a.parameters(), lr=1e-2, weight_decay=0.1), 10)
    train(b, AdamW8bit(b.parameters(), lr=1e-2, weight_decay=0.1), 10)
    assert _relative_gap(a, b) < 0.05


@pytest.mark.parametrize(
    "make",
    [
        lambda m, bits: GaLoreAdamW(
            split_groups(m, rank=4, update_proj_gap=3, proj_method="svd"), lr=1e-2, bits=bits
        ),
        lambda m, bits: FRUGAL(
            split_groups(m, density=0.25, update_proj_gap=3), lr=1e-2, bits=bits
        ),
        lambda m, bits: FRUGAL(
            split_groups(m, density=0.5, proj_type="columns", update_proj_gap=3), lr=1e-2, bits=bits
        ),
    ],
)
def test_8bit_lowrank_states_track_32bit(make) -> None:
    a, b = mlp(), mlp()
    opt_a, opt_b = make(a, 32), make(b, 8)
    train(a, opt_a, 8)
    train(b, opt_b, 8)
    state = opt_b.state[b[0].weight]
    assert state["exp_avg_codes"].dtype == torch.uint8 and "exp_avg" not in state
    assert _relative_gap(a, b) < 0.05


def test_bad_bits_are_a_clear_error() -> None:
    with pytest.raises(MemtrainError, match="bits must be 32 or 8"):
        GaLoreAdamW(mlp().parameters(), bits=4)
