"""What a checkpoint holds beyond the model and optimizer, and how it is written and read back.

Every kind of run stores the same client state: the step, the data position, every rank's RNG
state, the plan and the recipe (plain data, so the file loads without memtrain's classes).
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Any

import torch

CHECKPOINT = "checkpoint.pt"  # single process and DDP: the unwrapped model, in train.out_dir
DS_CHECKPOINTS = "deepspeed"  # DeepSpeed: engine.save_checkpoint's folder under train.out_dir


def rng_state(device: torch.device) -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def restore_rng(state: dict[str, Any], device: torch.device, rank: int, world_size: int) -> None:
    """This rank's RNG state (rank 0's, where the checkpoint came from another world size)."""
    ranks = state.get("rng_ranks")
    mine = ranks[rank] if ranks and len(ranks) == world_size else state["rng"]
    torch.set_rng_state(mine["torch"])
    random.setstate(mine["python"])
    if device.type == "cuda" and "cuda" in mine:
        torch.cuda.set_rng_state(mine["cuda"], device)


def save_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    """Write atomically: a crash mid-write leaves the previous checkpoint intact."""
    tmp = path.with_suffix(".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)


def trim_metrics(path: Path, last_step: int) -> None:
    """Drop lines a killed run logged after its last checkpoint (they are run again)."""
    if not path.exists():
        return
    kept = [line for line in path.read_text().splitlines() if json.loads(line)["step"] <= last_step]
    path.write_text("".join(line + "\n" for line in kept))
