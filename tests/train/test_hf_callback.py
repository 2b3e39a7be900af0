"""MemtrainCallback: an existing Trainer (its own optimizer) trains under a plan applied at
on_train_begin and removed at on_train_end, with the predicted peak reported."""

from __future__ import annotations

import pytest

from memtrain.errors import MemtrainError
from memtrain.train.hf import MemtrainCallback
from tests.train.test_hf_trainer import (
    SEQ,
    FixedLengthTokens,
    _model,
    forward_hooks,
    training_args,
)


def _args(tmp_path, **extra):
    return training_args(tmp_path, max_steps=8, learning_rate=3e-3, **extra)


class _Spy(MemtrainCallback):
    """Records what the model looked like during training."""

    def on_step_end(self, args, state, control, model=None, **kwargs):
        summary = self.prepared.summary()
        moved = bool(summary["layers_swapped"] or summary["layers_recomputed"])
        self.seen = (hasattr(model, "_memtrain_stock_forward"), forward_hooks(model), moved)


def test_callback_plans_the_trainers_model_and_removes_the_plan(tmp_path, capsys):
    from transformers import Trainer

    model = _model()
    hooks_before = forward_hooks(model)
    callback = _Spy(seq=SEQ, gpu_budget_fraction=0.8)
    trainer = Trainer(model=model, args=_args(tmp_path), train_dataset=FixedLengthTokens(64, 256))
    trainer.add_callback(callback)
    trainer.train()

    fused, hooks_during, moved = callback.seen
    assert fused and hooks_during > hooks_before, "the plan was not installed during training"
    assert moved, "a 0.8 x budget must make the plan swap or recompute something"
    inner = getattr(trainer.optimizer, "optimizer", trainer.optimizer)  # AcceleratedOptimizer
    assert type(inner).__name__ == "AdamW"  # the Trainer kept its own optimizer
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 8 and sum(losses[-3:]) < sum(losses[:3])
    # Removed at the end: no hooks, the stock forward.
    assert forward_hooks(model) == hooks_before and not hasattr(model, "_memtrain_stock_forward")
    assert callback.prepared is None
    memory = callback.memory
    assert memory["predicted_gpu_peak_bytes"] > 0
    assert memory["measured_gpu_peak_bytes"] is None  # a CPU has no device allocator
    last = trainer.state.log_history[-1]
    assert last["memtrain_predicted_gpu_peak_bytes"] == memory["predicted_gpu_peak_bytes"]
    err = capsys.readouterr().err
    assert "memtrain: predicted GPU peak" in err and "not measured on cpu" in err


def test_callback_refuses_the_trainers_own_checkpointing(tmp_path):
    from transformers import Trainer

    args = _args(tmp_path, gradient_checkpointing=True)
    trainer = Trainer(model=_model(), args=args, train_dataset=FixedLengthTokens(8, 256))
    trainer.add_callback(MemtrainCallback(seq=SEQ))
    with pytest.raises(MemtrainError, match="gradient_checkpointing"):
        trainer.train()


def test_trainer_optimizer_names_map_to_profiled_states():
    from types import SimpleNamespace

    from memtrain.train.hf import _trainer_optimizer_spec

    assert _trainer_optimizer_spec(SimpleNamespace(optim="adamw_torch_fused")) == "adamw"
    assert _trainer_optimizer_spec(SimpleNamespace(optim="adafactor")) == "adafactor"
    assert _trainer_optimizer_spec(SimpleNamespace(optim="sgd")) == "sgd"
