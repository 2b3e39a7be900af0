"""What every benchmark shares: where it ran, timing, peak memory, a GPU memory cap, results.

Results: each benchmark keeps its latest records in ``benchmarks/results/<benchmark>.jsonl``,
one JSON object a line, each with the command, device, date and git commit that produced it.
A run replaces the records whose ``key`` it measures again and keeps the others (rows that
need separate device sessions stay side by side, each with its own command); ``--fresh``
starts the file over. History stays in git.

Run every script as a module from the repository root: ``python -m benchmarks.NAME --help``.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

GiB = 2**30
MiB = 2**20
ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
DATA = ROOT / "benchmarks" / "data"
ENV_FIELDS = ("command", "device", "date", "commit", "torch")


def command() -> str:
    """How this process was started, as a ``python -m benchmarks.NAME ...`` line."""
    name = Path(sys.argv[0]).stem
    return f"python -m benchmarks.{name} {shlex.join(sys.argv[1:])}".rstrip()


def commit() -> str | None:
    """The checked-out commit (short hash, ``+`` when the tree has changes), or None.

    ``BENCH_COMMIT`` overrides it, for a copy of a tree whose git metadata lags its files."""
    if os.environ.get("BENCH_COMMIT"):
        return os.environ["BENCH_COMMIT"]
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=ROOT,
            capture_output=True,
            text=True,
        )
    except OSError:
        return None
    if head.returncode != 0:
        return None
    return head.stdout.strip() + ("+" if dirty.stdout.strip() else "")


def device_name(device: str | torch.device | None = None) -> str:
    """The GPU's name, or the CPU's (with its core count) where no GPU is used."""
    kind = torch.device(device).type if device is not None else None
    if kind in (None, "cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"CPU {platform.processor() or platform.machine()}, {os.cpu_count()} cores"


def environment(device: str | torch.device | None = None) -> dict[str, Any]:
    """Command, device, date (UTC), commit and torch version of this run."""
    return {
        "command": command(),
        "device": device_name(device),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": commit(),
        "torch": torch.__version__,
    }


def cap_gpu_memory(gib: float | None) -> dict[str, Any]:
    """Let this process allocate at most ``gib`` GiB (79.2: what an 80 GB H100 gives)."""
    if not torch.cuda.is_available():
        return {"gpu_cap_gib": None}
    total = torch.cuda.get_device_properties(0).total_memory
    if gib is not None:
        if gib * GiB > total:
            raise SystemExit(f"a cap of {gib} GiB exceeds the card's {total / GiB:.1f} GiB")
        torch.cuda.set_per_process_memory_fraction(gib * GiB / total)
    return {"gpu_total_gib": round(total / GiB, 2), "gpu_cap_gib": gib}


def synchronize(device: str | torch.device | None = None) -> None:
    if torch.cuda.is_available() and (device is None or torch.device(device).type == "cuda"):
        torch.cuda.synchronize()


def time_call(
    fn: Callable[[], Any],
    *,
    warmup: int = 1,
    repeats: int = 5,
    device: str | torch.device | None = None,
) -> list[float]:
    """Seconds of each of ``repeats`` calls after ``warmup`` untimed ones: CUDA events on a
    GPU, ``time.perf_counter`` otherwise."""
    cuda = torch.cuda.is_available() and (device is None or torch.device(device).type == "cuda")
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    for _ in range(repeats):
        if cuda:
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            stop.record()
            stop.synchronize()
            times.append(start.elapsed_time(stop) / 1e3)
        else:
            started = time.perf_counter()
            fn()
            times.append(time.perf_counter() - started)
    return times


def median(values: list[float]) -> float:
    return statistics.median(values)


class PeakMemory:
    """Peak GPU bytes allocated inside a ``with`` block (0 on a machine without a GPU).

    ``peak`` is ``torch.cuda.max_memory_allocated`` over the block, ``extra`` the peak above
    what was allocated when it began."""

    def __init__(self) -> None:
        self.base = self.peak = 0

    @property
    def extra(self) -> int:
        return self.peak - self.base

    def __enter__(self) -> PeakMemory:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
            self.base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        return self

    def __exit__(self, *exc: object) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated()


def release_memory() -> None:
    """Collect garbage and return cached device and pinned host blocks."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        host_empty_cache = getattr(torch._C, "_host_emptyCache", None)  # pinned blocks
        if host_empty_cache is not None:
            host_empty_cache()


class Results:
    """The latest records of one benchmark, in ``<directory>/<benchmark>.jsonl``."""

    def __init__(
        self,
        benchmark: str,
        *,
        device: str | torch.device | None = None,
        directory: str | Path | None = None,
        fresh: bool = False,
        extra: dict[str, Any] | None = None,
    ) -> None:
        self.benchmark = benchmark
        self.path = Path(directory or RESULTS) / f"{benchmark}.jsonl"
        self.environment = {**environment(device), **(extra or {})}
        self.records: dict[str, dict[str, Any]] = {}
        if not fresh:
            self.records = {r["key"]: r for r in read_results(benchmark, self.path.parent)}

    def write(self, key: str, **fields: Any) -> dict[str, Any]:
        """Record one row under ``key`` (replacing an older record of that key) and rewrite
        the file, so a run that stops early keeps what it measured."""
        clash = set(fields) & {"benchmark", "key", *self.environment}
        if clash:
            raise ValueError(f"fields {sorted(clash)} are set by the harness")
        record = {"benchmark": self.benchmark, "key": key, **self.environment, **fields}
        self.records[key] = record
        self.path.parent.mkdir(parents=True, exist_ok=True)
        lines = [json.dumps(r, default=str) for r in self.records.values()]
        self.path.write_text("".join(line + "\n" for line in lines))
        return record


def read_results(benchmark: str, directory: str | Path | None = None) -> list[dict[str, Any]]:
    path = Path(directory or RESULTS) / f"{benchmark}.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def parser(doc: str | None) -> argparse.ArgumentParser:
    """An argument parser with the module docstring as help and the results options."""
    lines = (doc or "").strip().splitlines()
    out = argparse.ArgumentParser(
        description=lines[0] if lines else None,
        epilog="\n".join(lines[1:]).strip() or None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    out.add_argument("--results-dir", default=str(RESULTS), help="where <benchmark>.jsonl goes")
    out.add_argument("--fresh", action="store_true", help="drop the file's earlier records")
    return out


def results_for(benchmark: str, args: argparse.Namespace, **kwargs: Any) -> Results:
    return Results(benchmark, directory=args.results_dir, fresh=args.fresh, **kwargs)


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``KEY=JSON`` model-config overrides from the command line (``KEY=``: None)."""
    values = {}
    for item in items:
        key, _, raw = item.partition("=")
        values[key] = json.loads(raw) if raw not in ("", None) else None
    return values
