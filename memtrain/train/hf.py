"""Hugging Face ``Trainer`` integration: one call builds a Trainer that trains under a plan.

    trainer = memtrain.train.hf.planned_trainer(model, args, train_dataset=ds, seq=4096,
                                                hardware="h100-sxm-80g", optimizer="galore:rank=256")
    trainer.train()

The plan, the fused loss and the optimizer come from :func:`memtrain.prepare`; the Trainer gets
that optimizer (and its own learning-rate schedule on top of it), and the plan is removed when
training ends.
"""

from __future__ import annotations

from typing import Any

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
