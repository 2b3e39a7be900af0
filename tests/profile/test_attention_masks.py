"""Masked and nn.MultiheadAttention SDPA: the dry run keeps what the measured CPU run keeps."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import transformers
from torch import nn

from memtrain.models import build_causal_lm
from memtrain.profile import profile_model
from memtrain.profile.attention import (
    FLASH,
    TargetAttention,
    additive_mask,
    efficient_bias,
)
from memtrain.profile.result import ProfileResult
from tests.profile.test_dry_matches_measured import _by_layer

TOLERANCE = 0.03
SEQS = (256, 1024)
WINDOW = 64  # shorter than every sequence above, so the mask cannot be replaced by is_causal
TINY_TEXT = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 8,
    "vocab_size": 128,
    "sliding_window": WINDOW,
}
SLIDING = {
    "mistral": {},
    "gemma3_text": {},
    "qwen2": {"use_sliding_window": True, "max_window_layers": 0},
}


def _profile_lm(model_type: str, seq: int, device: str, target: str | None) -> ProfileResult:
    """One profiled step of a tiny random-weight causal LM."""
    config = transformers.AutoConfig.for_model(model_type, **TINY_TEXT, **SLIDING[model_type])
    net = build_causal_lm(config, "fp32", device, seed=0)
    ids = torch.randint(0, config.vocab_size, (1, seq), generator=torch.Generator().manual_seed(0))
    ids = ids.to(device)
    return profile_model(net, {"input_ids": ids, "labels": ids}, seq=seq, target=target)


def _assert_close(dry: ProfileResult, real: ProfileResult) -> None:
    """Per-layer saved bytes and the simulated peak agree within the tolerance."""
    dry_layers, real_layers = _by_layer(dry), _by_layer(real)
    assert list(dry_layers) == list(real_layers)
    for name, layer in dry_layers.items():
        expected = real_layers[name].saved_bytes
        assert layer.saved_bytes == pytest.approx(expected, rel=TOLERANCE), name
    assert dry.simulated_peak_bytes == pytest.approx(real.simulated_peak_bytes, rel=TOLERANCE)


@pytest.mark.parametrize("seq", SEQS)
@pytest.mark.parametrize("model_type", list(SLIDING))
def test_sliding_window_mask_dry_matches_measured(model_type: str, seq: int) -> None:
    dry = _profile_lm(model_type, seq, "meta", "cpu")
    real = _profile_lm(model_type, seq, "cpu", None)
    # The runtime keeps a float mask per block: the case this test is about.
    block = real.layers[1]
    assert any(t.shape[-2:] == [seq, seq] and t.dtype == "float32" for t in block.saved_tensors)
    _assert_close(dry, real)


class Encoder(nn.Module):
    """nn.TransformerEncoder trained with a mean-square loss, with an optional causal mask."""

    def __init__(self, mask: str | None, width: int = 32, heads: int = 4, depth: int = 2):
        super().__init__()
        layer = nn.TransformerEncoderLayer(width, heads, 2 * width, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.mask = mask

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        seq = x.shape[1]
        mask = None
        if self.mask == "float":
            mask = nn.Transformer.generate_square_subsequent_mask(seq, device=x.device)
        elif self.mask == "bool":
            mask = torch.ones(seq, seq, dtype=torch.bool, device=x.device).triu(1)
        return self.encoder(x, mask=mask, is_causal=False).square().mean()


def _profile_encoder(mask: str | None, seq: int, device: str) -> ProfileResult:
    torch.manual_seed(0)
    net = Encoder(mask).to(device)
    x = torch.randn(1, seq, 32, generator=torch.Generator().manual_seed(0)).to(device)
    return profile_model(
        net,
        (x,),
        seq=seq,
        loss_fn=lambda out, _: out,
        layers=["encoder.layers.*"],
        target="cpu" if device == "meta" else None,
    )


@pytest.mark.parametrize("seq", SEQS)
@pytest.mark.parametrize("mask", [None, "float", "bool"])
def test_transformer_encoder_dry_matches_measured(mask: str | None, seq: int) -> None:
    _assert_close(_profile_encoder(mask, seq, "meta"), _profile_encoder(mask, seq, "cpu"))


def test_multihead_attention_reaches_the_fused_kernel() -> None:
    """SDPA called from inside nn.MultiheadAttention is routed, and the route is undone after."""
    layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True, device="meta")
    routed = TargetAttention("cpu")
    with routed:
        layer(torch.empty(1, 16, 32, device="meta"))
    assert routed.choices == [FLASH]
    assert F.scaled_dot_product_attention is torch._C._nn.scaled_dot_product_attention


def test_boolean_mask_becomes_a_new_additive_buffer() -> None:
    mask = torch.empty(1, 1, 40, 40, dtype=torch.bool, device="meta")
    additive = additive_mask(mask, torch.bfloat16)
    assert additive.dtype == torch.bfloat16 and additive.shape == mask.shape
    assert additive.untyped_storage().nbytes() == 40 * 40 * 2
    float_mask = torch.empty(1, 1, 40, 40, device="meta")
    assert additive_mask(float_mask, torch.float32) is float_mask


@pytest.mark.parametrize(("keys", "stored"), [(64, 64), (40, 40), (36, 40)])
def test_efficient_bias_pads_unaligned_rows(keys: int, stored: int) -> None:
    """Rows of a length that is not a multiple of 8 are copied into a padded buffer."""
    query = torch.empty(2, 4, keys, 8, device="meta")
    mask = torch.empty(1, 1, keys, keys, device="meta")
    bias = efficient_bias(mask, query, query)
    assert bias.shape == (2, 4, keys, keys)
    assert bias.untyped_storage().nbytes() == keys * stored * 4
    assert (bias.untyped_storage()._cdata == mask.untyped_storage()._cdata) == (keys == stored)


def test_cuda_target_keeps_a_bias_per_layer() -> None:
    """On CUDA a masked call takes the memory-efficient kernel, which saves the float bias."""
    seq = 250  # rows of 250 floats are not 8-aligned: SDPA pads them to 256
    dry = _profile_lm("mistral", seq, "meta", "h100-sxm-80g")
    for block in (dry.layers[1], dry.layers[2]):
        biases = [t for t in block.saved_tensors if t.op == "constant_pad_nd"]
        assert [t.nbytes for t in biases] == [seq * 256 * 4]
