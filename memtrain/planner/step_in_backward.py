"""Plan a step whose optimizer runs inside backward (``memtrain.optim.register_step_in_backward``).

When every parameter steps as soon as its gradient is complete and the gradient is freed right
after, the model's gradients never exist all at once: during a layer's backward only the
gradient of the parameter being stepped is live, next to the optimizer's own temporaries for
that one step. :func:`apply_step_in_backward` rewrites a profile accordingly, like
:func:`memtrain.planner.problem.apply_fused_loss`: each layer's static gradient bytes become
zero and its backward working set grows by its *step bytes*, the most any one of its parameters
holds while it is stepped (:func:`memtrain.optim.memory.model_step_bytes` from the model, or
:func:`profile_step_bytes` from the profile alone).

The bytes are added to the layer's ``output_bytes`` (the incoming gradient, live through the
whole backward of the layer), not to ``backward_transient_bytes``: the cost model divides a
tiled block's transient by its sequence chunks, and a parameter's gradient is not divided.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

from memtrain.errors import MemtrainError
from memtrain.planner.layer_plan import LayerPlan
from memtrain.planner.problem import apply_fused_loss, build_problem
from memtrain.profile.result import ProfileResult

# Without the model (profile only): each layer's whole gradient is live, plus this many
# gradient-size temporaries (a GaLore refresh of a bf16 weight makes a float32 copy: two).
PROFILE_ONLY_TEMPORARIES = 3


def profile_step_bytes(profile: ProfileResult) -> dict[str, int]:
    """Step bytes from the profile alone (no parameter shapes): each layer's whole gradient plus
    :data:`PROFILE_ONLY_TEMPORARIES` gradient-size temporaries. Conservative; pass the model's
    (:func:`memtrain.optim.memory.model_step_bytes`) for a tight plan."""
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
    layers = plan.layers if hasattr(plan, "layers") else map(LayerPlan.from_dict, plan["layers"])
    moved = [x.name for x in layers if {x.params, x.grads, x.optimizer} != {"gpu"}]
    if moved:
        raise MemtrainError(
            f"the plan puts parameters, gradients or optimizer states of {', '.join(moved[:3])}"
            f"{', ...' if len(moved) > 3 else ''} off the GPU, which no executor runs while the "
            "optimizer steps inside backward: re-plan with step_in_backward (it keeps states on "
            "the GPU), or turn train.step_in_backward off"
        )
