"""Saved tensors of any layout round-trip through the swap engine bit for bit, with the
copies done in memory order (no contiguous temporaries of permuted tensors)."""

from __future__ import annotations

import pytest
import torch

from memtrain.offload.nvme import NvmeStore
from memtrain.offload.pool import HostPool
from memtrain.offload.swap import LayerState, Packed, SwapEngine, memory_order

SEQ = 12


def _engine(tmp_path) -> SwapEngine:
    pools = {"cpu": HostPool(1 << 20, name="cpu", pin=False)}
    return SwapEngine(torch.device("cpu"), pools, NvmeStore(str(tmp_path)))


def _layouts() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    bshd = torch.randn(1, SEQ, 4, 8, generator=g)
    batched = torch.randn(3, SEQ, 4, 8, generator=g)
    wide = torch.randn(SEQ, 40, generator=g)
    return {
        "contiguous": torch.randn(1, SEQ, 16, generator=g),
        "heads_view": bshd.transpose(1, 2),  # [1, heads, tokens, dim] over [1, tokens, heads, dim]
        "batched_heads_view": batched.transpose(1, 2),
        "tokens_inner": torch.randn(16, SEQ, generator=g).t().t(),  # token dim innermost
        "column_slice": wide[:, :24],  # not dense: gathered before the copies
        "many_outer": torch.randn(20, SEQ, 3, generator=g),  # above MAX_OUTER_SLICES
    }


@pytest.mark.parametrize("name", sorted(_layouts()))
@pytest.mark.parametrize(
    "shares",
    [{"cpu": 1.0}, {"gpu": 0.25, "cpu": 0.5, "nvme": 0.25}, {"nvme": 1.0}],
    ids=["cpu", "split", "nvme"],
)
def test_round_trip_is_exact_and_keeps_strides(name, shares, tmp_path):
    tensor = _layouts()[name]
    engine = _engine(tmp_path)
    engine.start_step(SEQ, 1, [])
    layer = LayerState("block", shares)
    engine.enter_layer(layer)
    packed = engine.pack(layer, tensor)
    assert isinstance(packed, Packed)
    moved = sum(engine.totals[p] for p in ("cpu", "nvme"))
    expected_moved = sum(
        tensor.element_size() * tensor.numel() * length // SEQ
        for place, _, length in [(p.place, p.start, p.length) for p in packed.pieces]
        if place != "gpu"
    )
    assert moved == expected_moved > 0
    out = engine.unpack(packed)
    assert torch.equal(out, tensor)
    dense = torch.empty_like(tensor)
    assert out.stride() == dense.stride()
    engine.close()


def test_host_piece_holds_the_tensors_own_byte_order(tmp_path):
    """A permuted [1, heads, tokens, dim] tensor: a token range is one run of its buffer, so
    the pool holds exactly those bytes (no transposition on the way); the GPU keeps the first
    half, the CPU gets the second."""
    bshd = torch.arange(SEQ * 4 * 8, dtype=torch.float32).view(1, SEQ, 4, 8)
    tensor = bshd.transpose(1, 2)
    engine = _engine(tmp_path)
    engine.start_step(SEQ, 1, [])
    layer = LayerState("block", {"cpu": 0.5, "gpu": 0.5})
    engine.enter_layer(layer)
    packed = engine.pack(layer, tensor)
    host = next(p for p in packed.pieces if p.place == "cpu").data
    assert torch.equal(host.flatten(), bshd[:, SEQ // 2 :].flatten())
    assert torch.equal(engine.unpack(packed), tensor)


def test_memory_order_puts_size_one_dims_outside():
    assert memory_order((1, 4, 12, 8), (384, 8, 32, 1)) == [0, 2, 1, 3]
    assert memory_order((12, 16), (1, 12)) == [1, 0]
