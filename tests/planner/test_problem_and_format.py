"""Profile -> planner terms (fused loss, anchors, tiling share) and the plan file format."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from memtrain.errors import ConfigError, MemtrainError
from memtrain.hardware.tiers import build_hardware
from memtrain.planner import Plan, make_plan
from memtrain.planner.evaluate import evaluate
from memtrain.planner.plan import LayerPlan, baseline_decisions
from memtrain.planner.problem import apply_fused_loss, build_problem, layer_costs
from memtrain.planner.synthetic import synthetic_profile
from memtrain.profile.result import ProfileResult, is_attention_op


@pytest.fixture(scope="module")
def profile():
    return synthetic_profile(
        layers=3, hidden=512, intermediate=2048, heads=8, kv_heads=2, vocab=32000, seq=8192
    )


def test_fused_loss_drops_logits_as_a_function_of_the_profile(profile):
    tokens = profile.batch * profile.seq
    fused = apply_fused_loss(profile)
    for before, after in zip(profile.layers, fused.layers, strict=True):
        if before.kind not in ("head", "loss"):
            assert after == before
    head = fused.layer("lm_head")
    loss = fused.layer("loss")
    # The head keeps only its input (the hidden states); the loss one float per token.
    assert head.saved_bytes == profile.layer("lm_head").input_bytes
    assert loss.saved_bytes == 4 * tokens
    # Its backward: the hidden states' gradient at once, beside the kernel's 64 MiB workspace,
    # a small fraction of the logits the stock loss holds.
    hidden_grad = profile.layer("lm_head").input_bytes
    assert loss.backward_transient_bytes == hidden_grad + 64 * 2**20
    assert profile.layer("loss").backward_transient_bytes > 10 * loss.backward_transient_bytes
    assert profile.layer("loss").saved_bytes > 1000 * loss.saved_bytes


def test_fused_loss_needs_a_head():
    bare = synthetic_profile(layers=2, hidden=256, intermediate=512, heads=4, kv_heads=2, seq=64)
    data = bare.to_dict()
    data["layers"] = [layer for layer in data["layers"] if layer["kind"] not in ("head", "loss")]
    with pytest.raises(MemtrainError, match="fused-loss off"):
        apply_fused_loss(ProfileResult.from_dict(data))


def test_layer_costs_split(profile):
    block = profile.layer("model.layers.0")
    costs = layer_costs(block)
    token = sum(t.nbytes for t in block.saved_tensors if t.token_dim is not None)
    first = sum(t.nbytes for t in block.saved_tensors if t.is_layer_input)
    # token-wise recompute stores every token's attention output: an anchor, like the input
    attention = sum(
        t.nbytes for t in block.saved_tensors if t.token_dim is not None and is_attention_op(t.op)
    )
    assert attention > 0
    assert costs.anchor_bytes == first + attention
    assert costs.anchor_bytes + costs.recomputable_bytes == token
    assert costs.checkpoint_bytes == 0  # the input is saved already
    assert 0.5 < costs.tileable_fraction < 1  # attention tensors are not tileable
    pinned = layer_costs(block, always_store_ops=["attention"])
    assert pinned.anchor_bytes == pytest.approx(first + attention)
    untokenwise = layer_costs(replace(block, tokenwise=False))
    assert untokenwise.anchor_bytes == first


def test_checkpoint_bytes_when_input_is_not_saved(profile):
    data = profile.to_dict()
    for tensor in data["layers"][1]["saved_tensors"]:
        tensor["is_layer_input"] = False
    layer = ProfileResult.from_dict(data).layers[1]
    assert layer_costs(layer).checkpoint_bytes == layer.input_bytes


def test_plan_round_trips_through_yaml_and_json(profile, tmp_path):
    hardware = build_hardware("h100-sxm-80g", gpu_budget="6GiB", cpu="32GiB")
    plan = make_plan(profile, hardware)
    for suffix in (".yaml", ".json"):
        path = tmp_path / f"plan{suffix}"
        plan.save(path)
        again = Plan.load(path)
        assert json.dumps(again.to_dict()) == json.dumps(plan.to_dict())  # keys in order too
    data = plan.to_dict()
    assert all(isinstance(layer, LayerPlan) for layer in Plan.from_dict(data).layers)
    assert json.dumps(Plan.from_dict(data).to_dict()) == json.dumps(data)
    assert data["schema"] == "memtrain.plan" and data["schema_version"] == 1
    for layer in data["layers"]:
        total = layer["keep"] + sum(layer["swap"].values()) + layer["recompute"]
        assert total == pytest.approx(1.0, abs=1e-5)
    assert set(data["baselines"]) == {
        "no_checkpointing",
        "full_checkpointing",
        "full_checkpointing_zero_offload",
    }


def test_plan_rejects_other_versions(tmp_path):
    path = tmp_path / "plan.json"
    path.write_text(json.dumps({"schema": "memtrain.plan", "schema_version": 99}))
    with pytest.raises(MemtrainError, match="version 99"):
        Plan.load(path)
    path.write_text("[1, 2]")
    with pytest.raises(MemtrainError, match="mapping"):
        Plan.load(path)


def test_plan_is_at_least_as_fast_as_every_feasible_baseline(profile):
    hardware = build_hardware("h100-sxm-80g", gpu_budget="5GiB", cpu="32GiB")
    plan = make_plan(profile, hardware)
    feasible = [b for b in plan.baselines.values() if b["feasible"]]
    assert feasible
    for baseline in feasible:
        assert plan.predicted["step_time_s"] <= baseline["step_time_s"] * (1 + 1e-3)


def test_baselines_price_known_layouts(profile):
    hardware = build_hardware("h100-sxm-80g", cpu="32GiB")
    problem = build_problem(profile, fused_loss=False)
    none = evaluate(problem, hardware, baseline_decisions(problem, hardware, "no_checkpointing"))
    full = evaluate(problem, hardware, baseline_decisions(problem, hardware, "full_checkpointing"))
    zero = baseline_decisions(problem, hardware, "full_checkpointing_zero_offload")
    offload = evaluate(problem, hardware, zero)
    assert none.peaks["gpu"] > full.peaks["gpu"] > offload.peaks["gpu"]
    assert none.step_time_s < full.step_time_s  # recompute costs a forward per block
    blocks = [layer for layer in problem.layers if layer.kind == "block"]
    assert full.compute_s - none.compute_s == pytest.approx(sum(b.forward_time for b in blocks))
    states = sum(layer.state_bytes for layer in problem.layers)
    assert offload.peaks["cpu"] >= states


def test_a_plan_file_written_by_earlier_versions_loads_and_saves_unchanged(tmp_path):
    stored = Path(__file__).parents[2] / "benchmarks" / "data" / "offload_plans.json"
    data = json.loads(stored.read_text())["plans"]["65536"]["plan"]
    Plan.from_dict(data).save(tmp_path / "plan.json")
    assert (tmp_path / "plan.json").read_text() == json.dumps(data, indent=1)
    del data["layers"][1]["grads"]
    with pytest.raises(ConfigError, match="plan layer 'block.0': missing or unknown fields"):
        Plan.from_dict(data)


def test_plan_lists_every_gpu_moment_and_its_peak_is_the_largest(profile):
    hardware = build_hardware("h100-sxm-80g", gpu_budget="5GiB", cpu="32GiB")
    plan = make_plan(profile, hardware)
    moments = plan.predicted["gpu_moments"]
    names = [name for name, _ in moments]
    for layer in plan.layers:
        assert f"forward {layer.name}" in names
        assert f"backward {layer.name}" in names
    top = max(moments, key=lambda m: m[1])
    assert top[1] == plan.predicted["peak_bytes"]["gpu"]
    assert top[0] == plan.predicted["peak_at"]["gpu"]


def test_an_overlapped_host_step_is_priced_as_what_backward_cannot_hide():
    """With states on the host the step after backward is a tail of its whole length; stepping
    as gradients arrive leaves only what exceeds backward, and never less than the first
    layer's step (its gradients arrive last)."""
    from dataclasses import replace

    from memtrain.planner.evaluate import LayerDecision, evaluate
    from tests.planner.helpers import GB, block, machine, problem

    layers = [block(f"block.{i}", params=4 * GB, bwd=0.2) for i in range(4)]
    hardware = replace(machine(gpu=1000 * GB), cpu_optimizer_bandwidth=100 * GB)
    decisions = [LayerDecision({"gpu": 1.0}, {"gpu": 1.0}, states="opt:cpu") for _ in layers]
    step_of_one = (2 * 8 + 4 + 2 * 4) * GB / (100 * GB)  # states, grads, params: 0.28 s
    after = evaluate(problem(layers), hardware, decisions)
    overlapped = evaluate(replace(problem(layers), overlap_host_step=True), hardware, decisions)
    assert after.optimizer_tail_s == pytest.approx(4 * step_of_one)
    # 1.12 s of host steps, 0.8 s of backward to hide them in; at least the first layer's
    assert overlapped.optimizer_tail_s == pytest.approx(max(4 * step_of_one - 0.8, step_of_one))
    slow = replace(hardware, cpu_optimizer_bandwidth=10 * GB)
    long = evaluate(replace(problem(layers), overlap_host_step=True), slow, decisions)
    assert long.optimizer_tail_s == pytest.approx(4 * 10 * step_of_one - 0.8)
