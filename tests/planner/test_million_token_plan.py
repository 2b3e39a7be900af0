"""Llama-3.1-8B at 1,048,576 tokens plans on one 80 GB GPU with 128 GiB of host memory and an
NVMe drive: attention's backward in query chunks and a chunked final norm bring the GPU floor
under the budget (dry run, meta tensors)."""

from __future__ import annotations

import pytest

from memtrain.hardware.tiers import load_hardware
from memtrain.planner import PlanInfeasible
from memtrain.planner.plan import make_plan
from memtrain.planner.problem import build_problem
from memtrain.profile import profile_causal_lm

SEQ = 1_048_576


@pytest.fixture(scope="module")
def profile_1m():
    return profile_causal_lm(
        "llama-3.1-8b", seq=SEQ, dtype="bf16", device="meta", target="h100-sxm-80g"
    )


def test_8b_at_1m_tokens_fits_80gb_with_host_and_nvme(profile_1m):
    hardware = load_hardware("h100-sxm-80g", cpu="128GiB", nvme="/tmp/memtrain-nvme:4TB")
    plan = make_plan(profile_1m, hardware)
    peaks, usable = plan.predicted["peak_bytes"], plan.predicted["usable_bytes"]
    for tier in ("gpu", "cpu", "nvme"):
        assert peaks[tier] <= usable[tier] * (1 + 1e-6), tier
    assert plan.predicted["step_time_s"] > 0
    layers = {entry["name"]: entry for entry in plan.to_dict()["layers"]}
    assert layers["norm"]["chunks"] == plan.chunks > 1  # the final norm runs chunked
    problem = build_problem(profile_1m, fused_loss=True)
    blocks = [layer for layer in problem.layers if layer.kind == "block"]
    assert all(layer.query_bytes > 0 for layer in blocks)  # backward in query chunks


def test_8b_at_1m_tokens_needs_more_than_128gib_without_nvme(profile_1m):
    with pytest.raises(PlanInfeasible, match="no plan fits"):
        make_plan(profile_1m, load_hardware("h100-sxm-80g", cpu="128GiB"))
