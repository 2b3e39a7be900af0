"""memtrain's import graph: no cycle between modules, and no import from a lower layer to a
higher one (docs/architecture.md states the layers)."""

from __future__ import annotations

import ast
from pathlib import Path

import memtrain

ROOT = Path(memtrain.__file__).parent
# Highest first; a package may import only from packages listed after it (or itself).
LAYERS = [
    ["__main__", "cli"],
    ["train"],
    ["offload"],
    ["planner"],
    ["profile"],
    ["optim"],
    ["hardware", "models", "kernels"],
    ["figures", "dtypes", "units", "errors"],
]


def _modules() -> dict[str, Path]:
    found = {}
    for path in ROOT.rglob("*.py"):
        parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """Modules of memtrain that ``name`` imports, anywhere in the file (lazy imports count:
    they are still dependencies). ``from pkg import sub`` counts as importing ``pkg.sub``."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name in modules)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            subs = [f"{source}.{a.name}" for a in node.names if f"{source}.{a.name}" in modules]
            if subs:
                out.update(subs)
            if len(subs) < len(node.names) and source in modules:
                out.add(source)
    out.discard(name)
    return out


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def _layer(module: str) -> int | None:
    parts = module.split(".")
    if len(parts) < 2:
        return None  # the top-level package re-exports lazily
    for rank, names in enumerate(LAYERS):
        if parts[1] in names:
            return rank
    raise AssertionError(f"{module} is in no layer; add it to LAYERS and docs/architecture.md")


def test_no_import_cycle():
    assert _cycles(_graph()) == []


def test_imports_point_down_the_layers():
    wrong = []
    for module, targets in _graph().items():
        mine = _layer(module)
        for target in targets:
            theirs = _layer(target)
            if mine is not None and theirs is not None and theirs < mine:
                wrong.append(f"{module} -> {target}")
    assert wrong == []


def test_the_checker_sees_a_cycle_and_an_upward_import():
    assert _cycles({"a": {"b"}, "b": {"a"}, "c": set()}) == [["a", "b"]]
    assert _layer("memtrain.cli.run_cmd") < _layer("memtrain.train.prepare")
