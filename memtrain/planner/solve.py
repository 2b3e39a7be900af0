"""Solve the cross-layer placement problem with PuLP: LP relaxation, rounding, MIP if needed.

Fractions (keep / swap / recompute) are continuous, so the only integer choices are each
layer's state mode; the sequence chunk count is enumerated outside. Identical consecutive layers
share one set of fraction variables for their interior (all but the first and last of a run).
When those layers also share a state placement this loses nothing: their live-byte constraints
are implied by the run's last one, and averaging a solution over interchangeable layers never
raises its cost (the cost is convex). Layers of one run with different state placements differ
in their transfer windows, so there sharing fractions is a (small) restriction. Either way an
80-layer model solves about as fast as a 5-layer one.
"""

from __future__ import annotations

import math
import time
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, replace

import pulp

from memtrain.errors import MemtrainError
from memtrain.hardware.tiers import HardwareModel
from memtrain.planner.costmodel import (
    PREFETCH_UNIT,
    STATE_MODES,
    available_tiers,
    build_terms,
    gpu_lower_bound,
)
from memtrain.planner.evaluate import Evaluation, LayerDecision, evaluate_terms, keep_all
from memtrain.planner.problem import PlanProblem
from memtrain.planner.pulp_compat import cbc_solver, new_var
from memtrain.units import GiB

# Tie-breaks among equally fast plans, in this order: the least host-tier traffic time (a swap
# the model calls hidden still costs copy-engine and HBM time it does not count, so keep what
# fits), then the lowest GPU peak.
TRAFFIC_WEIGHT = 1e-4
PEAK_WEIGHT_S_PER_GIB = 1e-7
TILE_CHUNKS = (1, 2, 4, 8, 16, 32, 64)


def solver_capacity(capacity: float) -> float:
    """A hair below ``capacity`` (bytes), so solver tolerances never overshoot it."""
    return capacity * (1 - 1e-7) - 4096


def solver_name() -> str:
    """HiGHS when ``highspy`` is installed, else the CBC that ships with PuLP."""
    try:
        import highspy  # noqa: F401

        return "HiGHS"
    except ImportError:
        return "CBC"


def _make_solver(mip: bool, time_limit: float, gap: float):
    if solver_name() == "HiGHS":
        return pulp.HiGHS(msg=False, mip=mip, timeLimit=time_limit, gapRel=gap)
    return cbc_solver(msg=False, mip=mip, timeLimit=max(1, int(math.ceil(time_limit))), gapRel=gap)


@dataclass
class SolveResult:
    feasible: bool
    decisions: list[LayerDecision]
    chunks: int
    evaluation: Evaluation | None
    bound_s: float  # a lower bound on the optimal step time (LP relaxation)
    gap: float  # (predicted step time - bound) / predicted step time
    method: str
    solve_time_s: float
    solver: str
    solver_calls: int
    objective: float = math.nan  # the solver's objective: step time + weight x GPU peak (GiB)


class _Model:
    """One PuLP model for a fixed chunk count."""

    def __init__(
        self,
        problem: PlanProblem,
        hardware: HardwareModel,
        chunks: int,
        modes: list[str],
        *,
        tie_identical: bool,
        integer_fractions: bool,
        objective: str,
        capacity_overrides: dict[str, float | None],
        streamed_kinds: Sequence[str] | None = None,
    ) -> None:
        self.problem = problem
        self.hardware = hardware
        self.chunks = chunks
        self.modes = modes
        self.tiers = available_tiers(hardware)
        self.terms = build_terms(problem, hardware, chunks, modes)
        self.lp = pulp.LpProblem("memtrain_plan", pulp.LpMinimize)
        self.frac_set = self._fraction_sets(tie_identical)
        self.vars: dict[Hashable, pulp.LpVariable] = {}
        self.mode_vars: dict[int, dict[str, pulp.LpVariable]] = {}
        self.layer_vars: dict[Hashable, pulp.LpVariable] = {}  # per layer, not per set
        self.binaries: list[pulp.LpVariable] = []  # "moves any token", per fraction set
        cat = pulp.LpBinary if integer_fractions else pulp.LpContinuous
        for s in sorted(set(self.frac_set)):
            members = [j for j, k in enumerate(self.frac_set) if k == s]
            layer = problem.layers[members[0]]
            a = {t: new_var(self.lp, f"a_{s}_{t}", 0, 1, cat) for t in self.tiers}
            x = {t: new_var(self.lp, f"x_{s}_{t}", 0, 1, cat) for t in self.tiers}
            # Token-wise recompute exists for transformer blocks; other layers (norms, heads)
            # keep or swap their saved tensors.
            can_recompute = layer.recomputable_bytes > 0 and layer.kind == "block"
            x["rec"] = new_var(self.lp, f"x_{s}_rec", 0, 1 if can_recompute else 0, cat)
            if can_recompute and layer.droppable_anchor:
                full = new_var(self.lp, f"full_{s}", 0, 1, pulp.LpBinary)
                self.binaries.append(full)
                self.vars[("set", s, "f", "full")] = full
                self.lp += pulp.lpSum(a.values()) == 1 - full, f"anchor_{s}"
                if layer.tokenwise:
                    self.lp += x["rec"] >= full, f"full_recompute_{s}"
                else:  # a checkpoint around the whole layer: it stores only the input
                    self.lp += x["rec"] == full, f"full_recompute_{s}"
            else:
                self.lp += pulp.lpSum(a.values()) == 1, f"anchor_{s}"
                if can_recompute and not layer.tokenwise:
                    # No token-wise recompute for this block: recompute all of it or none.
                    whole = new_var(self.lp, f"whole_{s}", 0, 1, pulp.LpBinary)
                    self.binaries.append(whole)
                    self.lp += x["rec"] == whole, f"whole_recompute_{s}"
            self.lp += pulp.lpSum(x.values()) == 1, f"rest_{s}"
            if layer.checkpoint_bytes > 0:
                c = {t: new_var(self.lp, f"c_{s}_{t}", 0, 1, cat) for t in self.tiers}
                self.lp += pulp.lpSum(c.values()) == x["rec"], f"checkpoint_{s}"
                for t, v in c.items():
                    self.vars[("set", s, "c", t)] = v
            for t, v in a.items():
                self.vars[("set", s, "a", t)] = v
            for t, v in x.items():
                self.vars[("set", s, "x", t)] = v
            self._copy_share(s, layer, a["gpu"], x["gpu"])
        self._prefetch_shares()
        for j, layer in enumerate(problem.layers):
            if len(modes) > 1 and layer.param_bytes + layer.state_bytes + layer.grad_bytes > 0:
                ys = {
                    m: new_var(self.lp, f"m_{j}_{m.replace(':', '_')}", 0, 1, pulp.LpBinary)
                    for m in modes
                }
                self.lp += pulp.lpSum(ys.values()) == 1, f"mode_{j}"
                if streamed_kinds is not None and layer.kind not in streamed_kinds:
                    for m, y in ys.items():  # an executor that cannot stream this layer
                        if STATE_MODES[m]["params"] != "gpu":
                            self.lp += y == 0, f"stream_{j}_{m.replace(':', '_')}"
                self.mode_vars[j] = ys
        # Interchangeable interior layers: order their modes (symmetry breaking).
        for j in range(len(problem.layers) - 1):
            if (
                j in self.mode_vars
                and j + 1 in self.mode_vars
                and self.frac_set[j] == self.frac_set[j + 1]
            ):
                rank = {m: k for k, m in enumerate(modes)}
                self.lp += (
                    pulp.lpSum(rank[m] * v for m, v in self.mode_vars[j].items())
                    <= pulp.lpSum(rank[m] * v for m, v in self.mode_vars[j + 1].items()),
                    f"order_{j}",
                )

        self._pool_flags()
        self.peak = new_var(self.lp, "gpu_peak_gib", 0)
        self.host_peaks: dict[str, pulp.LpVariable] = {}
        self.lp += self.peak >= gpu_lower_bound(problem, chunks) / GiB, "live_bytes_lower_bound"
        # Shared parts of the GPU terms as variables (GiB): static bytes and the running sum
        # of kept bytes, so each term has a handful of coefficients.
        static = new_var(self.lp, "gpu_static_gib")
        self.lp += static == self._expr(self.terms.gpu_static, 1.0 / GiB), "gpu_static"
        prefix = [pulp.LpAffineExpression()]
        for j, form in enumerate(self.terms.kept):
            running = new_var(self.lp, f"kept_before_{j + 1}")
            self.lp += running == prefix[-1] + self._expr(form, 1.0 / GiB), f"kept_sum_{j}"
            prefix.append(running)
        for k, term in enumerate(self.terms.memory):
            tier = term.tier
            expr = self._expr(term.local, 1.0 / GiB)
            if term.prefix is not None:
                expr = expr + static + prefix[term.prefix]
            if tier == "gpu":
                self.lp += self.peak >= expr, f"peak_{k}"
            else:
                if tier not in self.host_peaks:
                    self.host_peaks[tier] = new_var(self.lp, f"{tier}_peak_gib", 0)
                self.lp += self.host_peaks[tier] >= expr, f"host_peak_{k}"
            cap = capacity_overrides.get(tier, hardware.usable(tier))
            if cap is not None:
                self.lp += expr <= solver_capacity(cap) / GiB, f"cap_{tier}_{k}"
        exposed = []
        for k, window in enumerate(self.terms.windows):
            if not window.transfers:
                continue
            e = new_var(self.lp, f"exposed_{k}", 0)
            for i, transfer in enumerate(window.transfers):
                if transfer.coef or transfer.const:
                    self.lp += e >= self._expr(transfer - window.compute), f"window_{k}_{i}"
            exposed.append(e)
        self.tail = new_var(self.lp, "optimizer_tail", 0)
        for i, form in enumerate(self.terms.tail):
            self.lp += self.tail >= self._expr(form), f"tail_{i}"
        self.step_time = self._expr(self.terms.compute) + pulp.lpSum(exposed) + self.tail
        if objective == "time":
            self.lp += (
                self.step_time
                + PEAK_WEIGHT_S_PER_GIB * self.peak
                + self._expr(self.terms.traffic, TRAFFIC_WEIGHT)
            )
        elif objective == "host":  # the least host memory, then the fastest
            self.lp += pulp.lpSum(self.host_peaks.values()) + 1e-6 * self.step_time
        else:  # the smallest GPU peak, then the fastest
            self.lp += self.peak + 1e-6 * self.step_time

    def _copy_share(self, s: int, layer, a_gpu, x_gpu) -> None:
        """``copy_s`` = the kept share when the layer moves anything (binary ``z_s``), else 0:
        the memory a partially moved layer holds twice while it runs."""
        token = layer.anchor_bytes + layer.recomputable_bytes
        if token <= 0:
            return
        z = new_var(self.lp, f"moves_{s}", 0, 1, pulp.LpBinary)
        copy = new_var(self.lp, f"copy_{s}", 0, 1)
        if layer.anchor_bytes > 0:
            self.lp += 1 - a_gpu <= z, f"moves_anchor_{s}"
        if layer.recomputable_bytes > 0:
            self.lp += 1 - x_gpu <= z, f"moves_rest_{s}"
        kept = (layer.anchor_bytes * a_gpu + layer.recomputable_bytes * x_gpu) * (1.0 / token)
        self.lp += copy >= kept - (1 - z), f"copy_{s}"
        self.vars[("set", s, "copy", "gpu")] = copy
        self.vars[("set", s, "moves", "gpu")] = z
        self.binaries.append(z)

    def _prefetch_shares(self) -> None:
        """``pref_j`` (GiB) >= the cut bytes of layer j-1 when layer j moves anything: the
        backward of a moving layer rebuilds the layer before it whole (big-M on ``moves``)."""
        for j in range(1, len(self.problem.layers)):
            z = self.vars.get(("set", self.frac_set[j], "moves", "gpu"))
            form = self.terms.copying[j - 1]
            if z is None or not form.coef:
                continue
            bound = form.const + sum(max(0.0, c) for c in form.coef.values())  # all shares 1
            cut = self._expr(form, 1.0 / PREFETCH_UNIT)
            pref = new_var(self.lp, f"prefetch_{j}", 0)
            self.lp += pref >= cut - (bound / PREFETCH_UNIT) * (1 - z), f"prefetch_{j}"
            self.layer_vars[(j, "pref", "gpu")] = pref

    def _pool_flags(self) -> None:
        """``pool_t`` (binary) is 1 where anything is swapped to pooled tier ``t``: the pool's
        fixed slack is charged only then (big-M on the tier's swapped bytes)."""
        for tier, form in self.terms.pools.items():
            if not form.coef:
                continue
            bound = form.const + sum(max(0.0, c) for c in form.coef.values())
            flag = new_var(self.lp, f"pool_{tier}", 0, 1, pulp.LpBinary)
            self.binaries.append(flag)
            self.vars[("pool", tier)] = flag
            expr = self._expr(form, 1.0 / GiB)
            self.lp += expr <= (bound / GiB) * flag, f"pool_{tier}"

    def _fraction_sets(self, tie: bool) -> list[int]:
        sets = list(range(len(self.problem.layers)))
        if not tie:
            return sets
        for start, end in self.problem.runs():
            if end - start >= 4:
                for j in range(start + 2, end - 1):
                    sets[j] = start + 1
        return sets

    def _lookup(self, key: Hashable):
        j, group, name = key
        if group == "pool":
            return self.vars.get(("pool", name), 0.0)
        if group == "pref":
            return self.layer_vars.get(key, 0.0)
        if group == "m":
            if j in self.mode_vars:
                return self.mode_vars[j][name]
            return 1.0 if name == "gpu" else 0.0
        return self.vars.get(("set", self.frac_set[j], group, name), 0.0)

    def _expr(self, form, scale: float = 1.0) -> pulp.LpAffineExpression:
        """``scale * form`` as one PuLP expression, built without intermediate objects."""
        terms: dict[pulp.LpVariable, float] = {}
        const = form.const
        for key, coef in form.coef.items():
            target = self._lookup(key)
            if isinstance(target, pulp.LpVariable):
                terms[target] = terms.get(target, 0.0) + coef
            else:
                const += coef * target
        return pulp.LpAffineExpression(
            [(v, c * scale) for v, c in terms.items() if c], const * scale
        )

    def relax(self, relaxed: bool) -> None:
        for ys in self.mode_vars.values():
            for v in ys.values():
                v.cat = pulp.LpContinuous if relaxed else pulp.LpInteger

    def fix_modes(self, chosen: dict[int, str] | None) -> None:
        for j, ys in self.mode_vars.items():
            for m, v in ys.items():
                if chosen is None:
                    v.lowBound, v.upBound = 0, 1
                else:
                    v.lowBound = v.upBound = 1 if chosen[j] == m else 0

    def solve(self, mip: bool, time_limit: float, gap: float) -> bool:
        # The "moves any token" indicators stay integer even in the relaxation: they are few
        # (one per set of identical layers), and relaxing them would drop the kept-share copy.
        self.lp.solve(_make_solver(mip or bool(self.binaries), time_limit, gap))
        # 1: optimal; 2: an integer-feasible solution when the time limit stopped the search.
        return self.lp.sol_status in (1, 2)

    def value_of(self, key: Hashable) -> float:
        v = self._lookup(key)
        return float(v.value() or 0.0) if isinstance(v, pulp.LpVariable) else float(v)

    def rounded_modes(self) -> dict[int, str]:
        """Round relaxed modes: runs of tied layers by largest remainder, others by argmax."""
        chosen: dict[int, str] = {}
        groups: dict[int, list[int]] = {}
        for j in self.mode_vars:
            groups.setdefault(self.frac_set[j], []).append(j)
        for members in groups.values():
            mass = {
                m: sum(self.mode_vars[j][m].value() or 0.0 for j in members) for m in self.modes
            }
            counts = {m: int(math.floor(mass[m] + 1e-6)) for m in self.modes}
            left = len(members) - sum(counts.values())
            for m in sorted(self.modes, key=lambda m: mass[m] - counts[m], reverse=True)[:left]:
                counts[m] += 1
            order = [m for m in self.modes for _ in range(counts[m])]
            for j, m in zip(sorted(members), order, strict=True):
                chosen[j] = m
        return chosen

    def decisions(self) -> list[LayerDecision]:
        out = []
        for j, layer in enumerate(self.problem.layers):
            anchor = {t: self.value_of((j, "a", t)) for t in self.tiers}
            rest = {t: self.value_of((j, "x", t)) for t in [*self.tiers, "rec"]}
            if layer.anchor_bytes == 0:
                anchor = {"gpu": 1.0}
            elif layer.droppable_anchor and self.value_of((j, "f", "full")) > 0.5:
                anchor = {}  # dropped: the layer is checkpointed whole
            if layer.recomputable_bytes == 0:
                rest = {"gpu": 1.0}
            anchor, rest = (_clean(anchor) if anchor else {}), _clean(rest)
            checkpoint = None
            if layer.checkpoint_bytes > 0 and rest.get("rec", 0.0) > 0:
                checkpoint = {t: self.value_of((j, "c", t)) for t in self.tiers}
                total = sum(checkpoint.values()) or 1.0
                checkpoint = {t: v * rest["rec"] / total for t, v in checkpoint.items() if v > 1e-9}
            mode = "gpu"
            if j in self.mode_vars:
                mode = max(self.mode_vars[j], key=lambda m: self.mode_vars[j][m].value() or 0.0)
            out.append(LayerDecision(anchor, rest, mode, checkpoint))
        return out


def _clean(fractions: dict[str, float]) -> dict[str, float]:
    kept = {t: min(1.0, max(0.0, v)) for t, v in fractions.items() if v > 1e-9}
    total = sum(kept.values()) or 1.0
    return {t: v / total for t, v in kept.items()}


def _evaluate(model: _Model, decisions: list[LayerDecision]) -> Evaluation:
    from memtrain.planner.evaluate import decision_values

    return evaluate_terms(
        model.terms,
        decision_values(decisions, model.problem.layers),
        model.hardware,
        model.problem.tokens,
    )


def _keeps_everything(decision: LayerDecision) -> bool:
    anchor_kept = not decision.anchor or decision.anchor.get("gpu", 0.0) >= 1.0
    return anchor_kept and decision.rest.get("gpu", 0.0) >= 1.0


def keep_what_costs_nothing(
    model: _Model, decisions: list[LayerDecision], evaluation: Evaluation
) -> tuple[list[LayerDecision], Evaluation]:
    """Keep on the GPU every layer whose swaps and recomputes buy no step time.

    The solver's tie-breaks (host traffic, then the GPU peak) weigh far less than its own
    tolerances on small problems, so where keeping everything fits it may still return a plan
    that moves bytes for nothing. This undoes such moves layer by layer, last layer first (its
    round trip is the one nothing hides), whenever the plan still fits and is no slower.
    """
    usable = {t: model.hardware.usable(t) for t in evaluation.peaks}

    def fits(ev: Evaluation) -> bool:
        return all(ev.peaks[t] <= solver_capacity(usable[t]) for t in ev.peaks)

    def no_slower(ev: Evaluation, than: Evaluation) -> bool:
        return ev.step_time_s <= than.step_time_s * (1 + 1e-9)

    for j in reversed(range(len(decisions))):
        if _keeps_everything(decisions[j]):
            continue
        trial = list(decisions)
        trial[j] = replace(keep_all(), states=decisions[j].states)
        candidate = _evaluate(model, trial)
        if fits(candidate) and no_slower(candidate, evaluation):
            decisions, evaluation = trial, candidate
    return decisions, evaluation


def _time_objective(model: _Model, decisions: list[LayerDecision], evaluation: Evaluation) -> float:
    """The "time" objective of ``decisions``, as the solver would value them."""
    from memtrain.planner.evaluate import decision_values

    traffic = model.terms.traffic.value(decision_values(decisions, model.problem.layers))
    return (
        evaluation.step_time_s
        + PEAK_WEIGHT_S_PER_GIB * evaluation.peaks["gpu"] / GiB
        + TRAFFIC_WEIGHT * traffic
    )


def solve(
    problem: PlanProblem,
    hardware: HardwareModel,
    modes: Sequence[str],
    *,
    chunk_options: Sequence[int] | None = None,
    tie_identical: bool = True,
    integer_fractions: bool = False,
    method: str = "auto",
    gap_tolerance: float = 1e-3,
    time_limit: float = 10.0,
    mip_time_limit: float = 4.0,
    objective: str = "time",
    capacity_overrides: dict[str, float | None] | None = None,
    streamed_kinds: Sequence[str] | None = None,
) -> SolveResult:
    """The fastest feasible decisions (``objective='time'``) or the smallest GPU peak ('gpu').

    ``method``: 'auto' (LP relaxation, rounding, MIP only if the gap exceeds ``gap_tolerance``),
    'lp-round' (never the MIP) or 'mip' (always the MIP). The 'auto' MIP runs at most
    ``mip_time_limit`` seconds and keeps the rounded plan unless it finds a better one.
    """
    if method not in ("auto", "lp-round", "mip"):
        raise MemtrainError(f"unknown solve method {method!r}; use auto, lp-round or mip")
    started = time.perf_counter()
    overrides = dict(capacity_overrides or {})
    if chunk_options is None:
        tileable = any(layer.tileable for layer in problem.layers)
        chunk_options = TILE_CHUNKS if tileable else (1,)
    chunk_options = sorted(set(chunk_options))
    calls = 0
    needs_mip = integer_fractions or method == "mip"
    relaxed: list[tuple[float, int, _Model]] = []
    for chunks in chunk_options:
        cap = overrides["gpu"] if "gpu" in overrides else hardware.usable("gpu")
        if cap is not None and gpu_lower_bound(problem, chunks) > cap:
            continue  # the live-bytes bound alone rules this chunk count out
        model = _Model(
            problem,
            hardware,
            chunks,
            list(modes),
            tie_identical=tie_identical,
            integer_fractions=integer_fractions,
            objective=objective,
            capacity_overrides=overrides,
            streamed_kinds=streamed_kinds,
        )
        model.relax(True)
        calls += 1
        if not needs_mip or integer_fractions:
            if not model.solve(mip=False, time_limit=time_limit, gap=gap_tolerance):
                continue
            relaxed.append((pulp.value(model.lp.objective), chunks, model))
            # Chunks only relax GPU terms and cost time: when the GPU does not bind without
            # them, no chunk count can do better.
            if chunks == 1 and objective == "time" and cap is not None:
                if (model.peak.value() or 0.0) * GiB < cap * (1 - 1e-4) - 2**20:
                    break
        else:
            relaxed.append((0.0, chunks, model))
    if not relaxed:
        return SolveResult(
            False,
            [],
            1,
            None,
            math.inf,
            math.inf,
            method,
            time.perf_counter() - started,
            solver_name(),
            calls,
        )
    relaxed.sort(key=lambda item: item[0])
    bound = relaxed[0][0] if not needs_mip else 0.0

    best: tuple[float, int, list[LayerDecision], Evaluation, _Model] | None = None
    for lp_value, chunks, model in relaxed:
        if best is not None and lp_value >= best[0] - 1e-12:
            break
        if needs_mip:
            model.relax(False)
            ok = model.solve(mip=True, time_limit=time_limit, gap=gap_tolerance / 10)
            calls += 1
        else:
            model.fix_modes(model.rounded_modes() if model.mode_vars else None)
            ok = model.solve(mip=False, time_limit=time_limit, gap=gap_tolerance)
            calls += 1
        if not ok:
            continue
        decisions = model.decisions()
        value = pulp.value(model.lp.objective)
        if best is None or value < best[0]:
            best = (value, chunks, decisions, _evaluate(model, decisions), model)
    method_used = "mip" if needs_mip else "lp-round"
    if best is None and relaxed and not needs_mip:
        # Rounding broke feasibility everywhere: search the integers of the best relaxation.
        _, chunks, model = relaxed[0]
        model.fix_modes(None)
        model.relax(False)
        calls += 1
        if model.solve(mip=True, time_limit=time_limit, gap=gap_tolerance / 10):
            decisions = model.decisions()
            value = pulp.value(model.lp.objective)
            best = (value, chunks, decisions, _evaluate(model, decisions), model)
        method_used = "lp-round+mip"
    if best is not None and not needs_mip and method == "auto":
        gap = (best[0] - bound) / best[0] if best[0] > 0 else 0.0
        if gap > gap_tolerance and best[4].mode_vars:
            model = best[4]
            model.fix_modes(None)
            model.relax(False)
            calls += 1
            if model.solve(mip=True, time_limit=mip_time_limit, gap=gap_tolerance / 10):
                value = pulp.value(model.lp.objective)
                if value < best[0]:
                    decisions = model.decisions()
                    best = (value, best[1], decisions, _evaluate(model, decisions), model)
            method_used = "lp-round+mip"
    if best is not None and objective == "time":
        decisions, evaluation = keep_what_costs_nothing(best[4], best[2], best[3])
        if decisions is not best[2]:
            best = (_time_objective(best[4], decisions, evaluation), best[1], decisions,
                    evaluation, best[4])  # fmt: skip
    elapsed = time.perf_counter() - started
    if best is None:
        return SolveResult(
            False, [], 1, None, bound, math.inf, method_used, elapsed, solver_name(), calls
        )
    value = best[0]
    if needs_mip:
        bound = value  # a solved MIP: the solver's own gap tolerance applies
        gap = gap_tolerance / 10
    else:
        gap = max(0.0, (value - bound) / value) if value > 0 else 0.0
    return SolveResult(
        feasible=True,
        decisions=best[2],
        chunks=best[1],
        evaluation=best[3],
        bound_s=bound,
        gap=gap,
        method=method_used,
        solve_time_s=elapsed,
        solver=solver_name(),
        solver_calls=calls,
        objective=value,
    )
