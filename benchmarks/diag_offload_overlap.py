"""Where the executor's step time goes: compute kernels, copies, and how much they overlap.

A shallow copy of the 1.2B Llama-style model (``--layers``, default 4) at ``--seq`` tokens runs
one policy per run (keep, swap all to pinned host memory, token-wise recompute with anchors on the
host, whole-layer recompute); the last step is traced with ``torch.profiler`` and summarised per
CUDA stream: busy seconds of compute kernels, of device-to-host and host-to-device copies (with
their bandwidth), and the seconds the compute stream sat idle. Also measures the raw copy
bandwidth between the GPU and a pinned pool block.

Run:  python benchmarks/diag_offload_overlap.py --seq 65536 --layers 4
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from memtrain.kernels import patch_causal_lm_loss  # noqa: E402
from memtrain.models import build_causal_lm, load_config  # noqa: E402
from memtrain.offload import LayerPolicy, OffloadPolicy, apply  # noqa: E402
from memtrain.offload.pool import HostPool  # noqa: E402

GiB = 2**30
POLICIES = {
    "keep": None,
    "swap-cpu": {"keep": 0.0, "swap": {"cpu": 1.0}},
    "swap-cpu-half": {"keep": 0.5, "swap": {"cpu": 0.5}},
    "swap-cpu-quarter": {"keep": 0.75, "swap": {"cpu": 0.25}},
    "tokenwise-anchors-cpu": {
        "keep": 0.0, "recompute": 1.0, "input_checkpoint": {"cpu": 1.0}, "chunks": 2,
    },
    "tokenwise-plan-like": {
        "keep": 0.0, "swap": {"cpu": 0.9}, "recompute": 0.1, "input_checkpoint": {"cpu": 0.1},
    },
    "full-recompute-cpu": {"keep": 0.0, "full_recompute": True, "input_checkpoint": {"cpu": 1.0}},
}  # fmt: skip


def copy_bandwidth(nbytes: int) -> dict[str, float]:
    pool = HostPool(nbytes + 4096, pin=True)
    block = pool.allocate(nbytes)
    host = pool.view(block, nbytes)
    dev = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    out = {}
    for name, (dst, src) in {"d2h": (host, dev), "h2d": (dev, host)}.items():
        dst.copy_(src, non_blocking=True)
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(3):
            dst.copy_(src, non_blocking=True)
        torch.cuda.synchronize()
        out[name + "_gb_s"] = 3 * nbytes / (time.perf_counter() - start) / 1e9
    del dev
    pool.close()
    return out


def summarise(events: list[dict]) -> dict[str, dict[str, float]]:
    """Per CUDA stream: seconds of kernels and of each copy direction, busy and span seconds;
    and the host's blocking CUDA runtime calls (count, seconds)."""
    per_stream: dict[str, dict[str, float]] = {}
    spans: dict[str, list[tuple[float, float]]] = {}
    # Host-side CUDA runtime calls that block the CPU (a blocking copy or a synchronise stops
    # the CPU from queueing compute while a copy runs, which serialises copies and compute).
    blocking: dict[str, list[float]] = {}
    for e in events:
        if e.get("cat") == "cuda_runtime" and "dur" in e:
            name = e.get("name", "")
            if "Synchronize" in name or name in ("cudaMemcpy", "cudaHostRegister"):
                entry = blocking.setdefault(name, [0, 0.0])
                entry[0] += 1
                entry[1] += e["dur"] / 1e6
        cat = e.get("cat", "")
        if cat not in ("kernel", "gpu_memcpy", "gpu_memset") or "dur" not in e:
            continue
        name = e.get("name", "").lower()
        kind = "d2h" if "dtoh" in name else "h2d" if "htod" in name else "kernel"
        if kind == "kernel" and cat == "gpu_memcpy":
            kind = "d2d"
        stream = str(e.get("args", {}).get("stream", "?"))
        entry = per_stream.setdefault(stream, {"kernel": 0.0, "d2h": 0.0, "h2d": 0.0, "d2d": 0.0})
        entry[kind] += e["dur"] / 1e6
        spans.setdefault(stream, []).append((e["ts"] / 1e6, (e["ts"] + e["dur"]) / 1e6))
    out: dict[str, dict[str, float]] = {
        f"host {name}": {"calls": calls, "seconds": round(seconds, 4)}
        for name, (calls, seconds) in blocking.items()
    }
    for stream, entry in per_stream.items():
        ordered = sorted(spans[stream])
        busy, cursor = 0.0, ordered[0][0]
        for a, b in ordered:
            if b > cursor:
                busy += b - max(a, cursor)
                cursor = b
        out[stream] = {
            **{k: round(v, 4) for k, v in entry.items()},
            "busy_s": round(busy, 4),
            "span_s": round(max(b for _, b in ordered) - ordered[0][0], 4),
        }
    return out


def run(policy_name: str, seq: int, layers: int, steps: int, trace_dir: str | None = None) -> dict:
    config = load_config("llama-3.2-1b")
    config.num_hidden_layers = layers
    config.use_cache = False
    model = build_causal_lm(config, "bf16", "cuda")
    patch_causal_lm_loss(model)
    fields = POLICIES[policy_name]
    handle = None
    if fields is not None:
        policy = OffloadPolicy({f"block.{i}": LayerPolicy(**fields) for i in range(layers)})
        handle = apply(model, policy, host_pool_bytes={"cpu": layers * seq * 120_000 + GiB})
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
    ids = torch.randint(0, config.vocab_size, (1, seq), device="cuda")
    row = {"policy": policy_name, "seq": seq, "layers": layers}

    def step(model=model, optimizer=optimizer):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(steps):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        step()
        torch.cuda.synchronize()
        row["step_s"] = round(time.perf_counter() - start, 4)
    row["peak_gib"] = round(torch.cuda.max_memory_allocated() / GiB, 3)
    from torch.profiler import ProfilerActivity, profile

    counters = ("num_alloc_retries", "num_sync_all_streams", "num_device_free")
    before = torch.cuda.memory_stats()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    after = torch.cuda.memory_stats()
    row["allocator"] = {k: int(after.get(k, 0) - before.get(k, 0)) for k in counters}
    with tempfile.NamedTemporaryFile(suffix=".json") as raw:  # a trace exports only once
        prof.export_chrome_trace(raw.name)
        text = Path(raw.name).read_bytes()
    row["streams"] = summarise(json.loads(text)["traceEvents"])
    if trace_dir:
        import gzip

        Path(trace_dir, f"trace_{policy_name}_{seq}.json.gz").write_bytes(gzip.compress(text))
    if handle is not None:
        row["moved_gib"] = round(handle.stats()["totals"]["cpu"] / (steps + 1) / GiB, 3)
        handle.remove()
    # The handle references the model, whose patched forward makes a reference cycle: drop
    # both before collecting, or the model outlives this run on the GPU.
    del model, optimizer, step, handle
    gc.collect()
    torch.cuda.empty_cache()
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int, default=65536)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--policies", nargs="*", default=list(POLICIES))
    parser.add_argument("--trace", action="store_true", help="also write gzipped traces to $OUT")
    args = parser.parse_args()
    rows = [{"device": torch.cuda.get_device_name(), "torch": torch.__version__}]
    rows.append(copy_bandwidth(2 * GiB))
    print(json.dumps(rows[-1]), flush=True)
    for name in args.policies:
        trace_dir = os.environ.get("OUT") if args.trace else None
        rows.append(run(name, args.seq, args.layers, args.steps, trace_dir))
        print(json.dumps(rows[-1]), flush=True)
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "diag_offload_overlap.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
