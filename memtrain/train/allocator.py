"""The CUDA caching allocator setting a plan relies on.

Plans put each layer's saved tensors, chunks and host copies in differently sized blocks; with
the stock allocator the memory freed between them is stranded in segments of the wrong size, and
a plan that fits can run out of memory by fragmentation (an 80 GB GPU with 67 GiB allocated and
78 GiB reserved). Expandable segments map freed pages back into one growing segment, so what the
plan frees is reused. ``memtrain run`` sets it before CUDA starts; :func:`use_expandable_segments`
does the same for ``prepare()``, which may run after.
"""

from __future__ import annotations

import os

import torch

SETTING = "expandable_segments:True"
VARIABLES = ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF")


def _configured() -> str | None:
    for name in VARIABLES:
        value = os.environ.get(name, "")
        if "expandable_segments" in value:
            return f"{name}={value}"
    return None


def use_expandable_segments() -> str | None:
    """Turn expandable segments on for this process unless the user chose otherwise; returns a
    note for the report (None without CUDA)."""
    chosen = _configured()
    if chosen is not None:
        if "expandable_segments:true" in chosen.lower():
            return f"allocator: expandable segments on ({chosen})"
        return (
            f"allocator: {chosen} keeps expandable segments off; fragmentation is covered only by "
            "the plan's allocator margin"
        )
    if not torch.cuda.is_available():
        return None
    if not torch.cuda.is_initialized():
        os.environ["PYTORCH_CUDA_ALLOC_CONF"] = SETTING
        return "allocator: expandable segments on (set before CUDA started)"
    setter = getattr(torch.cuda.memory, "_set_allocator_settings", None)
    try:
        if setter is None:
            raise RuntimeError("this torch cannot change allocator settings at run time")
        setter(SETTING)
    except RuntimeError as exc:
        return (
            f"allocator: expandable segments could not be turned on ({exc}); fragmentation is "
            "covered only by the plan's allocator margin: set "
            f"PYTORCH_CUDA_ALLOC_CONF={SETTING} before CUDA starts"
        )
    return (
        "allocator: expandable segments on (set by prepare; memory freed between layers is reused)"
    )
