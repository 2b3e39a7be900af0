"""Recipes: YAML files that say what to train, on what data, how, and under which plan.

Each section is a frozen dataclass below and its fields are the schema: the accepted types come
from the annotations, choices and positives from field metadata. An unknown key is an error
that names the closest known one, so a typo never silently falls back to a default.
``key=value`` overrides from the command line use dotted paths (``train.steps=5``) and YAML
values.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from memtrain.errors import ConfigError
from memtrain.hardware.request import HardwareRequest


def _key(default: Any, choices: tuple[str, ...] = (), positive: bool = False):
    value = {"default_factory": dict} if default == {} else {"default": default}
    return field(**value, metadata={"choices": choices, "positive": positive})


@dataclass(frozen=True)
class DryRunSection(HardwareRequest):
    """Plan a large model without building it (its hardware fields from HardwareRequest)."""

    model: str | None = None
    seq: int = _key(131072, positive=True)
    batch: int = _key(1, positive=True)
    dtype: str = "bf16"
    optimizer: str | list[str] = "adamw"
    # One GPU of a multi-GPU run (memtrain.planner.distributed); the report is per GPU.
    world_size: int = _key(1, positive=True)
    zero_stage: int = 0
    sequence_parallel: int = _key(1, positive=True)
    only: bool = False  # stop after the dry run (no training section needed)
    out: str | None = None  # write the dry-run plan here (for memtrain export-deepspeed)


@dataclass(frozen=True)
class ModelSection:
    preset: str | None = None
    config: str | None = None
    checkpoint: str | None = None
    dtype: str = "fp32"
    overrides: dict[str, Any] = _key({})


@dataclass(frozen=True)
class DataSection:
    source: str = _key("generated", choices=("generated", "text", "jsonl", "stdlib"))
    path: str | list[str] | None = None
    text_field: str = "text"
    seq: int = _key(256, positive=True)
    batch: int = _key(1, positive=True)
    seed: int = 0


@dataclass(frozen=True)
class OptimizerSection:
    name: str = "adamw"
    lr: float = 1e-3
    weight_decay: float = 0.0
    options: dict[str, Any] = _key({})

    @property
    def spec(self) -> str:
        """``name:key=value,...``, as ``prepare()`` takes it."""
        options = ",".join(f"{k}={v}" for k, v in self.options.items())
        return self.name + (":" + options if options else "")


@dataclass(frozen=True)
class ScheduleSection:
    steps: int = _key(20, positive=True)
    warmup: int = 0
    decay: str = _key("cosine", choices=("cosine", "linear", "constant"))
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0


@dataclass(frozen=True)
class PlanSection(HardwareRequest):
    """The plan the model trains under (its hardware fields from HardwareRequest)."""

    enabled: bool = True
    gpu_budget_fraction: float | None = None
    fused_loss: bool = True


@dataclass(frozen=True)
class TrainSection:
    device: str = "auto"
    seed: int = 0
    log_every: int = _key(1, positive=True)
    checkpoint_every: int = 0
    out_dir: str = "runs/memtrain"
    resume: bool = True
    step_in_backward: bool = False
    threads: int | None = None
    # Cap this process's CUDA allocator (e.g. 24GiB: a 24 GB card's run checked on a bigger
    # one); the plan gets no more GPU than this. Accepted and not enforced on the CPU.
    gpu_memory_limit: str | int | None = None


@dataclass(frozen=True)
class LauncherSection:
    kind: str = _key("single", choices=("single", "torchrun", "deepspeed"))
    nproc: int = _key(1, positive=True)
    zero_stage: int | None = None


@dataclass(frozen=True)
class Recipe:
    name: str = "recipe"
    description: str = ""
    dry_run: DryRunSection | None = None  # no dry run unless the recipe has the section
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    optimizer: OptimizerSection = field(default_factory=OptimizerSection)
    schedule: ScheduleSection = field(default_factory=ScheduleSection)
    plan: PlanSection = field(default_factory=PlanSection)
    train: TrainSection = field(default_factory=TrainSection)
    launcher: LauncherSection = field(default_factory=LauncherSection)


def _types(hint: Any) -> tuple[type, ...]:
    """The types a YAML value may have for an annotation (``float`` takes ints too)."""
    union = typing.get_origin(hint) in (typing.Union, types.UnionType)
    out: list[type] = []
    for arg in typing.get_args(hint) if union else (hint,):
        if arg is not type(None):
            arg = typing.get_origin(arg) or arg
            out.extend((int, float) if arg is float else (arg,))
    return tuple(out)


SECTIONS = {
    name: _types(hint)[0]
    for name, hint in typing.get_type_hints(Recipe).items()
    if dataclasses.is_dataclass(_types(hint)[0])
}


def _suggest(word: str, options) -> str:
    close = difflib.get_close_matches(word, list(options), n=1, cutoff=0.5)
    return f"; did you mean {close[0]!r}?" if close else f"; known: {', '.join(sorted(options))}"


def _section(cls: type, name: str, given: dict[str, Any], source: str):
    hints, known = typing.get_type_hints(cls), {f.name: f for f in fields(cls)}
    values = {}
    for key, value in given.items():
        if key not in known:
            raise ConfigError(f"{source}: unknown key {name}.{key}{_suggest(key, known)}")
        accepted = _types(hints[key])
        if isinstance(value, str) and float in accepted:
            with contextlib.suppress(ValueError):
                value = float(value)  # YAML reads 3e-4 as text
        if value is not None and not isinstance(value, accepted):
            names = " or ".join(t.__name__ for t in accepted)
            raise ConfigError(f"{source}: {name}.{key} must be {names}, got {value!r}")
        if isinstance(value, bool) and bool not in accepted:
            raise ConfigError(f"{source}: {name}.{key} must be a number, got {value!r}")
        values[key] = value
    section = cls(**values)
    for key, spec in known.items():
        options, value = spec.metadata.get("choices"), getattr(section, key)
        if options and value not in options:
            raise ConfigError(
                f"{source}: {name}.{key} is {value!r}; use one of {', '.join(options)}"
            )
    for key, spec in known.items():
        value = getattr(section, key)
        if spec.metadata.get("positive") and (value is None or value <= 0):
            raise ConfigError(f"{source}: {name}.{key} must be positive, got {value!r}")
    return section


def validate(raw: dict[str, Any], source: str = "recipe") -> Recipe:
    """Check keys, types and choices; return the typed recipe with every default filled in."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: a recipe is a YAML mapping of sections")
    allowed = {f.name for f in fields(Recipe)}
    for key in raw:
        if key not in allowed:
            raise ConfigError(f"{source}: unknown section {key!r}{_suggest(key, allowed)}")
    values: dict[str, Any] = {k: raw[k] for k in allowed - set(SECTIONS) if k in raw}
    for name, cls in SECTIONS.items():
        given = raw.get(name)
        if given is None and name == "dry_run":
            continue
        if not isinstance(given, dict | None):
            raise ConfigError(f"{source}: section {name!r} must be a mapping")
        values[name] = _section(cls, name, given or {}, source)
    recipe = Recipe(**values)
    model, data, dry = recipe.model, recipe.data, recipe.dry_run
    sources = [k for k in ("preset", "config", "checkpoint") if getattr(model, k)]
    if len(sources) != 1 and not (dry is not None and dry.only and not sources):
        raise ConfigError(
            f"{source}: model needs exactly one of preset, config or checkpoint (got "
            f"{', '.join(sources) or 'none'})"
        )
    if data.source in ("text", "jsonl") and not data.path:
        raise ConfigError(f"{source}: data.source {data.source} needs data.path")
    if dry is not None and not dry.model:
        raise ConfigError(f"{source}: dry_run needs a model (a preset name or config path)")
    fraction = recipe.plan.gpu_budget_fraction
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


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
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
