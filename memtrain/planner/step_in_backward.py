"""Plan a step whose optimizer runs inside backward (``memtrain.optim.register_step_in_backward``).

When every parameter steps as soon as its gradient is complete and the gradient is freed right
after, the model's gradients never exist all at once: during a layer's backward only the
gradient of the parameter being stepped is live, next to the optimizer's own temporaries for
that one step (GaLore: the low-rank buffers, and at a projection refresh a float32 copy of the
gradient). :func:`apply_step_in_backward` rewrites a profile accordingly, like
:func:`memtrain.planner.problem.apply_fused_loss`: each layer's static gradient bytes become
zero and its backward working set grows by its *step bytes*, the most any one of its parameters
holds while it is stepped.

Step bytes per parameter (:func:`param_step_bytes`) are its gradient plus the larger of a second
gradient-size buffer (a weight used more than once, as sequence chunks and token-wise recompute
do, sums two gradients before it steps) and the optimizer's transient for one step
(:func:`step_transient_bytes`, a formula per optimizer; measured on CPU by the tests).

The bytes are added to the layer's ``output_bytes`` (the incoming gradient, live through the
whole backward of the layer), not to ``backward_transient_bytes``: the cost model divides a
tiled block's transient by its sequence chunks, and a parameter's gradient is not divided.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from typing import Any

import torch
from torch import nn

from memtrain.errors import MemtrainError
from memtrain.profile.optimizer_state import OptimizerSpec, parse_optimizer_spec
from memtrain.profile.result import ProfileResult

# shape, dtype, options -> bytes the optimizer allocates above its states while stepping one
# parameter (its gradient not included)
StepTransient = Callable[[tuple[int, ...], torch.dtype, dict[str, Any]], int]

_TRANSIENTS: dict[str, StepTransient] = {}
FLOAT32_BYTES = 4
# Optimizers without a formula: four float32 copies of the parameter (every built-in one
# allocates less; a registered formula replaces this).
FALLBACK_FLOAT32_COPIES = 4
# Without the model (profile only): each layer's whole gradient is live, plus this many
# gradient-size temporaries (a GaLore refresh of a bf16 weight makes a float32 copy: two).
PROFILE_ONLY_TEMPORARIES = 3


def register_step_transient(name: str, formula: StepTransient) -> None:
    """Declare the bytes optimizer ``name`` allocates while stepping one parameter."""
    _TRANSIENTS[name] = formula


def _elem(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype, device="meta").element_size()


def _adam_transient(shape: tuple[int, ...], dtype: torch.dtype, options: dict[str, Any]) -> int:
    """torch Adam/AdamW: the denominator and its scaled copy (the single-tensor path; foreach
    makes one, fused none)."""
    return 2 * math.prod(shape) * _elem(dtype)


def _sgd_transient(shape: tuple[int, ...], dtype: torch.dtype, options: dict[str, Any]) -> int:
    """torch SGD: momentum updates in place; Nesterov adds one gradient-size temporary."""
    return math.prod(shape) * _elem(dtype)


def galore_transient(shape: tuple[int, ...], dtype: torch.dtype, options: dict[str, Any]) -> int:
    """:class:`memtrain.optim.GaLoreAdamW` stepping one parameter.

    Dense parameters: one full-size denominator. Projected ones: at a projection refresh the
    gradient's float32 copy (none for float32 gradients) plus the subspace iteration's float32
    ``(m + n) x l`` buffers (``l`` = rank + oversample), or a full SVD's ``U``, ``S``, ``V^T``;
    between refreshes the low-rank gradient, denominator and normalised update (3 low-rank
    matrices). The first step always refreshes, so the larger of the two is the bound.
    """
    from memtrain.optim.lowrank import effective_rank, low_rank_shape, projection_side
    from memtrain.optim.state_formulas import GALORE_DEFAULTS

    elem = _elem(dtype)
    numel = math.prod(shape)
    if len(shape) != 2 or not bool(options.get("projected", True)):
        return numel * elem
    m, n = shape
    rank = effective_rank(shape, int(options.get("rank", GALORE_DEFAULTS["rank"])))
    side = projection_side(shape, options.get("proj_type", GALORE_DEFAULTS["proj_type"]))
    low = math.prod(low_rank_shape(shape, rank, side))
    between = 3 * low * elem
    copy = 0 if dtype == torch.float32 else numel * FLOAT32_BYTES
    if options.get("proj_method", "iter") == "svd":
        k = min(m, n)
        refresh = copy + FLOAT32_BYTES * (m * k + k * n + k)
    else:
        extra = max(0, min(int(options.get("proj_oversample", 0)), min(m, n) - rank))
        width = rank + extra
        unit = (m + n) * width * FLOAT32_BYTES
        # The copy's products hold two (m + n) x l blocks (three with extra columns: the
        # Rayleigh-Ritz step), the orthonormalisation up to 4.5 (5) of them; ``l x l`` Gram and
        # Cholesky factors on top. Bounds every case the tests measure, cold and warm.
        refresh = max(copy + (3 if extra else 2) * unit, int((5 if extra else 4.5) * unit))
        refresh += 2 * width * width * FLOAT32_BYTES
    return max(between, refresh)


register_step_transient("adamw", _adam_transient)
register_step_transient("adam", _adam_transient)
register_step_transient("sgd", _sgd_transient)
register_step_transient("galore", galore_transient)
register_step_transient("galore-adamw", galore_transient)


def step_transient_bytes(
    shape: Sequence[int], dtype: torch.dtype, spec: str | OptimizerSpec
) -> tuple[int, bool]:
    """(bytes above states while ``spec`` steps one parameter, whether a formula gave them)."""
    spec = parse_optimizer_spec(spec)
    shape = tuple(int(s) for s in shape)
    formula = _TRANSIENTS.get(spec.name)
    if formula is None:
        return FALLBACK_FLOAT32_COPIES * math.prod(shape) * FLOAT32_BYTES, False
    return int(formula(shape, dtype, dict(spec.options))), True


def param_step_bytes(shape: Sequence[int], dtype: torch.dtype, spec: str | OptimizerSpec) -> int:
    """Most bytes one parameter holds while it steps in backward: its gradient plus the larger
    of a second gradient (two uses summed before the step) and the optimizer's transient."""
    grad = math.prod(int(s) for s in shape) * _elem(dtype)
    transient, _ = step_transient_bytes(shape, dtype, spec)
    return grad + max(grad, transient)


def model_step_bytes(
    model: nn.Module,
    spec: str | OptimizerSpec,
    layers: Sequence[tuple[str, Sequence[nn.Module]]] | None = None,
) -> tuple[dict[str, int], list[str]]:
    """Per layer, its largest :func:`param_step_bytes` (works on a meta-device model).

    ``layers``: ``(name, modules)`` pairs as profiled (default: the causal-LM granularity). A
    parameter counts in the first layer that holds it, as the profiler counts it. Returns the
    bytes and notes (optimizers priced without a formula).
    """
    from memtrain.optim.factory import param_state_specs

    spec = parse_optimizer_spec(spec)
    if layers is None:
        from memtrain.models.build import causal_lm_layers

        layers = [(s.name, s.modules) for s in causal_lm_layers(model)]
    specs = param_state_specs(model, spec)
    names = {id(p): n for n, p in model.named_parameters()}
    seen: set[int] = set()
    out: dict[str, int] = {}
    guessed = False
    for name, modules in layers:
        best = 0
        for module in modules:
            for param in module.parameters():
                if id(param) in seen or not param.requires_grad:
                    continue
                seen.add(id(param))
                pspec = specs.get(names.get(id(param), ""), spec)
                guessed |= not step_transient_bytes(param.shape, param.dtype, pspec)[1]
                best = max(best, param_step_bytes(param.shape, param.dtype, pspec))
        out[name] = best
    notes = []
    if guessed:
        notes.append(
            f"step in backward: no step-transient formula for optimizer {spec.name!r}; assumed "
            f"{FALLBACK_FLOAT32_COPIES} float32 copies of each parameter"
        )
    return out, notes


def profile_step_bytes(profile: ProfileResult) -> dict[str, int]:
    """Step bytes from the profile alone (no parameter shapes): each layer's whole gradient plus
    :data:`PROFILE_ONLY_TEMPORARIES` gradient-size temporaries. Conservative; pass the model's
    (:func:`model_step_bytes`) for a tight plan."""
    return {
        layer.name: (1 + PROFILE_ONLY_TEMPORARIES) * layer.grad_bytes
        for layer in profile.layers
        if layer.grad_bytes > 0
    }


def apply_step_in_backward(
    profile: ProfileResult, step_bytes: Mapping[str, float] | None = None
) -> ProfileResult:
    """The profile as it is when the optimizer steps inside backward.

    Every layer's ``grad_bytes`` become 0 (no gradient outlives its parameter's step) and its
    ``output_bytes`` grow by its step bytes (``step_bytes[name]``; layers it does not name, by
    :func:`profile_step_bytes`). Everything else is unchanged. Apply it after
    :func:`memtrain.planner.problem.apply_fused_loss`, which rewrites the head's bytes.
    """
    if not profile.layers:
        raise MemtrainError("the profile has no layers; re-run memtrain profile")
    fallback = profile_step_bytes(profile)
    given = dict(step_bytes or {})
    unknown = sorted(set(given) - {layer.name for layer in profile.layers})
    if unknown:
        raise MemtrainError(
            f"step bytes name layers the profile lacks ({', '.join(unknown[:3])}); "
            "compute them for the profiled model"
        )
    layers = []
    for layer in profile.layers:
        extra = int(given.get(layer.name, fallback.get(layer.name, 0)))
        layers.append(
            replace(layer, grad_bytes=0, output_bytes=layer.output_bytes + extra)
            if extra or layer.grad_bytes
            else layer
        )
    return replace(
        profile,
        layers=layers,
        grad_bytes=0,
        notes=[*profile.notes, "step in backward: gradients live one parameter at a time"],
    )


def step_in_backward_problem(
    profile: ProfileResult,
    *,
    fused_loss: bool,
    always_store_ops: Sequence[str] = (),
    step_bytes: Mapping[str, float] | None = None,
):
    """The planner's view of ``profile`` with the loss fused or not and the optimizer stepping
    inside backward (the fused-loss rewrite first, then :func:`apply_step_in_backward`)."""
    from memtrain.planner.problem import apply_fused_loss, build_problem

    source = apply_fused_loss(profile) if fused_loss else profile
    source = apply_step_in_backward(source, step_bytes)
    problem = build_problem(source, fused_loss=False, always_store_ops=always_store_ops)
    return replace(problem, fused_loss=fused_loss)


def check_step_in_backward(plan: Any) -> None:
    """Refuse a plan an optimizer stepping inside backward cannot execute.

    memtrain's executor steps optimizer states kept off the GPU on the host after backward
    (gradients gathered in pinned buffers), and parameters off the GPU need DeepSpeed; neither
    runs per parameter inside backward. So every layer's parameters, gradients and states must
    be planned on the GPU.
    """
    layers = plan.layers if hasattr(plan, "layers") else plan["layers"]
    moved = [
        layer["name"]
        for layer in layers
        if any(layer.get(what, "gpu") != "gpu" for what in ("params", "grads", "optimizer"))
    ]
    if moved:
        raise MemtrainError(
            f"the plan puts parameters, gradients or optimizer states of {', '.join(moved[:3])}"
            f"{', ...' if len(moved) > 3 else ''} off the GPU, which no executor runs while the "
            "optimizer steps inside backward: re-plan with step_in_backward (it keeps states on "
            "the GPU), or turn train.step_in_backward off"
        )
