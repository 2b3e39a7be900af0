"""Executor modes: what each can run, and which one a plan entry resolves to."""

from __future__ import annotations

import pytest
from torch import nn

from memtrain.errors import MemtrainError
from memtrain.offload.modes import (
    FullRecompute,
    Keep,
    Swap,
    TiledRecompute,
    TokenwiseRecompute,
    resolve,
    supported_modes,
)
from memtrain.offload.policy import layer_policy_from_entry
from tests.offload.conftest import make_model

LLAMA = make_model("llama").model.layers[0]
GPT2 = make_model("gpt2").transformer.h[0]
LINEAR = nn.Linear(4, 4)
CAPABLE = {  # Llama block, Llama block in 2 chunks, Linear, Linear in 2 chunks
    Keep: (True, True, True, False),
    Swap: (True, True, True, False),
    FullRecompute: (True, True, True, False),
    TiledRecompute: (False, True, False, False),
    TokenwiseRecompute: (True, True, False, False),
}


@pytest.mark.parametrize("mode", CAPABLE, ids=lambda mode: mode.__name__)
def test_each_mode_reports_what_it_can_run(mode):
    got = tuple(mode.supports([m], chunks) for m in (LLAMA, LINEAR) for chunks in (1, 2))
    assert got == CAPABLE[mode]
    assert (mode in supported_modes(LLAMA, chunks=2)) == CAPABLE[mode][1]
    assert (mode in supported_modes(LINEAR)) == CAPABLE[mode][2]


FULL = {"keep": 0.0, "recompute": 1.0, "full_recompute": True}
STORES_ATTENTION = {**FULL, "keep": 0.05, "recompute": 0.95, "input_checkpoint": {"gpu": 1.0}}
RESOLVED = [  # plan entry, modules (None: the plan's own choice), mode
    ({}, LINEAR, Keep),
    ({"keep": 0.5, "swap": {"cpu": 0.5}}, LINEAR, Swap),
    ({"keep": 0.5, "swap": {"cpu": 0.5}, "chunks": 2}, LLAMA, Swap),
    ({"keep": 0.5, "recompute": 0.5}, LLAMA, TokenwiseRecompute),
    (FULL, LINEAR, FullRecompute),
    (FULL, LLAMA, FullRecompute),
    ({**FULL, "chunks": 2}, LLAMA, TiledRecompute),
    ({**FULL, "chunks": 2}, GPT2, FullRecompute),  # MLP chunks under a checkpoint
    (STORES_ATTENTION, LLAMA, TokenwiseRecompute),  # every token recomputed, attention stored
    (STORES_ATTENTION, GPT2, FullRecompute),
    (STORES_ATTENTION, None, TokenwiseRecompute),  # the plan's own: only token-wise stores it
]


@pytest.mark.parametrize(("entry", "module", "mode"), RESOLVED)
def test_resolver_maps_plan_entries_to_modes(entry, module, mode):
    policy = layer_policy_from_entry({"name": "block.0", **entry})
    resolved = resolve(policy, None if module is None else [module], "block.0")
    assert type(resolved) is mode and resolved.policy is policy


@pytest.mark.parametrize(
    ("entry", "modules", "message"),
    [
        ({"keep": 0.5, "recompute": 0.5}, [LINEAR], "no block adapter knows Linear"),
        ({"keep": 0.5, "recompute": 0.5}, [LLAMA, LLAMA], "token-wise recompute needs one module"),
        ({"keep": 0.0, "swap": {"cpu": 1.0}, "chunks": 2}, [LINEAR], "no MLP submodule to tile"),
    ],
)
def test_a_mode_that_cannot_run_the_layer_is_refused(entry, modules, message):
    policy = layer_policy_from_entry({"name": "block.0", **entry})
    with pytest.raises(MemtrainError, match=f"layer block.0: .*{message}"):
        resolve(policy, modules, "block.0")


def test_a_whole_layer_recompute_storing_attention_on_the_host_gets_a_host_pool():
    """A plan whose only host bytes are the attention output a whole-layer recompute still
    stores (a one-block copy of Llama-3.1-8B at 1M tokens planned this) asks for a CPU pool:
    the plan's own mode for it is token-wise, which writes there."""
    from memtrain.offload.policy import OffloadPolicy

    entry = {**STORES_ATTENTION, "keep": 0.001, "swap": {"cpu": 0.04}, "recompute": 0.959}
    policy = OffloadPolicy({"block.0": layer_policy_from_entry({"name": "block.0", **entry})})
    assert policy.needs("cpu")
    assert resolve(policy.layers["block.0"]).tiers() == {"cpu"}
