"""Keep a mixture of experts' router outputs whole when its layer runs in token chunks.

Hugging Face models collect each router's logits with forward hooks, one entry per router call,
and the load-balancing (auxiliary) loss weighs them with the batch's padding mask, which has one
row per token of the whole sequence. A layer run in sequence chunks calls its router once per
chunk; this puts those entries back together, in token order, as the one entry the stock layer
makes, so the auxiliary loss is the stock model's with or without padding.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


def active_collector() -> dict | None:
    try:
        from transformers.utils.output_capturing import _active_collector
    except ImportError:  # other transformers versions: nothing collected this way
        return None
    collected = _active_collector.get()
    return collected if isinstance(collected, dict) else None


@contextlib.contextmanager
def whole_router_outputs(batch: int) -> Iterator[None]:
    """Around one layer's chunked forward over a batch of ``batch`` rows: entries collected
    during it that are 2-D per-token tensors become one, chunks joined along the sequence."""
    collected = active_collector()
    before = {k: len(v) for k, v in (collected or {}).items() if isinstance(v, list)}
    yield
    if collected is None:
        return
    for key, start in before.items():
        entries = collected[key]
        new = entries[start:]
        if len(new) < 2 or not all(
            isinstance(t, torch.Tensor) and t.dim() == 2 and t.shape[0] % batch == 0 for t in new
        ):
            continue
        pieces = [t.reshape(batch, -1, t.shape[-1]) for t in new]
        entries[start:] = [torch.cat(pieces, dim=1).reshape(-1, new[0].shape[-1])]
