"""Tiny configs of the three architecture families the profiler must get exactly right."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.tiny_models import TINY

PROFILED = ("gpt2", "llama", "qwen2")  # the families the profiler must get exactly right


@pytest.fixture(params=PROFILED)
def tiny_config(request, tmp_path: Path) -> tuple[str, Path]:
    """(family, path to its config.json)."""
    path = tmp_path / request.param / "config.json"
    path.parent.mkdir()
    path.write_text(json.dumps(TINY[request.param]))
    return request.param, path


def write_config(tmp_path: Path, family: str, **overrides) -> Path:
    path = tmp_path / f"{family}-custom.json"
    path.write_text(json.dumps({**TINY[family], **overrides}))
    return path
