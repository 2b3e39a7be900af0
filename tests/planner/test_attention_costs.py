"""How the planner prices attention: stored attention is not recomputed, its backward working
set is not divided by sequence chunks, and what fits is kept rather than swapped."""

from __future__ import annotations

from dataclasses import replace

import pytest

from memtrain.hardware.tiers import load_hardware
from memtrain.planner.costmodel import tile_factor, tiled_backward_transient
from memtrain.planner.plan import PlanOptions, make_plan
from memtrain.planner.problem import build_problem
from memtrain.profile import profile_causal_lm
from memtrain.profile.result import ProfileResult

SEQ = 8192


@pytest.fixture(scope="module")
def profile():
    return profile_causal_lm(
        "llama-3.2-1b", seq=SEQ, dtype="bf16", device="meta", target="h100-sxm-80g",
        optimizer="adamw:fused=true",
    )  # fmt: skip


def _block(problem):
    return next(layer for layer in problem.layers if layer.kind == "block")


def test_profile_records_attention_forward_time(profile):
    block = next(layer for layer in profile.layers if layer.kind == "block")
    assert 0 < block.attention_forward_time_s < block.forward_time_s
    head = next(layer for layer in profile.layers if layer.kind == "head")
    assert head.attention_forward_time_s == 0


def test_recompute_skips_attention_only_when_its_output_is_stored(profile):
    stored = _block(build_problem(profile, fused_loss=True, always_store_ops=("flash",)))
    # A block the executor runs token-wise stores its attention output in any case (the
    # executor keeps every token's): stored by default. One it cannot recomputes attention.
    default = _block(build_problem(profile, fused_loss=True))
    data = profile.to_dict()
    for layer in data["layers"]:
        layer["tokenwise"] = False
    plain = _block(build_problem(ProfileResult.from_dict(data), fused_loss=True))
    block = next(layer for layer in profile.layers if layer.kind == "block")
    assert default.recompute_time == pytest.approx(stored.recompute_time)
    assert default.anchor_bytes == pytest.approx(stored.anchor_bytes)
    assert default.droppable_anchor
    assert plain.recompute_time == pytest.approx(block.forward_time_s)
    assert stored.recompute_time == pytest.approx(
        block.forward_time_s - block.attention_forward_time_s
    )


def test_attention_backward_is_not_divided_by_chunks(profile):
    block = _block(build_problem(profile, fused_loss=True, always_store_ops=("flash",)))
    # q, k, v and the attention output (per-head tensors) are not tileable
    assert 0 < block.tileable_fraction < 1
    assert 0 < block.untiled_backward_transient <= block.backward_transient
    phi = tile_factor(block, 8)
    tiled = tiled_backward_transient(block, phi)
    assert tiled >= block.untiled_backward_transient
    assert tiled > phi * block.backward_transient  # the old, fully divided estimate
    assert tiled_backward_transient(block, 1.0) == pytest.approx(block.backward_transient)


def test_what_fits_is_kept_not_swapped(profile):
    """At 8k tokens everything fits an 80 GB GPU: a swap the model calls hidden still costs
    copy-engine time, so the plan moves nothing."""
    hardware = load_hardware("h100-sxm-80g", cpu="80GiB")
    plan = make_plan(profile, hardware, PlanOptions(always_store_ops=("flash",))).to_dict()
    for entry in plan["layers"]:
        assert entry["keep"] == pytest.approx(1.0), entry["name"]
        assert sum(entry["swap"].values()) == 0


@pytest.fixture(scope="module")
def profile_64k():
    return profile_causal_lm(
        "llama-3.2-1b", seq=65536, dtype="bf16", device="meta", target="h100-sxm-80g",
        optimizer="adamw:fused=true",
    )  # fmt: skip


def test_blocks_drop_stored_attention_when_memory_is_short(profile_64k):
    """With too little memory to store every attention output, some blocks are checkpointed
    whole (attention recomputed, nothing but the input stored) and the plan still fits; with
    room, none are."""
    options = PlanOptions(always_store_ops=("flash",))
    roomy = make_plan(profile_64k, load_hardware("h100-sxm-80g", cpu="64GiB"), options)
    tight = make_plan(
        profile_64k, load_hardware("h100-sxm-80g", cpu="1GiB", gpu_budget="17GiB"), options
    )

    def whole(plan):
        return [
            e for e in plan.to_dict()["layers"]
            if e["full_recompute"] and e["keep"] == 0 and sum(e["swap"].values()) == 0
        ]  # fmt: skip

    assert not whole(roomy)
    dropped = whole(tight)
    assert dropped
    for entry in dropped:
        assert entry["recompute"] == pytest.approx(1.0)
        assert entry["kind"] == "block"
    assert tight.predicted["step_time_s"] > roomy.predicted["step_time_s"]
    usable = tight.to_dict()["hardware"]["usable_bytes"]["gpu"]
    assert tight.predicted["peak_bytes"]["gpu"] <= usable


def test_chunks_cost_host_time_only_where_it_outlasts_the_gpu_work():
    from memtrain.planner.costmodel import chunk_issue_time

    assert chunk_issue_time(0.001, 1, 4e-3) == 0.0  # one chunk: nothing extra
    assert chunk_issue_time(1.0, 64, 4e-3) == 0.0  # 64 x 4 ms hides behind a 1 s pass
    assert chunk_issue_time(0.010, 8, 4e-3) == pytest.approx(8 * 4e-3 - 0.010)
    assert chunk_issue_time(0.001, 8, 4e-3) == pytest.approx(7 * 4e-3)  # host-bound throughout


def test_a_short_sequence_is_not_cut_into_many_chunks(profile):
    """8,192 tokens of the 1.2B Llama: each block pass is a few milliseconds on the GPU, so
    every chunk beyond what memory needs costs its host time and the plan takes one; priced as
    free, chunks lower the peak at no cost and the plan takes many."""
    hardware = load_hardware("h100-sxm-80g", gpu_budget="12GiB")
    tight = make_plan(profile, hardware, PlanOptions(fused_loss=True))
    free = make_plan(profile, replace(hardware, tile_overhead_s=0.0), PlanOptions(fused_loss=True))
    assert tight.chunks == 1 < free.chunks  # free chunks: as many as lower the peak
    eight = make_plan(profile, hardware, PlanOptions(fused_loss=True, chunk_options=[8]))
    priced = (
        eight.predicted["compute_s"]
        - make_plan(
            profile,
            replace(hardware, tile_overhead_s=0.0),
            PlanOptions(fused_loss=True, chunk_options=[8]),
        ).predicted["compute_s"]
    )
    assert priced > 0  # 8 chunks of a few-millisecond pass are host-bound
