"""What a checkpoint holds beyond the model and optimizer, and how it is written and read back.

Every kind of run stores the same client state: the step, the data position, every rank's RNG
state, the plan and the recipe (plain data, so the file loads without memtrain's classes).

Single process and DDP (rank 0 writes), in ``train.out_dir``::

    checkpoint-<step>.pt          the last train.keep_checkpoints (torch.save of the client state,
    checkpoint-<step>.pt.sha256   the model and the optimizer) and the SHA-256 of each file
    checkpoint.pt                 the newest again (a hard link; a copy where links fail)
    checkpoint.pt.sha256

Each payload is written to a temporary file and fsynced, its hash (taken while writing) goes
beside it, then it is renamed into place, and only then are older ones pruned: a crash at any
point (``kill -9`` included) leaves the previous checkpoints intact, and a resume removes the
temporary file it left. :mod:`memtrain.train.async_checkpoint` runs the same write in a
background thread. On resume the newest checkpoint whose bytes match its hash is loaded; a
damaged newer one is named and skipped.
The stored recipe and plan are compared with this run's: a change that breaks the run (data,
model, optimizer, where optimizer states live, world size) is refused, others are noted.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from memtrain.errors import MemtrainError

CHECKPOINT = "checkpoint.pt"  # single process and DDP: the unwrapped model, in train.out_dir
DS_CHECKPOINTS = "deepspeed"  # DeepSpeed: engine.save_checkpoint's folder under train.out_dir
DS_CLIENT = "memtrain.json"  # DeepSpeed: step, world size, recipe and plan beside each tag
FSDP_CHECKPOINTS = "fsdp"  # FSDP2: a torch.distributed.checkpoint folder per step<N> in here
FSDP_CLIENT = "memtrain.pt"  # FSDP2: step, data position, RNG, recipe and plan in each step<N>
KEEP = 2  # numbered checkpoints kept unless train.keep_checkpoints says otherwise
_NUMBERED = re.compile(r"checkpoint-(\d+)\.pt")
_CHUNK = 1 << 24
# Test hook: seconds to pause at each stage of a write, so a fault trial's kill lands inside it.
PAUSE_ENV = "MEMTRAIN_CHECKPOINT_PAUSE_S"

# Recipe keys (dotted, or a section's prefix) whose change breaks a resumed run: other data,
# another model or optimizer state layout, another world size. Every other change is noted.
BREAKING = (
    "model.",
    "data.",
    "optimizer.name",
    "optimizer.options",
    "launcher.nproc",
    "launcher.zero_stage",
    "launcher.sequence_parallel",
)


class CheckpointDamaged(MemtrainError):
    """A checkpoint file that is empty, truncated, altered or not a checkpoint at all."""


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


def hash_file(path: Path) -> Path:
    """The file that holds ``path``'s SHA-256 (``sha256sum`` format)."""
    return path.with_name(path.name + ".sha256")


def numbered(out_dir: Path) -> list[tuple[int, Path]]:
    """``checkpoint-<step>.pt`` files in ``out_dir``, newest first."""
    found = []
    for path in out_dir.glob("checkpoint-*.pt"):
        match = _NUMBERED.fullmatch(path.name)
        if match:
            found.append((int(match[1]), path))
    return sorted(found, reverse=True)


def _pause() -> None:
    seconds = float(os.environ.get(PAUSE_ENV) or 0)
    if seconds > 0:
        time.sleep(seconds)


class _Hashing:
    """A file that hashes what is written to it (pausing after its first bytes, under the
    fault-trial hook, so a kill can tear the temporary file)."""

    def __init__(self, file) -> None:
        self.file, self.sha, self.written = file, hashlib.sha256(), 0

    def write(self, data) -> int:
        self.sha.update(data)
        count = self.file.write(data)
        if not self.written:
            self.file.flush()
            _pause()
        self.written += count
        return count

    def flush(self) -> None:
        self.file.flush()


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as file:
        file.write(text)
        file.flush()
        os.fsync(file.fileno())
    os.replace(tmp, path)


def _sync_dir(folder: Path) -> None:
    """Make renames in ``folder`` durable (a power cut, not only a killed process)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems cannot sync a directory
    finally:
        os.close(fd)


def save_checkpoint(path: Path, payload: dict[str, Any], keep: int = KEEP) -> Path:
    """Write ``checkpoint-<step>.pt`` and its hash beside ``path`` atomically, make ``path`` the
    newest, keep the ``keep`` newest numbered ones (and none past this step: a run restarted
    from an older checkpoint drops the future it left). Returns the numbered file."""
    out_dir, step = path.parent, int(payload["step"])
    target = out_dir / f"checkpoint-{step}.pt"
    tmp = target.with_name(target.name + ".tmp")
    try:
        with open(tmp, "wb") as file:
            writer = _Hashing(file)
            torch.save(payload, writer)
            file.flush()
            os.fsync(file.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)  # a full disk leaves no half file behind
        raise
    digest = writer.sha.hexdigest()
    _write_text(hash_file(target), f"{digest}  {target.name}\n")
    _pause()
    os.replace(tmp, target)
    _sync_dir(out_dir)
    _pause()
    link = path.with_name(path.name + ".tmp")
    link.unlink(missing_ok=True)
    try:
        os.link(target, link)
    except OSError:
        shutil.copyfile(target, link)
    _write_text(hash_file(path), f"{digest}  {path.name}\n")
    os.replace(link, path)
    _sync_dir(out_dir)
    _pause()
    found = numbered(out_dir)
    kept = [p for s, p in found if s <= step][: max(1, keep)]
    for _, old in found:
        if old not in kept:
            old.unlink(missing_ok=True)
            hash_file(old).unlink(missing_ok=True)
    return target


def checkpoint_files(path: Path) -> list[Path]:
    """The checkpoints a resume may read, newest first: the numbered ones, and ``path`` where it
    is not one of them (a checkpoint from before numbering, or a copy of the newest)."""
    files = [p for _, p in numbered(path.parent)]
    if path.exists() and not any(_same(path, p) for p in files):
        files.insert(min(1, len(files)), path)
    return files


def clear_partial(out_dir: Path, note: Callable[[str], None]) -> None:
    """Remove temporary files a run killed inside a checkpoint write left behind (never read:
    only a complete, fsynced file is renamed into place). Called before any writer starts."""
    for tmp in sorted(out_dir.glob("checkpoint*.tmp")):
        tmp.unlink(missing_ok=True)
        if tmp.name.endswith(".pt.tmp"):
            note(f"removed {tmp.name}, a checkpoint write the previous run did not finish")


def _same(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _sha256(path: Path) -> str:
    sha = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(_CHUNK):
            sha.update(chunk)
    return sha.hexdigest()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def read_checkpoint(path: Path, device: torch.device) -> tuple[dict[str, Any], bool]:
    """The client state in ``path`` after checking its bytes against its hash; returns it and
    whether a hash was there to check (checkpoints written before hashes have none)."""
    side = hash_file(path)
    if path.stat().st_size == 0:
        raise CheckpointDamaged(f"checkpoint {path} is empty")
    verified = side.exists()
    if verified:
        words = side.read_text(errors="replace").split()
        if not words or _sha256(path) != words[0]:
            raise CheckpointDamaged(
                f"checkpoint {path} is damaged: its SHA-256 differs from {side.name}"
            )
    try:
        state = torch.load(path, map_location=device, weights_only=False)
    except Exception as exc:  # noqa: BLE001 - anything torch.load raises means unreadable
        raise CheckpointDamaged(f"checkpoint {path} is not readable ({_first_line(exc)})") from None
    missing = [
        k for k in ("step", "model", "optimizer") if not isinstance(state, dict) or k not in state
    ]
    if missing:
        raise CheckpointDamaged(f"checkpoint {path} is not a memtrain checkpoint (no {missing[0]})")
    return state, verified


def newest_good(
    path: Path, device: torch.device, note: Callable[[str], None]
) -> tuple[Path, dict[str, Any]] | None:
    """The newest checkpoint of ``path``'s run that reads back intact (None: there is none
    at all). A damaged newer one is named in a note; when all are damaged, one line says so."""
    files = checkpoint_files(path)
    damaged: list[CheckpointDamaged] = []
    for candidate in files:
        try:
            state, verified = read_checkpoint(candidate, device)
        except CheckpointDamaged as exc:
            damaged.append(exc)
            continue
        if damaged:
            note(f"{damaged[0]}; resuming from the newest good one, {candidate}")
        if not verified:
            note(f"checkpoint {candidate} has no {hash_file(candidate).name}: loaded unverified")
        return candidate, state
    if not damaged:
        return None
    more = f" ({len(damaged) - 1} older ones damaged too)" if len(damaged) > 1 else ""
    raise CheckpointDamaged(
        f"{damaged[0]}{more}; no good checkpoint to resume from: delete it or set "
        "train.resume=false"
    )


def _plain(value: Any) -> Any:
    """JSON's view of ``value`` (tuples are lists), as a DeepSpeed checkpoint stores it."""
    return json.loads(json.dumps(value, default=str))


def _keys(recipe: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for section, value in recipe.items():
        if isinstance(value, dict):
            for key, item in value.items():
                out[f"{section}.{key}"] = item
        else:
            out[section] = value
    return out


def _difference(key: str, old: Any, new: Any) -> tuple[str, Any, Any]:
    """The first differing entry of two values (a dict's own key named)."""
    if isinstance(old, dict) and isinstance(new, dict):
        for sub in [*old, *(k for k in new if k not in old)]:
            if old.get(sub, "unset") != new.get(sub, "unset"):
                return _difference(f"{key}.{sub}", old.get(sub, "unset"), new.get(sub, "unset"))
    return key, old, new


def _state_places(plan: dict[str, Any] | None) -> dict[str, str]:
    layers = (plan or {}).get("layers") or []
    return {layer["name"]: layer.get("optimizer", "gpu") for layer in layers}


def compare_resume(
    stored: dict[str, Any], recipe: dict[str, Any], plan: dict[str, Any] | None, world_size: int
) -> tuple[str | None, list[str]]:
    """What stops a run from resuming ``stored`` (one line, or None) and notes on the changes
    that do not. ``recipe`` is ``dataclasses.asdict`` of this run's, ``plan`` its plan's dict."""
    notes: list[str] = []
    if stored.get("recipe") is None:
        notes.append("the checkpoint stores no recipe: nothing compared")
    else:
        old, new = _keys(_plain(stored["recipe"])), _keys(_plain(recipe))
        for key, value in new.items():
            if key not in old or old[key] == value:
                continue
            name, was, now = _difference(key, old[key], value)
            if key.startswith(BREAKING):
                return f"{name} was {was!r}, now {now!r}", notes
            notes.append(f"{name} changed since the checkpoint: {was!r} -> {now!r}")
    if "plan" in stored:
        before, after = _state_places(stored["plan"]), _state_places(plan)
        for name in [*before, *(k for k in after if k not in before)]:
            was, now = before.get(name, "gpu"), after.get(name, "gpu")
            if was != now:
                return f"the plan keeps {name}'s optimizer states on {now}, not {was}", notes
    saved = stored.get("world_size", 1)
    if saved != world_size:
        return f"world size was {saved}, now {world_size}", notes
    return None, notes


def trim_metrics(path: Path, last_step: int) -> None:
    """Drop lines a killed run logged after its last checkpoint (they are run again)."""
    if not path.exists():
        return
    kept = [line for line in path.read_text().splitlines() if json.loads(line)["step"] <= last_step]
    path.write_text("".join(line + "\n" for line in kept))
