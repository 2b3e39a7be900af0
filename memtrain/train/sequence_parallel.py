"""Ulysses sequence parallelism for ``memtrain run`` under DeepSpeed (``launcher.sequence_parallel``).

``K`` consecutive ranks share every sequence. DeepSpeed's Arctic Long Sequence Training
components do the work: :meth:`UlyssesSPAttentionHF.register_with_transformers` builds the
sequence-parallel groups (``parallel_state_sp``, the ``mpu`` handed to ``deepspeed.initialize``)
and puts its all-to-all attention in place of the model's ``sdpa`` in transformers' attention
table, so each rank computes all tokens for ``heads / K`` heads between two all-to-alls.

Every rank of a group reads the same batch; :meth:`UlyssesSP.shard` does what DeepSpeed's
``UlyssesSPDataLoaderAdapter`` does to a batch: the labels are shifted on the whole sequence
(so no target is lost at a shard border), then ``input_ids``, the shifted labels and the global
``position_ids`` are cut into ``K`` contiguous shards, one per rank. :meth:`UlyssesSP.loss`
weights each shard's mean loss by its count of targets, as ALST does, so the group's loss is the
whole sequence's mean. The loss each rank backpropagates is its own share (the other shares
enter as constants), times :attr:`UlyssesSP.grad_scale`: DeepSpeed sums the gradients over the
sequence and data-parallel ranks and divides by the data-parallel degree under ZeRO stages 0-2,
but by all ranks in ZeRO-3's reduce-scatter (ALST's differentiable all-gather of the losses makes
up that factor ``K`` the same way), so the step sees the gradient of one process on the whole
sequence either way.
"""

from __future__ import annotations

from typing import Any

import torch

from memtrain.errors import ConfigError
from memtrain.train.recipe import Recipe

ATTENTION = "sdpa"  # the model's attention the Ulysses wrapper runs on each rank's heads


def check_sequence_parallel(recipe: Recipe, world_size: int | None = None) -> None:
    """Refuse ``launcher.sequence_parallel`` settings that cannot run (one line each)."""
    degree, launcher = recipe.launcher.sequence_parallel, recipe.launcher
    if degree == 1:
        return
    if launcher.kind != "deepspeed":
        raise ConfigError(
            f"launcher.sequence_parallel={degree} runs under DeepSpeed's Ulysses: set "
            "launcher.kind=deepspeed"
        )
    ranks = world_size if world_size is not None else launcher.nproc
    if ranks % degree:
        raise ConfigError(
            f"launcher.sequence_parallel={degree} must divide the number of ranks ({ranks})"
        )
    if recipe.data.seq % degree:
        raise ConfigError(
            f"launcher.sequence_parallel={degree} must divide data.seq ({recipe.data.seq}): "
            "each rank holds an equal shard of every sequence"
        )


def check_model(model: torch.nn.Module, degree: int) -> None:
    """The model's heads must split over ``degree`` ranks, on an attention Ulysses wraps."""
    config = model.config.get_text_config()
    heads = config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    if heads % degree or (kv % degree and degree % kv):
        raise ConfigError(
            f"launcher.sequence_parallel={degree}: the model's {heads} attention heads ({kv} "
            "key/value heads) do not split over that many ranks"
        )
    attention = getattr(model.config, "_attn_implementation", None)
    if attention != ATTENTION:
        raise ConfigError(
            f"launcher.sequence_parallel runs the model's {ATTENTION} attention per head group; "
            f"this model uses {attention!r}"
        )


def exchange_plan(handle: Any, group: Any, degree: int) -> int:
    """Give the plan's layers that call the attention kernels themselves (token-wise and tiled
    recompute) Ulysses' all-to-alls around those calls (memtrain.offload.sequence_exchange);
    keep, swap, whole-layer recompute (which reruns the layer, exchanges included) and MLP
    chunks run inside each rank as they are. Heads that do not split evenly over the ranks are
    refused in one line. Returns how many layers exchange."""
    if handle is None or degree == 1:
        return 0
    from memtrain.offload.sequence_exchange import HeadExchange

    exchange = HeadExchange(group, degree)
    parts = handle.attention_parts
    for part in parts:
        exchange.check_heads(part.spec.heads, part.spec.kv_heads, part.name)
    for part in parts:
        part.exchange = exchange
    return len(parts)


class UlyssesSP:
    """DeepSpeed's Ulysses attention installed for ``model``; the group's batch shards and loss.

    Call after the process group is up and before ``deepspeed.initialize`` (which takes
    :attr:`mpu`); :meth:`close` puts transformers' attention back.
    """

    def __init__(self, model: torch.nn.Module, degree: int, batch: int, seq: int) -> None:
        from deepspeed.runtime.sequence_parallel.ulysses_sp import UlyssesSPAttentionHF
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        check_model(model, degree)
        self.degree, self.seq = degree, seq
        self.grad_scale = 1.0  # K under ZeRO-3 (set_zero_stage)
        self._table, self._stock = ALL_ATTENTION_FUNCTIONS, ALL_ATTENTION_FUNCTIONS[ATTENTION]
        self.mpu = UlyssesSPAttentionHF.register_with_transformers(
            model_name_or_path=model,
            core_attn_implementation=ATTENTION,
            sequence_parallel_size=degree,
            micro_batch_size=batch,
            seq_length=seq,
            seq_length_is_variable=False,
        )
        self.group = self.mpu.get_sequence_parallel_group()
        self.rank = self.mpu.get_sequence_parallel_rank()

    def set_zero_stage(self, stage: int) -> None:
        """ZeRO-3's reduce-scatter divides the summed gradients by every rank, sequence ranks
        included (stages 0-2 by the data-parallel ranks): each share then counts ``K`` times."""
        self.grad_scale = float(self.degree) if stage == 3 else 1.0

    def shard(self, ids: torch.Tensor) -> dict[str, torch.Tensor]:
        """This rank's shard of a ``(batch, seq)`` batch that every rank of the group holds."""
        labels = torch.nn.functional.pad(ids, (0, 1), value=-100)[:, 1:]  # shifted first
        positions = torch.arange(ids.shape[1], device=ids.device).expand_as(ids)
        chunk = ids.shape[1] // self.degree
        part = slice(chunk * self.rank, chunk * (self.rank + 1))
        return {
            "input_ids": ids[:, part].contiguous(),
            "shift_labels": labels[:, part].contiguous(),
            "position_ids": positions[:, part].contiguous(),
        }

    def loss(
        self, local: torch.Tensor, shift_labels: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(what this rank backpropagates, the group's loss): the shards' mean losses weighted
        by their counts of targets; what is backpropagated is scaled by :attr:`grad_scale`."""
        import torch.distributed as dist

        targets = (shift_labels != -100).sum().to(local.dtype).reshape(1)
        counts = targets.clone()
        dist.all_reduce(counts, group=self.group)
        share = local * (targets[0] / counts[0].clamp(min=1))
        if targets[0] == 0:  # an empty shard's mean is NaN; it contributes nothing
            share = local.nan_to_num(0.0) * 0.0
        whole = share.detach().clone().reshape(1)
        dist.all_reduce(whole, group=self.group)
        return share * self.grad_scale, whole[0]

    def close(self) -> None:
        from deepspeed.runtime.sequence_parallel import parallel_state_sp

        self._table[ATTENTION] = self._stock
        parallel_state_sp._release_sequence_parallel_groups()
