"""PuLP across versions: variables attached to their model, and the CBC that ships with PuLP.

PuLP 3.3 deprecates free-standing variables and its bundled CBC command in favour of APIs that
older releases lack; these helpers use the new form where it exists so neither warns.
"""

from __future__ import annotations

from typing import Any

import pulp


def new_var(
    lp: pulp.LpProblem,
    name: str,
    low: float | None = None,
    up: float | None = None,
    cat: str = pulp.LpContinuous,
) -> pulp.LpVariable:
    add = getattr(lp, "add_variable", None)
    if add is not None:
        return add(name, low, up, cat=cat)
    return pulp.LpVariable(name, low, up, cat)


def cbc_solver(**options: Any):
    """PuLP's bundled CBC, without the 4.0 deprecation warning where PuLP allows that."""
    try:
        return pulp.PULP_CBC_CMD(_skip_v4_deprecation=True, **options)
    except TypeError:
        return pulp.PULP_CBC_CMD(**options)
