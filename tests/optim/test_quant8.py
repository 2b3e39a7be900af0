"""8-bit blockwise states: the code, AdamW8bit against a float64 reference that quantises its
moments the same way, and 8-bit GaLore/FRUGAL close to their 32-bit selves."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from memtrain.errors import MemtrainError
from memtrain.optim import FRUGAL, AdamW8bit, GaLoreAdamW
from memtrain.optim.moments import read_moments, write_moments
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
    """torch AdamW in float64 whose moments are stored through the same 8-bit code (the second
    as its square root)."""
    b1, b2 = 0.9, 0.999
    w = w.clone()
    m = v = torch.zeros_like(w)
    for t, g in enumerate(grads, start=1):
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        m_used, v_used = m, v
        m = dequantize(*quantize(m, True), True).double()
        v = dequantize(*quantize(v.sqrt(), False), False).double().square()
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


def test_a_small_gradient_beside_a_large_one_keeps_adams_step_size() -> None:
    """One block holds a gradient of 1 and many of 1e-4, which then fall to 1e-6. Their second
    moment is 1e-8 of the block's largest, below the code's floor, while their first moment is
    not: stored as ``v`` it became 0 and the next step was ~65 learning rates long."""
    big = torch.zeros(BLOCK)
    big[0] = 1.0
    grads = [big + 1e-4, big * 0 + 1e-6, big * 0 + 1e-6]
    weights = {}
    for make in (torch.optim.AdamW, AdamW8bit):
        weight = torch.nn.Parameter(torch.zeros(BLOCK))
        opt = make([weight], lr=1e-2, weight_decay=0.0)
        for g in grads:
            weight.grad = g.clone()
            opt.step()
        weights[make] = weight.detach()
    gap = (weights[AdamW8bit] - weights[torch.optim.AdamW]).abs().max()
    assert float(gap) < 1e-3  # 3e-2 is the whole distance moved


def test_adamw8bit_on_a_transformer_stays_within_a_step_of_adamw() -> None:
    """GPT-2's fused query/key/value weights and biases mix scales within a block."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        n_layer=2, n_embd=64, n_head=4, vocab_size=311, n_positions=64,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )  # fmt: skip
    start = transformers.GPT2LMHeadModel(config)
    ids = torch.randint(0, 311, (2, 64))
    finals = []
    for make in (torch.optim.AdamW, AdamW8bit):
        model = copy.deepcopy(start)
        opt = make(model.parameters(), lr=1e-2, weight_decay=0.0)
        for _ in range(3):
            model(input_ids=ids, labels=ids).loss.backward()
            opt.step()
            opt.zero_grad()
        finals.append(torch.cat([p.detach().reshape(-1) for p in model.parameters()]))
    assert float((finals[0] - finals[1]).abs().max()) < 1e-2  # one step's length


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


def test_states_saved_with_the_squared_second_moment_still_resume() -> None:
    """Older 8-bit checkpoints kept ``v`` itself under ``exp_avg_sq_*``; they read back as it
    and are rewritten as its root on the next step."""
    gen = torch.Generator().manual_seed(0)
    first, second = torch.randn(300, generator=gen), torch.rand(300, generator=gen)
    state = {}
    state["exp_avg_codes"], state["exp_avg_absmax"] = quantize(first, True)
    state["exp_avg_sq_codes"], state["exp_avg_sq_absmax"] = quantize(second, False)
    _, read = read_moments(state, first, bits=8)
    torch.testing.assert_close(read, dequantize(*quantize(second, False), False))
    write_moments(state, first, second, bits=8)
    assert "exp_avg_sq_codes" not in state and "exp_avg_sq_root_codes" in state
    _, reread = read_moments(state, first, bits=8)
    assert float(((reread - second).abs() / second).median()) < 0.03
