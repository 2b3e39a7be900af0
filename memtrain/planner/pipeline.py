"""profile -> hardware -> plan, once, for every front door.

``memtrain plan``, a recipe's dry run, :func:`memtrain.prepare` and the Trainer callback all call
:func:`plan_model`; they differ only in where the request comes from (flags, YAML, keywords).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from memtrain.errors import MemtrainError
from memtrain.hardware.request import HardwareRequest
from memtrain.hardware.tiers import HardwareModel
from memtrain.planner.distributed import (
    Parallelism,
    attention_shape,
    per_rank_profile,
    plan_per_rank,
)
from memtrain.planner.plan import Plan, PlanOptions, best_of
from memtrain.profile.result import ProfileResult
from memtrain.units import format_bytes


@dataclass(frozen=True)
class PlanRequest:
    """What to plan: tokens, candidate micro-batches and optimizers, hardware and options.

    Several micro-batch sizes or optimizers are each planned and the fastest plan kept.
    ``gpu_budget_fraction`` plans for that share of the unplanned step's simulated peak (plus
    the device's reserve and allocator margin), handy to exercise a plan on a small model.
    """

    seq: int
    batches: Sequence[int] = (1,)
    optimizers: Sequence[str] = ("adamw",)
    dtype: str = "bf16"
    hardware: HardwareRequest = field(default_factory=HardwareRequest)
    options: PlanOptions = field(default_factory=PlanOptions)
    parallelism: Parallelism | None = None
    gpu_budget_fraction: float | None = None


@dataclass
class PlannedModel:
    """The chosen plan, the profile it was made from, and one row per candidate."""

    plan: Plan
    profile: ProfileResult
    hardware: HardwareModel
    candidates: list[dict[str, Any]]
    notes: list[str] = field(default_factory=list)


def plan_model(model: Any, request: PlanRequest, reuse: Plan | None = None) -> PlannedModel:
    """Profile ``model`` (a preset name or config path, a live Hugging Face causal LM, or a
    :class:`ProfileResult`) for ``request`` and plan it.

    A live model is profiled through a meta-device twin, so nothing is allocated whatever its
    size. Raises :class:`~memtrain.planner.PlanInfeasible` with the smallest budget that fits.
    ``reuse``: a plan made earlier for the same request (a resumed run's): only the profile is
    made, so the run executes exactly the plan its checkpoints were written under.
    """
    hardware = request.hardware.load()
    _check_request(model, request)
    if reuse is not None:
        if reuse.seq != request.seq or reuse.micro_batch not in request.batches:
            raise MemtrainError(
                f"the stored plan is for {reuse.micro_batch} x {reuse.seq} tokens, not "
                f"{request.batches[0]} x {request.seq}; plan again"
            )
        profile = _profile(model, request, reuse.micro_batch, request.optimizers[0], hardware)
        return PlannedModel(reuse, profile, hardware, [], ["plan: the stored one, reused"])
    candidates = [
        (_label(batch, optimizer), _profile(model, request, batch, optimizer, hardware))
        for batch in request.batches
        for optimizer in request.optimizers
    ]
    notes: list[str] = []
    split = request.parallelism
    per_rank = split is not None and not split.is_single
    # per optimizer, per layer: one FSDP2 rank's optimizer-state bytes
    states = _rank_state_bytes(model, request) if per_rank and split.engine == "fsdp" else None
    if request.gpu_budget_fraction is not None:
        unplanned = candidates[0][1]
        if per_rank:  # a share of one rank's unplanned step
            rank_states = (states or {}).get(unplanned.optimizer)
            unplanned = per_rank_profile(unplanned, split, None, rank_states)
        hardware = _fraction_of_peak(hardware, unplanned, request.gpu_budget_fraction)
        notes.append(
            f"GPU budget: {request.gpu_budget_fraction:g} x the unplanned peak "
            f"({format_bytes(_unplanned_peak(unplanned))}) plus the device's "
            "reserve and allocator margin"
        )
    options = request.options
    if per_rank:  # the placements the sharding engine can run
        options = split.engine_options(options)
    if options.step_in_backward and options.step_bytes is None:
        step_bytes, step_notes = _step_bytes(model, request)
        options = replace(options, step_bytes=step_bytes)
        notes.extend(step_notes)
    if options.largest_param_bytes is None and options.allow_state_offload:
        options = replace(options, largest_param_bytes=_largest_param_bytes(model, request))
    if not per_rank:
        plan, rows = best_of(candidates, hardware, options)
    else:
        attention = attention_shape(model) if isinstance(model, str) else None
        plan, rows = plan_per_rank(candidates, hardware, split, options, attention, states)
    note = _pinnable_note(request, hardware)
    if note:
        plan.notes.append(note)
    chosen = next(
        (p for _, p in candidates if (p.batch, p.optimizer) == (plan.micro_batch, plan.optimizer)),
        candidates[0][1],
    )
    return PlannedModel(plan, chosen, hardware, rows, notes)


def _runs_here() -> bool:
    """Whether the plan is for this machine: it has the GPU a run needs."""
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:  # pragma: no cover - torch always imports here
        return False


def _pinnable_note(request: PlanRequest, hardware: HardwareModel) -> str | None:
    """A note where an explicit ``cpu=`` exceeds what the machine can pin: as calibrated, or,
    for a run on this machine, as read now (MemAvailable, RLIMIT_MEMLOCK)."""
    if request.hardware.cpu is None or hardware.capacity("cpu") <= 0:
        return None
    pinnable, where = hardware.host_pinnable, "as calibrated"
    if pinnable is None:
        if not _runs_here():
            return None
        from memtrain.hardware.calibrate import pinnable_memory

        pinnable, where = pinnable_memory()[2], "on this machine now"
    if hardware.capacity("cpu") <= pinnable:
        return None
    return (
        f"host memory: cpu={format_bytes(hardware.capacity('cpu'))} was given, but "
        f"{format_bytes(pinnable)} can be pinned {where} (MemAvailable, locked-memory limit); "
        "the executor's pools may fail to map or pin: re-plan with at most that much"
    )


def _label(batch: int, optimizer: str) -> str:
    return f"micro-batch {batch}, {optimizer}"


def _check_request(model: Any, request: PlanRequest) -> None:
    if not request.batches or min(request.batches) < 1:
        raise MemtrainError("micro-batch sizes must be positive, e.g. 1 or 1,2,4")
    if not request.optimizers:
        raise MemtrainError("name at least one optimizer, e.g. adamw")
    fraction = request.gpu_budget_fraction
    if fraction is not None and not 0 < fraction <= 1:
        raise MemtrainError(f"gpu_budget_fraction must be in (0, 1], got {fraction}")
    several = len(request.batches) > 1 or len(request.optimizers) > 1
    if isinstance(model, ProfileResult) and several:
        raise MemtrainError("a profile fixes batch and optimizer; plan a model to compare several")
    if request.options.step_in_backward and len(request.optimizers) > 1:
        raise MemtrainError("stepping in backward plans one optimizer; name a single one")


def _profile(
    model: Any, request: PlanRequest, batch: int, optimizer: str, hardware: HardwareModel
) -> ProfileResult:
    if isinstance(model, ProfileResult):
        return model
    if isinstance(model, str):
        from memtrain.profile import profile_causal_lm

        return profile_causal_lm(
            model,
            seq=request.seq,
            batch=batch,
            dtype=request.dtype,
            optimizer=optimizer,
            device="meta",
            target=hardware.device,
        )
    return _meta_twin_profile(model, request.seq, batch, optimizer, hardware)


def _meta_twin_profile(model, seq: int, batch: int, optimizer: str, hardware: HardwareModel):
    """A dry run of a live Hugging Face causal LM on a meta-device copy: the model itself copied
    with meta tensors (its blocks as they are, custom or adapted), else rebuilt from its config."""
    import copy

    import torch

    from memtrain.models import build_causal_lm
    from memtrain.models.build import meta_twin
    from memtrain.profile import profile_model
    from memtrain.profile.profiler import default_loss

    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "vocab_size"):
        raise MemtrainError(
            f"prepare() profiles Hugging Face causal LMs from their config; {type(model).__name__} "
            "has none. Profile it with memtrain.profile.profile_model and plan with make_plan."
        )
    dtype = next(model.parameters()).dtype
    if getattr(config, "use_cache", None) is False:
        # A Trainer turns the cache off for training; without a cache transformers looks for
        # packed sequences in the position ids, which meta tensors cannot hold. The twin runs
        # as it would before (the plan turns the cache off in training steps either way).
        config = copy.deepcopy(config)
        config.use_cache = True
    try:
        twin = meta_twin(model)
    except (TypeError, RuntimeError, copy.Error):  # state deepcopy cannot copy: from the config
        twin = build_causal_lm(config, dtype, "meta", config._attn_implementation)
    else:
        twin.config.use_cache = config.use_cache  # the copy's one config object, shared inside
    ids = torch.zeros(batch, seq, dtype=torch.long, device="meta")
    return profile_model(
        twin,
        {"input_ids": ids, "labels": ids},
        seq=seq,
        batch=batch,
        loss_fn=default_loss,
        optimizer=optimizer,
        target=hardware.device,
        name=getattr(config, "name_or_path", "") or type(model).__name__,
    )


def _unplanned_peak(profile: ProfileResult) -> int:
    """The step's peak with nothing planned (a per-rank profile has no timeline to simulate)."""
    return profile.simulated_peak_bytes or profile.predicted_peak_bytes


def _fraction_of_peak(hardware: HardwareModel, profile: ProfileResult, fraction: float):
    peak = _unplanned_peak(profile)
    budget = (hardware.gpu_reserved_bytes + fraction * peak) / (1 - hardware.allocator_margin)
    return hardware.with_capacity("gpu", int(budget))


def _largest_param_bytes(model: Any, request: PlanRequest) -> dict[str, float] | None:
    """Per layer (as profiled), its largest parameter's bytes: the host gradient staging of a
    host-placed layer (memtrain.planner.hostmem.grad_staging_bytes); None for a bare profile
    (each layer's parameter bytes bound it)."""
    from memtrain.models.build import params_by_layer

    model = _with_weights(model, request)
    if model is None:
        return None
    out: dict[str, float] = {}
    for layer, params in params_by_layer(model):
        out[layer] = float(max((p.numel() * p.element_size() for _, p in params), default=0))
    return out


def _step_bytes(model: Any, request: PlanRequest) -> tuple[dict[str, float] | None, list[str]]:
    """Per layer, the most one parameter holds while it steps in backward; None for a bare
    profile (the planner's conservative estimate)."""
    from memtrain.optim.memory import model_step_bytes

    model = _with_weights(model, request)
    if model is None:
        return None, []
    return model_step_bytes(model, request.optimizers[0])


def _rank_state_bytes(model: Any, request: PlanRequest) -> dict[str, dict[str, int]] | None:
    """Per optimizer, per layer: the optimizer-state bytes one FSDP2 rank keeps (None where the
    model is only a profile: the ZeRO division stands in)."""
    from memtrain.optim.sharded_memory import layer_rank_state_bytes

    model = _with_weights(model, request)
    if model is None:
        return None
    world = request.parallelism.world_size
    return {
        str(optimizer): layer_rank_state_bytes(model, optimizer, world)
        for optimizer in request.optimizers
    }


def _with_weights(model: Any, request: PlanRequest) -> Any:
    """A model whose weights' shapes can be read: a live one as it is, a preset or config on the
    meta device; None for a bare profile."""
    if isinstance(model, ProfileResult):
        return None
    if isinstance(model, str):
        from memtrain.models import build_causal_lm, load_config

        return build_causal_lm(load_config(model), request.dtype, "meta")
    return model
