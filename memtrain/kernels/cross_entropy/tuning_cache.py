"""Launch settings chosen by timing, kept on disk so that a new process does not time a known
problem again (each timing compiles and runs every candidate: seconds per kernel and shape).

One JSON file, ``lce_tuning.json``, in ``$MEMTRAIN_CACHE_DIR``, else ``$XDG_CACHE_HOME/memtrain``,
else ``~/.cache/memtrain``. An entry is keyed by the device name, the memtrain, Triton and
PyTorch versions and the picker's own key (kernel, dtype, hidden size, options, chunk shape),
and holds the chosen settings in full: it is used only if they are still one of the candidates,
so a changed candidate list times again. Writes go to a temporary file that replaces the cache
in one rename, so a reader never sees half a file; a damaged or unreadable file is ignored
with a one-line warning and rewritten by the next choice.
"""

from __future__ import annotations

import json
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch

# Off: neither read nor write the file (benchmarks that must time every run).
ENABLED = True
FILE_NAME = "lce_tuning.json"
FORMAT = 1


def cache_dir() -> Path:
    """Where the file lives: ``MEMTRAIN_CACHE_DIR``, ``XDG_CACHE_HOME/memtrain`` or
    ``~/.cache/memtrain``."""
    override = os.environ.get("MEMTRAIN_CACHE_DIR")
    if override:
        return Path(override).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "memtrain"


def cache_path() -> Path:
    return cache_dir() / FILE_NAME


def device_name() -> str:
    """The name of the GPU the choice was timed on (timings do not carry across models)."""
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(torch.cuda.current_device())
    return "cpu"


def entry_key(key: tuple) -> str:
    """The file's key of a picker key: device, versions, then the picker's own key."""
    import triton

    import memtrain

    versions = (memtrain.__version__, triton.__version__, torch.__version__)
    return json.dumps([device_name(), *versions, *key], default=str)


def _warn(message: str, quiet: bool = False) -> None:
    if not quiet:
        warnings.warn(f"memtrain tuning cache: {message}", RuntimeWarning, stacklevel=3)


def _read(path: Path, quiet: bool = False) -> dict[str, Any]:
    """The file's entries; an absent file is empty, a damaged one empty with a warning (none
    when ``quiet``: the lookup before a store has warned already)."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return {}
    except (OSError, UnicodeDecodeError) as exc:
        _warn(f"ignoring unreadable {path} ({type(exc).__name__})", quiet)
        return {}
    try:
        data = json.loads(text)
    except ValueError:
        _warn(f"ignoring damaged {path} (not JSON)", quiet)
        return {}
    if not (isinstance(data, dict) and data.get("format") == FORMAT):
        _warn(f"ignoring {path} (not a format-{FORMAT} tuning cache)", quiet)
        return {}
    entries = data.get("entries")
    if not isinstance(entries, dict):
        _warn(f"ignoring damaged {path} (no entries)", quiet)
        return {}
    return entries


def lookup(key: tuple, candidates: list[dict]) -> dict | None:
    """The candidate stored for ``key``, or None (no entry, or settings no longer offered)."""
    if not ENABLED:
        return None
    entry = _read(cache_path()).get(entry_key(key))
    stored = entry.get("config") if isinstance(entry, dict) else None
    return next((c for c in candidates if c == stored), None)


def store(key: tuple, config: dict, timings: dict) -> None:
    """Add the choice for ``key`` to the file (atomically); failure to write only warns."""
    if not ENABLED:
        return
    path = cache_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        entries = _read(path, quiet=True)
        entries[entry_key(key)] = {"config": config, "ms": timings}
        text = json.dumps({"format": FORMAT, "entries": entries}, indent=1, sort_keys=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{FILE_NAME}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                handle.write(text)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    except OSError as exc:
        _warn(f"cannot write {path} ({type(exc).__name__}: {exc})")
