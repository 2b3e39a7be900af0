"""Make Hugging Face causal LMs compute their training loss with the fused kernel.

``patch_causal_lm_loss(model)`` swaps the model's ``forward`` for one that, whenever ``labels``
are given, runs the decoder, then feeds its last hidden states and the LM head's weight to
:func:`linear_cross_entropy` (shifted, ``ignore_index=-100``, Gemma 2's final logit softcap
honoured), and returns the loss with ``logits=None``: the batch x sequence x vocabulary logits are
never built. Without labels (generation, evaluation) the stock forward runs unchanged.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch

from memtrain.errors import MemtrainError

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2")
_STOCK_FORWARD = "_memtrain_stock_forward"


def _check(model: torch.nn.Module) -> None:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise MemtrainError(
            f"patch_causal_lm_loss supports {', '.join(SUPPORTED_MODEL_TYPES)} causal LMs, "
            f"got model_type={model_type!r}"
        )
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None or not hasattr(model, "model"):
        raise MemtrainError(
            f"{type(model).__name__} has no decoder (.model) and LM head; pass a *ForCausalLM model"
        )


def patch_causal_lm_loss(model: torch.nn.Module, **loss_options: Any) -> torch.nn.Module:
    """Route ``model(..., labels=...)`` through the fused loss; returns the same model.

    ``loss_options`` go to :func:`linear_cross_entropy` (e.g. ``grad_filter=True``,
    ``impl="torch"``). ``num_items_in_batch`` (gradient accumulation in the HF Trainer) is honoured
    as in the stock loss: summed and divided by it. Undo with :func:`unpatch_causal_lm_loss`.
    """
    from memtrain.kernels.cross_entropy import linear_cross_entropy

    _check(model)
    if hasattr(model, _STOCK_FORWARD):
        return model
    stock_forward = model.forward
    softcap = getattr(model.config, "final_logit_softcapping", None)
    # The patched forward lives in the model's __dict__; holding the model weakly (and its class
    # forward, not a bound method) keeps that from being a reference cycle, so a dropped model
    # frees its GPU memory at once instead of at the next garbage collection.
    model_ref = weakref.ref(model)
    if "forward" not in model.__dict__:
        class_forward = type(model).forward

        def stock_forward(*args, **kwargs):
            return class_forward(model_ref(), *args, **kwargs)

    def forward(input_ids=None, *args, labels=None, **kwargs):
        self = model_ref()
        if labels is None:
            return stock_forward(input_ids, *args, **kwargs)
        from transformers.modeling_outputs import CausalLMOutputWithPast

        if args:
            raise MemtrainError(
                "with the fused loss, pass model inputs other than input_ids by name"
            )
        num_items = kwargs.pop("num_items_in_batch", None)
        kwargs.pop("logits_to_keep", None)
        outputs = self.model(input_ids=input_ids, **kwargs)
        hidden = outputs.last_hidden_state
        head = self.get_output_embeddings()
        reduction = "sum" if num_items is not None else "mean"
        loss = linear_cross_entropy(
            hidden, head.weight, labels.to(hidden.device), bias=getattr(head, "bias", None),
            softcap=softcap, reduction=reduction, shift=True, **loss_options,
        )  # fmt: skip
        if num_items is not None:
            loss = loss / num_items
        extra = {
            key: value
            for key, value in outputs.items()
            if key != "last_hidden_state" and key in CausalLMOutputWithPast.__dataclass_fields__
        }
        return CausalLMOutputWithPast(loss=loss, logits=None, **extra)

    setattr(model, _STOCK_FORWARD, stock_forward)
    model.forward = forward
    return model


def unpatch_causal_lm_loss(model: torch.nn.Module) -> torch.nn.Module:
    """Restore the stock ``forward`` replaced by :func:`patch_causal_lm_loss`."""
    if hasattr(model, _STOCK_FORWARD):
        del model.forward
        delattr(model, _STOCK_FORWARD)
    return model
