"""``plan_model``: one pipeline whatever the model is given as (path, live model, profile)."""

from __future__ import annotations

import pytest

from memtrain.errors import MemtrainError
from memtrain.hardware import HardwareRequest
from memtrain.models import build_causal_lm, load_config
from memtrain.planner import PlanOptions, make_plan
from memtrain.planner.pipeline import PlanRequest, plan_model
from memtrain.profile import profile_causal_lm
from tests.planner.helpers import write_tiny_llama

SEQ = 512
HARDWARE = HardwareRequest("h100-sxm-80g", gpu_budget="20GiB", cpu="8GiB")


@pytest.fixture(scope="module")
def config_path(tmp_path_factory):
    return write_tiny_llama(tmp_path_factory.mktemp("tiny"))


def _same_plan(a, b):
    da, db = a.to_dict(), b.to_dict()
    for d in (da, db):
        d["solver"].pop("solve_time_s")
        d.pop("model")
    assert da == db


def test_a_path_plans_as_profile_then_make_plan(config_path):
    request = PlanRequest(seq=SEQ, dtype="fp32", hardware=HARDWARE)
    planned = plan_model(config_path, request)
    profile = profile_causal_lm(config_path, seq=SEQ, dtype="fp32", target="h100-sxm-80g")
    _same_plan(planned.plan, make_plan(profile, HARDWARE.load()))
    assert planned.profile.seq == SEQ and planned.hardware.capacity("cpu") == 8 * 2**30


def test_a_live_model_plans_through_its_meta_twin(config_path):
    live = build_causal_lm(load_config(config_path), "fp32", "cpu")
    from_live = plan_model(live, PlanRequest(seq=SEQ, hardware=HARDWARE))
    from_path = plan_model(config_path, PlanRequest(seq=SEQ, dtype="fp32", hardware=HARDWARE))
    _same_plan(from_live.plan, from_path.plan)
    assert all(p.device.type == "cpu" for p in live.parameters())  # nothing moved


def test_a_profile_plans_as_is_and_fixes_batch_and_optimizer(config_path):
    profile = profile_causal_lm(config_path, seq=SEQ, dtype="fp32")
    planned = plan_model(profile, PlanRequest(seq=SEQ, hardware=HARDWARE))
    assert planned.profile is profile
    with pytest.raises(MemtrainError, match="fixes batch and optimizer"):
        plan_model(profile, PlanRequest(seq=SEQ, batches=(1, 2), hardware=HARDWARE))


def test_candidates_keep_the_fastest(config_path):
    request = PlanRequest(
        seq=SEQ, batches=(1, 2), optimizers=("adamw", "sgd"), dtype="fp32", hardware=HARDWARE
    )
    planned = plan_model(config_path, request)
    assert len(planned.candidates) == 4
    best = max(planned.candidates, key=lambda row: row["tokens_per_s"])
    assert planned.plan.predicted["tokens_per_s"] == best["tokens_per_s"]
    assert (planned.profile.batch, planned.profile.optimizer) == (
        planned.plan.micro_batch,
        planned.plan.optimizer,
    )


def test_budget_fraction_plans_below_the_unplanned_peak(config_path):
    request = PlanRequest(seq=SEQ, dtype="fp32", hardware=HARDWARE, gpu_budget_fraction=0.5)
    planned = plan_model(config_path, request)
    peak = planned.profile.simulated_peak_bytes
    assert planned.plan.predicted["peak_bytes"]["gpu"] <= 0.5 * peak + 1
    assert any("0.5 x the unplanned peak" in note for note in planned.notes)
    with pytest.raises(MemtrainError, match="gpu_budget_fraction"):
        plan_model(config_path, PlanRequest(seq=SEQ, gpu_budget_fraction=1.5))


def test_step_in_backward_takes_step_bytes_from_the_model(config_path):
    options = PlanOptions(step_in_backward=True)
    request = PlanRequest(seq=SEQ, dtype="fp32", hardware=HARDWARE, options=options)
    planned = plan_model(config_path, request)
    assert planned.plan.step_in_backward
    assert planned.plan.predicted["peak_bytes"]["gpu"] > 0
    with pytest.raises(MemtrainError, match="one optimizer"):
        plan_model(config_path, PlanRequest(seq=SEQ, optimizers=("adamw", "sgd"), options=options))
