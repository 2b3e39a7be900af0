"""Run the optimizer step for each parameter as soon as its gradient is complete.

A hook after gradient accumulation steps that one parameter and frees its gradient, so at most
a few gradients are alive at any time instead of all of them (saving up to the size of the
model's gradients at the backward peak). Works with any optimizer whose ``step`` walks
``param_groups`` (all torch optimizers and ours): the hook presents a one-parameter view of the
parameter's group. Not compatible with gradient accumulation over micro-batches or with global
gradient clipping, which need every gradient at once.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from memtrain.errors import MemtrainError


class StepInBackward:
    """Handle returned by :func:`register_step_in_backward`; ``remove()`` restores normal use."""

    def __init__(self, optimizer: torch.optim.Optimizer, handles: list[Any]):
        self.optimizer = optimizer
        self._handles = handles

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


def step_one(optimizer: torch.optim.Optimizer, param: torch.Tensor, index: int) -> None:
    """Step ``param`` alone, with the settings of its group ``index`` of ``optimizer``."""
    # The group is looked up at step time: load_state_dict (a resume) replaces the group dicts,
    # and a schedule sets the learning rate on the current ones.
    view = dict(optimizer.param_groups[index])
    view["params"] = [param]
    groups = optimizer.param_groups
    optimizer.param_groups = [view]
    try:
        optimizer.step()
    finally:
        optimizer.param_groups = groups


def _step_one(optimizer: torch.optim.Optimizer, param: torch.Tensor, index: int) -> None:
    step_one(optimizer, param, index)
    param.grad = None


def register_step_in_backward(
    model_or_params: nn.Module | Iterable[torch.Tensor], optimizer: torch.optim.Optimizer
) -> StepInBackward:
    """Step ``optimizer`` inside backward for every parameter of ``model_or_params``.

    After this, a training step is just ``loss.backward()``: no ``optimizer.step()`` or
    ``zero_grad()``. Every parameter must belong to ``optimizer``.
    """
    params = (
        list(model_or_params.parameters())
        if isinstance(model_or_params, nn.Module)
        else list(model_or_params)
    )
    group_of = {id(p): i for i, g in enumerate(optimizer.param_groups) for p in g["params"]}
    handles = []
    for p in params:
        if not p.requires_grad:
            continue
        index = group_of.get(id(p))
        if index is None:
            raise MemtrainError(
                f"parameter of shape {tuple(p.shape)} is not in the optimizer; "
                "build the optimizer over the same parameters"
            )

        def hook(param: torch.Tensor, index: int = index) -> None:
            _step_one(optimizer, param, index)

        handles.append(p.register_post_accumulate_grad_hook(hook))
    return StepInBackward(optimizer, handles)
