"""A small sparse linear form, so the cost model is written once for the solver and the evaluator.

The cost model builds every quantity (a tier's live bytes at one moment, a window's transfer
time) as a :class:`Lin` over decision keys. The MIP turns each into a PuLP expression; the
evaluator takes its value at concrete decisions. Both therefore price exactly the same model.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Mapping

Key = Hashable


class Lin:
    """``const + sum(coef[key] * x[key])``."""

    __slots__ = ("coef", "const")

    def __init__(self, coef: Mapping[Key, float] | None = None, const: float = 0.0) -> None:
        self.coef: dict[Key, float] = dict(coef) if coef else {}
        self.const = float(const)

    @classmethod
    def var(cls, key: Key, coef: float = 1.0) -> Lin:
        return cls({key: coef}) if coef else cls()

    def __add__(self, other: Lin | float) -> Lin:
        if not isinstance(other, Lin):
            return Lin(self.coef, self.const + float(other))
        coef = dict(self.coef)
        for key, value in other.coef.items():
            coef[key] = coef.get(key, 0.0) + value
        return Lin(coef, self.const + other.const)

    __radd__ = __add__

    def __sub__(self, other: Lin | float) -> Lin:
        return self + (-1.0) * other

    def __rsub__(self, other: float) -> Lin:
        return (-1.0) * self + other

    def __mul__(self, factor: float) -> Lin:
        factor = float(factor)
        if factor == 0.0:
            return Lin()
        return Lin({k: v * factor for k, v in self.coef.items()}, self.const * factor)

    __rmul__ = __mul__

    def value(self, values: Mapping[Key, float]) -> float:
        return self.const + sum(c * values.get(k, 0.0) for k, c in self.coef.items())

    def keys(self) -> Iterable[Key]:
        return self.coef.keys()

    def __repr__(self) -> str:
        terms = " + ".join(f"{v:g}*{k}" for k, v in self.coef.items())
        return f"Lin({terms} + {self.const:g})"


def lin_sum(forms: Iterable[Lin | float]) -> Lin:
    """Sum many forms in one pass (repeated ``+`` would copy the dict each time)."""
    coef: dict[Key, float] = {}
    const = 0.0
    for form in forms:
        if isinstance(form, Lin):
            const += form.const
            for key, value in form.coef.items():
                coef[key] = coef.get(key, 0.0) + value
        else:
            const += float(form)
    return Lin(coef, const)
