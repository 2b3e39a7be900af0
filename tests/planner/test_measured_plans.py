"""The cost model against GPU measurements: the decisions that ran on an H100, priced again
with the current model (``python -m benchmarks.bench_planner --parts reprice``), must stay
close to what the device measured. A cost-model change that breaks this is checked against
real numbers."""

from __future__ import annotations

import pytest

from tests.benchmark_scripts import load_benchmark


@pytest.fixture(scope="module")
def rows():
    module = load_benchmark("bench_planner")
    return {key: module.reprice(key, item) for key, item in module.measured_plans().items()}


def test_65k_peak_and_every_moment_match_the_h100(rows):
    row = rows["65536"]
    # measured 71.99 GiB (torch.cuda.max_memory_allocated); within 2%
    assert abs(row["predicted_peak_gib"] / row["measured_peak_gib"] - 1) < 0.02
    # 37 layer moments (forward and backward of every layer), mean error under 1.2 GiB
    assert row["moments_compared"] >= 30 and row["mean_abs_error_gib"] < 1.2


def test_262k_peak_within_five_percent(rows):
    row = rows["262144"]
    assert abs(row["predicted_peak_gib"] / row["measured_peak_gib"] - 1) < 0.05


def test_the_512k_plan_that_ran_out_of_memory_is_priced_over_the_card(rows):
    row = rows["524288"]
    assert row["measured_status"] == "out of memory"
    assert row["predicted_peak_gib"] > row["measured_peak_gib"]  # 77.69 GiB when it failed
