"""Launch settings chosen by timing are kept on disk (``tuning_cache``): a second call with a
cold memory, and a second process, take them from the file without timing. The timing itself is
stubbed (it needs a GPU); the candidates are two fixed settings."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")

from memtrain.kernels.cross_entropy import triton_function as tf  # noqa: E402
from memtrain.kernels.cross_entropy import tuning_cache  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
KEY = (2304, False, True, False)  # hidden size and flags, as the forward's picker keys them
SLOW = tf._config(128, 256, 64, 8, 3, "ieee", programs=528)
FAST = tf._config(128, 128, 64, 4, 4, "ieee", programs=528)


@pytest.fixture(autouse=True)
def isolated(monkeypatch, tmp_path):
    """A private cache folder, empty in-memory choices, fixed candidates, stubbed timing."""
    monkeypatch.setenv("MEMTRAIN_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(tf, "_CHOSEN", {})
    monkeypatch.setattr(tf, "TUNING_LOG", {})
    monkeypatch.setattr(
        tf, "candidate_configs", lambda dtype, tma=False, variants=True: [SLOW, FAST]
    )
    timed = []

    def fake_time(run, cfg, reps):
        timed.append(tf._name(cfg))
        return 2.0 * reps if cfg is SLOW else 1.0 * reps

    monkeypatch.setattr(tf, "_time", fake_time)
    return timed


def _pick(ran: list | None = None) -> dict:
    picker = tf.ConfigPicker("forward", torch.bfloat16, KEY, tf.TUNE_MIN_LOGITS)
    return picker(lambda cfg: ran.append(cfg) if ran is not None else None)


def test_second_call_with_cold_memory_reads_the_file(isolated, monkeypatch):
    assert _pick() == FAST and isolated  # timed the first time
    path = tuning_cache.cache_path()
    data = json.loads(path.read_text())
    assert data["format"] == tuning_cache.FORMAT and len(data["entries"]) == 1
    (key,) = data["entries"]
    assert json.loads(key)[:2] == ["cpu", __import__("memtrain").__version__]
    isolated.clear()
    monkeypatch.setattr(tf, "_CHOSEN", {})  # a new process's memory
    ran = []
    assert _pick(ran) == FAST
    assert not isolated and not ran  # neither timed nor compiled
    assert "disk cache" in str(tf.TUNING_LOG[next(iter(tf.TUNING_LOG))]["ms"])
    assert not [p for p in path.parent.iterdir() if p.name != path.name]  # no temporary left


def test_a_second_process_does_not_tune_again(isolated):
    _pick()
    script = textwrap.dedent(
        f"""
        import torch
        from memtrain.kernels.cross_entropy import triton_function as tf
        slow, fast = {SLOW!r}, {FAST!r}
        tf.candidate_configs = lambda dtype, tma=False, variants=True: [slow, fast]
        def no_timing(*args):
            raise AssertionError("timed again")
        tf._time = no_timing
        picker = tf.ConfigPicker("forward", torch.bfloat16, {KEY!r}, tf.TUNE_MIN_LOGITS)
        print(tf._name(picker(lambda cfg: None)))
        """
    )
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == tf._name(FAST)


@pytest.mark.parametrize("content", ["{not json", '{"format": 1, "entries": [1]}', "[]", "\x00"])
def test_a_damaged_file_is_ignored_with_a_warning(isolated, content):
    path = tuning_cache.cache_path()
    path.parent.mkdir(parents=True)
    path.write_text(content)
    with pytest.warns(RuntimeWarning, match="tuning cache: ignoring") as record:
        assert _pick() == FAST
    assert len(record) == 1 and "\n" not in str(record[0].message)  # one line, once
    assert isolated  # timed, as without a file
    assert len(json.loads(path.read_text())["entries"]) == 1  # and rewritten whole


def test_other_versions_devices_and_candidates_tune_again(isolated, monkeypatch):
    import memtrain

    _pick()
    for patch in (
        lambda: monkeypatch.setattr(memtrain, "__version__", "999.0"),
        lambda: monkeypatch.setattr(tuning_cache, "device_name", lambda: "NVIDIA H200"),
        lambda: monkeypatch.setattr(
            tf, "candidate_configs", lambda *a, **k: [SLOW, dict(FAST, num_warps=8)]
        ),
    ):
        patch()
        monkeypatch.setattr(tf, "_CHOSEN", {})
        isolated.clear()
        _pick()
        assert isolated, "an entry of another version, device or candidate list was reused"


def test_an_unwritable_folder_only_warns(isolated, monkeypatch, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("MEMTRAIN_CACHE_DIR", str(blocker / "below"))
    with pytest.warns(RuntimeWarning) as record:
        assert _pick() == FAST
    assert any("cannot write" in str(w.message) for w in record)


def test_disabled_cache_neither_reads_nor_writes(isolated, monkeypatch):
    monkeypatch.setattr(tuning_cache, "ENABLED", False)
    _pick()
    assert not tuning_cache.cache_path().exists()


def test_cache_folder_resolution(monkeypatch, tmp_path):
    monkeypatch.setenv("MEMTRAIN_CACHE_DIR", str(tmp_path / "x"))
    assert tuning_cache.cache_dir() == tmp_path / "x"
    monkeypatch.delenv("MEMTRAIN_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert tuning_cache.cache_dir() == tmp_path / "xdg" / "memtrain"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert tuning_cache.cache_dir() == tmp_path / "home" / ".cache" / "memtrain"
