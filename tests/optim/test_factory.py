"""build_optimizer: spec strings to optimizers, default projection targets, clear errors."""

from __future__ import annotations

import pytest
import torch

from memtrain.errors import MemtrainError
from memtrain.optim import (
    APOLLO,
    COSMOS,
    FRUGAL,
    AdamW8bit,
    GaLoreAdafactor,
    GaLoreAdamW,
    NaturalGaLore,
    build_optimizer,
    lowrank_targets,
)
from memtrain.optim.memory import parse_optimizer_spec
from tests.optim.reference import mlp, tiny_llama

BLOCK_LINEARS = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def test_default_targets_are_the_block_linears() -> None:
    model = tiny_llama()
    names = [n for n, _ in lowrank_targets(model)]
    assert len(names) == 2 * len(BLOCK_LINEARS)
    assert {n.split(".")[-2] for n in names} == BLOCK_LINEARS
    assert not any("embed" in n or "lm_head" in n or "norm" in n for n in names)


def test_targets_regex_selects_by_name() -> None:
    names = [n for n, _ in lowrank_targets(tiny_llama(), targets=r"mlp\.")]
    assert len(names) == 6 and all(".mlp." in n for n in names)


@pytest.mark.parametrize(
    ("spec", "cls"),
    [
        ("adamw", torch.optim.AdamW),
        ("sgd:momentum=0.9", torch.optim.SGD),
        ("adafactor", torch.optim.Adafactor),
        ("galore:rank=8,scale=0.25,update_proj_gap=50", GaLoreAdamW),
        ("galore-adafactor:rank=8", GaLoreAdafactor),
        ("frugal:density=0.25,proj_type=columns", FRUGAL),
        ("frugal:density=0.25,bits=8,moment_transfer=reset", FRUGAL),
        ("adamw8bit", AdamW8bit),
        ("apollo:rank=8,scale_type=tensor,norm_growth=0", APOLLO),
        ("apollo-mini:update_proj_gap=50", APOLLO),
        ("natural-galore:rank=8,history=4,damping=0.01", NaturalGaLore),
        ("cosmos:rank=8,gamma=0.5,step_rms=paper", COSMOS),
    ],
)
def test_specs_build_the_right_optimizer(spec: str, cls: type) -> None:
    model = tiny_llama()
    opt = build_optimizer(model, spec, lr=1e-3)
    assert type(opt) is cls
    if cls in (GaLoreAdamW, GaLoreAdafactor, FRUGAL, APOLLO, NaturalGaLore, COSMOS):
        split = [g for g in opt.param_groups if "rank" in g or "density" in g]
        assert len(split) == 1 and len(split[0]["params"]) == 14
        options = parse_optimizer_spec(spec).options
        for key, value in options.items():
            assert split[0][key] == value


def test_galore_groups_carry_galore_torch_keys() -> None:
    opt = build_optimizer(tiny_llama(), "galore:rank=8")
    group = next(g for g in opt.param_groups if "rank" in g)
    assert {"rank", "update_proj_gap", "scale", "proj_type"} <= set(group)


def test_a_parameter_list_projects_its_2d_tensors() -> None:
    model = mlp()
    opt = build_optimizer(list(model.parameters()), "galore:rank=2")
    projected = next(g for g in opt.param_groups if "rank" in g)["params"]
    assert all(p.dim() == 2 for p in projected) and len(projected) == 3


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("galore:rnak=8", "unknown option"),
        ("lion", "unknown optimizer"),
        ("frugal:density=2", "density"),
        ("galore:targets=(", "regular expression"),
        ("galore:targets=nomatch", "no 2-D weights"),
        ("galore:rank=8,bits=4", "bits must be 8 or 32"),
        ("adamw8bit:rank=8", "unknown option"),
        ("apollo:scale_type=row", "scale_type"),
        ("apollo-mini:norm_growth=-1", "norm_growth"),
        ("natural-galore:history=0", "history"),
        ("natural-galore:damping=0", "damping"),
        ("cosmos:step_rms=big", "step_rms"),
        ("cosmos:gamma=-1", "gamma"),
        ("cosmos:update_proj_gap=5", "unknown option"),
        ("frugal:moment_transfer=keep", "moment_transfer"),
    ],
)
def test_bad_specs_are_clear_errors(spec: str, message: str) -> None:
    with pytest.raises(MemtrainError, match=message):
        build_optimizer(tiny_llama(), spec)


@pytest.mark.parametrize(
    "spec",
    ["apollo:scale_type=row", "cosmos:gamma=-1", "galore:bits=4", "frugal:moment_transfer=x"],
)
def test_bad_options_are_one_line_errors(spec: str) -> None:
    with pytest.raises(MemtrainError) as info:
        build_optimizer(tiny_llama(), spec)
    assert "\n" not in str(info.value)
