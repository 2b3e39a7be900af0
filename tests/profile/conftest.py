"""Tiny configs of the three architecture families the profiler must get exactly right."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

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
        "rms_norm_eps": 1e-5,
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


@pytest.fixture(params=sorted(TINY))
def tiny_config(request, tmp_path: Path) -> tuple[str, Path]:
    """(family, path to its config.json)."""
    path = tmp_path / request.param / "config.json"
    path.parent.mkdir()
    path.write_text(json.dumps(TINY[request.param]))
    return request.param, path


def write_config(tmp_path: Path, family: str, **overrides) -> Path:
    path = tmp_path / f"{family}-custom.json"
    path.write_text(json.dumps({**TINY[family], **overrides}))
    return path
