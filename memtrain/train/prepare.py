"""Wrap an existing training loop: profile, plan, apply, swap the loss, build the optimizer.

    prepared = memtrain.prepare(model, seq=8192, hardware="h100-sxm-80g", optimizer="galore:rank=256")
    for batch in loader:
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        prepared.optimizer.step()
        prepared.optimizer.zero_grad(set_to_none=True)
    prepared.remove()

The model is profiled as a meta-device twin (dry run, nothing allocated), so preparing a model
costs seconds whatever its size.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from memtrain.errors import MemtrainError
from memtrain.hardware.request import HardwareRequest
from memtrain.optim.factory import ALLOWED_OPTIONS, check_options
from memtrain.optim.memory import parse_optimizer_spec
from memtrain.planner import Plan, PlanOptions
from memtrain.planner.costmodel import STREAMED_KINDS
from memtrain.planner.distributed import Parallelism
from memtrain.planner.pipeline import PlanRequest, plan_model
from memtrain.train.allocator import use_expandable_segments
from memtrain.units import format_bytes

# Each model a prepare() result is installed on, with that result's id (until its remove()).
_INSTALLED: weakref.WeakKeyDictionary[nn.Module, int] = weakref.WeakKeyDictionary()

TORCH_OPTIMIZERS = {"adamw": torch.optim.AdamW, "adam": torch.optim.Adam, "sgd": torch.optim.SGD}


@dataclass
class Prepared:
    """What :func:`prepare` set up; ``remove()`` (or leaving the ``with`` block) undoes it."""

    model: nn.Module
    optimizer: Any
    plan: Any
    profile: Any
    handle: Any = None
    fused_loss: bool = False
    notes: list[str] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        predicted, layers = (self.plan.predicted, self.plan.layers) if self.plan else ({}, [])
        return {
            "optimizer": type(self.optimizer).__name__
            if self.optimizer is not None
            else "caller's",
            "fused_loss": self.fused_loss,
            "predicted_peak_bytes": predicted.get("peak_bytes", {}),
            "predicted_step_time_s": predicted.get("step_time_s"),
            "layers_swapped": [x.name for x in layers if any(v > 0 for v in x.swap.values())],
            "layers_recomputed": [x.name for x in layers if x.recompute > 0],
            "notes": list(self.notes),
        }

    def report(self) -> str:
        s = self.summary()
        peaks = ", ".join(f"{t} {format_bytes(b)}" for t, b in s["predicted_peak_bytes"].items())
        lines = [
            f"optimizer: {s['optimizer']}; fused loss: {'on' if s['fused_loss'] else 'off'}",
            f"predicted peaks: {peaks or 'n/a'}",
            f"layers swapping activations: {', '.join(s['layers_swapped']) or 'none'}",
            f"layers recomputing activations: {', '.join(s['layers_recomputed']) or 'none'}",
        ]
        if s["predicted_step_time_s"]:
            lines.append(f"predicted step time: {s['predicted_step_time_s'] * 1e3:.1f} ms")
        lines.extend(f"note: {n}" for n in s["notes"])
        return "\n".join(lines)

    def remove(self) -> None:
        if _INSTALLED.get(self.model) == id(self):
            del _INSTALLED[self.model]
        if self.handle is not None:
            self.handle.remove()
            self.handle = None
        if self.fused_loss:
            from memtrain.kernels import unpatch_causal_lm_loss

            unpatch_causal_lm_loss(self.model)
            self.fused_loss = False

    def __enter__(self) -> Prepared:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()


def unwrap_model(model: nn.Module) -> nn.Module:
    """The model inside data-parallel wrappers (DDP, DataParallel, a DeepSpeed engine)."""
    while isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)) or (
        type(model).__name__ == "DeepSpeedEngine"
        and isinstance(getattr(model, "module", None), nn.Module)
    ):
        model = model.module
    return model


def _several_processes() -> bool:
    import os

    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size() > 1
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def _fused_loss_choice(model: nn.Module, asked: bool | None, notes: list[str]) -> bool:
    """Whether the run uses the fused loss: where the model's stock loss can be fused unless
    asked otherwise; asked for on a model whose loss cannot be fused, a one-line error before
    anything is planned (a plan counts the loss it will run)."""
    if asked is False:
        return False
    from memtrain.kernels import fused_loss_problem

    problem = fused_loss_problem(model)
    if problem is None:
        return True
    if asked:
        raise MemtrainError(f"{problem}; pass fused_loss=False to train with the stock loss")
    notes.append(f"fused loss off: {problem}")
    return False


def prepare(
    model: nn.Module,
    *,
    seq: int,
    batch: int = 1,
    hardware: str = "h100-sxm-80g",
    gpu_budget: str | int | None = None,
    gpu_budget_fraction: float | None = None,
    cpu: str | int | None = None,
    cxl: str | int | None = None,
    nvme: str | None = None,
    optimizer: str = "adamw",
    lr: float = 1e-3,
    weight_decay: float = 0.0,
    fused_loss: bool | None = None,
    plan: bool | Plan = True,
    build_optimizer: bool = True,
    state_offload: bool | None = None,
    step_in_backward: bool = False,
    overlap_host_step: bool = False,
    parallelism: Parallelism | None = None,
) -> Prepared:
    """Profile ``model`` at ``batch x seq``, plan it for ``hardware``, and install the plan.

    ``fused_loss``: the fused linear cross-entropy (no logits stored) where the model's stock
    loss can be fused, unless False; True insists (a one-line error for a model it cannot fuse).

    ``gpu_budget_fraction`` plans for that share of the unplanned step's simulated peak (handy to
    exercise a plan on a small model). ``plan=False`` only swaps the loss and builds the optimizer;
    a :class:`~memtrain.planner.Plan` made earlier for this model and request (a resumed run's)
    is installed as it is, without planning again.
    ``build_optimizer=False`` leaves the optimizer to the caller (a Trainer's, DeepSpeed's):
    ``Prepared.optimizer`` is None. ``state_offload`` lets the plan put optimizer states off the
    GPU; by default it may when memtrain builds a torch optimizer in a single process (its host
    step takes each gradient as it is accumulated, before a data-parallel all-reduce).

    ``model`` may already be wrapped for data parallelism (DDP, ``accelerator.prepare``): the
    plan is installed on the wrapped model, so the wrapper runs it.

    ``weight_decay`` applies wherever the plan puts the optimizer states, unless the optimizer
    spec names its own (``adamw:weight_decay=0.05``).

    ``overlap_host_step``: optimizer states the plan puts on the host step in a worker thread as
    their gradients arrive, overlapping backward (one backward per step, no global clipping); the
    plan prices only the part of the host step backward cannot hide.

    ``parallelism``: this process is one rank of that split (FSDP2 with ``engine="fsdp"``):
    the plan is the rank's, with its share of the weights, gradients and optimizer states.
    With ``build_optimizer=False, state_offload=True`` it may put whole blocks' model states on
    the host; shard the model with ``memtrain.offload.shard_as_planned(model, prepared.plan)``
    so FSDP2's CPU offload runs them.

    ``step_in_backward``: the caller steps the optimizer inside backward
    (:func:`memtrain.optim.register_step_in_backward`), so the plan counts no resident
    gradients, only each layer's largest parameter step, and keeps optimizer states on the GPU.
    """
    from memtrain.optim import build_optimizer as build_torch_optimizer

    model = unwrap_model(model)
    if model in _INSTALLED:
        raise MemtrainError(
            f"this {type(model).__name__} is already prepared; call .remove() on the first "
            "memtrain.prepare() result (or leave its with block) before preparing it again"
        )
    notes: list[str] = []
    fused_loss = _fused_loss_choice(model, fused_loss, notes)
    spec = parse_optimizer_spec(optimizer)
    if spec.name in ALLOWED_OPTIONS:  # a registered optimizer of the caller's takes its own
        check_options(spec)
    # The spec's own weight_decay option wins; otherwise the keyword, wherever the states live.
    decay = float(spec.options.get("weight_decay", weight_decay))
    if step_in_backward and state_offload:
        raise MemtrainError(
            "step_in_backward steps every parameter on the GPU as its gradient arrives; "
            "optimizer states off the GPU are stepped on the host after backward: use one or "
            "the other (state_offload=False)"
        )
    if step_in_backward:
        state_offload = False
    if state_offload is None:
        state_offload = build_optimizer and spec.name in TORCH_OPTIMIZERS
        if state_offload and _several_processes():
            state_offload = False
            notes.append(
                "several processes: optimizer states stay on the device (memtrain's host step "
                "would take gradients before the all-reduce); DeepSpeed ZeRO-Offload moves them"
            )
    plan_obj = None
    profile = None
    if plan:
        allocator = use_expandable_segments()
        if allocator:
            notes.append(allocator)
        # memtrain's own executor runs optimizer-state offload for torch optimizers and streams
        # the weights of blocks whose states it steps on the host (memtrain.offload.params).
        request = PlanRequest(
            seq=seq,
            batches=(batch,),
            optimizers=(str(spec),),
            hardware=HardwareRequest(hardware, gpu_budget, cpu, cxl, nvme),
            options=PlanOptions(
                fused_loss=fused_loss,
                allow_state_offload=state_offload,
                # streamed with the states' host step, by memtrain's executor in one process
                allow_param_offload=state_offload and build_optimizer,
                streamed_kinds=STREAMED_KINDS,
                step_in_backward=step_in_backward,
                overlap_host_step=overlap_host_step,
            ),
            parallelism=parallelism,
            gpu_budget_fraction=gpu_budget_fraction,
        )
        planned = plan_model(model, request, plan if isinstance(plan, Plan) else None)
        plan_obj, profile = planned.plan, planned.profile
        notes.extend(planned.notes)
        if step_in_backward:
            from memtrain.planner.step_in_backward import check_step_in_backward

            check_step_in_backward(plan_obj)
            notes.append("optimizer steps inside backward: the plan holds no resident gradients")
    if fused_loss:
        from memtrain.kernels import patch_causal_lm_loss

        patch_causal_lm_loss(model)
    handle = None
    try:
        if plan_obj is not None:
            from memtrain.offload import apply

            # without memtrain's optimizer, the caller's engine places the model states
            handle = apply(
                model, plan_obj, profile=profile, engine_moves_states=not build_optimizer
            )
        if not build_optimizer:
            built = None
            if handle is not None and handle.needs_optimizer_offload:
                notes.append(
                    "model states off the GPU are the caller's engine's to move (DeepSpeed "
                    "ZeRO-Offload: memtrain.offload.deepspeed_config(plan); FSDP2: "
                    "memtrain.offload.shard_as_planned(model, plan))"
                )
        elif handle is not None and handle.needs_optimizer_offload:
            from memtrain.offload import offload_optimizer

            options_ = {"lr": lr, "weight_decay": decay}
            if spec.name == "sgd":
                options_["momentum"] = float(spec.options.get("momentum", 0.9))
            built = offload_optimizer(
                handle, TORCH_OPTIMIZERS[spec.name], overlap=overlap_host_step, **options_
            )
            notes.append(
                "optimizer states live where the plan puts them (host step"
                + (", overlapped with backward)" if built.overlap else ")")
            )
        else:
            built = build_torch_optimizer(model, spec, lr=lr)
            for group in built.param_groups:
                group["weight_decay"] = decay
    except Exception:
        if handle is not None:
            handle.remove()
        if fused_loss:
            from memtrain.kernels import unpatch_causal_lm_loss

            unpatch_causal_lm_loss(model)
        raise
    prepared = Prepared(model, built, plan_obj, profile, handle, fused_loss, notes)
    if handle is not None or fused_loss:
        _INSTALLED[model] = id(prepared)  # a second prepare() would stack its hooks on these
    return prepared
