"""Tiny random-weight models and a training loop whose losses and gradients tests compare."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from memtrain.models import build_causal_lm

TINY = {
    "llama": {
        "model_type": "llama",
        "hidden_size": 64,
        "intermediate_size": 160,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "vocab_size": 311,
        "tie_word_embeddings": True,
        "bos_token_id": 0,
        "eos_token_id": 1,
    },
    "qwen2": {
        "model_type": "qwen2",
        "hidden_size": 48,
        "intermediate_size": 96,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": 257,
        "tie_word_embeddings": False,
        "bos_token_id": 0,
        "eos_token_id": 1,
    },
    "mistral": {
        "model_type": "mistral",
        "hidden_size": 32,
        "intermediate_size": 80,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 1,
        "head_dim": 8,
        "vocab_size": 203,
        "sliding_window": 4096,
        "bos_token_id": 0,
        "eos_token_id": 1,
    },
    "gpt2": {
        "model_type": "gpt2",
        "n_embd": 32,
        "n_layer": 2,
        "n_head": 4,
        "n_positions": 128,
        "vocab_size": 199,
        "attn_pdrop": 0.0,
        "resid_pdrop": 0.0,
        "embd_pdrop": 0.0,
        "bos_token_id": 0,
        "eos_token_id": 1,
    },
}
SEQ = 24  # differs from every other dimension of the tiny models
STEPS = 3


def make_config(family: str, **overrides):
    from transformers import AutoConfig

    values = {**TINY[family], **overrides}
    kind = values.pop("model_type")
    return AutoConfig.for_model(kind, **values)


def make_model(family: str = "llama", dtype: str = "fp32", **overrides) -> torch.nn.Module:
    return build_causal_lm(make_config(family, **overrides), dtype, "cpu", seed=0)


def batch(family: str = "llama", seq: int = SEQ, size: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    vocab = TINY[family].get("vocab_size")
    return torch.randint(2, vocab, (size, seq), generator=generator)


@dataclass
class Trace:
    losses: list[torch.Tensor]
    grads: list[dict[str, torch.Tensor]]


def train(model: torch.nn.Module, ids: torch.Tensor, steps: int = STEPS, after_step=None) -> Trace:
    """SGD steps; returns every loss and every parameter gradient."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    trace = Trace([], [])
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        trace.losses.append(loss.detach().clone())
        trace.grads.append(
            {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
        )
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if after_step is not None:
            after_step()
    return trace


def assert_identical(a: Trace, b: Trace) -> None:
    """Bit-for-bit equality (pure moves of bytes)."""
    for la, lb in zip(a.losses, b.losses, strict=True):
        assert torch.equal(la, lb)
    for ga, gb in zip(a.grads, b.grads, strict=True):
        assert ga.keys() == gb.keys()
        for name in ga:
            assert torch.equal(ga[name], gb[name]), name


def assert_close(a: Trace, b: Trace, rel: float) -> None:
    """Every loss and gradient within ``rel`` of the largest magnitude of the reference."""
    for la, lb in zip(a.losses, b.losses, strict=True):
        assert abs(la.item() - lb.item()) <= rel * abs(la.item())
    for ga, gb in zip(a.grads, b.grads, strict=True):
        assert ga.keys() == gb.keys()
        for name in ga:
            scale = ga[name].abs().max().item() + 1e-12
            err = (ga[name] - gb[name]).abs().max().item()
            assert err <= rel * scale, f"{name}: {err:.3g} > {rel} * {scale:.3g}"


@pytest.fixture(scope="module")
def llama_reference() -> Trace:
    return train(make_model("llama"), batch("llama"))
