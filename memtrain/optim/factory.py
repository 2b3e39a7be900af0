"""Build any supported optimizer from a spec string such as ``galore:rank=256,scale=0.25``.

The planner and the ``run`` command describe optimizers as text; this turns the text into a
ready optimizer. GaLore/FRUGAL project the weights :func:`lowrank_targets` picks: by default
every ``nn.Linear`` weight inside a repeated block (a ``ModuleList``, i.e. the transformer
layers), never embeddings, the LM head or norms, as in GaLore's and FRUGAL's own scripts.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from memtrain.errors import MemtrainError
from memtrain.optim.adamw8bit import AdamW8bit
from memtrain.optim.apollo import APOLLO
from memtrain.optim.cosmos import COSMOS
from memtrain.optim.frugal import FRUGAL
from memtrain.optim.galore_adafactor import GaLoreAdafactor
from memtrain.optim.galore_adamw import GaLoreAdamW
from memtrain.optim.lowrank import lowrank_targets
from memtrain.optim.memory import (
    APOLLO_MINI_DEFAULTS,
    COSMOS_RANK,
    FRUGAL_DEFAULTS,
    GALORE_DEFAULTS,
    NATURAL_GALORE_DEFAULTS,
    OptimizerSpec,
    parse_optimizer_spec,
)
from memtrain.optim.natural_galore import NaturalGaLore

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
    "adamw8bit": {"weight_decay", "eps", "beta1", "beta2"},
    "galore": _COMMON | _LOWRANK | {"rank", "scale", "proj_type", "correct_bias", "bits"},
    "galore-adafactor": {"weight_decay", "seed", "targets", "beta1", "clip_threshold"}
    | {"decay_rate", "scale_parameter", "rank", "scale", "proj_type"}
    | _LOWRANK,
    "frugal": _COMMON
    | _LOWRANK
    | {"density", "rank", "proj_type", "free_update", "free_lr_scale", "bits", "moment_transfer"},
    "apollo": _COMMON
    | {"update_proj_gap", "rank", "scale", "proj_type", "scale_type", "norm_growth"},
    "natural-galore": _COMMON
    | _LOWRANK
    | {"rank", "scale", "proj_type", "correct_bias", "history", "damping"},
    "cosmos": _COMMON | {"rank", "scale", "gamma", "ns_steps", "step_rms"},
}
ALLOWED_OPTIONS["apollo-mini"] = ALLOWED_OPTIONS["apollo"]
ALLOWED_OPTIONS["galore-adamw"] = ALLOWED_OPTIONS["galore"]


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


def check_options(spec: OptimizerSpec) -> None:
    """Refuse an optimizer this factory cannot build, or an option it does not take."""
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
    spec = parse_optimizer_spec(spec)
    check_options(spec)
    opts = dict(spec.options)
    name = spec.name
    if name == "adamw8bit":
        params = (
            model_or_params.parameters()
            if isinstance(model_or_params, nn.Module)
            else model_or_params
        )
        return AdamW8bit(
            params,
            lr=lr,
            betas=_betas(opts),
            eps=float(opts.get("eps", 1e-8)),
            weight_decay=float(opts.get("weight_decay", 0.01)),
        )
    if name in ("adamw", "adam", "sgd", "adafactor"):
        params = (
            model_or_params.parameters()
            if isinstance(model_or_params, nn.Module)
            else model_or_params
        )
        return _build_torch(name, params, lr, opts)
    split = _split_params(model_or_params, opts.pop("targets", None))
    keys = {k: opts.pop(k) for k in list(opts) if k in _LOWRANK}
    if name in ("apollo", "apollo-mini", "natural-galore", "cosmos"):
        return _build_projected_adam(name, split, keys, opts, lr)
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
            bits=int(opts.get("bits", 32)),
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
    for key in ("proj_type", "free_update", "free_lr_scale", "moment_transfer"):
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
        bits=int(opts.get("bits", 32)),
    )


# group keys of the GaLoreAdamW family: name -> {key: default}
_FAMILY_KEYS: dict[str, dict[str, Any]] = {
    "apollo": {
        "rank": GALORE_DEFAULTS["rank"],
        "scale": 1.0,
        "proj_type": "std",
        "scale_type": "channel",
        "norm_growth": 1.01,
    },
    "apollo-mini": {"proj_type": "std", "norm_growth": 1.01, **APOLLO_MINI_DEFAULTS},
    "natural-galore": {
        **{k: GALORE_DEFAULTS[k] for k in ("rank", "scale", "proj_type")},
        **NATURAL_GALORE_DEFAULTS,
    },
    "cosmos": {"rank": COSMOS_RANK, "scale": 1.0, "gamma": 0.2, "ns_steps": 5, "step_rms": "unit"},
}
_FAMILY_CLASSES = {
    "apollo": APOLLO,
    "apollo-mini": APOLLO,
    "natural-galore": NaturalGaLore,
    "cosmos": COSMOS,
}


def _build_projected_adam(
    name: str, split: Any, keys: dict[str, Any], opts: dict[str, Any], lr: float
) -> torch.optim.Optimizer:
    """APOLLO, APOLLO-Mini, Natural GaLore and COSMOS: GaLoreAdamW's constructor and dense
    AdamW, their own rule on the projected group."""
    for key, default in _FAMILY_KEYS[name].items():
        keys[key] = opts.pop(key, default)
    kwargs: dict[str, Any] = {}
    if "correct_bias" in opts:
        kwargs["correct_bias"] = bool(opts["correct_bias"])
    return _FAMILY_CLASSES[name](
        _groups(split, keys),
        lr=lr,
        betas=_betas(opts),
        eps=float(opts.get("eps", 1e-6)),
        weight_decay=float(opts.get("weight_decay", 0.0)),
        seed=int(opts.get("seed", 0)),
        **kwargs,
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
