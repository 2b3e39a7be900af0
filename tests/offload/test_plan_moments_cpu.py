"""The planner's GPU bytes at every moment against what the executor really holds, on the CPU.

A small bf16 Llama runs under decisions of the kinds the planner makes at long context, given
per block in the planner's own terms (stored token shares swapped, the rest recomputed from a
stored input; every token recomputed with the attention output stored; whole-block
recompute), and every live storage is counted at each layer's forward and backward (storages
tracked at the dispatcher, as the profiler's measured CPU mode does). A block moment the plan
underestimates is how a plan runs out of memory on the GPU (a partially swapped block's
backward once held a third of its bytes more than priced), so every block moment must be
covered by the prediction to within 5%, and the backward moments must not be overestimated by
more than 30% either (a useless plan wastes memory).
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from memtrain.hardware.tiers import load_hardware
from memtrain.kernels import patch_causal_lm_loss
from memtrain.models import build_causal_lm
from memtrain.models.build import causal_lm_layers
from memtrain.offload import apply
from memtrain.planner.evaluate import LayerDecision, evaluate, keep_all
from memtrain.planner.plan import _layer_entry
from memtrain.planner.problem import build_problem
from memtrain.profile.scopes import Clock, LayerScopes, TrackedMemory
from memtrain.profile.tracker import OpTracker
from tests.offload.conftest import dry_profile
from tests.tiny_models import tiny_config

UNDER = 0.05  # a measured block moment may exceed its prediction by at most this share
OVER = 0.30  # a backward block moment may fall short of its prediction by at most this share

CONFIG = tiny_config("llama", intermediate_size=256, num_hidden_layers=4)
# attention as large against the block as Llama-3.1-8B's (grouped-query 4:1, keys and values a
# quarter of the hidden size, the MLP tiled away): the proportions of the 1M-token 8B plan
ATTENTION_HEAVY = tiny_config(
    "llama",
    hidden_size=256,
    num_attention_heads=8,
    num_key_value_heads=2,
    head_dim=32,
    intermediate_size=512,
    num_hidden_layers=4,
)

# Per-block decisions (the planner's LayerDecision fields), block 0 first.
PATTERNS: dict[str, list[dict[str, Any]]] = {
    # what the 512k plan does: stored tokens swapped and the rest recomputed (blocks 0, 1),
    # then every token recomputed with the attention output stored, input on the GPU
    "long-context": [
        {"anchor": {"cpu": 1.0}, "rest": {"cpu": 0.33, "rec": 0.67}, "checkpoint": {"cpu": 0.67}},
        {"anchor": {"cpu": 1.0}, "rest": {"cpu": 0.62, "rec": 0.38}, "checkpoint": {"gpu": 0.38}},
        {"anchor": {"gpu": 0.25, "cpu": 0.75}, "rest": {"rec": 1.0}, "checkpoint": {"gpu": 1.0}},
        {"anchor": {"gpu": 0.25, "cpu": 0.75}, "rest": {"rec": 1.0}, "checkpoint": {"gpu": 1.0}},
    ],
    # what the 1M plan does in its interior: the attention output dropped, whole-block recompute
    "whole-block": [
        {"anchor": {"cpu": 1.0}, "rest": {"cpu": 0.1, "rec": 0.9}, "checkpoint": {"cpu": 0.9}},
        {"anchor": {}, "rest": {"rec": 1.0}, "checkpoint": {"gpu": 0.1, "cpu": 0.9}},
        {"anchor": {}, "rest": {"rec": 1.0}, "checkpoint": {"gpu": 0.1, "cpu": 0.9}},
        {"anchor": {}, "rest": {"rec": 1.0}, "checkpoint": {"gpu": 0.1, "cpu": 0.9}},
    ],
    "swap-half": [{"anchor": {"gpu": 0.5, "cpu": 0.5}, "rest": {"gpu": 0.5, "cpu": 0.5}}] * 4,
}


def compare(pattern: str, seq: int, chunks: int, config_in=None) -> dict[str, Any]:
    config, profile = dry_profile(config_in or CONFIG, seq, "sgd")
    problem = build_problem(profile, fused_loss=True, always_store_ops=("flash",))
    hardware = load_hardware("h100-sxm-80g", cpu="1TiB")  # moments only: no capacity binds
    blocks = iter(LayerDecision(**d) for d in PATTERNS[pattern])
    decisions = [next(blocks) if layer.kind == "block" else keep_all() for layer in problem.layers]
    evaluation = evaluate(problem, hardware, decisions, chunks)
    plan = {
        "schema": "memtrain.plan",
        "seq": seq,
        "micro_batch": 1,
        "layers": [
            _layer_entry(layer, decision, chunks).to_dict()
            for layer, decision in zip(problem.layers, decisions, strict=True)
        ],
    }
    model = build_causal_lm(config, "bf16", "cpu", seed=0)
    model.train()
    patch_causal_lm_loss(model)
    handle = apply(model, plan, profile=profile)
    ids = torch.randint(2, config.vocab_size, (1, seq), generator=torch.Generator().manual_seed(0))
    for param in model.parameters():  # gradients exist for the whole step, as in the plan
        param.grad = torch.zeros_like(param)
    # parameters and gradients as allocated, optimizer states as the plan counts them
    states = sum(layer.state_bytes for layer in problem.layers)
    static = sum(p.numel() * p.element_size() * 2 for p in model.parameters()) + int(states)
    memory = TrackedMemory(static)
    scopes = LayerScopes(causal_lm_layers(model), memory, Clock(torch.device("cpu")))
    tracker = OpTracker(None, track_memory=True, on_op=scopes.charge, on_alloc=memory.observe)
    memory.attach(tracker)
    try:
        with tracker:
            scopes.begin("forward")
            loss = model(input_ids=ids, labels=ids).loss
            scopes.begin("backward")
            loss.backward()
            scopes.end()
            del loss
    finally:
        scopes.remove()
        handle.remove()
    measured: dict[str, int] = {}
    for phase, name, value in scopes.timeline:
        key = f"{phase} {name}"
        measured[key] = max(measured.get(key, 0), value)
    rows = []
    for moment, predicted in evaluation.gpu_moments:
        value = measured.get(moment)
        rows.append(
            {
                "moment": moment,
                "predicted": int(predicted),
                "measured": value,
                "error": None if not value else round(value / predicted - 1, 4),
            }
        )
    return {"pattern": pattern, "seq": seq, "chunks": chunks, "moments": rows}


@pytest.mark.parametrize(
    ("pattern", "config", "seq", "chunks"),
    [
        ("long-context", CONFIG, 1024, 4),
        ("whole-block", CONFIG, 1024, 4),
        ("swap-half", CONFIG, 1024, 4),
        ("long-context", ATTENTION_HEAVY, 4096, 16),
    ],
    ids=["long-context", "whole-block", "swap-half", "long-context-gqa"],
)
def test_block_moments_are_covered_by_the_plan(pattern, config, seq, chunks):
    result = compare(pattern, seq=seq, chunks=chunks, config_in=config)
    blocks = [m for m in result["moments"] if " block." in m["moment"]]
    assert len(blocks) == 8  # forward and backward of 4 blocks, each measured
    for moment in blocks:
        measured, predicted = moment["measured"], moment["predicted"]
        assert measured is not None, moment["moment"]
        assert measured <= predicted * (1 + UNDER), moment
        if moment["moment"].startswith("backward"):
            assert measured >= predicted * (1 - OVER), moment
