"""Installing and removing a plan, the plan adapter, and refusals of bad input."""

from __future__ import annotations

import json

import pytest
import torch

from memtrain.errors import ConfigError, MemtrainError
from memtrain.offload import LayerPolicy, OffloadPolicy, apply, offloaded, policy_from_plan
from tests.offload.conftest import SEQ, TINY, assert_identical, batch, make_model, train


def _hook_counts(model: torch.nn.Module) -> list[tuple[int, int, bool]]:
    return [
        (len(m._forward_pre_hooks), len(m._forward_hooks), "forward" in m.__dict__)
        for m in model.modules()
    ]


def _everything(tmp_path) -> OffloadPolicy:
    return OffloadPolicy(
        {
            "embed": LayerPolicy(keep=0.0, swap={"cpu": 1.0}),
            "block.0": LayerPolicy(keep=0.5, recompute=0.5, chunks=2),
            "block.1": LayerPolicy(keep=0.0, full_recompute=True, chunks=2),
            "norm": LayerPolicy(keep=0.0, swap={"nvme": 1.0}),
            "lm_head": LayerPolicy(keep=0.5, swap={"cpu": 0.5}),
            "loss": LayerPolicy(keep=0.0, swap={"cpu": 1.0}),
        },
        nvme_path=str(tmp_path),
    )


def test_remove_restores_the_model(tmp_path):
    model = make_model("llama")
    ids = batch("llama")
    before = _hook_counts(model)
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    handle = apply(model, _everything(tmp_path), host_pool_bytes={"cpu": 8 << 20})
    assert _hook_counts(model) != before
    model(input_ids=ids, labels=ids).loss.backward()
    model.zero_grad(set_to_none=True)
    handle.remove()
    handle.remove()  # idempotent
    assert _hook_counts(model) == before
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, expected)
    assert list(tmp_path.iterdir()) == []  # swap directory gone


def test_context_manager_removes_on_error(tmp_path):
    model = make_model("llama")
    before = _hook_counts(model)
    with pytest.raises(RuntimeError, match="boom"):
        with offloaded(model, _everything(tmp_path), host_pool_bytes={"cpu": 8 << 20}):
            raise RuntimeError("boom")
    assert _hook_counts(model) == before


def test_loss_scope_swaps_logits_exactly(llama_reference):
    model = make_model("llama")
    policy = OffloadPolicy({"loss": LayerPolicy(keep=0.0, swap={"cpu": 1.0})})
    with apply(model, policy, host_pool_bytes={"cpu": 8 << 20}) as handle:
        trace = train(model, batch("llama"))
        moved = handle.stats()["layers"]["loss"]["cpu"]
    assert_identical(llama_reference, trace)
    assert moved >= SEQ * TINY["llama"]["vocab_size"] * 4  # at least the logits


def _plan_dict(names, **layer) -> dict:
    entry = {
        "keep": 1.0,
        "swap": {"cpu": 0.0, "cxl": 0.0, "nvme": 0.0},
        "recompute": 0.0,
        "full_recompute": False,
        "input_checkpoint": {},
        "chunks": 1,
        "params": "gpu",
        "grads": "gpu",
        "optimizer": "gpu",
        "token_saved_bytes": 200_000,
        "input_checkpoint_bytes": 0,
    }
    return {
        "schema": "memtrain.plan",
        "schema_version": 1,
        "model": "tiny",
        "seq": SEQ,
        "micro_batch": 1,
        "optimizer": "sgd",
        "fused_loss": False,
        "chunks": 1,
        "predicted": {},
        "baselines": {},
        "solver": {},
        "hardware": {"nvme_path": None},
        "layers": [{"name": n, "kind": "block", **entry, **layer} for n in names],
    }


NAMES = ["embed", "block.0", "block.1", "norm", "lm_head", "loss"]


def test_plan_dict_and_file_are_applied(llama_reference, tmp_path):
    plan = _plan_dict(NAMES, keep=0.25, swap={"cpu": 0.75, "cxl": 0.0, "nvme": 0.0})
    policy = policy_from_plan(plan)
    assert policy.host_bytes == {"cpu": 6 * 150_000}
    assert policy.layers["block.0"].swap == {"cpu": 0.75}
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(plan))
    model = make_model("llama")
    with apply(model, str(path)) as handle:
        trace = train(model, batch("llama"))
        assert handle.engine.pools["cpu"].capacity >= 6 * 150_000
    assert_identical(llama_reference, trace)


@pytest.mark.parametrize("fused", [False, True], ids=["stock_loss", "fused_loss"])
def test_plan_from_the_planner_runs_exactly(fused, llama_reference, tmp_path):
    """Profile the tiny model, plan it into the least GPU memory that fits, execute the plan."""
    from memtrain.hardware.tiers import load_hardware
    from memtrain.kernels import patch_causal_lm_loss
    from memtrain.planner.plan import PlanInfeasible, PlanOptions, make_plan
    from memtrain.profile import profile_causal_lm

    config = tmp_path / "config.json"
    config.write_text(json.dumps(TINY["llama"]))
    profile = profile_causal_lm(str(config), seq=SEQ, dtype="fp32", optimizer="sgd", device="cpu")
    options = PlanOptions(allow_state_offload=False, fused_loss=fused)
    with pytest.raises(PlanInfeasible) as tight:
        make_plan(profile, load_hardware("h100-sxm-80g", gpu_budget="1MiB", cpu="1GiB"), options)
    # just above the least that fits: 1% of the live bytes, not of the budget (which includes
    # the CUDA context the hardware model reserves, far larger than this model)
    budget = int(tight.value.minimum_bytes + 0.01 * profile.predicted_peak_bytes)
    hardware = load_hardware("h100-sxm-80g", gpu_budget=str(budget), cpu="1GiB")
    plan = make_plan(profile, hardware, options)
    moved = [e for e in plan.layers if any(v > 0 for v in e.swap.values())]
    assert moved, "at its minimum budget the planner must swap something"
    model = make_model("llama")
    reference = llama_reference
    if fused:
        patch_causal_lm_loss(model)
        reference = train(patch_causal_lm_loss(make_model("llama")), batch("llama"))
    with apply(model, plan) as handle:
        trace = train(model, batch("llama"))
        stats = handle.stats()
    if all(e.recompute == 0 for e in plan.layers):
        assert_identical(reference, trace)
    planned = sum(v for v in policy_from_plan(plan).host_bytes.values())
    swapped = sum(v for k, v in stats["totals"].items() if k != "gpu") / len(trace.losses)
    # Shares become whole tokens: each cut range of each chunk of a moving layer may round by
    # up to one token's bytes, which at 24 tokens is a large share.
    rounding = sum(2 * entry.chunks * entry.token_saved_bytes / SEQ for entry in moved)
    assert abs(swapped - planned) <= max(0.25 * planned, rounding)


def test_plan_for_another_model_is_refused():
    plan = _plan_dict([*NAMES, "block.2"])
    with pytest.raises(MemtrainError, match="another model"):
        apply(make_model("llama"), plan)
    plan = _plan_dict(["embed", "block.0", "norm", "lm_head"])
    with pytest.raises(MemtrainError, match="no decision for layers block.1"):
        apply(make_model("llama"), plan)


def test_plan_for_another_sequence_length_is_refused_before_any_work():
    plan = _plan_dict(NAMES, keep=0.0, swap={"cpu": 1.0})
    model = make_model("llama")
    ids = batch("llama", seq=SEQ + 8)
    with apply(model, plan) as handle:
        with pytest.raises(MemtrainError, match=f"sequences of {SEQ} tokens"):
            model(input_ids=ids, labels=ids)
        assert handle.engine.totals["cpu"] == 0


def test_missing_or_full_nvme_path_fails_at_apply(tmp_path):
    policy = OffloadPolicy(
        {"block.0": LayerPolicy(keep=0.0, swap={"nvme": 1.0})}, nvme_path=str(tmp_path / "no")
    )
    with pytest.raises(MemtrainError, match="does not exist"):
        apply(make_model("llama"), policy)
    policy.nvme_path = str(tmp_path)
    with pytest.raises(MemtrainError, match="free but the plan writes"):
        apply(make_model("llama"), policy, nvme_bytes=1 << 62)
    policy.nvme_path = None
    with pytest.raises(ConfigError, match="names no path"):
        apply(make_model("llama"), policy)


def test_missing_cxl_node_is_refused():
    policy = OffloadPolicy({"block.0": LayerPolicy(keep=0.0, swap={"cxl": 1.0})}, cxl_node=97)
    with pytest.raises(MemtrainError, match="NUMA node 97 does not exist"):
        apply(make_model("llama"), policy, host_pool_bytes={"cxl": 1 << 20})


def test_cxl_pool_is_bound_to_its_node():
    from memtrain.offload.numa import node_of, numa_nodes
    from memtrain.offload.pool import HostPool

    if 0 not in numa_nodes():
        pytest.skip("no NUMA sysfs here")
    pool = HostPool(1 << 20, numa_node=0, pin=False)
    try:
        pool.buffer[:4096].fill_(1)  # first touch places the page
        assert node_of(pool.address) == 0
    finally:
        pool.close()


@pytest.mark.parametrize(
    ("layer", "message"),
    [
        (LayerPolicy(keep=0.5, swap={"cpu": 0.2}), "must be 1"),
        (LayerPolicy(keep=0.0, swap={"tape": 1.0}), "unknown swap tier"),
        (LayerPolicy(keep=1.0, chunks=0), "positive integer"),
        (LayerPolicy(keep=1.0, params="cpu"), "gradients and optimizer states on the GPU"),
    ],
)
def test_bad_policies_are_refused(layer, message):
    with pytest.raises(MemtrainError, match=message):
        apply(make_model("llama"), OffloadPolicy({"block.0": layer}))


def test_swap_without_pool_size_is_refused():
    policy = OffloadPolicy({"block.0": LayerPolicy(keep=0.0, swap={"cpu": 1.0})})
    with pytest.raises(MemtrainError, match="host_pool_bytes"):
        apply(make_model("llama"), policy)


def test_not_a_plan_is_refused():
    with pytest.raises(ConfigError, match="not a memtrain plan"):
        apply(make_model("llama"), {"schema": "memtrain.profile", "layers": []})
    with pytest.raises(MemtrainError, match="cannot apply"):
        apply(make_model("llama"), 42)


@pytest.mark.parametrize(
    "layer",
    [
        LayerPolicy(keep=0.25, swap={"cpu": 0.75}),
        LayerPolicy(keep=0.0, full_recompute=True, input_checkpoint={"cpu": 1.0}),
        LayerPolicy(keep=0.0, swap={"cpu": 0.5}, recompute=0.5, input_checkpoint={"cpu": 1.0}),
        LayerPolicy(
            keep=0.1, swap={"cpu": 0.2}, recompute=0.7, input_checkpoint={"cpu": 0.75}
        ),  # attention output split like the stored tokens; 18 of 24 tokens recomputed
    ],
    ids=["swap", "full_recompute", "tokenwise", "tokenwise_split"],
)
def test_pool_sized_from_profile_matches_what_moves(layer, tmp_path):
    """With the profiler's result the pools are sized to what this executor really moves."""
    from memtrain.profile import profile_causal_lm

    config = tmp_path / "config.json"
    config.write_text(json.dumps(TINY["llama"]))
    profile = profile_causal_lm(str(config), seq=SEQ, dtype="fp32", optimizer="sgd", device="cpu")
    policy = OffloadPolicy({f"block.{i}": layer for i in range(2)})
    model = make_model("llama")
    ids = batch("llama")
    with apply(model, policy, profile=profile) as handle:
        model(input_ids=ids, labels=ids).loss.backward()
        stats = handle.stats()
    expected = stats["expected_host_bytes"]["cpu"]
    # Token-wise layers also store the rotary tables whole for their recomputed tokens; the
    # profile counts those once, in the first layer. In this tiny model they are a quarter of a
    # hidden state (head_dim 16, hidden 64), in the 1.2B model 3%, and stored once for all layers.
    tolerance = 0.1 if layer.mode == "tokenwise" else 0.01
    assert stats["totals"]["cpu"] == pytest.approx(expected, rel=tolerance)
    assert stats["pools"]["cpu"]["capacity"] >= expected


def test_decision_for_a_layer_that_never_runs_is_an_error():
    """A planned swap for a module the forward never calls cannot happen, and that is said."""
    model = make_model("llama")
    ids = batch("llama")
    idle = torch.nn.Linear(4, 4)
    layers = {"block.0": model.model.layers[0], "idle": idle}
    policy = OffloadPolicy(
        {
            "block.0": LayerPolicy(keep=0.0, swap={"cpu": 1.0}),
            "idle": LayerPolicy(keep=0.0, swap={"cpu": 1.0}),
        }
    )
    with apply(model, policy, layers=layers, host_pool_bytes={"cpu": 1 << 20}):
        with pytest.raises(MemtrainError, match="idle never ran"):
            model(input_ids=ids, labels=ids)


def test_fused_loss_takes_the_heads_decision(llama_reference):
    """With the fused loss the head never runs; its input is saved by the loss, which swaps it."""
    from memtrain.kernels import patch_causal_lm_loss

    reference_model = patch_causal_lm_loss(make_model("llama"))
    reference = train(reference_model, batch("llama"))
    model = patch_causal_lm_loss(make_model("llama"))
    policy = OffloadPolicy({"lm_head": LayerPolicy(keep=0.0, swap={"cpu": 1.0})})
    with apply(model, policy, host_pool_bytes={"cpu": 1 << 20}) as handle:
        trace = train(model, batch("llama"))
        moved = handle.stats()["layers"]["lm_head+loss"]["cpu"]
    assert_identical(reference, trace)
    assert moved >= SEQ * TINY["llama"]["hidden_size"] * 4  # the final hidden states


def test_plan_recompute_shares_become_token_shares():
    """A plan counts recompute in bytes; the stored-input share gives the token share."""
    entry = {
        "name": "block.0",
        "keep": 0.0,
        "swap": {"cpu": 0.2},
        "recompute": 0.8,
        "full_recompute": False,
        "input_checkpoint": {"cpu": 0.85},
    }
    from memtrain.offload.policy import layer_policy_from_entry

    policy = layer_policy_from_entry(entry)
    assert policy.mode == "tokenwise" and policy.token_fraction == pytest.approx(0.85)
    full = layer_policy_from_entry(
        {**entry, "keep": 0.05, "swap": {}, "recompute": 0.95, "full_recompute": True,
         "input_checkpoint": {"gpu": 1.0}}
    )  # fmt: skip
    assert full.stores_more_than_input and full.token_fraction == 1.0


def test_full_recompute_that_stores_attention_runs_tokenwise(llama_reference):
    """A plan that recomputes a block fully but stores its attention output is MEMO with every
    token recomputed; a plain full recompute is a whole-layer checkpoint."""
    from tests.offload.test_recompute import REL

    model = make_model("llama")
    policy = OffloadPolicy(
        {
            "block.0": LayerPolicy(keep=0.1, recompute=0.9, full_recompute=True),
            "block.1": LayerPolicy(keep=0.0, recompute=1.0, full_recompute=True),
        }
    )
    with apply(model, policy) as handle:
        trace = train(model, batch("llama"))
        modes = handle.stats()["modes"]
    assert modes["block.0"] == "tokenwise" and modes["block.1"] == "full_recompute"
    from tests.offload.conftest import assert_close

    assert_close(llama_reference, trace, REL)


def test_training_forward_runs_without_a_key_value_cache():
    """A cache would pin every layer's k and v on the GPU after they were swapped."""
    model = make_model("llama")
    assert model.config.use_cache
    ids = batch("llama")
    policy = OffloadPolicy({"block.0": LayerPolicy(keep=0.0, swap={"cpu": 1.0})})
    with apply(model, policy, host_pool_bytes={"cpu": 1 << 20}):
        out = model(input_ids=ids, labels=ids)
        assert out.past_key_values is None
        out.loss.backward()
        with torch.no_grad():  # inference is left alone
            assert model(input_ids=ids).past_key_values is not None


def test_profile_of_another_model_is_refused(tmp_path):
    from memtrain.profile import profile_causal_lm

    config = tmp_path / "config.json"
    config.write_text(json.dumps({**TINY["llama"], "intermediate_size": 96}))
    profile = profile_causal_lm(str(config), seq=SEQ, dtype="fp32", optimizer="sgd", device="meta")
    policy = OffloadPolicy({"block.0": LayerPolicy(keep=0.0, swap={"cpu": 1.0})})
    with pytest.raises(MemtrainError, match="profile is for another model: layer block.0"):
        apply(make_model("llama"), policy, profile=profile)
