"""The Triton kernels of linear_cross_entropy, run on the CPU by Triton's interpreter.

Small blocks (16 x 32 x 16) make the odd shapes below cross every masking path, chunk boundary
and row-block accumulation. Each case is compared with float64 (see interpret_worker.py).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

from tests.kernels.interpret_worker import CASES  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def interpreted():
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run(
        [sys.executable, "-m", "tests.kernels.interpret_worker"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)


@pytest.mark.parametrize("name", sorted(CASES))
def test_case_within_tolerance(interpreted, name):
    result = interpreted[name]
    bad = {k: e for k, e in result["errors"].items() if not e < result["tol"]}
    assert not bad, f"{name}: {bad} (tolerance {result['tol']})"
