"""Plain references the tests compare against."""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from typing import Any

import pytest
import torch
from torch import nn


def galore_torch_module(name: str) -> Any:
    """A galore-torch submodule, loaded without the package __init__ (which imports
    bitsandbytes); skips the test when galore-torch is not installed."""
    loaded = sys.modules.get("galore_torch")
    spec = loaded.__spec__ if loaded is not None else importlib.util.find_spec("galore_torch")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("galore-torch is not installed")
    pytest.importorskip("transformers")
    if "galore_torch" not in sys.modules:
        package = types.ModuleType("galore_torch")
        package.__spec__ = spec
        package.__path__ = list(spec.submodule_search_locations)
        sys.modules["galore_torch"] = package
    return importlib.import_module(f"galore_torch.{name}")


def mlp(seed: int = 0, dtype: torch.dtype = torch.float32) -> nn.Sequential:
    """Three linears of different shapes (tall, wide and square-ish) for the optimizer tests."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(16, 40), nn.Tanh(), nn.Linear(40, 12), nn.Tanh(), nn.Linear(12, 3)
    ).to(dtype)


def split_groups(model: nn.Sequential, **keys: Any) -> list[dict[str, Any]]:
    """The two hidden weights projected (keys), everything else dense."""
    projected = [model[0].weight, model[2].weight]
    dense = [model[0].bias, model[2].bias, model[4].weight, model[4].bias]
    return [{"params": dense}, {"params": projected, **keys}]


def batch(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(64, 16, generator=gen), torch.randn(64, 3, generator=gen)


def train(model: nn.Module, optimizer: torch.optim.Optimizer, steps: int, start: int = 0) -> None:
    """Deterministic steps; the data shifts with the step so gradients keep changing."""
    dtype = next(model.parameters()).dtype
    x, y = (t.to(dtype) for t in batch())
    for step in range(start, start + steps):
        optimizer.zero_grad()
        loss = (model(x + 0.1 * step) - y).square().mean()
        loss.backward()
        optimizer.step()


def tiny_llama(dtype: torch.dtype = torch.float32, seed: int = 0, **sizes: Any) -> nn.Module:
    """A 2-layer Llama with tied embeddings; ``sizes`` override its config's fields."""
    transformers = pytest.importorskip("transformers")
    fields = {
        "vocab_size": 128,
        "hidden_size": 48,
        "intermediate_size": 96,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 64,
        "tie_word_embeddings": True,
    }
    config = transformers.LlamaConfig(**{**fields, **sizes})
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(config).to(dtype)
