"""Price concrete decisions with the cost model: per-tier peaks, step time, feasibility.

Used for the baselines, to check every solver answer, and by the brute-force tests; the solver
optimises the very same linear forms (:mod:`memtrain.planner.costmodel`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from memtrain.hardware.tiers import HardwareModel
from memtrain.planner.costmodel import (
    STATE_MODES,
    Terms,
    available_tiers,
    build_terms,
    pool_values,
    prefetch_values,
)
from memtrain.planner.linear import Key
from memtrain.planner.problem import PlanProblem


@dataclass
class LayerDecision:
    """What happens to one layer's bytes."""

    anchor: dict[str, float]  # tier -> share of the layer input stored there (empty: a
    # block that drops its stored attention output and is checkpointed whole)
    rest: dict[str, float]  # gpu / cpu / cxl / nvme / rec -> share of recomputable bytes
    states: str = "gpu"  # a key of STATE_MODES
    # tier -> share of the tokens whose input is stored there for recompute (sums to the
    # ``rec`` share); None stores it on the GPU, as plain checkpointing does
    checkpoint: dict[str, float] | None = None

    def values(self, j: int) -> dict[Key, float]:
        out: dict[Key, float] = {(j, "a", t): v for t, v in self.anchor.items()}
        out.update({(j, "x", t): v for t, v in self.rest.items()})
        checkpoint = self.checkpoint
        if checkpoint is None:
            checkpoint = {"gpu": self.rest.get("rec", 0.0)}
        out.update({(j, "c", t): v for t, v in checkpoint.items()})
        out[(j, "m", self.states)] = 1.0
        return out


def keep_all() -> LayerDecision:
    return LayerDecision({"gpu": 1.0}, {"gpu": 1.0})


def recompute_all() -> LayerDecision:
    return LayerDecision({"gpu": 1.0}, {"rec": 1.0})


@dataclass
class Evaluation:
    """Predicted figures for one set of decisions."""

    step_time_s: float
    compute_s: float
    exposed_transfer_s: float
    optimizer_tail_s: float
    peaks: dict[str, float]  # tier -> peak live bytes (allocator margin not included)
    binding: dict[str, str]  # tier -> moment of its peak
    usable: dict[str, float]  # tier -> bytes the plan may fill
    tokens: int
    exposed_by_window: dict[str, float] = field(default_factory=dict)
    # (moment, bytes) of every predicted GPU moment, layer by layer (forward, backward), as the
    # cost model lists them (planner.plot.step_order puts them in step order): what a measured
    # per-layer memory timeline is compared against
    gpu_moments: list[tuple[str, float]] = field(default_factory=list)

    @property
    def feasible(self) -> bool:
        return all(self.peaks[t] <= self.usable[t] * (1 + 1e-6) + 1 for t in self.peaks)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.step_time_s if self.step_time_s > 0 else 0.0

    def over(self) -> dict[str, float]:
        """Tiers whose peak exceeds what they may hold, with the excess in bytes."""
        return {
            t: self.peaks[t] - self.usable[t]
            for t in self.peaks
            if self.peaks[t] > self.usable[t] * (1 + 1e-6) + 1
        }

    def to_dict(self) -> dict:
        return {
            "feasible": self.feasible,
            "step_time_s": self.step_time_s,
            "tokens_per_s": self.tokens_per_s,
            "compute_s": self.compute_s,
            "exposed_transfer_s": self.exposed_transfer_s,
            "optimizer_tail_s": self.optimizer_tail_s,
            "peak_bytes": {t: int(v) for t, v in self.peaks.items()},
            "peak_at": dict(self.binding),
            "usable_bytes": {t: int(v) for t, v in self.usable.items()},
        }


def evaluate_terms(
    terms: Terms, values: Mapping[Key, float], hardware: HardwareModel, tokens: int
) -> Evaluation:
    values = dict(values)
    prefetch_values(terms, values, len(terms.copying))
    pool_values(terms, values)
    compute = terms.compute.value(values)
    exposed = {}
    for window in terms.windows:
        hidden = window.compute.value(values)
        need = max((t.value(values) for t in window.transfers), default=0.0)
        if need > hidden:
            exposed[window.label] = need - hidden
    tail = max((t.value(values) for t in terms.tail), default=0.0)
    peaks: dict[str, float] = {}
    binding: dict[str, str] = {}
    moments = []
    for tier, moment, value in terms.memory_values(values):
        if tier == "gpu":
            moments.append((moment, value))
        if tier not in peaks or value > peaks[tier]:
            peaks[tier] = value
            binding[tier] = moment
    usable = {t: hardware.usable(t) for t in peaks}
    total_exposed = sum(exposed.values())
    return Evaluation(
        step_time_s=compute + total_exposed + tail,
        compute_s=compute,
        exposed_transfer_s=total_exposed,
        optimizer_tail_s=tail,
        peaks=peaks,
        binding=binding,
        usable=usable,
        tokens=tokens,
        exposed_by_window=exposed,
        gpu_moments=moments,
    )


def moves_any(layer, decision: LayerDecision) -> bool:
    """Whether the layer keeps less than all its token bytes on the GPU (swaps or recomputes)."""
    if layer.anchor_bytes + layer.recomputable_bytes <= 0:
        return False
    kept_anchor = decision.anchor.get("gpu", 0.0) if layer.anchor_bytes > 0 else 1.0
    kept_rest = decision.rest.get("gpu", 0.0) if layer.recomputable_bytes > 0 else 1.0
    return kept_anchor < 1 - 1e-6 or kept_rest < 1 - 1e-6


def copy_share(layer, decision: LayerDecision) -> float:
    """Share of a layer's token bytes held twice while it runs: its kept share when it moves
    some tokens (swap or recompute) and keeps others, else 0."""
    if not moves_any(layer, decision):
        return 0.0
    kept = layer.anchor_bytes * decision.anchor.get("gpu", 0.0)
    kept += layer.recomputable_bytes * decision.rest.get("gpu", 0.0)
    return kept / (layer.anchor_bytes + layer.recomputable_bytes)


def decision_values(decisions: list[LayerDecision], layers=None) -> dict[Key, float]:
    """Values of every decision key; with ``layers``, also each layer's kept-copy share and
    whether it moves anything."""
    values: dict[Key, float] = {}
    for j, decision in enumerate(decisions):
        values.update(decision.values(j))
        if layers is not None:
            values[(j, "copy", "gpu")] = copy_share(layers[j], decision)
            values[(j, "moves", "gpu")] = 1.0 if moves_any(layers[j], decision) else 0.0
            if layers[j].droppable_anchor:
                values[(j, "f", "full")] = max(0.0, 1.0 - sum(decision.anchor.values()))
    return values


def evaluate(
    problem: PlanProblem,
    hardware: HardwareModel,
    decisions: list[LayerDecision],
    chunks: int = 1,
) -> Evaluation:
    """Predicted peaks and step time of ``decisions`` (one per layer) on ``hardware``."""
    if len(decisions) != len(problem.layers):
        raise ValueError(f"need {len(problem.layers)} decisions, got {len(decisions)}")
    tiers = set(available_tiers(hardware))
    modes = sorted({d.states for d in decisions})
    for d in decisions:
        shares = {**d.anchor, **d.rest, **(d.checkpoint or {})}
        used = {t for t, v in shares.items() if v > 0 and t != "rec"}
        if d.states not in STATE_MODES or STATE_MODES[d.states]["optimizer"] not in tiers:
            raise ValueError(f"state mode {d.states!r} is unknown or needs a missing tier")
        if not used <= tiers:
            raise ValueError(f"decision uses tiers {sorted(used - tiers)} the hardware lacks")
    terms = build_terms(problem, hardware, chunks, modes)
    return evaluate_terms(
        terms, decision_values(decisions, problem.layers), hardware, problem.tokens
    )
