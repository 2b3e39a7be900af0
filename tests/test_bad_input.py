"""Every bad input a user can type ends in one clear line naming what was wrong, never a traceback.

CLI cases run ``memtrain.cli.main`` and expect status 2 with exactly one stderr line that names
the key, flag or file; API cases expect a :class:`MemtrainError` naming it. The property tests
feed arbitrary values to recipe and hardware-file validation: each either passes or raises
``MemtrainError``.
"""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from memtrain.cli import main
from memtrain.errors import MemtrainError
from memtrain.hardware.devices import DeviceSpec
from memtrain.hardware.tiers import HardwareModel, MemoryTier, build_hardware
from memtrain.optim.memory import parse_optimizer_spec
from memtrain.train.data import TokenStream
from memtrain.train.recipe import SECTIONS, load_recipe, validate

GOOD_HARDWARE = build_hardware("h100-sxm-80g").to_dict()


def _one_line_error(capsys, argv: list[str], needle: str) -> str:
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"memtrain {argv[0]}: error: "), err
    assert needle in lines[0], err
    return lines[0]


# -- hardware YAML -------------------------------------------------------------------------


def _set(path: str, value):
    def change(data):
        *parents, last = path.split(".")
        node = data
        for part in parents:
            node = node[part]
        node[last] = value

    return change


HARDWARE_CASES = {
    "tiers-as-list": (_set("tiers", [{"name": "gpu"}]), "'tiers'"),
    "host-to-device-text": (_set("host_to_device", "fast"), "host_to_device"),
    "capacity-text": (_set("tiers.gpu.capacity_bytes", "80GB"), "tiers.gpu.capacity_bytes"),
    "tier-unknown-field": (_set("tiers.gpu.speed", 3), "tiers.gpu.speed"),
    "tier-not-mapping": (_set("tiers.cpu", 5), "tiers.cpu"),
    "device-number": (_set("device", 5), "'device'"),
    "device-list": (_set("device", [1, 2]), "'device'"),
    "device-field-text": (_set("device.memory_bytes", "lots"), "device.memory_bytes"),
    "device-unknown-field": (_set("device.warp", 1), "device.warp"),
    "device-rate-zero": (_set("device.achievable_bf16_flops", 0), "device.achievable_bf16_flops"),
    "margin-text": (_set("allocator_margin", "x"), "allocator_margin"),
    "notes-number": (_set("notes", 5), "notes"),
    "unknown-top-field": (_set("host_to_devise", 1.0), "host_to_devise"),
    "bandwidth-nan": (_set("device_to_host", float("nan")), "device_to_host"),
    "missing-field": (lambda data: data.pop("host_link_duplex"), "host_link_duplex"),
}


@pytest.mark.parametrize("case", sorted(HARDWARE_CASES))
def test_bad_hardware_yaml(case, tmp_path, capsys):
    change, needle = HARDWARE_CASES[case]
    data = copy.deepcopy(GOOD_HARDWARE)
    change(data)
    path = tmp_path / "my.yaml"
    path.write_text(yaml.safe_dump(data))
    line = _one_line_error(capsys, ["plan", "--hardware", str(path), "--model", "gpt2"], needle)
    assert str(path) in line


@pytest.mark.parametrize(
    ("text", "needle"),
    [("- 1\n- 2\n", "YAML mapping"), ("a: [\n", "not valid YAML"), ("", "YAML mapping")],
)
def test_hardware_file_not_a_mapping(text, needle, tmp_path, capsys):
    path = tmp_path / "my.yaml"
    path.write_text(text)
    _one_line_error(capsys, ["plan", "--hardware", str(path), "--model", "gpt2"], needle)


def test_hardware_file_unreadable(tmp_path, capsys):
    folder = tmp_path / "folder.yaml"
    folder.mkdir()
    line = _one_line_error(capsys, ["plan", "--hardware", str(folder)], "cannot read")
    assert str(folder) in line


def test_good_hardware_yaml_still_loads(tmp_path):
    path = tmp_path / "hw.yaml"
    path.write_text(yaml.safe_dump(GOOD_HARDWARE))
    assert HardwareModel.load_yaml(path).to_dict() == GOOD_HARDWARE


# -- recipes ---------------------------------------------------------------------------------


@pytest.fixture
def recipe(tmp_path, monkeypatch) -> Path:
    """A valid recipe; a case that got past validation fails instead of training."""
    import memtrain.train
    import memtrain.train.launch

    def refuse(*args, **kwargs):
        raise AssertionError("bad input reached training")

    monkeypatch.setattr(memtrain.train, "run_recipe", refuse)
    monkeypatch.setattr(memtrain.train.launch, "launch", refuse)
    path = tmp_path / "r.yaml"
    model = {"preset": "llama-3.2-1b", "overrides": {"num_hidden_layers": 2}}
    path.write_text(yaml.safe_dump({"model": model, "train": {"out_dir": str(tmp_path)}}))
    return path


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ("model.overrides.num_hidden_layers=-1", "model.overrides.num_hidden_layers"),
        ("model.overrides.num_hidden_layers=abc", "model.overrides.num_hidden_layers"),
        ("model.overrides.num_hidden_layers=2.5", "model.overrides.num_hidden_layers"),
        ("model.overrides.hidden_size=0", "model.overrides.hidden_size"),
        ("model.overrides.vocab_size=true", "model.overrides.vocab_size"),
        ("model.overrides.rms_norm_eps=abc", "model.overrides.rms_norm_eps"),
        ("model.overrides.tie_word_embeddings=1", "model.overrides.tie_word_embeddings"),
        ("model.overrides.hidden_act=3", "model.overrides.hidden_act"),
        ("model.overrides.no_such_field=1", "no_such_field"),
        ("optimizer.options.rank=abc", "rank"),
        ("optimizer.name=galore optimizer.options.rank=-4", "rank"),
        ("optimizer.name=frugal optimizer.options.density=2", "density"),
        ("optimizer.options.fused=maybe", "fused"),
        ("optimizer.options.eps=tiny", "eps"),
        ("optimizer.options.bogus=1", "bogus"),
        ("schedule.steps=0", "schedule.steps"),
        ("data.seq=abc", "data.seq"),
        ("model.dtype=null", "model.dtype"),
        ("plan.hardware=null", "plan.hardware"),
    ],
)
def test_bad_recipe_override(override, needle, recipe, capsys):
    _one_line_error(capsys, ["run", str(recipe), *override.split()], needle)


def test_float_override_given_as_int_or_text_is_a_float(recipe):
    loaded = load_recipe(
        recipe, ["model.overrides.rms_norm_eps=1e-5", "model.overrides.initializer_range=1"]
    )
    assert loaded.model.overrides["rms_norm_eps"] == 1e-5
    assert isinstance(loaded.model.overrides["initializer_range"], float)
    assert loaded.model.overrides["num_hidden_layers"] == 2


def test_empty_overrides_and_options_are_none_given(recipe):
    loaded = load_recipe(recipe, ["model.overrides=null", "optimizer.options=null"])
    assert loaded.model.overrides == {} and loaded.optimizer.options == {}


def test_recipe_is_a_folder(tmp_path, capsys):
    line = _one_line_error(capsys, ["run", str(tmp_path)], "is a folder")
    assert str(tmp_path) in line


def test_recipe_unreadable(recipe, capsys, monkeypatch):
    def refuse(self, *args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(Path, "read_text", refuse)
    line = _one_line_error(capsys, ["run", str(recipe)], "cannot read the recipe")
    assert str(recipe) in line and "Permission denied" in line


def test_recipe_not_text(tmp_path, capsys):
    path = tmp_path / "r.yaml"
    path.write_bytes(b"\xff\xfe\x00binary")
    _one_line_error(capsys, ["run", str(path)], "not a text file")


# -- optimizer specs -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "needle"),
    [
        ("galore:rank=abc", "galore:rank"),
        ("galore:rank=0", "galore:rank"),
        ("galore:rank=1.5", "galore:rank"),
        ("frugal:density=0", "frugal:density"),
        ("frugal:density=-0.5", "frugal:density"),
        ("galore:update_proj_gap=-1", "update_proj_gap"),
        ("adamw:beta2=1.5", "adamw:beta2"),
        ("adamw:weight_decay=-1", "weight_decay"),
        ("sgd:momentum=fast", "sgd:momentum"),
        ("adamw:fused=2", "adamw:fused"),
    ],
)
def test_bad_optimizer_option(spec, needle, capsys):
    with pytest.raises(MemtrainError, match=needle):
        parse_optimizer_spec(spec)
    argv = ["plan", "--model", "gpt2", "--seq", "128", "--optimizer", spec]
    _one_line_error(capsys, argv, needle)


@pytest.mark.parametrize(
    "spec",
    ["adamw:eps=1e-8,weight_decay=0.1,fused=false", "galore:rank=64,scale=0.25",
     "galore-adafactor:beta1=none", "frugal:density=0.5", "sgd:momentum=0.9,nesterov=true"],
)  # fmt: skip
def test_good_optimizer_options_still_parse(spec):
    assert parse_optimizer_spec(spec).options


# -- output files and flags ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["profile", "--model", "gpt2", "--json", "{missing}/p.json"], "--json"),
        (["profile", "--model", "gpt2", "--json", "{folder}"], "--json"),
        (["profile", "--model", "gpt2", "--plot", "{missing}/p.png"], "--plot"),
        (["profile", "--model", "gpt2", "--plot", "{folder}/p.txt"], "--plot"),
        (["plan", "--model", "gpt2", "--out", "{missing}/plan.yaml"], "--out"),
        (["plan", "--model", "gpt2", "--out", "{folder}"], "--out"),
        (["plan", "--model", "gpt2", "--plot", "{missing}/p.html"], "--plot"),
        (["export-deepspeed", "{plan}", "--out", "{folder}"], "--out"),
        (["export-deepspeed", "{plan}", "--gradient-accumulation-steps", "0"], "--gradient"),
        (["export-deepspeed", "{plan}", "--lr", "-1"], "--lr"),
        (["calibrate", "--out", "{folder}"], "--out"),
        (["plan", "--model", "gpt2", "--seq", "-5"], "seq"),
        (["plan", "--model", "gpt2", "--batch", "0"], "--batch"),
        (["plan", "--model", "gpt2", "--batch", "two"], "--batch"),
        (["plan", "--model", "gpt2", "--time-limit", "-1"], "--time-limit"),
        (["plan", "--model", "gpt2", "--time-limit", "nan"], "--time-limit"),
        (["plan", "--model", "gpt2", "--dtype", "int8"], "dtype"),
        (["plan", "--model", "gpt2", "--cpu", "lots"], "lots"),
        (["plan", "--model", "gpt2", "--chunks", "0"], "--chunks"),
        (["plan", "--profile", "{folder}"], "cannot read profile"),
        (["profile", "--model", "gpt2", "--seq", "0"], "seq"),
        (["profile", "--model", "gpt2", "--batch", "0"], "batch"),
        (["profile", "--model", "gpt2", "--dtype", "int8"], "dtype"),
        (["profile", "--model", "gpt2", "--device", "tpu"], "device"),
    ],
)
def test_bad_flag(argv, needle, tmp_path, capsys):
    plan = tmp_path / "plan.json"
    plan.write_text("{}")
    where = {"missing": tmp_path / "missing", "folder": tmp_path, "plan": plan}
    argv = [arg.format(**where) for arg in argv]
    _one_line_error(capsys, argv, needle)
    assert not (tmp_path / "missing").exists()


# -- data files ------------------------------------------------------------------------------


def _stream(path, source: str = "text") -> TokenStream:
    return TokenStream(source, seq=8, batch=1, vocab_size=256, path=path)


def test_missing_data_file():
    with pytest.raises(MemtrainError, match="data.path '/nonexistent'"):
        _stream("/nonexistent")


def test_empty_data_folder(tmp_path):
    with pytest.raises(MemtrainError, match="data.path .* holds no files"):
        _stream(str(tmp_path))


def test_unreadable_data_file(tmp_path, monkeypatch):
    path = tmp_path / "corpus.txt"
    path.write_text("hello " * 10)

    def refuse(self):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(Path, "read_bytes", refuse)
    with pytest.raises(MemtrainError, match="data.path .*corpus.txt.*Permission denied"):
        _stream(str(tmp_path), "jsonl")


def test_data_path_of_numbers():
    with pytest.raises(MemtrainError, match="data.path"):
        _stream([1, 2])


def test_readable_data_still_streams(tmp_path):
    (tmp_path / "a.txt").write_text("hello world " * 4)
    assert next(_stream(str(tmp_path))).shape == (1, 8)


# -- prepare() twice -------------------------------------------------------------------------


def test_second_prepare_is_refused_until_remove():
    import memtrain
    from tests.offload.conftest import make_model

    model = make_model("llama")
    first = memtrain.prepare(model, seq=24, gpu_budget_fraction=0.5)
    with pytest.raises(MemtrainError, match=r"already prepared; call \.remove\(\)") as info:
        memtrain.prepare(model, seq=24, plan=False)
    assert "\n" not in str(info.value)
    first.remove()
    first.remove()  # twice is harmless
    again = memtrain.prepare(model, seq=24, plan=False)
    first.remove()  # the old result's remove leaves the new one installed
    with pytest.raises(MemtrainError, match="already prepared"):
        memtrain.prepare(model, seq=24, plan=False)
    again.remove()
    memtrain.prepare(model, seq=24, plan=False).remove()


# -- properties: validation passes or says why -------------------------------------------------

VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.lists(st.one_of(st.integers(), st.text(max_size=4), st.none()), max_size=3),
    st.dictionaries(st.text(max_size=4), st.integers(), max_size=2),
)
SECTION_KEYS = [
    (name, spec.name) for name, cls in SECTIONS.items() for spec in dataclasses.fields(cls)
]
CONFIG_KEYS = [
    "num_hidden_layers", "hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim",
    "intermediate_size", "vocab_size", "rms_norm_eps", "initializer_range", "tie_word_embeddings",
    "hidden_act", "rope_scaling", "attention_bias", "max_position_embeddings", "no_such_key",
]  # fmt: skip
OPTIMIZER_KEYS = ["rank", "density", "scale", "eps", "beta1", "fused", "update_proj_gap", "zzz"]
FAST = settings(
    max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow], database=None
)


@FAST
@given(
    st.lists(st.tuples(st.sampled_from(SECTION_KEYS), VALUES), max_size=3),
    st.dictionaries(st.sampled_from(CONFIG_KEYS), VALUES, max_size=2),
    st.dictionaries(st.sampled_from(OPTIMIZER_KEYS), VALUES, max_size=2),
    st.sampled_from(["adamw", "galore", "frugal"]),
)
def test_recipe_validation_passes_or_says_why(section_values, overrides, options, optimizer):
    raw: dict = {
        "model": {"preset": "llama-3.2-1b", "overrides": overrides},
        "optimizer": {"name": optimizer, "options": options},
    }
    for (section, key), value in section_values:
        raw.setdefault(section, {})[key] = value
    try:
        recipe = validate(raw)
        parse_optimizer_spec(recipe.optimizer.spec)
    except MemtrainError as exc:
        assert "\n" not in str(exc).strip()


HARDWARE_PATHS = (
    [f.name for f in dataclasses.fields(HardwareModel)]
    + [f"tiers.gpu.{f.name}" for f in dataclasses.fields(MemoryTier)]
    + [f"tiers.cpu.{f.name}" for f in dataclasses.fields(MemoryTier)]
    + [f"device.{f.name}" for f in dataclasses.fields(DeviceSpec)]
    + ["tiers.nvme", "tiers.gpu.extra", "device.extra", "schema_version"]
)


@FAST
@given(st.lists(st.tuples(st.sampled_from(HARDWARE_PATHS), VALUES), min_size=1, max_size=3))
def test_hardware_validation_passes_or_says_why(changes):
    data = copy.deepcopy(GOOD_HARDWARE)
    for path, value in changes:
        *parents, last = path.split(".")
        node = data
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node[last] = value
    try:
        HardwareModel.from_dict(data)
    except MemtrainError as exc:
        assert "\n" not in str(exc).strip()
