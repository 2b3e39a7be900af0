"""The benchmark scripts on the CPU: each imports and answers --help, the harness writes one
JSON-lines record per row with where and how it was measured, and the dry-run and planner
benchmarks run on a tiny model."""

from __future__ import annotations

import json
import sys

import pytest

from benchmarks import harness
from tests.benchmark_scripts import SCRIPTS, load_benchmark
from tests.tiny_models import tiny_config

TINY = {"architectures": ["LlamaForCausalLM"], **tiny_config("llama", intermediate_size=256)}
RECORD_FIELDS = {"benchmark", "key", "command", "device", "date", "commit", "torch"}


def run_main(module, monkeypatch, *args: str) -> None:
    monkeypatch.setattr(sys, "argv", [f"{module.__name__.rsplit('.', 1)[-1]}.py", *args])
    module.main()


def records(folder, benchmark):
    lines = (folder / f"{benchmark}.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def test_every_script_is_listed():
    assert {"bench_offload_gpu", "bench_linear_cross_entropy", "bench_planner"} <= set(SCRIPTS)


@pytest.mark.parametrize("name", SCRIPTS)
def test_script_imports_and_prints_help(name, monkeypatch, capsys):
    module = load_benchmark(name)
    with pytest.raises(SystemExit) as done:
        run_main(module, monkeypatch, "--help")
    assert done.value.code == 0
    out = capsys.readouterr().out
    assert "--results-dir" in out and module.__doc__.splitlines()[0] in out


def test_results_keep_the_latest_record_per_key(tmp_path):
    first = harness.Results("demo", directory=tmp_path, device="cpu")
    first.write("a", value=1)
    first.write("b", value=2)
    again = harness.Results("demo", directory=tmp_path, device="cpu")
    again.write("a", value=3)
    rows = records(tmp_path, "demo")
    assert [(r["key"], r["value"]) for r in rows] == [("a", 3), ("b", 2)]
    for row in rows:
        assert RECORD_FIELDS <= set(row) and row["benchmark"] == "demo"
        assert row["command"].startswith("python -m benchmarks.")
        assert row["date"].endswith("UTC") and row["device"].startswith("CPU")
    harness.Results("demo", directory=tmp_path, fresh=True).write("c", value=4)
    assert [r["key"] for r in records(tmp_path, "demo")] == ["c"]
    with pytest.raises(ValueError):
        again.write("d", device="elsewhere")


def test_timing_and_peak_memory_on_the_cpu():
    calls = []
    times = harness.time_call(lambda: calls.append(1), warmup=2, repeats=3, device="cpu")
    assert len(times) == 3 and len(calls) == 5 and all(t >= 0 for t in times)
    with harness.PeakMemory() as memory:
        pass
    assert memory.extra >= 0


@pytest.fixture
def tiny_config(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(TINY))
    return path


def test_dry_run_benchmark_on_a_tiny_model(tiny_config, tmp_path, monkeypatch):
    module = load_benchmark("bench_profile_dry_run")
    out = tmp_path / "results"
    run_main(module, monkeypatch, "--cases", f"{tiny_config}:256", "--results-dir", str(out))
    (row,) = records(out, "bench_profile_dry_run")
    assert RECORD_FIELDS <= set(row) and row["key"] == f"{tiny_config}:256"
    assert row["seq"] == 256 and row["profile_s"] > 0 and row["simulated_peak_gib"] > 0


def test_planner_benchmark_on_a_tiny_model(tiny_config, tmp_path, monkeypatch):
    pytest.importorskip("pulp")
    module = load_benchmark("bench_planner")
    out = tmp_path / "results"
    case = f"{tiny_config}:512:1GiB"
    run_main(
        module, monkeypatch, "--parts", "solve", "plans", "--solve-cases", case,
        "--no-synthetic", "--plan-cases", case, "--results-dir", str(out),
    )  # fmt: skip
    rows = {r["key"]: r for r in records(out, "bench_planner")}
    assert set(rows) == {
        f"solve/{case}/reduction on",
        f"solve/{case}/reduction off",
        f"plan/{case}",
    }
    assert all(RECORD_FIELDS <= set(r) for r in rows.values())
    plan = rows[f"plan/{case}"]
    assert plan["feasible"] and plan["peak_gib"]["gpu"] > 0 and plan["tokens_per_s"] > 0


def test_families_benchmark_on_one_family(tmp_path, monkeypatch, capsys):
    module = load_benchmark("bench_families_cpu")
    run_main(module, monkeypatch, "--families", "mistral", "--results-dir", str(tmp_path))
    (row,) = records(tmp_path, "bench_families_cpu")
    assert RECORD_FIELDS <= set(row)
    assert abs(row["dry_run"]["256"]["peak_error"]) < 1e-3
    for fraction in ("0.5", "0.25"):
        plan = row["plans"][fraction]
        assert plan["status"] == "ok" and plan["loss_error"] < 1e-5
    assert "| mistral |" in capsys.readouterr().out
