"""Hugging Face ``Trainer`` integration: one call builds a Trainer that trains under a plan.

    trainer = memtrain.train.hf.planned_trainer(model, args, train_dataset=ds, seq=4096,
                                                hardware="h100-sxm-80g", optimizer="galore:rank=256")
    trainer.train()

The plan, the fused loss and the optimizer come from :func:`memtrain.prepare`; the Trainer gets
that optimizer (and its own learning-rate schedule on top of it), and the plan is removed when
training ends.

For a Trainer that already exists (its own optimizer, any subclass), one callback does the plan:

    trainer.add_callback(memtrain.MemtrainCallback(seq=4096, hardware="h100-sxm-80g"))

It plans and installs the plan on the Trainer's model when training begins (activation swap and
recompute, the fused loss; optimizer states stay with the Trainer's optimizer on the device),
removes it when training ends, and reports the measured peak next to the plan's prediction.
"""

from __future__ import annotations

import sys
from typing import Any

import torch

from memtrain.errors import MemtrainError
from memtrain.train.prepare import Prepared, prepare


def _callback_base():
    try:
        from transformers import TrainerCallback
    except ImportError:  # pragma: no cover - transformers is in the hf and test extras
        raise MemtrainError(
            "the Trainer integration needs transformers: pip install 'memtrain[hf]'"
        ) from None
    return TrainerCallback


class _RemovePlanAtEnd(_callback_base()):
    """Restores the model (hooks, loss) when ``trainer.train()`` finishes."""

    def __init__(self, prepared: Prepared):
        self.prepared = prepared

    def on_train_end(self, args, state, control, **kwargs):
        self.prepared.remove()


def planned_trainer(
    model,
    args,
    *,
    seq: int,
    hardware: str = "h100-sxm-80g",
    optimizer: str = "adamw",
    lr: float | None = None,
    trainer_cls: type | None = None,
    plan_options: dict[str, Any] | None = None,
    **trainer_kwargs: Any,
):
    """A ``transformers.Trainer`` for ``model`` that trains under a memtrain plan.

    ``seq`` is the padded sequence length of every batch and ``args.per_device_train_batch_size``
    the micro-batch the plan is made for. ``lr`` defaults to ``args.learning_rate``.
    """
    from transformers import Trainer

    if "optimizers" in trainer_kwargs:
        raise MemtrainError("planned_trainer builds the optimizer the plan chose; drop optimizers=")
    prepared = prepare(
        model,
        seq=seq,
        batch=args.per_device_train_batch_size,
        hardware=hardware,
        optimizer=optimizer,
        lr=args.learning_rate if lr is None else lr,
        weight_decay=args.weight_decay,
        **(plan_options or {}),
    )
    callbacks = list(trainer_kwargs.pop("callbacks", None) or []) + [_RemovePlanAtEnd(prepared)]
    cls = trainer_cls or Trainer
    trainer = cls(
        model=model,
        args=args,
        optimizers=(prepared.optimizer, None),
        callbacks=callbacks,
        **trainer_kwargs,
    )
    trainer.memtrain = prepared
    return trainer


def _trainer_optimizer_spec(args) -> str:
    """The memtrain optimizer name that profiles the states of ``args.optim``."""
    name = str(getattr(args.optim, "value", args.optim)).lower()
    for prefix, spec in (("adafactor", "adafactor"), ("sgd", "sgd"), ("adam", "adamw")):
        if name.startswith(prefix):
            return spec
    return "adamw"


class MemtrainCallback(_callback_base()):
    """Plans the Trainer's model when training begins; removes the plan when training ends.

    ``trainer.add_callback(MemtrainCallback(seq=4096, hardware="h100-sxm-80g"))``. ``seq`` is the
    padded length of every batch; the micro-batch is ``args.per_device_train_batch_size``. The
    Trainer builds its optimizer before callbacks run, so it keeps it, and the plan keeps the
    optimizer states on the device (``optimizer`` names the states to profile; by default from
    ``args.optim``). ``plan_options`` go to :func:`memtrain.prepare` (``gpu_budget``,
    ``gpu_budget_fraction``, ``cpu``, ``nvme``, ``fused_loss``, ...).

    At the end, ``callback.memory`` holds the plan's predicted GPU peak and, on CUDA, the
    measured ``torch.cuda.max_memory_allocated`` (on a CPU there is no device allocator to
    measure: only the prediction is reported); both are printed by the main process and added
    to ``trainer.state.log_history``.
    """

    def __init__(
        self,
        seq: int,
        *,
        hardware: str = "h100-sxm-80g",
        optimizer: str | None = None,
        verbose: bool = True,
        **plan_options: Any,
    ):
        self.seq, self.hardware, self.optimizer = seq, hardware, optimizer
        self.verbose, self.plan_options = verbose, plan_options
        self.prepared: Prepared | None = None
        self.memory: dict[str, Any] | None = None
        self._device: torch.device | None = None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if model is None:
            raise MemtrainError("MemtrainCallback needs the Trainer's model at on_train_begin")
        if getattr(args, "gradient_checkpointing", False):
            raise MemtrainError(
                "the plan decides what is recomputed: turn off the Trainer's "
                "gradient_checkpointing when training with MemtrainCallback"
            )
        if self.prepared is not None:  # a second train() call: re-plan from scratch
            self.prepared.remove()
        self.prepared = prepare(
            model,
            seq=self.seq,
            batch=args.per_device_train_batch_size,
            hardware=self.hardware,
            optimizer=self.optimizer or _trainer_optimizer_spec(args),
            build_optimizer=False,
            **self.plan_options,
        )
        self._device = torch.device(args.device)
        if self._device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self._device)
        if self.verbose and state.is_world_process_zero:
            print(f"memtrain plan:\n{self.prepared.report()}", file=sys.stderr)

    def on_train_end(self, args, state, control, **kwargs):
        if self.prepared is None:
            return
        from memtrain.units import format_bytes

        plan = self.prepared.plan
        predicted = plan.predicted["peak_bytes"].get("gpu") if plan is not None else None
        measured = None
        if self._device is not None and self._device.type == "cuda":
            measured = torch.cuda.max_memory_allocated(self._device)
        self.memory = {
            "predicted_gpu_peak_bytes": predicted,
            "measured_gpu_peak_bytes": measured,
        }
        if predicted and measured:
            self.memory["error"] = (measured - predicted) / predicted
        self.prepared.remove()
        self.prepared = None
        state.log_history.append(
            {f"memtrain_{k}": v for k, v in self.memory.items()} | {"step": state.global_step}
        )
        if self.verbose and state.is_world_process_zero:
            said = f"predicted GPU peak {format_bytes(predicted) if predicted else 'n/a'}"
            if measured is not None:
                said += f", measured {format_bytes(measured)}"
                if "error" in self.memory:
                    said += f" ({self.memory['error']:+.1%})"
            else:
                said += f"; not measured on {self._device} (no device allocator)"
            print(f"memtrain: {said}", file=sys.stderr)
