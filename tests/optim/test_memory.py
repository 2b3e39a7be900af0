"""memtrain.optim.memory: one table, known without side effects, and depended on, never depending
on the profiler or planner."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import memtrain.optim
from memtrain.errors import MemtrainError
from memtrain.optim import memory
from memtrain.optim.factory import ALLOWED_OPTIONS

OPTIM = Path(memtrain.optim.__file__).parent
FRESH = """
import sys
import torch
from memtrain.optim.memory import optimizer_names, parse_optimizer_spec, state_bytes_for
assert {"galore", "galore-adafactor", "frugal"} <= set(optimizer_names())
spec = parse_optimizer_spec("frugal:density=0.5")
assert state_bytes_for((64, 32), torch.bfloat16, parse_optimizer_spec("galore:rank=8")) > 0
assert state_bytes_for((64, 32), torch.bfloat16, spec) > 0
heavy = ("base", "factory", "frugal", "galore_adafactor", "galore_adamw", "step_in_backward")
loaded = [m for m in sys.modules if m.startswith(("memtrain.profile", "memtrain.planner"))]
loaded += [m for m in sys.modules if m in {f"memtrain.optim.{h}" for h in heavy}]
print(sorted(loaded))
"""


def test_a_fresh_interpreter_knows_galore_and_frugal_without_the_optimizers():
    done = subprocess.run(
        [sys.executable, "-c", FRESH], capture_output=True, text=True, cwd=OPTIM.parents[1]
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def _imported(tree: ast.AST) -> set[str]:
    """Every module named by an import statement or an ``import_module``/``__import__`` call."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.update([node.module] + [f"{node.module}.{a.name}" for a in node.names])
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            func = node.func
            called = getattr(func, "attr", getattr(func, "id", ""))
            if called in ("import_module", "__import__"):
                names.add(str(node.args[0].value))
    return names


def test_nothing_in_optim_imports_the_profiler_or_the_planner():
    wrong = {
        f"{path.name} -> {name}"
        for path in sorted(OPTIM.rglob("*.py"))
        for name in _imported(ast.parse(path.read_text()))
        if name.startswith(("memtrain.profile", "memtrain.planner"))
    }
    assert wrong == set()


def test_the_scan_sees_lazy_and_string_imports():
    source = (
        "def f():\n    import memtrain.profile\n    importlib.import_module('memtrain.planner')"
    )
    assert _imported(ast.parse(source)) == {"memtrain.profile", "memtrain.planner"}


def test_every_buildable_optimizer_is_in_the_table():
    assert set(ALLOWED_OPTIONS) <= set(memory.OPTIMIZERS)
    assert {n for n, m in memory.OPTIMIZERS.items() if m.projects} == {
        "galore",
        "galore-adamw",
        "galore-adafactor",
        "frugal",
        "apollo",
        "apollo-mini",
        "natural-galore",
        "cosmos",
    }


def test_a_registered_formula_prices_a_users_optimizer(monkeypatch):
    monkeypatch.setattr(memory, "OPTIMIZERS", dict(memory.OPTIMIZERS))
    with pytest.raises(MemtrainError, match="unknown optimizer 'lion'"):
        memory.parse_optimizer_spec("lion")
    memory.register_state_formula("Lion", lambda shape, dtype, options: 7 * shape[0])
    spec = memory.parse_optimizer_spec("lion:beta1=0.9")
    assert memory.state_bytes_for((3, 5), torch.float32, spec) == 21
    assert memory.step_transient_bytes((3, 5), torch.float32, spec) == (4 * 15 * 4, False)
    # a name already in the table keeps its step formula and projection rule
    memory.register_state_formula("galore", lambda shape, dtype, options: 1)
    assert memory.OPTIMIZERS["galore"].projects
    assert memory.OPTIMIZERS["galore"].step_transient is memory.galore_transient
