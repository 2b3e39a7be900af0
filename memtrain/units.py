"""Byte sizes: parse what users type ("70GiB", "2TB") and print what they read."""

from __future__ import annotations

import re

from memtrain.errors import MemtrainError

_UNITS = {
    "": 1,
    "b": 1,
    "k": 10**3,
    "kb": 10**3,
    "m": 10**6,
    "mb": 10**6,
    "g": 10**9,
    "gb": 10**9,
    "t": 10**12,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}

GiB = 2**30
MiB = 2**20


def parse_bytes(text: str | int | float) -> int:
    """Parse a size such as ``70GiB``, ``1.5TB`` or ``123456`` into bytes."""
    if isinstance(text, (int, float)):
        if text < 0:
            raise MemtrainError(f"a size must not be negative, got {text}")
        return int(text)
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(text))
    if not match or match.group(2).lower() not in _UNITS:
        raise MemtrainError(
            f"cannot read size {text!r}: use a number with a unit such as 80GiB, 512GB or 2TiB"
        )
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


def format_bytes(n: float, unit: str | None = None) -> str:
    """Format bytes in binary units (GiB, MiB, ...), the units GPU memory is reported in."""
    if unit is None:
        for unit, size in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
            if abs(n) >= size:
                return f"{n / size:.2f} {unit}"
        return f"{int(n)} B"
    return (
        f"{n / {'TiB': 2**40, 'GiB': 2**30, 'MiB': 2**20, 'KiB': 2**10, 'B': 1}[unit]:.2f} {unit}"
    )


def short_bytes(n: float) -> str:
    """Compact binary size for dense tables: ``416M``, ``24.1G``, ``1.04T``."""
    for suffix, size in (("T", 2**40), ("G", 2**30), ("M", 2**20), ("K", 2**10)):
        if abs(n) >= size:
            value = n / size
            return f"{value:.3g}{suffix}" if value < 100 else f"{value:.0f}{suffix}"
    return f"{int(n)}B"
