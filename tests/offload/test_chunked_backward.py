"""Attention's backward in query chunks and the chunked final norm, against whole-sequence
references in float64."""

from __future__ import annotations

import math

import pytest
import torch
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from memtrain.models.adapters import is_norm_module
from memtrain.offload.attention import ChunkedAttention, FlashAttention
from memtrain.offload.memo import chunk_ranges
from memtrain.offload.tiled import token_chunked


def _qkvo(tokens: int, heads: int, kv_heads: int, dim: int = 8, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)

    def make(h):
        return torch.randn(1, h, tokens, dim, generator=gen, dtype=torch.float64)

    return make(heads), make(kv_heads), make(kv_heads), make(heads)


def _rows_backward(engine, grad, q, k, v, out, lse, extra, chunks):
    """dq, dk, dv from ``backward_rows`` over query chunks from the last, parts summed."""
    dk = torch.zeros_like(k)
    dv = torch.zeros_like(v)
    dq = torch.empty_like(q)

    def take(first, dk_part, dv_part):
        dk[:, :, first : first + dk_part.shape[2]] += dk_part
        dv[:, :, first : first + dv_part.shape[2]] += dv_part

    for start, end in reversed(chunk_ranges(0, q.shape[2], chunks)):
        rows = slice(start, end)
        dq[:, :, rows] = engine.backward_rows(
            grad[:, :, rows], q[:, :, rows], k, v, out[:, :, rows], lse[:, :, rows], start,
            extra, take,
        )  # fmt: skip
    return dq, dk, dv


@pytest.mark.parametrize("chunks", [1, 3, 7])
def test_flash_rows_equal_the_whole_backward(chunks):
    q, k, v, grad = _qkvo(53, 4, 4)
    engine = FlashAttention(1 / math.sqrt(q.shape[-1]))
    out, lse, extra = engine.forward(q, k, v)
    whole = engine.backward(grad, q, k, v, out, lse, extra)[:3]
    rows = _rows_backward(engine, grad, q, k, v, out, lse, extra, chunks)
    for a, b in zip(rows, whole, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("window, softcap", [(None, None), (9, None), (None, 5.0), (12, 3.0)])
def test_chunked_rows_equal_the_whole_backward(window, softcap):
    q, k, v, grad = _qkvo(41, 6, 2)  # grouped-query: 3 query heads per key head
    engine = ChunkedAttention(1 / math.sqrt(q.shape[-1]), window, softcap)
    out, lse, extra = engine.forward(q, k, v)
    whole = engine.backward(grad, q, k, v, out, lse, extra)
    rows = _rows_backward(engine, grad, q, k, v, out, lse, extra, 4)
    for a, b in zip(rows, whole, strict=True):  # float32 inside either way
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_chunked_norm_equals_the_module():
    torch.manual_seed(0)
    norm = LlamaRMSNorm(16).double()
    norm.weight.data.uniform_()
    assert is_norm_module(norm)
    x = torch.randn(2, 37, 16, dtype=torch.float64, requires_grad=True)
    grad = torch.randn_like(x)
    norm(x).backward(grad)
    reference = x.grad.clone(), norm.weight.grad.clone()
    x.grad = norm.weight.grad = None
    hooked = []
    norm.weight.register_post_accumulate_grad_hook(lambda p: hooked.append(1))
    chunked = token_chunked(norm.forward, norm, 5)
    out = chunked(x)
    torch.testing.assert_close(out, norm(x), rtol=0, atol=0)
    out.backward(grad)
    torch.testing.assert_close(x.grad, reference[0], rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(norm.weight.grad, reference[1], rtol=1e-12, atol=1e-12)
    assert hooked == [1]  # one gradient per step, as hooks on the weights expect


def test_chunked_norm_with_a_frozen_weight_and_without_gradients():
    norm = LlamaRMSNorm(8)
    norm.weight.requires_grad_(False)
    x = torch.randn(1, 10, 8, requires_grad=True)
    chunked = token_chunked(norm.forward, norm, 3)
    chunked(x).sum().backward()
    expected = torch.autograd.grad(norm(x).sum(), x)[0]
    torch.testing.assert_close(x.grad, expected)
    with torch.no_grad():
        torch.testing.assert_close(chunked(x), norm(x))


def test_flash_rows_repeat_key_heads_part_by_part():
    """Kernels without grouped-query support get each part's keys repeated per group, never the
    whole sequence's, and the key/value gradients summed back per key head."""
    q, k, v, grad = _qkvo(45, 6, 2)
    engine = FlashAttention(1 / math.sqrt(q.shape[-1]))
    wide_k, wide_v = k.repeat_interleave(3, dim=1), v.repeat_interleave(3, dim=1)
    out, lse, extra = engine.forward(q, wide_k, wide_v)
    dq, dk, dv = engine.backward(grad, q, wide_k, wide_v, out, lse, extra)[:3]
    whole = dq, dk.view(1, 2, 3, 45, 8).sum(2), dv.view(1, 2, 3, 45, 8).sum(2)

    class Grouped:
        def backward_rows(self, *args):
            return engine.backward_rows(*args, groups=3)

    rows = _rows_backward(Grouped(), grad, q, k, v, out, lse, extra, 4)
    for a, b in zip(rows, whole, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
