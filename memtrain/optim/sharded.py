"""Optimizer math on weights an engine shards over ranks (FSDP2's DTensors, split along dim 0).

memtrain's optimizers are written once, on tensors; under FSDP2 those tensors are DTensors and
torch's DTensor runs the same arithmetic on each rank's rows, doing the collectives an
operation needs itself (a projection that sums over the sharded dimension becomes one
all-reduce of the small low-rank result). What DTensor cannot run is done here:

- factorisations (SVD, QR, subspace iteration) read the whole gradient: :func:`full` gathers it
  (only on the steps a projection is refreshed) and :func:`like` makes the result, which every
  rank computed identically, a replicated DTensor without another collective;
- random projections are drawn from seeded generators, so every rank draws the same one;
- 8-bit moments of a sharded tensor are quantised in blocks along each row
  (:mod:`memtrain.optim.moments`), so a rank's codes and scales are its own rows' and are
  saved as row shards; for rows that are multiples of the block this is the unsharded layout;
- optimizers whose update reads whole matrices step one gathered weight at a time
  (:func:`step_whole_matrices`).

A state is a DTensor (row-sharded like its weight, or replicated) or a plain tensor equal on
every rank (step counters, the states of whole-matrix steps), so
``torch.distributed.checkpoint`` saves each rank's part once and reloads it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch


def _dtensor_type() -> Any:
    from torch.distributed.tensor import DTensor

    return DTensor


def is_sharded(tensor: Any) -> bool:
    """Whether ``tensor`` is a DTensor (a weight, gradient or state of a sharded engine)."""
    if not isinstance(tensor, torch.Tensor) or type(tensor) is torch.Tensor:
        return False
    return isinstance(tensor, _dtensor_type())


def full(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor on every rank (a collective for a sharded one), as a plain tensor."""
    return tensor.full_tensor() if is_sharded(tensor) else tensor


def local(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's part (the tensor itself when it is not sharded)."""
    return tensor.to_local() if is_sharded(tensor) else tensor


def _assemble(part: torch.Tensor, ref: torch.Tensor, placements, shape) -> torch.Tensor:
    """This rank's ``part`` of a contiguous tensor of global ``shape`` placed on ``ref``'s
    ranks as ``placements`` say, as a DTensor (no collective: every rank brings its own)."""
    from torch.distributed.tensor import DTensor

    shape = torch.Size(shape)
    stride = torch.empty(shape, device="meta").stride()
    return DTensor.from_local(
        part, ref.device_mesh, placements, run_check=False, shape=shape, stride=stride
    )


def like(value: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """``value``, computed identically on every rank, as a replicated DTensor on ``ref``'s
    ranks when ``ref`` is sharded (no collective), else ``value`` itself."""
    if not is_sharded(ref):
        return value
    from torch.distributed.tensor import Replicate

    value = value.contiguous()
    return _assemble(value, ref, [Replicate()] * ref.device_mesh.ndim, value.shape)


def settled(tensor: torch.Tensor) -> torch.Tensor:
    """A DTensor whose placements hold pending partial sums (a product over the sharded
    dimension) reduced to a replicated one; anything else as it is."""
    if not is_sharded(tensor):
        return tensor
    from torch.distributed.tensor import Replicate

    placements = tensor.placements
    if not any(p.is_partial() for p in placements):
        return tensor
    return tensor.redistribute(
        placements=[Replicate() if p.is_partial() else p for p in placements]
    )


def row_sharded(tensor: torch.Tensor) -> bool:
    """Whether a DTensor is split along dim 0 (and nowhere else)."""
    if not is_sharded(tensor):
        return False
    shards = [p for p in tensor.placements if p.is_shard()]
    return bool(shards) and all(p.is_shard(0) for p in shards)


def from_rows(local_rows: torch.Tensor, ref: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """This rank's rows of a tensor of global ``shape`` split along dim 0 exactly as ``ref``
    (a row-sharded DTensor) is, as a DTensor."""
    return _assemble(local_rows, ref, ref.placements, shape)


def stacked_zeros(count: int, ref: torch.Tensor) -> torch.Tensor:
    """``count`` zero tensors shaped like ``ref`` stacked on a new dim 0; a row-sharded ``ref``'s
    split moves to dim 1, so each rank holds its own rows of every one."""
    zeros = torch.zeros((count, *local(ref).shape), dtype=ref.dtype, device=ref.device)
    if not is_sharded(ref):
        return zeros
    from torch.distributed.tensor import Replicate, Shard

    if not row_sharded(ref):
        return like(zeros, ref)
    placements = [Shard(1) if p.is_shard() else Replicate() for p in ref.placements]
    return _assemble(zeros, ref, placements, (count, *ref.shape))


# How each optimizer steps FSDP2's row shards: "rows" runs its own arithmetic on the shards
# (DTensor ops; projections refreshed from a gathered gradient), with states sharded like the
# weight where the update keeps rows apart and replicated where it sums over them (low-rank
# moments of a left projection); "whole" gathers one weight and its gradient at a time and
# steps the whole matrix on every rank (Newton-Schulz, QR of the full gradient, row blocks),
# keeping that optimizer's states whole on every rank.
ROW_STEPS = (
    "adamw",
    "adam",
    "sgd",
    "adamw8bit",
    "galore",
    "galore-adamw",
    "galore-adafactor",
    "natural-galore",
    "apollo",
    "apollo-mini",
)
WHOLE_MATRIX_STEPS = ("cosmos", "frugal", "adafactor")


def sharded_step_kind(name: str) -> str:
    """``rows`` or ``whole`` for optimizer ``name`` (see :data:`ROW_STEPS`)."""
    return "rows" if name in ROW_STEPS else "whole"


def step_sharded(optimizer: torch.optim.Optimizer, name: str) -> None:
    """One step of optimizer ``name`` over sharded weights: memtrain's optimizers gather what
    they need themselves; torch's Adafactor is stepped one gathered weight at a time."""
    if sharded_step_kind(name) == "whole" and not getattr(optimizer, "whole_matrices", False):
        step_whole_matrices(optimizer)
    else:
        optimizer.step()


@torch.no_grad()
def step_whole_matrices(optimizer: torch.optim.Optimizer) -> None:
    """One step of ``optimizer`` over row-sharded weights, one weight at a time: its whole
    weight and gradient gathered, the step taken on them exactly as in one process, and this
    rank's rows written back. Weights that are not sharded step as they are."""
    from memtrain.optim.step_in_backward import step_one

    for index, group in enumerate(optimizer.param_groups):
        for param in list(group["params"]):
            if param.grad is None:
                continue
            if not is_sharded(param):
                step_one(optimizer, param, index)
                continue
            whole = full(param.detach())
            whole.grad = full(param.grad)
            state = optimizer.state.pop(param, None)
            if state:
                optimizer.state[whole] = state
            cache = getattr(optimizer, "_index_cache", None)
            if cache is not None:  # memtrain optimizers seed refreshes by the weight's place
                cache[id(whole)] = cache[id(param)]
            try:
                step_one(optimizer, whole, index)
            finally:
                if cache is not None:
                    cache.pop(id(whole), None)
                if whole in optimizer.state:
                    optimizer.state[param] = optimizer.state.pop(whole)
            rows = like(whole, param).redistribute(param.device_mesh, param.placements)
            param.to_local().copy_(rows.to_local())


@torch.no_grad()
def init_states(optimizer: torch.optim.Optimizer, step: Callable[[], None]) -> None:
    """Give a fresh optimizer its states (the layout a sharded checkpoint loads into) by one
    ``step`` on zero gradients at learning rate 0, as torch.distributed.checkpoint does for
    torch's optimizers, but through ``step`` (a gathered step for whole-matrix optimizers).
    The checkpoint then replaces every state; nothing else is left changed."""
    if optimizer.state:
        return
    params = [p for g in optimizer.param_groups for p in g["params"] if p.requires_grad]
    if any(p.grad is not None for p in params):
        return
    rates = [g["lr"] for g in optimizer.param_groups]
    for p in params:
        p.grad = torch.zeros_like(p)
    for group in optimizer.param_groups:
        group["lr"] = 0.0
    try:
        step()
    finally:
        for group, rate in zip(optimizer.param_groups, rates, strict=True):
            group["lr"] = rate
        optimizer.zero_grad(set_to_none=True)


def state_bytes_split(optimizer: torch.optim.Optimizer) -> tuple[int, int]:
    """(bytes of this rank's row shards of the states, bytes of states every rank holds whole):
    what sharding an optimizer's states saved, measured. A storage is counted once."""
    seen: set[int] = set()
    split, whole = 0, 0
    for state in optimizer.state.values():
        for value in state.values():
            if not isinstance(value, torch.Tensor):
                continue
            storage = local(value).untyped_storage()
            if storage._cdata in seen:
                continue
            seen.add(storage._cdata)
            if is_sharded(value) and any(p.is_shard() for p in value.placements):
                split += storage.nbytes()
            else:
                whole += storage.nbytes()
    return split, whole
