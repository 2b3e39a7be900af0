"""Import a benchmark script (``benchmarks/NAME.py``, run as ``python -m benchmarks.NAME``) for
tests that check its logic on the CPU."""

from __future__ import annotations

import importlib
from pathlib import Path
from types import ModuleType

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
SCRIPTS = sorted(p.stem for p in BENCHMARKS.glob("bench_*.py"))


def load_benchmark(name: str) -> ModuleType:
    return importlib.import_module(f"benchmarks.{name}")
