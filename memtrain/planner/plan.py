"""``make_plan``: profile + hardware in, a versioned plan out (or one line saying what would fit).

The plan records, per layer, what share of its token-dim saved bytes is kept on the GPU, swapped
to each host tier or recomputed, where its parameters, gradients and optimizer states live,
and the predicted peaks and step time, next to three baselines priced by the same cost model.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from memtrain.errors import ConfigError, MemtrainError, check_schema
from memtrain.hardware.tiers import HOST_TIERS, HardwareModel
from memtrain.planner.costmodel import STATE_MODES, available_modes, available_tiers, host_states
from memtrain.planner.evaluate import LayerDecision, evaluate, keep_all, recompute_all
from memtrain.planner.hostmem import master_bytes
from memtrain.planner.layer_plan import LayerPlan
from memtrain.planner.layout import assign_offsets, host_pool_buffers, staging_buffers
from memtrain.planner.problem import PlanProblem, build_problem, has_logits
from memtrain.planner.solve import SolveResult, solve
from memtrain.profile.result import ProfileResult
from memtrain.units import GiB

SCHEMA = "memtrain.plan"
SCHEMA_VERSION = 1
BASELINES = ("no_checkpointing", "full_checkpointing", "full_checkpointing_zero_offload")


class PlanInfeasible(MemtrainError):
    """No placement fits; carries the smallest budget that would and the tier that binds."""

    def __init__(self, message: str, tier: str, minimum_bytes: float) -> None:
        super().__init__(message)
        self.tier = tier
        self.minimum_bytes = minimum_bytes


@dataclass
class PlanOptions:
    """Choices the user makes; the planner decides everything else."""

    fused_loss: bool | None = None  # None: on when the profile has a head or loss layer
    allow_state_offload: bool = True
    allow_param_offload: bool = True  # parameters on the host: DeepSpeed ZeRO-3 (any layer)
    # Layer kinds whose parameters may leave the GPU (None: any, as ZeRO-3 offloads them all;
    # memtrain's own executor streams blocks: memtrain.planner.costmodel.STREAMED_KINDS).
    streamed_kinds: Sequence[str] | None = None
    chunk_options: Sequence[int] | None = None  # None: 1 for models without blocks, else 1..64
    always_store_ops: Sequence[str] = ()  # ops whose saved tensors are never recomputed
    method: str = "auto"
    gap_tolerance: float = 1e-3
    time_limit: float = 10.0
    # The optimizer steps each parameter inside backward (register_step_in_backward): no static
    # gradients, each layer's backward holds its largest parameter's gradient and step transient
    # (``step_bytes``, per layer name; None: from the profile alone, conservative). States stay
    # on the GPU: no executor steps offloaded states inside backward.
    step_in_backward: bool = False
    step_bytes: Mapping[str, float] | None = None
    # Host-placed states step as their gradients arrive, overlapping backward (prepare's
    # overlap_host_step): the host step is priced as what backward cannot hide.
    overlap_host_step: bool = False
    # Per layer name, its largest parameter's bytes: the host gradient staging the host
    # optimizer holds for it (memtrain.planner.hostmem.grad_staging_bytes); None, or a layer
    # missing: bounded by the layer's parameter bytes. memtrain.planner.pipeline fills it in
    # from the model.
    largest_param_bytes: Mapping[str, float] | None = None
    # What the engine that moves states can run (memtrain.planner.distributed.Parallelism
    # .engine_options): the state placements (None: every one in costmodel.STATE_MODES) and
    # whether its host step keeps float32 masters (PlanProblem.host_masters).
    state_modes: Sequence[str] | None = None
    host_masters: bool = True


@dataclass
class Plan:
    """What the executors read. ``to_dict`` is the documented format (docs/plan-format.md)."""

    model: str
    seq: int
    micro_batch: int
    optimizer: str
    fused_loss: bool
    chunks: int
    hardware: dict[str, Any]
    layers: list[LayerPlan]
    predicted: dict[str, Any]
    baselines: dict[str, dict[str, Any]]
    solver: dict[str, Any]
    layout: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    # Multi-GPU plans only (memtrain.planner.distributed): the split this rank's plan is for.
    parallelism: dict[str, Any] | None = None
    # Planned for an optimizer that steps inside backward (written only when true).
    step_in_backward: bool = False

    def to_dict(self) -> dict[str, Any]:
        extra = {} if self.parallelism is None else {"parallelism": self.parallelism}
        if self.step_in_backward:
            extra["step_in_backward"] = True
        return {
            "schema": SCHEMA,
            "schema_version": SCHEMA_VERSION,
            "model": self.model,
            "seq": self.seq,
            "micro_batch": self.micro_batch,
            "optimizer": self.optimizer,
            "fused_loss": self.fused_loss,
            "chunks": self.chunks,
            "hardware": self.hardware,
            "layers": [layer.to_dict() for layer in self.layers],
            "predicted": self.predicted,
            "baselines": self.baselines,
            "solver": self.solver,
            "layout": self.layout,
            "notes": list(self.notes),
            **extra,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Plan:
        check_schema(data, SCHEMA, SCHEMA_VERSION, "plan", "memtrain plan")
        fields = {k: v for k, v in data.items() if k not in ("schema", "schema_version")}
        try:
            if "layers" in fields:
                fields["layers"] = [LayerPlan.from_dict(entry) for entry in fields["layers"]]
            return cls(**fields)
        except TypeError as exc:
            raise ConfigError(f"plan has missing or unknown fields ({exc})") from None

    def save(self, path: str | Path) -> None:
        """YAML for ``.yaml``/``.yml``, JSON otherwise."""
        path = Path(path)
        if path.suffix in (".yaml", ".yml"):
            import yaml

            path.write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))
        else:
            path.write_text(json.dumps(self.to_dict(), indent=1))

    @classmethod
    def load(cls, path: str | Path) -> Plan:
        import yaml

        try:
            text = Path(path).read_text()
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read plan ({exc.strerror})") from None
        try:
            data = yaml.safe_load(text)  # JSON is YAML too
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: plan is neither YAML nor JSON ({exc})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: a plan must be a mapping")
        return cls.from_dict(data)


def baseline_decisions(
    problem: PlanProblem, hardware: HardwareModel, name: str
) -> list[LayerDecision] | None:
    """Decisions of a named baseline, or None where the hardware cannot run it."""
    out = []
    for layer in problem.layers:
        if name == "no_checkpointing" or layer.kind != "block":
            decision = keep_all()
        else:
            decision = recompute_all()
            if layer.droppable_anchor:  # stock checkpointing stores the block input alone: the
                # attention output token-wise recompute would keep is recomputed with the rest
                decision = replace(decision, anchor={})
        if name == "full_checkpointing_zero_offload":
            if hardware.capacity("cpu") <= 0:
                return None
            if layer.param_bytes + layer.state_bytes > 0:
                decision.states = "opt:cpu"
        out.append(decision)
    return out


def _layer_entry(layer, decision: LayerDecision, chunks: int) -> LayerPlan:
    token = layer.anchor_bytes + layer.recomputable_bytes
    shares: dict[str, float] = {"gpu": 0.0, "rec": 0.0, **{t: 0.0 for t in HOST_TIERS}}
    if token > 0:
        for t, v in decision.anchor.items():
            shares[t] += v * layer.anchor_bytes / token
        for t, v in decision.rest.items():
            shares[t] += v * layer.recomputable_bytes / token
        dropped = 1.0 - sum(decision.anchor.values()) if layer.droppable_anchor else 0.0
        shares["rec"] += max(0.0, dropped) * layer.anchor_bytes / token
    else:
        shares["gpu"] = 1.0
    states = STATE_MODES[decision.states]
    rec = decision.rest.get("rec", 0.0)
    checkpoint = decision.checkpoint
    if checkpoint is None:
        checkpoint = {"gpu": rec} if rec > 0 and layer.checkpoint_bytes > 0 else {}
    return LayerPlan(
        name=layer.name,
        kind=layer.kind,
        keep=round(shares["gpu"], 6),
        swap={t: round(shares[t], 6) for t in HOST_TIERS},
        recompute=round(shares["rec"], 6),
        full_recompute=layer.recomputable_bytes > 0 and rec >= 1 - 1e-6,
        input_checkpoint={t: round(v, 6) for t, v in checkpoint.items() if v > 0},
        chunks=chunks if layer.tileable else 1,
        params=states["params"],
        grads=states["grads"],
        optimizer=states["optimizer"],
        token_saved_bytes=int(token),
        input_checkpoint_bytes=int(layer.checkpoint_bytes),
    )


def _resident(problem: PlanProblem, decisions: list[LayerDecision]) -> dict[str, dict[str, int]]:
    """Parameter, gradient and optimizer-state bytes through the whole step: ``gpu`` those on
    the GPU (``grads`` is 0 when stepping inside backward), ``host`` those it hands to the host
    (states with their float32 masters where the host step keeps them)."""
    out = {tier: {"params": 0.0, "grads": 0.0, "optimizer": 0.0} for tier in ("gpu", "host")}
    for layer, decision in zip(problem.layers, decisions, strict=True):
        where = STATE_MODES[decision.states]
        masters = master_bytes(layer.param_count) if problem.host_masters else 0.0
        placed = {
            "params": (layer.param_bytes, layer.param_bytes),
            "grads": (layer.grad_bytes, layer.grad_bytes),
            "optimizer": (layer.state_bytes, host_states(problem, layer) + masters),
        }
        for kind, (on_gpu, on_host) in placed.items():
            if where[kind] == "gpu":
                out["gpu"][kind] += on_gpu
            else:
                out["host"][kind] += on_host
    return {tier: {k: int(v) for k, v in parts.items()} for tier, parts in out.items()}


def _hardware_summary(hardware: HardwareModel) -> dict[str, Any]:
    return {
        "device": hardware.device.name,
        "capacity_bytes": {t: hardware.capacity(t) for t in available_tiers(hardware)},
        "usable_bytes": {t: int(hardware.usable(t)) for t in available_tiers(hardware)},
        "host_to_device": hardware.host_to_device,
        "device_to_host": hardware.device_to_host,
        "host_link_duplex": hardware.host_link_duplex,
        "allocator_margin": hardware.allocator_margin,
        "nvme_path": hardware.tiers["nvme"].path if "nvme" in hardware.tiers else None,
    }


def _solve(
    problem: PlanProblem, hardware: HardwareModel, options: PlanOptions, **kw
) -> SolveResult:
    state_offload = options.allow_state_offload and not options.step_in_backward
    return solve(
        problem,
        hardware,
        available_modes(hardware, state_offload, options.allow_param_offload, options.state_modes),
        chunk_options=options.chunk_options,
        method=options.method,
        gap_tolerance=options.gap_tolerance,
        time_limit=options.time_limit,
        streamed_kinds=options.streamed_kinds,
        **kw,
    )


def minimum_gpu_budget(
    problem: PlanProblem,
    hardware: HardwareModel,
    options: PlanOptions,
    *,
    host_limited: bool = True,
) -> float:
    """The smallest GPU capacity (bytes) any plan fits in, with or without host limits."""
    overrides: dict[str, float | None] = {"gpu": None}
    if not host_limited:
        overrides.update({t: None for t in HOST_TIERS})
    result = _solve(problem, hardware, options, objective="gpu", capacity_overrides=overrides)
    if not result.feasible or result.evaluation is None:
        raise MemtrainError("no plan fits even with unlimited GPU memory; check the profile")
    peak = result.evaluation.peaks["gpu"]
    return (peak + hardware.gpu_reserved_bytes) / (1 - hardware.allocator_margin)


def _size(nbytes: float) -> str:
    """GiB with one decimal, or MiB where that would round small budgets away."""
    return f"{nbytes / GiB:.1f} GiB" if nbytes >= 10 * GiB else f"{nbytes / 2**20:,.0f} MiB"


def _infeasible(
    problem: PlanProblem, hardware: HardwareModel, options: PlanOptions
) -> PlanInfeasible:
    need = minimum_gpu_budget(problem, hardware, options)
    need_unlimited_host = minimum_gpu_budget(problem, hardware, options, host_limited=False)
    have = hardware.capacity("gpu")
    if need_unlimited_host <= have * (1 - 1e-6):
        # The GPU budget would do with more host memory: the host binds. Name its tier with the
        # least host memory (as the executor allocates it) any plan in this GPU budget needs.
        overrides: dict[str, float | None] = {t: None for t in HOST_TIERS}
        result = _solve(problem, hardware, options, objective="host", capacity_overrides=overrides)
        if result.feasible and result.evaluation is not None:
            peaks = result.evaluation.peaks
            over = {t: peaks[t] - hardware.usable(t) for t in peaks if t != "gpu"}
            tier = max(over, key=over.get) if over else "cpu"
            needed = (peaks.get(tier, 0.0)) / (1 - hardware.allocator_margin)
            return PlanInfeasible(
                f"no plan fits: host memory binds, the {tier} tier needs at least "
                f"{_size(needed)} (pool, host optimizer and staging buffers as the executor "
                f"allocates them; available {_size(hardware.capacity(tier))}); "
                f"or give the GPU {_size(need)}",
                tier,
                needed,
            )
    message = f"no plan fits: the GPU binds, it needs at least {_size(need)} (budget {_size(have)})"
    if need_unlimited_host < need * 0.99:
        message += (
            f"; host memory binds too (with more host memory {_size(need_unlimited_host)} "
            f"of GPU would do)"
        )
    return PlanInfeasible(message, "gpu", need)


def plan_layout(layers: list[LayerPlan], time_limit: float = 2.0) -> dict[str, Any]:
    """Offsets in the pinned host pool (per tier) and in the GPU staging pool (per layer, solved
    once per distinct layer)."""
    host = {}
    for tier in HOST_TIERS:
        buffers = host_pool_buffers(layers, tier)
        if buffers:
            host[tier] = assign_offsets(buffers, time_limit=time_limit).to_dict()
    staging: dict[str, Any] = {}
    solved: dict[tuple, dict[str, Any]] = {}
    for index, layer in enumerate(layers):
        buffers = staging_buffers(layers, index)
        if not buffers:
            continue
        key = tuple((b.size, b.start, b.end) for b in buffers)
        if key not in solved:
            solved[key] = assign_offsets(buffers, time_limit=time_limit).to_dict()
        staging[layer.name] = solved[key]
    return {"host_pool": host, "gpu_staging": staging}


def make_plan(
    profile: ProfileResult, hardware: HardwareModel, options: PlanOptions | None = None
) -> Plan:
    """The fastest placement of every byte that fits ``hardware`` (then the lowest GPU peak).

    Raises :class:`PlanInfeasible` (a :class:`MemtrainError`) with the smallest GPU budget that
    would fit when none does.
    """
    options = options or PlanOptions()
    hardware.validate()
    fused = has_logits(profile) if options.fused_loss is None else options.fused_loss
    if options.step_in_backward:
        from memtrain.planner.step_in_backward import step_in_backward_problem

        problem = step_in_backward_problem(
            profile,
            fused_loss=fused,
            always_store_ops=options.always_store_ops,
            step_bytes=options.step_bytes,
        )
    else:
        problem = build_problem(
            profile,
            fused_loss=fused,
            always_store_ops=options.always_store_ops,
            largest_param_bytes=options.largest_param_bytes,
        )
    if options.overlap_host_step:
        problem = replace(problem, overlap_host_step=True)
    if not options.host_masters:
        problem = replace(problem, host_masters=False)
    result = _solve(problem, hardware, options)
    if not result.feasible or result.evaluation is None:
        raise _infeasible(problem, hardware, options)
    resident = _resident(problem, result.decisions)
    baselines: dict[str, dict[str, Any]] = {}
    for name in BASELINES:
        decisions = baseline_decisions(problem, hardware, name)
        if decisions is None or (options.step_in_backward and name.endswith("zero_offload")):
            continue  # ZeRO-Offload steps on the host after backward
        baselines[name] = evaluate(problem, hardware, decisions).to_dict()
    layers = [
        _layer_entry(layer, decision, result.chunks)
        for layer, decision in zip(problem.layers, result.decisions, strict=True)
    ]
    notes = []
    if fused:
        notes.append("fused linear cross-entropy: logits are never stored (baselines use it too)")
    if options.step_in_backward:
        notes.append(
            "step in backward: no gradient outlives its parameter's step, optimizer states stay "
            "on the GPU (baselines step in backward too)"
        )
    return Plan(
        model=profile.model,
        seq=profile.seq,
        micro_batch=profile.batch,
        optimizer=profile.optimizer,
        fused_loss=fused,
        chunks=result.chunks,
        hardware=_hardware_summary(hardware),
        layers=layers,
        predicted={
            **result.evaluation.to_dict(),
            "gpu_resident_bytes": resident["gpu"],
            "host_resident_bytes": resident["host"],
            "gpu_moments": [[m, int(v)] for m, v in result.evaluation.gpu_moments],
        },
        baselines=baselines,
        solver={
            "solver": result.solver,
            "method": result.method,
            "solve_time_s": round(result.solve_time_s, 4),
            "gap": result.gap,
            "bound_step_time_s": result.bound_s,
            "solver_calls": result.solver_calls,
            "identical_layer_runs": [
                [problem.layers[s].name, problem.layers[e - 1].name]
                for s, e in problem.runs()
                if e - s > 1
            ],
        },
        layout=plan_layout(layers),
        notes=notes,
        step_in_backward=options.step_in_backward,
    )


def best_of(
    candidates: Sequence[tuple[str, ProfileResult]],
    hardware: HardwareModel,
    options: PlanOptions | None = None,
) -> tuple[Plan, list[dict[str, Any]]]:
    """Plan each candidate profile (another micro-batch size or optimizer) and keep the one with
    the most tokens/s. Returns the winner and one summary row per candidate.

    Raises the smallest-budget :class:`PlanInfeasible` when no candidate fits.
    """
    if not candidates:
        raise MemtrainError("nothing to plan: give at least one profile")
    best: Plan | None = None
    rows: list[dict[str, Any]] = []
    failures: list[PlanInfeasible] = []
    for label, profile in candidates:
        try:
            plan = make_plan(profile, hardware, options)
        except PlanInfeasible as exc:
            failures.append(exc)
            rows.append({"candidate": label, "feasible": False, "message": str(exc)})
            continue
        rows.append(
            {
                "candidate": label,
                "feasible": True,
                "tokens_per_s": plan.predicted["tokens_per_s"],
                "step_time_s": plan.predicted["step_time_s"],
                "gpu_peak_bytes": plan.predicted["peak_bytes"]["gpu"],
            }
        )
        if best is None or plan.predicted["tokens_per_s"] > best.predicted["tokens_per_s"]:
            best = plan
    if best is None:
        raise min(failures, key=lambda exc: exc.minimum_bytes)
    if len(candidates) > 1:
        best.notes.append(
            "chosen among "
            + "; ".join(
                f"{r['candidate']}: "
                + (f"{r['tokens_per_s']:,.0f} tokens/s" if r["feasible"] else "does not fit")
                for r in rows
            )
        )
    return best, rows
