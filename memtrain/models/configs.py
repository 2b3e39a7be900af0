"""Find and validate a model config: a preset name or a path to a local ``config.json``."""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Any

from memtrain.errors import ConfigError, UnknownModelError

_PRESET_DIR = "presets"


def preset_names() -> list[str]:
    """Names of the configs shipped with memtrain (``llama-3.1-8b``, ``gpt2``, ...)."""
    folder = resources.files("memtrain.models") / _PRESET_DIR
    return sorted(p.name[: -len(".json")] for p in folder.iterdir() if p.name.endswith(".json"))


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read ({exc.strerror})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a model config must be a JSON object")
    return data


def load_config_dict(name_or_path: str) -> tuple[str, dict[str, Any]]:
    """Return ``(display name, raw config dict)`` for a preset name or a config path."""
    lowered = name_or_path.lower()
    if lowered in preset_names():
        folder = resources.files("memtrain.models") / _PRESET_DIR
        data = json.loads((folder / f"{lowered}.json").read_text())
        data.pop("_memtrain_source", None)
        return lowered, data
    path = Path(name_or_path)
    if path.is_dir():
        path = path / "config.json"
    if path.suffix == ".json" or path.exists():
        if not path.exists():
            raise ConfigError(f"{path}: no such file")
        return path.parent.name or str(path), _read_json(path)
    raise UnknownModelError(
        f"unknown model {name_or_path!r}; presets: {', '.join(preset_names())} "
        "(or give a path to a local config.json)"
    )


_REQUIRED_POSITIVE = ("vocab_size",)


def load_config(name_or_path: str):
    """Build a ``transformers`` config object from a preset or a local ``config.json``.

    Errors in the file (unknown ``model_type``, missing or non-positive sizes) are reported in
    one line naming the file and the key.
    """
    try:
        from transformers import AutoConfig
    except ImportError:  # pragma: no cover - exercised only without the hf extra
        raise ConfigError(
            "building Hugging Face models needs transformers: pip install 'memtrain[hf]'"
        ) from None
    name, data = load_config_dict(name_or_path)
    model_type = data.get("model_type")
    if not model_type:
        raise ConfigError(f'{name}: config has no \'model_type\' (e.g. "llama", "qwen2", "gpt2")')
    data = dict(data)
    data.pop("model_type")
    try:
        config = AutoConfig.for_model(model_type, **data)
    except (ValueError, KeyError, TypeError) as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"{name}: invalid config ({first_line})") from None
    for key in _REQUIRED_POSITIVE + ("hidden_size", "num_hidden_layers", "num_attention_heads"):
        value = getattr(config, key, None)
        if value is None:
            continue
        if not isinstance(value, int) or value <= 0:
            raise ConfigError(f"{name}: '{key}' must be a positive integer, got {value!r}")
    config.name_or_path = name
    return config
