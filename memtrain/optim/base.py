"""What every memtrain optimizer shares: exact checkpoints, state accounting, step counters."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from memtrain.errors import MemtrainError
from memtrain.optim.memory import measured_state_bytes

# Scalars read on the host every step: kept on the CPU so reading them never syncs the GPU.
HOST_STATE_KEYS = ("step", "block_start")


class MemtrainOptimizer(torch.optim.Optimizer):
    """Base class: state tensors keep their own dtype on load, so a resumed run is bit-exact
    (float32 projections and statistics of bf16 weights stay float32, indices stay integers)."""

    # The update reads whole matrices (QR, Newton-Schulz, row bands): on weights an engine
    # shards (FSDP2's DTensors) ``step`` gathers one weight at a time
    # (memtrain.optim.sharded.step_whole_matrices); the others step each rank's rows.
    whole_matrices = False

    def _gathered_step(self, closure: Callable[[], Any] | None) -> tuple[bool, Any]:
        """(whether this step ran on gathered weights, the closure's loss): for a
        ``whole_matrices`` optimizer over sharded weights, the whole step."""
        from memtrain.optim.sharded import is_sharded, step_whole_matrices

        if not self.whole_matrices:
            return False, None
        if not any(is_sharded(p) for g in self.param_groups for p in g["params"]):
            return False, None
        loss = self._run_closure(closure)
        step_whole_matrices(self)
        return True, loss

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """torch's loader, then every state tensor put back in its saved dtype (torch casts
        floating ones, and even integer indices, to the parameter's dtype)."""
        super().load_state_dict(state_dict)
        saved_ids = (i for g in state_dict["param_groups"] for i in g["params"])
        params = (p for g in self.param_groups for p in g["params"])
        for saved_id, param in zip(saved_ids, params, strict=True):
            for key, value in state_dict["state"].get(saved_id, {}).items():
                if isinstance(value, torch.Tensor):
                    device = "cpu" if key in HOST_STATE_KEYS else param.device
                    self.state[param][key] = value.to(device=device, copy=True)

    def state_bytes(self) -> int:
        """Bytes held in ``self.state`` (every tensor, shared storage counted once)."""
        return sum(measured_state_bytes(self).values())

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        # Built eagerly: stepping inside backward swaps param_groups for one-parameter views.
        params = (p for g in self.param_groups for p in g["params"])
        self._index_cache = {id(p): i for i, p in enumerate(params)}

    def param_index(self, param: torch.Tensor) -> int:
        """Position of ``param`` across all groups: a stable key for seeding its refreshes."""
        return self._index_cache[id(param)]

    def _run_closure(self, closure: Callable[[], Any] | None) -> Any:
        if closure is None:
            return None
        with torch.enable_grad():
            return closure()


def init_step(state: dict[str, Any]) -> int:
    """The parameter's completed-step count (float32 CPU scalar in the state, like torch)."""
    if "step" not in state:
        state["step"] = torch.zeros((), dtype=torch.float32)
    return int(state["step"].item())


def grads_of(group: dict[str, Any]) -> list[torch.Tensor]:
    params = [p for p in group["params"] if p.grad is not None]
    for p in params:
        if p.grad.is_sparse:
            raise MemtrainError("memtrain optimizers do not support sparse gradients")
    return params


def check_positive(name: str, value: float) -> None:
    if not value > 0:
        raise MemtrainError(f"{name} must be positive, got {value!r}")


def check_unit_interval(name: str, value: float) -> None:
    if not 0.0 <= value < 1.0:
        raise MemtrainError(f"{name} must be in [0, 1), got {value!r}")
