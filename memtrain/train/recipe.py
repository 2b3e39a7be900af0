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

from memtrain.errors import ConfigError, MemtrainError
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
    engine: str = _key("zero", choices=("zero", "fsdp"))  # fsdp: stage 3 by rows, as run does
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
    # None: the fused linear cross-entropy wherever the model's stock loss can be fused
    fused_loss: bool | None = None


@dataclass(frozen=True)
class TrainSection:
    device: str = "auto"
    seed: int = 0
    log_every: int = _key(1, positive=True)
    checkpoint_every: int = 0
    # Numbered checkpoints kept (DeepSpeed tags too); older ones are deleted after each write.
    keep_checkpoints: int = _key(2, positive=True)
    # Copy the state to host memory and write the file in a background thread while training
    # goes on (synchronous where that is not safe: DeepSpeed, too little free host memory).
    async_checkpoints: bool = True
    out_dir: str = "runs/memtrain"
    resume: bool = True
    step_in_backward: bool = False
    # Optimizer states the plan puts on the host step in a worker thread as their gradients
    # arrive, overlapping backward (bit-identical to the step after backward; no global
    # gradient clipping, so schedule.grad_clip must be 0).
    overlap_host_step: bool = False
    threads: int | None = None
    # Cap this process's CUDA allocator (e.g. 24GiB: a 24 GB card's run checked on a bigger
    # one); the plan gets no more GPU than this. Accepted and not enforced on the CPU.
    gpu_memory_limit: str | int | None = None


@dataclass(frozen=True)
class LauncherSection:
    kind: str = _key("single", choices=("single", "torchrun", "deepspeed", "fsdp"))
    nproc: int = _key(1, positive=True)
    zero_stage: int | None = None
    # Ranks that share each sequence (DeepSpeed Ulysses; memtrain.train.sequence_parallel).
    sequence_parallel: int = _key(1, positive=True)


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
        if value is None and known[key].default_factory is dict:
            value = {}  # ``overrides:`` with nothing under it
        nullable = type(None) in typing.get_args(hints[key]) or hints[key] is Any
        if value is None and not nullable:
            names = " or ".join(t.__name__ for t in accepted)
            raise ConfigError(f"{source}: {name}.{key} must be {names}, got null")
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
    recipe = dataclasses.replace(recipe, model=_check_model_overrides(recipe.model, source))
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
    _check_optimizer(recipe.optimizer, source)
    recipe.plan.check_sizes(f"{source}: plan")
    if dry is not None:
        dry.check_sizes(f"{source}: dry_run")
    fraction = recipe.plan.gpu_budget_fraction
    if fraction is not None and not 0 < fraction <= 1:
        raise ConfigError(f"{source}: plan.gpu_budget_fraction must be in (0, 1], got {fraction}")
    return recipe


# Config sizes a model override must give as a positive integer (null where the config itself
# may leave one unset); Hugging Face and GPT-2 spellings.
POSITIVE_SIZES = {
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "intermediate_size",
    "vocab_size",
    "max_position_embeddings",
    "head_dim",
    "n_layer",
    "n_head",
    "n_embd",
    "n_positions",
    "n_inner",
}
NULLABLE_SIZES = {"num_key_value_heads", "head_dim", "n_inner", "intermediate_size"}


def _check_model_overrides(model: ModelSection, source: str) -> ModelSection:
    """Each ``model.overrides`` key a field of the model's config, each size a positive integer
    and each value of the type the config takes (a number for a float field becomes a float)."""
    overrides = dict(model.overrides)
    for key, value in overrides.items():
        where = f"{source}: model.overrides.{key}"
        if not isinstance(key, str) or not key.isidentifier():
            raise ConfigError(f"{source}: model.overrides key {key!r} is not a config field name")
        if key in POSITIVE_SIZES and not (value is None and key in NULLABLE_SIZES):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ConfigError(f"{where} must be a positive integer, got {value!r}")
    if not overrides or not (model.preset or model.config):
        return model
    from memtrain.models.configs import load_config

    try:
        config = load_config(model.preset or model.config)
    except MemtrainError:
        return model  # a bad model is reported where it is built
    for key, value in overrides.items():
        where = f"{source}: model.overrides.{key}"
        if not hasattr(config, key):
            raise ConfigError(f"{where}: {config.model_type} configs have no {key!r}")
        current = getattr(config, key)
        if isinstance(current, float) and not isinstance(value, bool):
            with contextlib.suppress(TypeError, ValueError, OverflowError):
                value = overrides[key] = float(value)  # YAML reads 1e-5 as text, 1 as an int
        try:
            setattr(config, key, value)
        except Exception as exc:  # transformers checks field types on assignment
            lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
            reason = lines[-1] if lines else type(exc).__name__
            if current is None:
                raise ConfigError(f"{where}: cannot set {value!r} ({reason})") from None
            short = len(repr(current)) <= 40 and not isinstance(current, bool)
            example = f" like {current!r}" if short else ""
            kind = {bool: "true or false", int: "an integer", float: "a number", str: "text"}
            accepted = kind.get(type(current), f"a {type(current).__name__}")
            raise ConfigError(f"{where} must be {accepted}{example}, got {value!r}") from None
    return dataclasses.replace(model, overrides=overrides)


def _check_optimizer(section: OptimizerSection, source: str) -> None:
    """The optimizer's name and options, checked before anything is built or trained."""
    from memtrain.optim.factory import ALLOWED_OPTIONS, check_options
    from memtrain.optim.memory import parse_optimizer_spec

    for key in section.options:
        if not isinstance(key, str) or not key.isidentifier():
            raise ConfigError(f"{source}: optimizer.options key {key!r} is not an option name")
    try:
        spec = parse_optimizer_spec(section.spec)
        if spec.name in ALLOWED_OPTIONS:
            check_options(spec)
    except MemtrainError as exc:
        raise ConfigError(f"{source}: optimizer: {exc}") from None


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
    if path.is_dir():
        raise ConfigError(f"{path}: is a folder; give a recipe file, e.g. recipes/quickstart.yaml")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the recipe ({exc.strerror})") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a text file; a recipe is YAML") from None
    except yaml.YAMLError as exc:
        first = str(exc).strip().splitlines()[0]
        raise ConfigError(f"{path}: not valid YAML ({first})") from None
    return validate(apply_overrides(raw, overrides or []), str(path))
