"""``memtrain plan`` and ``memtrain calibrate`` end to end."""

from __future__ import annotations

import json

import pytest

from memtrain.cli import main
from memtrain.planner import Plan
from memtrain.planner.synthetic import synthetic_profile


@pytest.fixture(scope="module")
def profile_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("profile") / "profile.json"
    synthetic_profile(
        layers=3, hidden=512, intermediate=2048, heads=8, kv_heads=2, vocab=32000, seq=16384
    ).to_json(path)
    return path


def test_plan_json_and_out(profile_path, tmp_path, capsys):
    out = tmp_path / "plan.yaml"
    code = main(
        ["plan", "--profile", str(profile_path), "--gpu-budget", "6GiB", "--cpu", "32GiB"]
        + ["--json", "--out", str(out)]
    )
    assert code == 0
    data = json.loads(capsys.readouterr().out)
    assert data["schema"] == "memtrain.plan"
    assert data["predicted"]["feasible"]
    assert Plan.load(out).to_dict() == data


def test_plan_tables(profile_path, capsys):
    assert main(["plan", "--profile", str(profile_path), "--gpu-budget", "6GiB"]) == 0
    text = capsys.readouterr().out
    for needle in ("keep", "recompute", "tokens/s", "no checkpointing", "optimality gap"):
        assert needle in text


def test_plan_infeasible_is_one_line(profile_path, capsys):
    code = main(["plan", "--profile", str(profile_path), "--gpu-budget", "200MiB"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and "needs at least" in err


def test_plan_from_model_dry_run(capsys):
    code = main(["plan", "--model", "llama-3.2-1b", "--seq", "2048", "--json", "--chunks", "1"])
    assert code == 0
    data = json.loads(capsys.readouterr().out)
    assert data["model"] and data["seq"] == 2048
    assert sum(layer["kind"] == "block" for layer in data["layers"]) == 16


def test_bad_chunks(profile_path, capsys):
    assert main(["plan", "--profile", str(profile_path), "--chunks", "0"]) == 2
    assert "--chunks" in capsys.readouterr().err


def test_calibrate_then_plan(profile_path, tmp_path, capsys):
    hw = tmp_path / "hw.yaml"
    assert main(["calibrate", "--out", str(hw), "--no-optimizer", "--cpu", "16GiB"]) == 0
    capsys.readouterr()
    code = main(
        ["plan", "--profile", str(profile_path), "--hardware", str(hw), "--gpu-budget", "8GiB"]
        + ["--json"]
    )
    assert code == 0
    data = json.loads(capsys.readouterr().out)
    assert data["hardware"]["capacity_bytes"]["cpu"] == 16 * 2**30


def test_plan_keeps_the_fastest_micro_batch(capsys):
    code = main(
        ["plan", "--model", "llama-3.2-1b", "--seq", "1024", "--batch", "1,2", "--json"]
        + ["--chunks", "1"]
    )
    assert code == 0
    data = json.loads(capsys.readouterr().out)
    assert data["micro_batch"] in (1, 2)
    note = next(n for n in data["notes"] if n.startswith("chosen among"))
    assert "micro-batch 1" in note and "micro-batch 2" in note


def test_profile_cannot_compare_batches(profile_path, capsys):
    assert main(["plan", "--profile", str(profile_path), "--batch", "1,2"]) == 2
    assert "--model" in capsys.readouterr().err


def test_plan_step_in_backward_from_a_model(capsys):
    """--step-in-backward with --model prices each layer's step from the model's parameter
    shapes: no resident gradients, states on the GPU, a lower peak than stepping after backward."""
    common = ["plan", "--model", "llama-3.2-1b", "--seq", "2048", "--optimizer", "adamw"]
    common += ["--gpu-budget", "80GiB", "--json"]
    assert main(common) == 0
    after = json.loads(capsys.readouterr().out)
    assert main([*common, "--step-in-backward"]) == 0
    inside = json.loads(capsys.readouterr().out)
    assert inside["step_in_backward"] is True
    assert inside["predicted"]["gpu_resident_bytes"]["grads"] == 0
    assert after["predicted"]["gpu_resident_bytes"]["grads"] > 0
    assert inside["predicted"]["peak_bytes"]["gpu"] < after["predicted"]["peak_bytes"]["gpu"]
    for entry in inside["layers"]:
        assert entry["optimizer"] == "gpu" and entry["grads"] == "gpu"


def test_plan_plot_png_and_html_with_a_measurement(profile_path, tmp_path, capsys):
    from memtrain.planner.plot import step_order

    png, html = tmp_path / "plan.png", tmp_path / "plan.html"
    args = ["plan", "--profile", str(profile_path), "--gpu-budget", "6GiB", "--json"]
    assert main([*args, "--plot", str(png)]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    ordered = [name for name, _ in step_order(plan["predicted"]["gpu_moments"])]
    forwards = [n for n in ordered if n.startswith("forward ")]
    backwards = [n for n in ordered if n.startswith("backward ")]
    assert ordered.index(forwards[-1]) < ordered.index(backwards[0])
    assert [n.split()[1] for n in backwards] == [n.split()[1] for n in forwards][::-1]
    first = plan["predicted"]["gpu_moments"][0]
    measured = tmp_path / "measured.json"
    measured.write_text(json.dumps({"moments": [{"moment": first[0], "measured_gib": 1.5}]}))
    assert main([*args, "--plot", str(html), "--measured", str(measured)]) == 0
    capsys.readouterr()
    assert "data:image/png;base64," in html.read_text()


@pytest.mark.parametrize(
    "extra, needle",
    [
        (["--plot", "plan.svg"], ".png or .html"),
        (["--measured", "m.json"], "--plot"),
        (["--plot", "plan.png", "--measured", "missing.json"], "no file"),
    ],
)
def test_plan_plot_bad_input_is_one_line(
    profile_path, tmp_path, monkeypatch, capsys, extra, needle
):
    monkeypatch.chdir(tmp_path)
    code = main(["plan", "--profile", str(profile_path), "--gpu-budget", "6GiB", *extra])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and needle in err, err
