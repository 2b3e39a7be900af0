"""The `memtrain profile` front door: outputs, and one-line errors for bad input."""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import textwrap

import pytest

from memtrain.cli import main
from memtrain.profile import ProfileResult


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_help_lists_subcommands(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "profile" in out and "presets" in out


def test_json_round_trips_and_is_versioned(capsys, tmp_path):
    code, out, _ = run_cli(capsys, "profile", "--model", "llama-3.2-1b", "--seq", "2048", "--json")
    assert code == 0
    data = json.loads(out)
    assert data["schema"] == "memtrain.profile" and data["schema_version"] == 1
    result = ProfileResult.from_dict(data)
    assert [layer.name for layer in result.layers][:3] == ["embed", "block.0", "block.1"]
    assert result.layers[-1].name == "loss"
    path = tmp_path / "p.json"
    result.to_json(path)
    assert ProfileResult.from_json(path) == result


def test_table_plot_png_and_html(capsys, tmp_path):
    png, html = tmp_path / "m.png", tmp_path / "m.html"
    code, out, _ = run_cli(capsys, "profile", "--model", "gpt2", "--seq", "512", "--plot", str(png))
    assert code == 0
    assert "block.0" in out and "peak, simulated step" in out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    code, _, _ = run_cli(capsys, "profile", "--model", "gpt2", "--seq", "512", "--plot", str(html))
    assert code == 0 and "<img" in html.read_text()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--model", "llama-9000"], "presets: "),
        (["--seq", "0"], "seq must be a positive integer"),
        (["--seq", "-5"], "seq must be a positive integer"),
        (["--batch", "0"], "batch must be a positive integer"),
        (["--dtype", "fp8"], "unknown dtype"),
        (["--optimizer", "lion"], "unknown optimizer 'lion'"),
        (["--model", "gpt2", "--seq", "4096"], "at most 1024"),
        (["--device", "tpu"], "unknown device"),
        (["--hardware", "b300"], "unknown hardware"),
    ],
)
def test_bad_input_is_one_line(capsys, argv, message):
    code, _, err = run_cli(capsys, "profile", *argv)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], err
    assert "Traceback" not in err


@pytest.mark.parametrize(
    "content, message",
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "must be a JSON object"),
        ('{"hidden_size": 64}', "no 'model_type'"),
        ('{"model_type": "nonsense-arch"}', "invalid config"),
        (
            '{"model_type": "llama", "hidden_size": -8, "num_attention_heads": 2}',
            "'hidden_size' must be a positive integer",
        ),
    ],
)
def test_malformed_config_is_one_line(capsys, tmp_path, content, message):
    path = tmp_path / "config.json"
    path.write_text(content)
    code, _, err = run_cli(capsys, "profile", "--model", str(path))
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and message in err, err


def test_missing_config_file(capsys, tmp_path):
    code, _, err = run_cli(capsys, "profile", "--model", str(tmp_path / "nope.json"))
    assert code == 2 and "no such file" in err


def test_config_directory_is_accepted(capsys, tmp_path):
    from tests.profile.conftest import TINY

    (tmp_path / "config.json").write_text(json.dumps(TINY["llama"]))
    code, _, _ = run_cli(capsys, "profile", "--model", str(tmp_path), "--seq", "32", "--json")
    assert code == 0


def test_70b_dry_run_at_131072_tokens_uses_little_host_memory():
    """A 70B model at 128k tokens is profiled without allocating its terabyte of tensors."""
    script = textwrap.dedent(
        """
        import resource, json
        from memtrain.profile import profile_causal_lm
        r = profile_causal_lm("llama-3.1-70b", seq=131072, dtype="bf16", device="meta")
        print(json.dumps({"rss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                          "params": r.param_count, "peak": r.simulated_peak_bytes}))
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300, check=True
    )
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["rss_kib"] < 2 * 2**20  # under 2 GiB of host memory
    assert 70.0e9 < report["params"] < 71.0e9
    assert report["peak"] > 2**40  # the step it describes needs over a TiB of device memory
    assert resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss < 2 * 2**20
