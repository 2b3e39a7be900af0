"""Recipes: YAML files that say what to train, on what data, how, and under which plan.

Every key is checked against :data:`SCHEMA`; an unknown key is an error that names the closest
known one, so a typo never silently falls back to a default. ``key=value`` overrides from the
command line use dotted paths (``train.steps=5``) and YAML values.
"""

from __future__ import annotations

import copy
import difflib
from pathlib import Path
from typing import Any

import yaml

from memtrain.errors import ConfigError

# section -> key -> (accepted types, default). ``None`` default: optional, unset.
_NUM = (int, float)
SCHEMA: dict[str, dict[str, tuple[tuple[type, ...], Any]]] = {
    "dry_run": {
        "model": ((str,), None),
        "seq": ((int,), 131072),
        "batch": ((int,), 1),
        "dtype": ((str,), "bf16"),
        "optimizer": ((str, list), "adamw"),
        "hardware": ((str,), "h100-sxm-80g"),
        "gpu_budget": ((str, int), None),
        "cpu": ((str, int), None),
        "cxl": ((str, int), None),
        "nvme": ((str,), None),
        # One GPU of a multi-GPU run (memtrain.planner.distributed); the report is per GPU.
        "world_size": ((int,), 1),
        "zero_stage": ((int,), 0),
        "sequence_parallel": ((int,), 1),
        "only": ((bool,), False),  # stop after the dry run (no training section needed)
        "out": ((str,), None),  # write the dry-run plan here (for memtrain export-deepspeed)
    },
    "model": {
        "preset": ((str,), None),
        "config": ((str,), None),
        "checkpoint": ((str,), None),
        "dtype": ((str,), "fp32"),
        "overrides": ((dict,), {}),
    },
    "data": {
        "source": ((str,), "generated"),
        "path": ((str, list), None),
        "text_field": ((str,), "text"),
        "seq": ((int,), 256),
        "batch": ((int,), 1),
        "seed": ((int,), 0),
    },
    "optimizer": {
        "name": ((str,), "adamw"),
        "lr": (_NUM, 1e-3),
        "weight_decay": (_NUM, 0.0),
        "options": ((dict,), {}),
    },
    "schedule": {
        "steps": ((int,), 20),
        "warmup": ((int,), 0),
        "decay": ((str,), "cosine"),
        "min_lr_ratio": (_NUM, 0.1),
        "grad_clip": (_NUM, 1.0),
    },
    "plan": {
        "enabled": ((bool,), True),
        "hardware": ((str,), "h100-sxm-80g"),
        "gpu_budget": ((str, int), None),
        "gpu_budget_fraction": (_NUM, None),
        "cpu": ((str, int), None),
        "cxl": ((str, int), None),
        "nvme": ((str,), None),
        "fused_loss": ((bool,), True),
    },
    "train": {
        "device": ((str,), "auto"),
        "seed": ((int,), 0),
        "log_every": ((int,), 1),
        "checkpoint_every": ((int,), 0),
        "out_dir": ((str,), "runs/memtrain"),
        "resume": ((bool,), True),
        "step_in_backward": ((bool,), False),
        "threads": ((int,), None),
        # Cap this process's CUDA allocator (e.g. 24GiB: a 24 GB card's run checked on a bigger
        # one); the plan gets no more GPU than this. Accepted and not enforced on the CPU.
        "gpu_memory_limit": ((str, int), None),
    },
    "launcher": {
        "kind": ((str,), "single"),
        "nproc": ((int,), 1),
        "zero_stage": ((int,), None),
    },
}
TOP_LEVEL = {"name": ((str,), "recipe"), "description": ((str,), "")}

CHOICES = {
    ("data", "source"): ("generated", "text", "jsonl", "stdlib"),
    ("schedule", "decay"): ("cosine", "linear", "constant"),
    ("launcher", "kind"): ("single", "torchrun", "deepspeed"),
}
POSITIVE = {
    ("data", "seq"),
    ("data", "batch"),
    ("schedule", "steps"),
    ("dry_run", "seq"),
    ("dry_run", "batch"),
    ("dry_run", "world_size"),
    ("dry_run", "sequence_parallel"),
    ("train", "log_every"),
    ("launcher", "nproc"),
}


def _number(text: str) -> float | str:
    try:
        return float(text)
    except ValueError:
        return text


def _suggest(word: str, options) -> str:
    close = difflib.get_close_matches(word, list(options), n=1, cutoff=0.5)
    return f"; did you mean {close[0]!r}?" if close else f"; known: {', '.join(sorted(options))}"


def validate(raw: dict[str, Any], source: str = "recipe") -> dict[str, Any]:
    """Check keys, types and choices; return the recipe with every default filled in."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: a recipe is a YAML mapping of sections")
    allowed = set(SCHEMA) | set(TOP_LEVEL)
    for key in raw:
        if key not in allowed:
            raise ConfigError(f"{source}: unknown section {key!r}{_suggest(key, allowed)}")
    recipe: dict[str, Any] = {k: raw.get(k, default) for k, (_, default) in TOP_LEVEL.items()}
    for section, keys in SCHEMA.items():
        given = raw.get(section)
        if given is None:
            if section == "dry_run":
                recipe[section] = None
                continue
            given = {}
        if not isinstance(given, dict):
            raise ConfigError(f"{source}: section {section!r} must be a mapping")
        out = {}
        for key, value in given.items():
            if key not in keys:
                raise ConfigError(f"{source}: unknown key {section}.{key}{_suggest(key, keys)}")
            types, _ = keys[key]
            if isinstance(value, str) and float in types:
                value = _number(value)  # YAML reads 3e-4 as text
            if value is not None and not isinstance(value, types):
                names = " or ".join(t.__name__ for t in types)
                raise ConfigError(f"{source}: {section}.{key} must be {names}, got {value!r}")
            if isinstance(value, bool) and bool not in types:
                raise ConfigError(f"{source}: {section}.{key} must be a number, got {value!r}")
            out[key] = value
        for key, (_, default) in keys.items():
            out.setdefault(key, copy.deepcopy(default))
        for (sec, key), options in CHOICES.items():
            if sec == section and out[key] not in options:
                raise ConfigError(
                    f"{source}: {section}.{key} is {out[key]!r}; use one of {', '.join(options)}"
                )
        for sec, key in POSITIVE:
            if sec == section and (out[key] is None or out[key] <= 0):
                raise ConfigError(f"{source}: {section}.{key} must be positive, got {out[key]!r}")
        recipe[section] = out
    model = recipe["model"]
    sources = [k for k in ("preset", "config", "checkpoint") if model[k]]
    dry_only = recipe["dry_run"] is not None and recipe["dry_run"]["only"]
    if len(sources) != 1 and not (dry_only and not sources):
        raise ConfigError(
            f"{source}: model needs exactly one of preset, config or checkpoint (got "
            f"{', '.join(sources) or 'none'})"
        )
    if recipe["data"]["source"] in ("text", "jsonl") and not recipe["data"]["path"]:
        raise ConfigError(f"{source}: data.source {recipe['data']['source']} needs data.path")
    if recipe["dry_run"] is not None and not recipe["dry_run"]["model"]:
        raise ConfigError(f"{source}: dry_run needs a model (a preset name or config path)")
    fraction = recipe["plan"]["gpu_budget_fraction"]
    if fraction is not None and not 0 < fraction <= 1:
        raise ConfigError(f"{source}: plan.gpu_budget_fraction must be in (0, 1], got {fraction}")
    return recipe


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``section.key=value`` overrides (values parsed as YAML) to a raw recipe."""
    raw = copy.deepcopy(raw)
    for item in overrides:
        path, sep, text = item.partition("=")
        if not sep or not path:
            raise ConfigError(f"cannot read override {item!r}: use section.key=value")
        parts = path.split(".")
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError:
            value = text
        node = raw
        for part in parts[:-1]:
            if node.get(part) is None:
                node[part] = {}
            node = node[part]
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {part!r} is not a section")
        node[parts[-1]] = value
    return raw


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> dict[str, Any]:
    """Read, override and validate a recipe file."""
    path = Path(path)
    if not path.exists():
        bundled = Path(__file__).resolve().parents[2] / "recipes" / path.name
        hint = f" (there is {bundled})" if bundled.exists() and bundled != path else ""
        raise ConfigError(f"{path}: no such recipe{hint}")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        first = str(exc).strip().splitlines()[0]
        raise ConfigError(f"{path}: not valid YAML ({first})") from None
    return validate(apply_overrides(raw, overrides or []), str(path))
