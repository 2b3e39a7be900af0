"""The Hugging Face Trainer trains under a plan, and the model is restored afterwards."""

from __future__ import annotations

import torch

from memtrain.train.hf import planned_trainer

SEQ, BATCH = 32, 2


class FixedLengthTokens(torch.utils.data.Dataset):
    """Counting sequences (each token is the previous plus one): learnable in a few steps."""

    def __init__(self, count: int, vocab: int):
        generator = torch.Generator().manual_seed(0)
        starts = torch.randint(0, vocab, (count, 1), generator=generator)
        self.ids = (starts + torch.arange(SEQ)) % vocab

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[index], "labels": self.ids[index]}


def _model():
    from memtrain.train.recipe import validate
    from memtrain.train.runner import build_model
    from tests.train.test_run_and_resume import TINY

    return build_model(validate(TINY).model, torch.device("cpu"))


def forward_hooks(model) -> int:
    """Forward and pre-forward hooks on every module (a removed plan leaves none of its own)."""
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def training_args(tmp_path, *, max_steps: int, learning_rate: float, **extra):
    """Trainer arguments for a short CPU run with no checkpoints, reports or workers."""
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=BATCH,
        max_steps=max_steps,
        learning_rate=learning_rate,
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        dataloader_num_workers=0,
        **extra,
    )


def test_trainer_trains_under_a_plan_and_restores_the_model(tmp_path):
    model = _model()
    probe = torch.randint(0, 256, (1, SEQ))
    with torch.no_grad():
        before_logits = model(input_ids=probe).logits.clone()
    hooks_before = forward_hooks(model)
    args = training_args(tmp_path, max_steps=6, learning_rate=1e-2)
    trainer = planned_trainer(
        model,
        args,
        seq=SEQ,
        optimizer="galore:rank=8,update_proj_gap=3",
        train_dataset=FixedLengthTokens(64, 256),
        plan_options={"gpu_budget_fraction": 0.7},
    )
    plan = trainer.memtrain.plan
    assert any(layer.recompute > 0 or any(layer.swap.values()) for layer in plan.layers)
    assert type(trainer.optimizer).__name__ == "GaLoreAdamW"
    result = trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 6 and losses[-1] < losses[0]
    assert result.global_step == 6
    # Training changed the weights; removing the plan left no hooks and the stock forward.
    hooks_after = forward_hooks(model)
    assert hooks_after == hooks_before
    with torch.no_grad():
        logits = model(input_ids=probe).logits
    assert logits is not None and not torch.equal(logits, before_logits)
