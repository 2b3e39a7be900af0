"""Build any supported optimizer from a spec string such as ``galore:rank=256,scale=0.25``.

The planner and the ``run`` command describe optimizers as text; this turns the text into a
ready optimizer and decides which weights GaLore/FRUGAL project: by default every ``nn.Linear``
weight inside a repeated block (a ``ModuleList``, i.e. the transformer layers), never
embeddings, the LM head or norms, as in GaLore's and FRUGAL's own training scripts.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from memtrain.errors import MemtrainError
from memtrain.optim.frugal import FRUGAL
from memtrain.optim.galore_adafactor import GaLoreAdafactor
from memtrain.optim.galore_adamw import GaLoreAdamW
from memtrain.optim.state_formulas import FRUGAL_DEFAULTS, GALORE_DEFAULTS
from memtrain.profile.optimizer_state import OptimizerSpec, parse_optimizer_spec

_COMMON = {"weight_decay", "eps", "beta1", "beta2", "seed", "targets"}
_LOWRANK = {
    "update_proj_gap",
    "proj_method",
    "proj_iters",
    "proj_cold_iters",
    "proj_oversample",
    "proj_orth",
}
ALLOWED_OPTIONS: dict[str, set[str]] = {
    "adamw": {"weight_decay", "eps", "beta1", "beta2", "amsgrad", "fused", "foreach"},
    "adam": {"weight_decay", "eps", "beta1", "beta2", "amsgrad", "fused", "foreach"},
    "sgd": {"momentum", "weight_decay", "nesterov", "dampening", "foreach"},
    "adafactor": {"weight_decay", "eps", "beta2_decay", "d", "foreach"},
    "galore": _COMMON | _LOWRANK | {"rank", "scale", "proj_type", "correct_bias"},
    "galore-adafactor": {"weight_decay", "seed", "targets", "beta1", "clip_threshold"}
    | {"decay_rate", "scale_parameter", "rank", "scale", "proj_type"}
    | _LOWRANK,
    "frugal": _COMMON | _LOWRANK | {"density", "rank", "proj_type", "free_update", "free_lr_scale"},
}
ALLOWED_OPTIONS["galore-adamw"] = ALLOWED_OPTIONS["galore"]
LOWRANK_OPTIMIZERS = ("galore", "galore-adamw", "galore-adafactor", "frugal")


def lowrank_targets(model: nn.Module, targets: str | None = None) -> list[tuple[str, nn.Parameter]]:
    """Weights to project: ``targets`` is a regular expression on parameter names (2-D only);
    by default the ``nn.Linear`` weights inside ``ModuleList`` containers, minus any weight
    tied to an embedding."""
    if targets:
        try:
            pattern = re.compile(str(targets))
        except re.error as exc:
            raise MemtrainError(
                f"targets={targets!r} is not a valid regular expression: {exc}"
            ) from None
        chosen = [
            (n, p)
            for n, p in model.named_parameters()
            if p.requires_grad and p.dim() == 2 and pattern.search(n)
        ]
    else:
        embedded = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
        in_blocks: set[int] = set()
        for container in model.modules():
            if isinstance(container, nn.ModuleList):
                for m in container.modules():
                    if isinstance(m, nn.Linear) and id(m.weight) not in embedded:
                        in_blocks.add(id(m.weight))
        chosen = [
            (n, p) for n, p in model.named_parameters() if id(p) in in_blocks and p.requires_grad
        ]
    if not chosen:
        raise MemtrainError(
            "no 2-D weights to project: the model has no nn.Linear inside a ModuleList; "
            "pass targets=<regex on parameter names>"
        )
    return chosen


def _split_params(
    model_or_params: nn.Module | Iterable[Any], targets: str | None
) -> tuple[list[torch.Tensor], list[torch.Tensor]] | list[dict[str, Any]]:
    if isinstance(model_or_params, nn.Module):
        chosen = {id(p) for _, p in lowrank_targets(model_or_params, targets)}
        params = [p for p in model_or_params.parameters() if p.requires_grad]
        return [p for p in params if id(p) in chosen], [p for p in params if id(p) not in chosen]
    items = list(model_or_params)
    if items and isinstance(items[0], dict):
        return items
    if targets:
        raise MemtrainError("targets=... needs a model (names), not a list of parameters")
    return [p for p in items if p.dim() == 2], [p for p in items if p.dim() != 2]


def _betas(options: dict[str, Any]) -> tuple[float, float]:
    return float(options.get("beta1", 0.9)), float(options.get("beta2", 0.999))


def _check_options(spec: OptimizerSpec) -> None:
    allowed = ALLOWED_OPTIONS.get(spec.name)
    if allowed is None:
        raise MemtrainError(
            f"cannot build optimizer {spec.name!r}; buildable: {', '.join(sorted(ALLOWED_OPTIONS))}"
        )
    unknown = sorted(set(spec.options) - allowed)
    if unknown:
        raise MemtrainError(
            f"unknown option(s) {', '.join(unknown)} for {spec.name}; "
            f"valid: {', '.join(sorted(allowed))}"
        )


def _groups(
    split: tuple[list, list] | list[dict[str, Any]], lowrank_keys: dict[str, Any]
) -> list[dict[str, Any]]:
    if isinstance(split, list):
        return split  # caller-made groups, used unchanged
    projected, dense = split
    groups = [{"params": projected, **lowrank_keys}] if projected else []
    if dense:
        groups.append({"params": dense})
    return groups


def build_optimizer(
    model_or_params: nn.Module | Iterable[Any],
    spec: str | OptimizerSpec,
    lr: float = 1e-3,
) -> torch.optim.Optimizer:
    """An optimizer for ``spec``: torch AdamW/Adam/SGD/Adafactor, or GaLore/FRUGAL.

    Given a model, GaLore/FRUGAL project the weights chosen by :func:`lowrank_targets`; given
    parameters, every 2-D one; given parameter groups (dicts), the groups are used as they are.
    """
    import memtrain.optim  # noqa: F401  (registers the GaLore/FRUGAL formulas)

    spec = parse_optimizer_spec(spec)
    _check_options(spec)
    opts = dict(spec.options)
    name = spec.name
    if name in ("adamw", "adam", "sgd", "adafactor"):
        params = (
            model_or_params.parameters()
            if isinstance(model_or_params, nn.Module)
            else model_or_params
        )
        return _build_torch(name, params, lr, opts)
    split = _split_params(model_or_params, opts.pop("targets", None))
    keys = {k: opts.pop(k) for k in list(opts) if k in _LOWRANK}
    if name in ("galore", "galore-adamw"):
        for key in ("rank", "scale", "proj_type"):
            keys[key] = opts.pop(key, GALORE_DEFAULTS[key])
        return GaLoreAdamW(
            _groups(split, keys),
            lr=lr,
            betas=_betas(opts),
            eps=float(opts.get("eps", 1e-6)),
            weight_decay=float(opts.get("weight_decay", 0.0)),
            correct_bias=bool(opts.get("correct_bias", True)),
            seed=int(opts.get("seed", 0)),
        )
    if name == "galore-adafactor":
        for key in ("rank", "scale", "proj_type"):
            keys[key] = opts.pop(key, GALORE_DEFAULTS[key])
        beta1 = opts.get("beta1")
        return GaLoreAdafactor(
            _groups(split, keys),
            lr=lr,
            relative_step=False,
            scale_parameter=bool(opts.get("scale_parameter", False)),
            beta1=None if beta1 in (None, "none", "None") else float(beta1),
            clip_threshold=float(opts.get("clip_threshold", 1.0)),
            decay_rate=float(opts.get("decay_rate", -0.8)),
            weight_decay=float(opts.get("weight_decay", 0.0)),
            seed=int(opts.get("seed", 0)),
        )
    for key in ("proj_type", "free_update", "free_lr_scale"):
        if key in opts:
            keys[key] = opts.pop(key)
    keys.setdefault("proj_type", FRUGAL_DEFAULTS["proj_type"])
    if "rank" in opts:
        keys["rank"] = opts.pop("rank")
    else:
        keys["density"] = opts.pop("density", FRUGAL_DEFAULTS["density"])
    return FRUGAL(
        _groups(split, keys),
        lr=lr,
        betas=_betas(opts),
        eps=float(opts.get("eps", 1e-8)),
        weight_decay=float(opts.get("weight_decay", 0.0)),
        seed=int(opts.get("seed", 0)),
    )


def _build_torch(
    name: str, params: Iterable[Any], lr: float, opts: dict[str, Any]
) -> torch.optim.Optimizer:
    if name in ("adamw", "adam"):
        cls = torch.optim.AdamW if name == "adamw" else torch.optim.Adam
        kwargs: dict[str, Any] = {"betas": _betas(opts), "eps": float(opts.get("eps", 1e-8))}
        kwargs["weight_decay"] = float(opts.get("weight_decay", 0.01 if name == "adamw" else 0))
        for flag in ("amsgrad", "fused", "foreach"):
            if flag in opts:
                kwargs[flag] = bool(opts[flag])
        return cls(params, lr=lr, **kwargs)
    if name == "sgd":
        return torch.optim.SGD(
            params,
            lr=lr,
            momentum=float(opts.get("momentum", 0.9)),
            weight_decay=float(opts.get("weight_decay", 0.0)),
            nesterov=bool(opts.get("nesterov", False)),
            dampening=float(opts.get("dampening", 0.0)),
        )
    kwargs = {k: float(opts[k]) for k in ("weight_decay", "eps", "beta2_decay", "d") if k in opts}
    return torch.optim.Adafactor(params, lr=lr, **kwargs)


def param_state_specs(model: nn.Module, spec: str | OptimizerSpec) -> dict[str, OptimizerSpec]:
    """Per-parameter specs for the state formulas: what ``build_optimizer(model, spec)`` does
    to each parameter (weights it leaves dense get ``projected=False``)."""
    import memtrain.optim  # noqa: F401

    spec = parse_optimizer_spec(spec)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    if spec.name not in LOWRANK_OPTIMIZERS:
        return {n: spec for n in names}
    chosen = {n for n, _ in lowrank_targets(model, spec.options.get("targets"))}
    dense = OptimizerSpec(spec.name, {**spec.options, "projected": False})
    return {n: spec if n in chosen else dense for n in names}


def predicted_state_bytes(model: nn.Module, spec: str | OptimizerSpec) -> int:
    """Optimizer-state bytes of ``build_optimizer(model, spec)`` after its first step, by
    formula (works on a meta-device model). Tied parameters are counted once."""
    from memtrain.profile.optimizer_state import state_bytes_for

    specs = param_state_specs(model, spec)
    params = dict(model.named_parameters())
    return sum(state_bytes_for(params[n].shape, params[n].dtype, s) for n, s in specs.items())
