"""The filtered Triton backward with label smoothing, run on the CPU by Triton's interpreter.

Smoothing puts ``-g * smoothing / V`` into every logit's gradient; the filtered backward leaves
that uniform term out of the blocks (so the filter still skips the negligible ones) and adds it
in closed form to dH, dW and the bias gradient. Each case (``interpret_worker.py smoothing``)
must match float64 within the filtered path's usual tolerances while the filter skips blocks,
and the forward's bound must not change the gradients (it only skips the same blocks earlier).
"""

from __future__ import annotations

import pytest

pytest.importorskip("triton")

from tests.kernels.interpret_worker import SMOOTHING_CASES, run_interpreted  # noqa: E402


@pytest.fixture(scope="module")
def runs():
    return run_interpreted("smoothing")


@pytest.mark.parametrize("name", sorted(SMOOTHING_CASES))
def test_filtered_smoothing_within_float64_tolerance(runs, name):
    result = runs[name]
    assert set(result["errors"]) >= {"loss", "grad_hidden", "grad_weight"}
    bad = {k: e for k, e in result["errors"].items() if not e < result["tol"]}
    assert not bad, f"{name}: {bad} (tolerance {result['tol']})"


@pytest.mark.parametrize("name", sorted(SMOOTHING_CASES))
def test_filter_still_skips_blocks_with_smoothing(runs, name):
    on, off = runs[name]["stats_on"], runs[name]["stats_off"]
    assert on["tiles"] == off["tiles"] > 0 and on["skipped"] == off["skipped"]
    assert on["skipped"] >= runs[name]["min_share"] * on["tiles"], on


@pytest.mark.parametrize("name", sorted(SMOOTHING_CASES))
def test_preskip_does_not_change_smoothed_gradients(runs, name):
    assert all(d == 0.0 for d in runs[name]["diff"].values()), runs[name]["diff"]
