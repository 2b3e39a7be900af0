"""Checkpoints resume bit-exactly; state bytes equal the formulas of memtrain.optim.memory."""

from __future__ import annotations

import io

import pytest
import torch

from memtrain.optim import (
    APOLLO,
    COSMOS,
    FRUGAL,
    AdamW8bit,
    GaLoreAdafactor,
    GaLoreAdamW,
    NaturalGaLore,
    build_optimizer,
)
from memtrain.optim.memory import (
    measured_state_bytes,
    parse_optimizer_spec,
    predicted_state_bytes,
    state_bytes_for,
)
from tests.optim.reference import mlp, split_groups, tiny_llama, train

MAKERS = {
    "galore-iter": lambda m: GaLoreAdamW(
        split_groups(m, rank=4, update_proj_gap=3, proj_oversample=2), lr=1e-2, weight_decay=0.1
    ),
    "galore-svd": lambda m: GaLoreAdamW(
        split_groups(m, rank=4, update_proj_gap=3, proj_method="svd"), lr=1e-2
    ),
    "galore-adafactor": lambda m: GaLoreAdafactor(
        split_groups(m, rank=4, update_proj_gap=3), lr=1e-2, relative_step=False, beta1=0.9
    ),
    "frugal-svd": lambda m: FRUGAL(split_groups(m, density=0.25, update_proj_gap=3), lr=1e-2),
    "frugal-random": lambda m: FRUGAL(
        split_groups(m, density=0.25, proj_type="random", update_proj_gap=3), lr=1e-2
    ),
    "frugal-columns": lambda m: FRUGAL(
        split_groups(m, density=0.25, proj_type="columns", update_proj_gap=3), lr=1e-2
    ),
    "frugal-blocks": lambda m: FRUGAL(
        split_groups(m, rank=3, proj_type="blocks", free_update="sgd", update_proj_gap=3),
        lr=1e-2,
    ),
    "frugal-svd-8bit": lambda m: FRUGAL(
        split_groups(m, density=0.25, update_proj_gap=3), lr=1e-2, bits=8
    ),
    "frugal-columns-reset": lambda m: FRUGAL(
        split_groups(
            m, density=0.25, proj_type="columns", update_proj_gap=3, moment_transfer="reset"
        ),
        lr=1e-2,
    ),
    "galore-8bit": lambda m: GaLoreAdamW(
        split_groups(m, rank=4, update_proj_gap=3), lr=1e-2, weight_decay=0.1, bits=8
    ),
    "adamw8bit": lambda m: AdamW8bit(m.parameters(), lr=1e-2),
    "apollo": lambda m: APOLLO(split_groups(m, rank=4, update_proj_gap=3), lr=1e-2),
    "apollo-mini": lambda m: APOLLO(
        split_groups(m, rank=1, scale_type="tensor", update_proj_gap=3), lr=1e-2
    ),
    "natural-galore": lambda m: NaturalGaLore(
        split_groups(m, rank=4, update_proj_gap=3, history=2), lr=1e-2, weight_decay=0.1
    ),
    "cosmos": lambda m: COSMOS(split_groups(m, rank=4), lr=1e-2, weight_decay=0.1),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", sorted(MAKERS))
def test_save_load_continue_equals_continuing(name: str, dtype: torch.dtype) -> None:
    make = MAKERS[name]
    model = mlp(dtype=dtype)
    opt = make(model)
    train(model, opt, 4)  # refresh at 0 and 3; the save sits between refreshes
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)
    train(model, opt, 5, start=4)  # crosses refreshes at 6
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    resumed = mlp(seed=123, dtype=dtype)
    resumed.load_state_dict(saved["model"])
    resumed_opt = make(resumed)
    resumed_opt.load_state_dict(saved["opt"])
    train(resumed, resumed_opt, 5, start=4)
    for a, b in zip(model.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b)
    for p, q in zip(model.parameters(), resumed.parameters(), strict=True):
        for key, value in opt.state[p].items():
            other = resumed_opt.state[q][key]
            assert value.dtype == other.dtype and torch.equal(value, other), key


def test_projections_are_in_the_state_dict() -> None:
    model = mlp()
    opt = MAKERS["galore-iter"](model)
    train(model, opt, 1)
    states = opt.state_dict()["state"]
    assert sum("projection" in s for s in states.values()) == 2


SPECS = [
    "galore:rank=8",
    "galore:rank=8,proj_type=reverse_std",
    "galore-adafactor:rank=8",
    "galore-adafactor:rank=8,beta1=0.9",
    "frugal:density=0.25",
    "frugal:rank=5,proj_type=random",
    "frugal:density=0.5,proj_type=columns",
    "frugal:rank=3,proj_type=blocks",
    "frugal:density=0.25,bits=8",
    "frugal:density=0.5,proj_type=columns,bits=8",
    "galore:rank=8,bits=8",
    "adamw8bit",
    "apollo:rank=8",
    "apollo:rank=8,norm_growth=0",
    "apollo-mini",
    "natural-galore:rank=8,history=3",
    "cosmos:rank=8",
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("spec", SPECS)
def test_state_bytes_equal_the_formula(spec: str, dtype: torch.dtype) -> None:
    model = tiny_llama(dtype)
    opt = build_optimizer(model, spec, lr=1e-3)
    tokens = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    model(input_ids=tokens, labels=tokens).loss.backward()
    opt.step()
    assert opt.state_bytes() == predicted_state_bytes(model, spec)
    # and per parameter, for a projected weight, straight from the profiler's table
    weight = model.model.layers[0].mlp.down_proj.weight
    measured = measured_state_bytes(opt)[id(weight)]
    assert measured == state_bytes_for(weight.shape, weight.dtype, parse_optimizer_spec(spec))


def test_predicted_state_bytes_work_on_a_meta_model() -> None:
    real = tiny_llama(torch.bfloat16)
    with torch.device("meta"):
        meta = tiny_llama(torch.bfloat16)
    assert next(meta.parameters()).is_meta
    assert predicted_state_bytes(meta, "galore:rank=8") == predicted_state_bytes(
        real, "galore:rank=8"
    )
    assert predicted_state_bytes(meta, "galore:rank=8") < predicted_state_bytes(meta, "adamw")
