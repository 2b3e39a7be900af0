"""On a GPU (skipped without one): every family's token-wise and tiled recompute in bf16 through
the fused kernels (cuDNN or flash, flash with its window for sliding-window layers) against the
stock model, and the window kernel against the chunked one."""

from __future__ import annotations

import pytest
import torch

from memtrain.offload import LayerPolicy, OffloadPolicy, apply
from memtrain.offload.attention import ChunkedAttention, FlashAttention
from tests.families import FAMILIES, family_ids, family_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
SEQ = 256
SHAPE = {"hidden_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32}
POLICIES = {
    "tokenwise": lambda: LayerPolicy(keep=0.3, swap={"cpu": 0.3}, recompute=0.4, chunks=2),
    "tiled": lambda: LayerPolicy(keep=0.0, full_recompute=True, chunks=3),
}


def _model(family):
    shape = dict(SHAPE)
    if family == "gpt_neox":
        shape["num_key_value_heads"] = shape["num_attention_heads"]
    return family_model(family, "bf16", **shape).cuda()


def _step(model, ids):
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach().float(), [p.grad.detach().float() for p in model.parameters()]


@pytest.mark.parametrize("mode", sorted(POLICIES))
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_family_on_the_gpu(family, mode):
    ids = family_ids(SEQ).cuda()
    want, want_grads = _step(_model(family), ids)
    model = _model(family)
    policy = OffloadPolicy({f"block.{i}": POLICIES[mode]() for i in range(4)})
    with apply(model, policy, host_pool_bytes={"cpu": 64 << 20}):
        got, got_grads = _step(model, ids)
    assert abs(got - want) <= 1e-2 * abs(want)
    worst = max(((a - b).norm() / b.norm().clamp_min(1e-12)).item()
                for a, b in zip(got_grads, want_grads, strict=True))  # fmt: skip
    assert worst <= 5e-2, worst  # bf16: kernels and summation orders differ


@pytest.mark.parametrize("window", [64, 200])
def test_window_kernel_matches_chunked(window):
    gen = torch.Generator(device="cuda").manual_seed(0)
    shape = (1, 4, 1024, 64)
    q, k, v, g = (torch.randn(shape, generator=gen, device="cuda", dtype=torch.bfloat16)
                  for _ in range(4))  # fmt: skip
    flash, chunked = FlashAttention(0.125, window), ChunkedAttention(0.125, window)
    out_f, lse_f, extra_f = flash.forward(q, k, v)
    out_c, lse_c, extra_c = chunked.forward(q, k, v)
    assert flash.backend == "flash"
    grads_f = flash.backward(g, q, k, v, out_f, lse_f, extra_f)[:3]
    grads_c = chunked.backward(g, q, k, v, out_c, lse_c, extra_c)
    for a, b in zip((out_f, *grads_f), (out_c, *grads_c), strict=True):
        assert ((a.float() - b.float()).norm() / b.float().norm()).item() < 2e-2
