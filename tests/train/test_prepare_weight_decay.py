"""``prepare(weight_decay=...)`` reaches the optimizer the same way wherever its states live."""

from __future__ import annotations

import pytest

import memtrain
from tests.offload.conftest import make_model


def _decays(**options) -> tuple[str, set[float]]:
    prepared = memtrain.prepare(make_model("llama"), seq=24, hardware="h100-sxm-80g", **options)
    try:
        optimizer = prepared.optimizer
        return type(optimizer).__name__, {g["weight_decay"] for g in optimizer.param_groups}
    finally:
        prepared.remove()


@pytest.mark.parametrize("where", ["gpu", "offloaded"])
@pytest.mark.parametrize(
    ("optimizer", "keyword", "expected"),
    [
        ("adamw", {}, 0.0),
        ("adamw", {"weight_decay": 0.1}, 0.1),
        ("adamw:weight_decay=0.05", {}, 0.05),
    ],
)
def test_weight_decay_is_what_was_asked(where, optimizer, keyword, expected):
    placement = {"plan": False} if where == "gpu" else {"gpu_budget_fraction": 0.5}
    kind, decays = _decays(optimizer=optimizer, **keyword, **placement)
    assert (kind == "OffloadedOptimizer") == (where == "offloaded")
    assert decays == {expected}
