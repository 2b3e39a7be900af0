"""A DeepSpeed ZeRO-Offload / ZeRO-Infinity config generated from a plan's state placements.

When training runs through DeepSpeed, model states are DeepSpeed's business: this turns the
plan's ``params`` / ``grads`` / ``optimizer`` placements into ``zero_optimization`` settings
(optimizer states to CPU: ZeRO-Offload, stage 2; parameters or states to NVMe: ZeRO-Infinity,
stage 3). Activations stay with :func:`memtrain.offload.apply`. DeepSpeed offloads every layer's
states alike, so a plan that mixes placements is refused unless ``mixed="offload-all"``.

A multi-GPU plan (``memtrain plan --world-size N --zero-stage S --sequence-parallel K``) was
made for one rank under ZeRO stage ``S``: the config keeps that stage (or a higher one an offload
needs), sizes the ZeRO buckets to one layer as the plan's communication buffers assume, and sets
``train_batch_size`` for ``N / K`` data-parallel ranks and ``sequence_parallel_size`` to ``K``.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from memtrain.errors import MemtrainError
from memtrain.offload.policy import OffloadPolicy, policy_from_plan

AIO_DEFAULTS = {
    "block_size": 1 << 20,
    "queue_depth": 8,
    "intra_op_parallelism": 1,
    "single_submit": False,
    "overlap_events": True,
}
_RANK = {"gpu": 0, "cpu": 1, "cxl": 1, "nvme": 2}


def _choose(places: set[str], what: str, mixed: str) -> str:
    if "cxl" in places:
        raise MemtrainError(
            f"DeepSpeed cannot place {what} on CXL memory by itself; bind the process with "
            "numactl, or plan cpu/nvme for them"
        )
    if len(places) > 1 and mixed != "offload-all":
        raise MemtrainError(
            f"the plan puts {what} of different layers on {', '.join(sorted(places))}; DeepSpeed "
            "offloads all layers alike: pass mixed='offload-all' or use memtrain's own optimizer "
            "offload (memtrain.offload.offload_optimizer)"
        )
    return max(places, key=_RANK.__getitem__) if places else "gpu"


def deepspeed_config(
    plan: Any,
    *,
    dtype: str = "bf16",
    gradient_accumulation_steps: int = 1,
    mixed: str = "error",
    base: dict[str, Any] | None = None,
    lr: float | None = None,
    weight_decay: float = 0.0,
) -> dict[str, Any]:
    """The DeepSpeed config dict for ``plan`` (a Plan, its dict, a file or an OffloadPolicy).

    With ``lr`` the config names an AdamW optimizer, which DeepSpeed then builds itself (its
    CPU Adam where states are offloaded; it refuses a client optimizer with ZeRO-Offload).
    """
    if mixed not in ("error", "offload-all"):
        raise MemtrainError(f"mixed must be 'error' or 'offload-all', got {mixed!r}")
    if dtype not in ("bf16", "fp16", "fp32"):
        raise MemtrainError(f"unknown dtype {dtype!r}; use bf16, fp16 or fp32")
    if isinstance(plan, str | Path):
        from memtrain.planner.plan import Plan

        plan = Plan.load(plan)
    split = _parallelism(plan)
    policy: OffloadPolicy = policy_from_plan(plan)
    stateful = list(policy.layers.values())
    params = _choose({p.params for p in stateful}, "parameters", mixed)
    optimizer = _choose({p.optimizer for p in stateful}, "optimizer states", mixed)
    grads = _choose({p.grads for p in stateful}, "gradients", mixed)
    if optimizer == "gpu" and grads != "gpu":
        optimizer = "cpu"  # gradients on the host only make sense with the step there
    stage = 3 if "nvme" in (params, optimizer) or params != "gpu" else 2
    if params == "gpu" and optimizer == "gpu":
        stage = 1 if grads == "gpu" else 2
        if split and grads == "gpu":
            stage = 0  # a multi-GPU plan names its own stage (below)
    if split:
        # A multi-GPU plan was made per rank for this ZeRO stage; offloads may need a higher one.
        stage = max(stage, int(split["zero_stage"]))
    zero: dict[str, Any] = {
        "stage": stage,
        "contiguous_gradients": True,
        "overlap_comm": True,
    }
    for key, place in (("offload_optimizer", optimizer), ("offload_param", params)):
        if place != "gpu":
            zero[key] = {"device": place, "pin_memory": True}
            if place == "nvme":
                zero[key]["nvme_path"] = _nvme_path(policy)
    micro = int(policy.micro_batch or 1)
    config: dict[str, Any] = dict(base or {})
    config.update(
        {
            "train_micro_batch_size_per_gpu": micro,
            "gradient_accumulation_steps": int(gradient_accumulation_steps),
            "zero_optimization": zero,
            "bf16": {"enabled": dtype == "bf16"},
            "fp16": {"enabled": dtype == "fp16"},
        }
    )
    if split:
        # Buckets of one layer, as the plan's communication buffers assume.
        bucket = int(split.get("largest_layer_params") or 0)
        if bucket and stage >= 2:
            zero["reduce_bucket_size"] = bucket
        if bucket and stage == 3:
            zero["stage3_prefetch_bucket_size"] = bucket
            zero["stage3_max_live_parameters"] = 2 * bucket
        data_parallel = int(split["world_size"]) // int(split["sequence_parallel"])
        config["train_batch_size"] = micro * int(gradient_accumulation_steps) * data_parallel
        if int(split["sequence_parallel"]) > 1:
            config["sequence_parallel_size"] = int(split["sequence_parallel"])
    if "nvme" in (params, optimizer):
        config["aio"] = dict(AIO_DEFAULTS)
    if lr is not None:
        config["optimizer"] = {"type": "AdamW", "params": {"lr": lr, "weight_decay": weight_decay}}
    return config


def _parallelism(plan: Any) -> dict[str, Any] | None:
    """The multi-GPU split a plan was made for (``None`` for single-GPU plans)."""
    if isinstance(plan, OffloadPolicy):
        return None
    data = plan.to_dict() if hasattr(plan, "to_dict") else plan
    return data.get("parallelism") if isinstance(data, Mapping) else None


def _nvme_path(policy: OffloadPolicy) -> str:
    if not policy.nvme_path:
        raise MemtrainError("the plan offloads to NVMe but names no path; plan with --nvme PATH")
    return str(policy.nvme_path)


# Where ZeRO's optimizers keep each rank's fp32 partition (the master weights): stage 3, and
# stages 1 and 2.
_FP32_PARTITIONS = ("fp32_partitioned_groups_flat", "single_partition_of_fp32_groups")


def zero_state_tensors(optimizer: Any) -> list[Any] | None:
    """The tensors a ZeRO optimizer keeps for one rank's optimizer state: its fp32 partitions
    and the states of the optimizer that steps them (None: not a ZeRO optimizer)."""
    import torch

    partitions = [getattr(optimizer, name, None) for name in _FP32_PARTITIONS]
    partitions = [p for p in partitions if isinstance(p, list)]
    inner = getattr(optimizer, "optimizer", None)
    if not partitions or inner is None or not hasattr(inner, "state"):
        return None
    tensors = [t for group in partitions for t in group if isinstance(t, torch.Tensor)]
    for state in inner.state.values():
        tensors += [v for v in state.values() if isinstance(v, torch.Tensor)]
    return [t for t in tensors if t.numel() > 0]
