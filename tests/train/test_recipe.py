"""Recipe validation: unknown keys are refused with a suggestion, defaults filled, overrides."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from memtrain.errors import ConfigError
from memtrain.hardware.request import HARDWARE_FIELDS, HardwareRequest
from memtrain.train.recipe import SECTIONS, apply_overrides, load_recipe, validate

RECIPES = sorted((Path(__file__).resolve().parents[2] / "recipes").glob("*.yaml"))


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_shipped_recipes_validate(path):
    recipe = load_recipe(path)
    assert recipe.schedule.steps > 0
    assert recipe.name


@pytest.mark.parametrize(
    "raw, message",
    [
        ({"modle": {}}, "unknown section 'modle'; did you mean 'model'?"),
        ({"model": {"preset": "gpt2", "dtpye": "fp32"}}, "did you mean 'dtype'?"),
        ({"model": {"preset": "gpt2"}, "schedule": {"step": 3}}, "did you mean 'steps'?"),
        ({"model": {"preset": "gpt2"}, "data": {"seq": "long"}}, "data.seq must be int"),
        ({"model": {"preset": "gpt2"}, "data": {"seq": 0}}, "data.seq must be positive"),
        ({"model": {"preset": "gpt2"}, "data": {"source": "web"}}, "use one of generated"),
        ({"model": {}}, "exactly one of preset, config or checkpoint"),
        ({"model": {"preset": "gpt2", "config": "x.json"}}, "exactly one of"),
        ({"model": {"preset": "gpt2"}, "data": {"source": "text"}}, "needs data.path"),
        ({"model": {"preset": "gpt2"}, "plan": {"gpu_budget_fraction": 1.5}}, "(0, 1]"),
        ({"model": {"preset": "gpt2"}, "train": {"resume": "yes"}}, "train.resume must be bool"),
        ([1, 2], "a YAML mapping"),
        ({"model": {"preset": "gpt2"}, "plan": {"cpu": "lots"}}, "plan.cpu: cannot read size"),
        (
            {"dry_run": {"model": "gpt2", "only": True, "nvme": "2TB"}},
            "dry_run.nvme: cannot read NVMe tier",
        ),
    ],
)
def test_bad_recipes_are_refused(raw, message):
    with pytest.raises(ConfigError) as info:
        validate(raw)
    assert message in str(info.value)


def test_defaults_and_overrides():
    raw = {"model": {"preset": "gpt2"}}
    raw = apply_overrides(
        raw,
        [
            "schedule.steps=7",
            "optimizer.lr=3e-4",
            "train.device=cpu",
            "model.overrides={n_layer: 2}",
        ],
    )
    recipe = validate(raw)
    assert recipe.schedule.steps == 7
    assert recipe.optimizer.lr == pytest.approx(3e-4)
    assert recipe.model.overrides == {"n_layer": 2}
    assert (
        recipe.data.source == "generated" and recipe.plan.fused_loss is None
    )  # where the model allows it
    with pytest.raises(ConfigError, match="section.key=value"):
        apply_overrides(raw, ["steps"])


def test_recipe_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="no such recipe"):
        load_recipe(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_recipe(bad)
    typo = tmp_path / "typo.yaml"
    typo.write_text(yaml.safe_dump({"model": {"preset": "gpt2"}, "optimiser": {}}))
    with pytest.raises(ConfigError, match="did you mean 'optimizer'"):
        load_recipe(typo)


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_typed_recipe_round_trips(path):
    recipe = load_recipe(path)
    plain = dataclasses.asdict(recipe)
    assert yaml.safe_load(yaml.safe_dump(plain)) == plain  # plain data, as checkpoints store it
    assert validate(plain) == recipe
    assert isinstance(recipe.plan, HardwareRequest)
    if recipe.dry_run is not None:
        assert recipe.dry_run.hardware_request() == HardwareRequest(
            **{k: getattr(recipe.dry_run, k) for k in HARDWARE_FIELDS}
        )


@pytest.mark.parametrize("section", sorted(SECTIONS))
def test_unknown_key_in_every_section_is_named(section):
    raw = {"model": {"preset": "gpt2"}, "dry_run": {"model": "gpt2"}}
    for key in (f.name for f in dataclasses.fields(SECTIONS[section])):
        given = {**raw, section: {**raw.get(section, {}), key + "s": 1}}
        with pytest.raises(ConfigError) as info:
            validate(given)
        assert f"unknown key {section}.{key}s; did you mean {key!r}?" in str(info.value)
