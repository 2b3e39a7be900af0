"""Every shipped preset builds on meta and profiles; parameter counts match the published sizes."""

from __future__ import annotations

import pytest

from memtrain.models import preset_names
from memtrain.profile import profile_causal_lm

# Published parameter counts (model cards), to 2 significant digits.
PUBLISHED = {
    "llama-3.2-1b": 1.24e9,
    "llama-3.2-3b": 3.21e9,
    "llama-3.1-8b": 8.03e9,
    "llama-3.1-70b": 70.6e9,
    "qwen2.5-7b": 7.62e9,
    "mistral-7b": 7.25e9,
    "gemma-2-2b": 2.61e9,
    "gpt2": 124e6,
}


def test_required_presets_ship():
    assert set(PUBLISHED) <= set(preset_names())


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_preset_profiles_on_meta(name):
    result = profile_causal_lm(name, seq=256, dtype="bf16", device="meta")
    assert result.param_count == pytest.approx(PUBLISHED[name], rel=0.01)
    blocks = [layer for layer in result.layers if layer.kind == "block"]
    assert blocks and all(layer.saved_bytes > 0 for layer in blocks[1:])
    assert result.simulated_peak_bytes >= result.param_bytes + result.optimizer_state_bytes
