"""The Triton kernels of linear_cross_entropy, run on the CPU by Triton's interpreter.

Small blocks (16 x 32 x 16) make the odd shapes below cross every masking path, chunk boundary
and row-block accumulation. Each case is compared with float64 (see interpret_worker.py).
"""

from __future__ import annotations

import pytest

pytest.importorskip("triton")

from tests.kernels.interpret_worker import CASES, run_interpreted  # noqa: E402


@pytest.fixture(scope="module")
def interpreted():
    return run_interpreted()


@pytest.mark.parametrize("name", sorted(CASES))
def test_case_within_tolerance(interpreted, name):
    result = interpreted[name]
    bad = {k: e for k, e in result["errors"].items() if not e < result["tol"]}
    assert not bad, f"{name}: {bad} (tolerance {result['tol']})"


def test_no_kernel_reads_memory_it_never_wrote():
    """Fresh buffers poisoned with NaN: gradients stay finite and match the torch path (the
    logits-gradient buffer's padding columns are read by whole-tile products)."""
    results = run_interpreted("uninitialised")
    for name, result in results.items():
        assert result["finite"], name
        assert result["grad_hidden"] < 2e-2, (name, result)
