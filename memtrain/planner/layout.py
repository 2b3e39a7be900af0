"""Offsets for buffers with known lifetimes, so a pool never fragments.

The executor allocates its GPU staging buffers and its pinned host pool once and carves them
into buffers whose lifetimes the plan fixes. Giving every buffer an offset is dynamic storage
allocation: minimise the pool size ``M`` subject to ``offset_i + size_i <= M`` and, for every
pair alive at the same time, one below the other (a binary picks which). The MIP runs under a
time limit, seeded with a best-fit layout; best-fit is the answer when the MIP cannot improve
on it in time. The live-bytes bound (the most bytes alive at one moment) says how far from
optimal any answer can be.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import pulp

from memtrain.errors import MemtrainError
from memtrain.planner.layer_plan import LayerPlan
from memtrain.planner.pulp_compat import cbc_solver, new_var


@dataclass(frozen=True)
class Buffer:
    """``size`` bytes alive during ``[start, end)`` (integer moments of the schedule)."""

    name: str
    size: int
    start: int
    end: int


@dataclass
class Layout:
    offsets: dict[str, int]
    total_bytes: int
    lower_bound: int  # most bytes alive at one moment: no layout can be smaller
    method: str  # "mip" | "best-fit"
    solve_time_s: float

    @property
    def gap(self) -> float:
        return 0.0 if self.total_bytes == 0 else 1 - self.lower_bound / self.total_bytes

    def to_dict(self) -> dict:
        return {
            "total_bytes": self.total_bytes,
            "lower_bound_bytes": self.lower_bound,
            "method": self.method,
            "offsets": dict(self.offsets),
        }


def _align(n: int, alignment: int) -> int:
    return -(-n // alignment) * alignment


def _overlap(a: Buffer, b: Buffer) -> bool:
    return a.start < b.end and b.start < a.end


def _check(buffers: Sequence[Buffer]) -> None:
    names = set()
    for b in buffers:
        if b.size < 0 or b.end <= b.start:
            raise MemtrainError(f"buffer {b.name!r} needs a size >= 0 and end > start")
        if b.name in names:
            raise MemtrainError(f"buffer name {b.name!r} is used twice")
        names.add(b.name)


def live_bytes_bound(buffers: Sequence[Buffer], alignment: int = 1) -> int:
    """The most (aligned) bytes alive at any one moment."""
    moments = sorted({b.start for b in buffers})
    return max(
        (sum(_align(b.size, alignment) for b in buffers if b.start <= t < b.end) for t in moments),
        default=0,
    )


def best_fit(buffers: Sequence[Buffer], alignment: int = 512) -> dict[str, int]:
    """Largest first; each goes into the smallest gap among the buffers it overlaps."""
    placed: list[tuple[Buffer, int]] = []
    offsets: dict[str, int] = {}
    for buf in sorted(buffers, key=lambda b: (-b.size, b.start, b.name)):
        size = _align(buf.size, alignment)
        busy = sorted(
            (off, off + _align(other.size, alignment))
            for other, off in placed
            if _overlap(other, buf)
        )
        best, best_gap, cursor = None, None, 0
        for lo, hi in busy:
            if lo - cursor >= size and (best_gap is None or lo - cursor < best_gap):
                best, best_gap = cursor, lo - cursor
            cursor = max(cursor, hi)
        offset = cursor if best is None else best
        offsets[buf.name] = offset
        placed.append((buf, offset))
    return offsets


def _total(buffers: Sequence[Buffer], offsets: dict[str, int], alignment: int) -> int:
    return max((offsets[b.name] + _align(b.size, alignment) for b in buffers), default=0)


def assign_offsets(
    buffers: Sequence[Buffer], *, alignment: int = 512, time_limit: float = 5.0
) -> Layout:
    """Non-overlapping offsets for ``buffers`` in the smallest pool found within ``time_limit``."""
    _check(buffers)
    started = time.perf_counter()
    bound = live_bytes_bound(buffers, alignment)
    fit = best_fit(buffers, alignment)
    fit_total = _total(buffers, fit, alignment)
    if fit_total <= bound or len(buffers) < 2 or time_limit <= 0:
        return Layout(fit, fit_total, bound, "best-fit", time.perf_counter() - started)
    unit = alignment  # solve in units of the alignment: smaller, exact numbers
    sizes = {b.name: _align(b.size, alignment) // unit for b in buffers}
    big = fit_total // unit
    lp = pulp.LpProblem("buffer_layout", pulp.LpMinimize)
    top = new_var(lp, "pool", bound // unit, big, pulp.LpInteger)
    off = {
        b.name: new_var(lp, f"o{i}", 0, big - sizes[b.name], pulp.LpInteger)
        for i, b in enumerate(buffers)
    }
    lp += top
    for b in buffers:
        lp += off[b.name] + sizes[b.name] <= top
    for i, a in enumerate(buffers):
        for k in range(i + 1, len(buffers)):
            b = buffers[k]
            if not _overlap(a, b):
                continue
            below = new_var(lp, f"z{i}_{k}", cat=pulp.LpBinary)
            lp += off[a.name] + sizes[a.name] <= off[b.name] + big * (1 - below)
            lp += off[b.name] + sizes[b.name] <= off[a.name] + big * below
            below.setInitialValue(1 if fit[a.name] < fit[b.name] else 0)
    for b in buffers:
        off[b.name].setInitialValue(fit[b.name] // unit)
    top.setInitialValue(big)
    solver = cbc_solver(msg=False, timeLimit=max(1, int(time_limit)), warmStart=True, gapRel=0.0)
    lp.solve(solver)
    elapsed = time.perf_counter() - started
    if lp.sol_status not in (1, 2):
        return Layout(fit, fit_total, bound, "best-fit", elapsed)
    offsets = {name: int(round(v.value())) * unit for name, v in off.items()}
    total = _total(buffers, offsets, alignment)
    if total >= fit_total or not _valid(buffers, offsets, alignment):
        return Layout(fit, fit_total, bound, "best-fit", elapsed)
    return Layout(offsets, total, bound, "mip", elapsed)


def _valid(buffers: Sequence[Buffer], offsets: dict[str, int], alignment: int) -> bool:
    for i, a in enumerate(buffers):
        for b in buffers[i + 1 :]:
            if _overlap(a, b):
                a0, a1 = offsets[a.name], offsets[a.name] + _align(a.size, alignment)
                b0, b1 = offsets[b.name], offsets[b.name] + _align(b.size, alignment)
                if a0 < b1 and b0 < a1:
                    return False
    return True


def host_pool_buffers(plan_layers: Sequence[LayerPlan], tier: str) -> list[Buffer]:
    """One buffer per layer for its bytes swapped to ``tier``: alive from its forward to its
    backward (moment ``j`` to ``2n - j``), the lifetimes the pinned host pool must hold."""
    n = len(plan_layers)
    out = []
    for j, layer in enumerate(plan_layers):
        swapped = layer.swap.get(tier, 0.0) * layer.token_saved_bytes
        size = int(swapped + layer.input_checkpoint.get(tier, 0.0) * layer.input_checkpoint_bytes)
        if size > 0:
            out.append(Buffer(f"{layer.name}:{tier}", size, j, 2 * n - j))
    return out


def staging_buffers(plan_layers: Sequence[LayerPlan], index: int) -> list[Buffer]:
    """GPU staging buffers around backward of layer ``index``: the prefetch of the previous
    layer's swapped bytes overlaps the layer's own restored bytes (chunk by chunk when tiled),
    and the next prefetch starts while this layer's chunks are still in use."""
    layer = plan_layers[index]
    chunks = max(1, layer.chunks)
    swapped = sum(layer.swap.values()) * layer.token_saved_bytes
    restored = (swapped + layer.recompute * layer.token_saved_bytes) / chunks
    buffers = []
    if index > 0:
        prev = plan_layers[index - 1]
        prefetch = int(sum(prev.swap.values()) * prev.token_saved_bytes)
        if prefetch:
            buffers.append(Buffer("prefetch_previous", prefetch, 0, 2 * chunks + 1))
    for c in range(chunks):
        if restored >= 1:
            buffers.append(Buffer(f"chunk_{c}", int(restored), 2 * c, 2 * c + 3))
    return buffers
