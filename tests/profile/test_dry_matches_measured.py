"""The dry run (meta tensors) must count exactly what a measured CPU run counts."""

from __future__ import annotations

import math

import pytest
import torch

from memtrain.profile import profile_causal_lm

SEQ = 40


def _by_layer(result):
    return {layer.name: layer for layer in result.layers}


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_saved_bytes_per_layer_equal(tiny_config, dtype):
    family, path = tiny_config
    dry = profile_causal_lm(str(path), seq=SEQ, batch=2, dtype=dtype, device="meta", target="cpu")
    real = profile_causal_lm(str(path), seq=SEQ, batch=2, dtype=dtype, device="cpu")
    assert dry.mode == "dry-run" and real.mode == "measured"
    dry_layers, real_layers = _by_layer(dry), _by_layer(real)
    assert list(dry_layers) == list(real_layers)
    for name, layer in dry_layers.items():
        other = real_layers[name]
        assert layer.saved_bytes == other.saved_bytes, name
        assert [(t.shape, t.dtype, t.nbytes, t.token_dim) for t in layer.saved_tensors] == [
            (t.shape, t.dtype, t.nbytes, t.token_dim) for t in other.saved_tensors
        ], name
        assert layer.param_bytes == other.param_bytes
        assert layer.grad_bytes == other.grad_bytes
        assert layer.optimizer_state_bytes == other.optimizer_state_bytes
        assert layer.forward_flops == other.forward_flops
    # Every block saves something, and the totals are the sums of the layers.
    assert all(layer.saved_bytes > 0 for layer in dry.layers if layer.kind == "block")
    assert dry.saved_bytes == sum(layer.saved_bytes for layer in dry.layers)
    # The simulated memory timeline of the dry run equals the one tracked on real tensors.
    assert dry.simulated_peak_bytes == real.simulated_peak_bytes


def _analytic_param_count(family: str, cfg: dict) -> int:
    if family == "gpt2":
        d, v, p, n = cfg["n_embd"], cfg["vocab_size"], cfg["n_positions"], cfg["n_layer"]
        block = (d * 3 * d + 3 * d) + (d * d + d) + (d * 4 * d + 4 * d) + (4 * d * d + d) + 4 * d
        return v * d + p * d + n * block + 2 * d
    d, i, n = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    heads, kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    hd = cfg.get("head_dim", d // heads)
    attn = d * heads * hd + 2 * d * kv * hd + heads * hd * d
    if family == "qwen2":
        attn += heads * hd + 2 * kv * hd  # q, k, v biases
    block = attn + 3 * d * i + 2 * d
    embed = cfg["vocab_size"] * d
    head = 0 if cfg["tie_word_embeddings"] else embed
    return embed + n * block + d + head


@pytest.mark.parametrize("optimizer", ["adamw", "sgd", "adafactor"])
def test_model_state_bytes_are_analytic(tiny_config, optimizer):
    from tests.profile.conftest import TINY

    family, path = tiny_config
    cfg = TINY[family]
    count = _analytic_param_count(family, cfg)
    tensors = None
    for device in ("meta", "cpu"):
        result = profile_causal_lm(
            str(path), seq=16, dtype="fp32", optimizer=optimizer, device=device, target="cpu"
        )
        assert result.param_count == count
        assert result.param_bytes == 4 * count
        assert result.grad_bytes == 4 * count
        model_params = [layer.param_count for layer in result.layers]
        assert sum(model_params) == count
        if tensors is None:
            from memtrain.models import build_causal_lm, load_config

            net = build_causal_lm(load_config(str(path)), "fp32", "meta")
            shapes = [tuple(p.shape) for p in net.parameters()]
            tensors = len(shapes)
        if optimizer == "adamw":
            expected = 2 * 4 * count + 4 * tensors  # exp_avg, exp_avg_sq, float32 step
        elif optimizer == "sgd":
            expected = 4 * count  # momentum buffer
        else:
            factored = sum(
                math.prod(s[:-2]) * (s[-2] + s[-1]) if len(s) >= 2 else math.prod(s) for s in shapes
            )
            expected = 4 * factored + 4 * tensors
        assert result.optimizer_state_bytes == expected, (device, optimizer)


def test_tied_embeddings_counted_once(tmp_path):
    from tests.profile.conftest import write_config

    tied = profile_causal_lm(str(write_config(tmp_path, "llama")), seq=8, dtype="fp32")
    untied = profile_causal_lm(
        str(write_config(tmp_path, "llama", tie_word_embeddings=False)), seq=8, dtype="fp32"
    )
    embed_bytes = 311 * 64 * 4
    assert tied.layer("lm_head").param_bytes == 0
    assert untied.layer("lm_head").param_bytes == embed_bytes
    assert untied.param_bytes - tied.param_bytes == embed_bytes


def test_meta_parameters_are_not_merged_by_pointer():
    """All meta tensors report data_ptr() == 0; the profiler must still see them as distinct."""
    net = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 8)).to("meta")
    assert all(p.data_ptr() == 0 for p in net.parameters())
    from memtrain.profile import profile_model

    x = torch.empty(4, 8, device="meta")
    result = profile_model(
        net, (x,), seq=4, loss_fn=lambda out, _: out.sum(), layers=["0", "1"], target="cpu"
    )
    assert result.param_bytes == 2 * (8 * 8 + 8) * 4


@pytest.mark.parametrize(
    "optimizer", ["galore:rank=8", "frugal:density=0.25", "galore-adafactor:rank=8"]
)
def test_low_rank_optimizer_state_dry_equals_measured(tmp_path, optimizer):
    """Dry-run formulas follow the factory's choice of projected weights (tied head included)."""
    from tests.profile.conftest import write_config

    path = str(write_config(tmp_path, "llama"))
    dry = profile_causal_lm(path, seq=16, dtype="fp32", optimizer=optimizer, target="cpu")
    real = profile_causal_lm(path, seq=16, dtype="fp32", optimizer=optimizer, device="cpu")
    assert [x.optimizer_state_bytes for x in dry.layers] == [
        x.optimizer_state_bytes for x in real.layers
    ]
    adamw = profile_causal_lm(path, seq=16, dtype="fp32", optimizer="adamw", target="cpu")
    assert 0 < dry.optimizer_state_bytes < adamw.optimizer_state_bytes
