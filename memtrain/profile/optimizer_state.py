"""Optimizer-state bytes: read from a live optimizer, or predicted by formula for dry runs.

Formulas are per parameter, from its shape and dtype, so a meta-device model gets exact figures.
New optimizers declare theirs with :func:`register_state_formula` (``memtrain.optim`` does so for
GaLore and FRUGAL); an optimizer with no formula is an error, never a silent zero.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch

from memtrain.errors import MemtrainError

StateFormula = Callable[[tuple[int, ...], torch.dtype, dict[str, Any]], int]

_FORMULAS: dict[str, StateFormula] = {}
_STEP_BYTES = 4  # torch optimizers keep ``step`` as a float32 scalar tensor per parameter


@dataclass(frozen=True)
class OptimizerSpec:
    """An optimizer name plus options, parsed from text like ``galore:rank=512,scale=0.25``."""

    name: str
    options: dict[str, Any] = field(default_factory=dict)

    def __str__(self) -> str:
        if not self.options:
            return self.name
        return self.name + ":" + ",".join(f"{k}={v}" for k, v in self.options.items())


def _parse_value(text: str) -> Any:
    lowered = text.lower()
    if lowered in {"true", "false"}:
        return lowered == "true"
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def parse_optimizer_spec(text: str | OptimizerSpec) -> OptimizerSpec:
    """Parse ``name[:key=value,...]``; the name must have a registered formula."""
    if isinstance(text, OptimizerSpec):
        spec = text
    else:
        name, _, rest = text.partition(":")
        options: dict[str, Any] = {}
        for item in filter(None, rest.split(",")):
            key, sep, value = item.partition("=")
            if not sep or not key.strip():
                raise MemtrainError(f"cannot read optimizer option {item!r}: use key=value")
            options[key.strip()] = _parse_value(value.strip())
        spec = OptimizerSpec(name.strip().lower(), options)
    if spec.name not in _FORMULAS:
        _register_memtrain_optimizers()
    if spec.name not in _FORMULAS:
        raise MemtrainError(
            f"unknown optimizer {spec.name!r}; known: {', '.join(sorted(_FORMULAS))}"
        )
    return spec


def _register_memtrain_optimizers() -> None:
    """memtrain's own optimizers register their formulas when ``memtrain.optim`` is imported."""
    import importlib

    importlib.import_module("memtrain.optim")


def register_state_formula(name: str, formula: StateFormula) -> None:
    """Declare how many state bytes optimizer ``name`` keeps for a parameter of a given shape."""
    _FORMULAS[name.lower()] = formula


def optimizer_names() -> list[str]:
    return sorted(_FORMULAS)


def state_bytes_for(shape: Iterable[int], dtype: torch.dtype, spec: OptimizerSpec) -> int:
    """Predicted state bytes for one parameter."""
    return _FORMULAS[spec.name](tuple(shape), dtype, spec.options)


def _elem(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype, device="meta").element_size()


def _adam(shape: tuple[int, ...], dtype: torch.dtype, options: dict[str, Any]) -> int:
    moments = 3 if options.get("amsgrad") else 2
    return moments * math.prod(shape) * _elem(dtype) + _STEP_BYTES


def _sgd(shape: tuple[int, ...], dtype: torch.dtype, options: dict[str, Any]) -> int:
    return math.prod(shape) * _elem(dtype) if float(options.get("momentum", 0.9)) else 0


def _adafactor(shape: tuple[int, ...], dtype: torch.dtype, options: dict[str, Any]) -> int:
    # torch.optim.Adafactor: factored row/column variances for >= 2-D, full variance otherwise.
    if len(shape) >= 2:
        lead = math.prod(shape[:-2])
        numel = lead * (shape[-2] + shape[-1])
    else:
        numel = math.prod(shape)
    return numel * _elem(dtype) + _STEP_BYTES


def _none(shape: tuple[int, ...], dtype: torch.dtype, options: dict[str, Any]) -> int:
    return 0


register_state_formula("adamw", _adam)
register_state_formula("adam", _adam)
register_state_formula("sgd", _sgd)
register_state_formula("adafactor", _adafactor)
register_state_formula("none", _none)


def measured_state_bytes(optimizer: torch.optim.Optimizer) -> dict[int, int]:
    """Bytes of every tensor in ``optimizer.state``, keyed by ``id(param)``.

    A storage shared between entries (or parameters) is counted once, found by storage identity.
    """
    seen: set[int] = set()
    result: dict[int, int] = {}
    for param, state in optimizer.state.items():
        total = 0
        for value in _tensors_in(state):
            storage = value.untyped_storage()
            key = storage._cdata
            if key in seen:
                continue
            seen.add(key)
            total += storage.nbytes()
        result[id(param)] = total
    return result


def _tensors_in(obj: Any) -> Iterable[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for value in obj.values():
            yield from _tensors_in(value)
    elif isinstance(obj, (list, tuple)):
        for value in obj:
            yield from _tensors_in(value)
