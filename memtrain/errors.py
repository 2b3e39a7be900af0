"""User-facing errors.

Everything a user can get wrong (an unknown model, a malformed config, an impossible budget)
raises :class:`MemtrainError`. The CLI prints its message on one line and exits with status 2,
so bad input never ends in a traceback from deep inside PyTorch.
"""

from __future__ import annotations

import os
from pathlib import Path


class MemtrainError(Exception):
    """An error caused by the user's input, with a message that says what to do about it."""


class UnknownModelError(MemtrainError):
    """A model name that is neither a preset nor a path to a config."""


class ConfigError(MemtrainError):
    """A config file or recipe that cannot be read or has invalid values."""


def check_schema(data: dict, schema: str, version: int, what: str, remedy: str) -> None:
    """Refuse a file that is not ``schema`` at ``version`` (``what``: "plan", "profile", ...;
    ``remedy``: the command that writes a current one)."""
    if not isinstance(data, dict) or data.get("schema") != schema:
        raise ConfigError(f"not a memtrain {what} (missing schema {schema!r})")
    if data.get("schema_version") != version:
        raise ConfigError(
            f"{what} schema version {data.get('schema_version')} is not supported "
            f"(this memtrain reads version {version}); re-run {remedy}"
        )


def check_output_path(path: str | os.PathLike, flag: str) -> Path:
    """Refuse an output file that cannot be written (a folder, a missing or read-only folder,
    a read-only file) before any work is done; ``flag`` names it in the message (``--out``)."""
    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
    if path.is_dir():
        raise MemtrainError(f"{flag}: {path} is a folder; give a file name, e.g. {path / 'out'}")
    if not parent.is_dir():
        raise MemtrainError(f"{flag}: folder {parent} does not exist; create it or pick another")
    writable = os.access(path, os.W_OK) if path.exists() else os.access(parent, os.W_OK | os.X_OK)
    if not writable:
        raise MemtrainError(f"{flag}: cannot write {path} (permission denied); pick another file")
    return path
