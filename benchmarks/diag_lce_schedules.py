"""Where the exact fused-loss backward's time goes, per chunk schedule (one GPU).

For each schedule of ``memtrain.kernels.cross_entropy.triton_schedule`` (loop order, chunk shape,
tensor-descriptor kernels on or off) it prints the forward+backward time (median of CUDA-event
timings), the extra peak memory over the inputs and the returned gradients, the gradient errors
against a float32 reference, and, for the schedules named in ``--timeline``, how much of the
backward the GPU spent idle between kernels (from a torch.profiler trace: wall time minus the
union of kernel intervals), which is launch overhead and dependencies rather than arithmetic.

Reproduce:  python benchmarks/diag_lce_schedules.py --out schedules.json
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_linear_cross_entropy import (  # noqa: E402
    MiB,
    log,
    make_inputs,
    matmul_tflops,
    measure,
    ours,
    reference_grads,
)

from memtrain.kernels.cross_entropy import triton_function, triton_schedule  # noqa: E402

# label -> (order, workspace MiB or None, (rows, cols) or None, TMA kernels). The stream-overlap
# variant measured in docs/benchmarks.md (193 ms) was removed from the library after that run.
DEFAULT_VARIANTS = {
    "pointer rows 64 MiB": ("rows", 64, None, False),
    "pointer vocab 16 MiB": ("vocab", 16, None, False),
    "tma rows 64 MiB": ("rows", 64, None, True),
    "tma rows 16 MiB": ("rows", 16, None, True),
    "tma vocab 16 MiB": ("vocab", 16, None, True),
    "tma vocab 14 MiB 1024x7168": ("vocab", None, (1024, 7168), True),
    "tma vocab 14 MiB 2048x3584": ("vocab", None, (2048, 3584), True),
    "tma vocab 14 MiB 4096x1792": ("vocab", None, (4096, 1792), True),
    "tma vocab 32 MiB": ("vocab", 32, None, True),
    "tma vocab 64 MiB": ("vocab", 64, None, True),
}


class Schedule:
    """Sets the schedule knobs for one variant and restores them afterwards (without the TMA
    kernels, launch settings are chosen again among the pointer kernels only)."""

    def __init__(self, order, plan, tma):
        self.values = {"ORDER": order, "CHUNK_PLAN": plan}
        self.tma = tma

    def __enter__(self):
        self.saved = {k: getattr(triton_schedule, k) for k in self.values}
        for k, v in self.values.items():
            setattr(triton_schedule, k, v)
        self.shapes = triton_function.TMA_SHAPES
        if not self.tma:
            triton_function.TMA_SHAPES = []
            self.chosen = dict(triton_function._CHOSEN)
            triton_function._CHOSEN.clear()

    def __exit__(self, *exc):
        for k, v in self.saved.items():
            setattr(triton_schedule, k, v)
        if not self.tma:
            triton_function.TMA_SHAPES = self.shapes
            triton_function._CHOSEN.clear()
            triton_function._CHOSEN.update(self.chosen)


def idle_share(fn, h, w, y) -> dict:
    """Backward wall time and the part of it with no kernel running (profiler trace)."""
    from torch.profiler import ProfilerActivity, profile

    hp = h.detach().clone().requires_grad_()
    wp = w.detach().clone().requires_grad_()
    fn(hp, wp, y).backward()
    torch.cuda.synchronize()
    hp.grad = wp.grad = None
    loss = fn(hp, wp, y)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        loss.backward()
        torch.cuda.synchronize()
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        prof.export_chrome_trace(f.name)
        trace = json.load(open(f.name))
    spans = sorted(
        (e["ts"], e["ts"] + e["dur"])
        for e in trace["traceEvents"]
        if e.get("cat") == "kernel" and "dur" in e
    )
    if not spans:
        return {}
    busy, end = 0.0, spans[0][0]
    for s, t in spans:
        s = max(s, end)
        if t > s:
            busy += t - s
            end = t
    wall = spans[-1][1] - spans[0][0]
    kernels: dict[str, float] = {}
    for e in trace["traceEvents"]:
        if e.get("cat") == "kernel" and "dur" in e:
            key = e["name"][:60]
            kernels[key] = kernels.get(key, 0.0) + e["dur"] / 1e3
    top = sorted(kernels.items(), key=lambda kv: -kv[1])[:6]
    return {
        "bwd_wall_ms": wall / 1e3,
        "bwd_busy_ms": busy / 1e3,
        "idle_ms": (wall - busy) / 1e3,
        "kernels": len(spans),
        "top_kernels_ms": top,
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="lce_schedules.json")
    p.add_argument("--shapes", default="8192x2304x256000")
    p.add_argument("--kind", default="peaked")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--only", default="", help="comma-separated substrings of variant labels")
    p.add_argument("--timeline", default="pointer rows 64,tma vocab 16 MiB,tma rows 64")
    p.add_argument(
        "--tma-shapes",
        default="",
        help="more TMA launch settings to tune among: BMxBVxBD/warps/stages,...",
    )
    p.add_argument(
        "--tma-variants",
        default="",
        help="backward TMA variants to tune among, e.g. 'persistent+flatten,tma_store' ('-': plain)",
    )
    p.add_argument(
        "--vocab-plans", default="", help="more vocabulary-order variants: ROWSxCOLS,..."
    )
    args = p.parse_args()
    for text in filter(None, args.vocab_plans.split(",")):
        rows, cols = (int(x) for x in text.split("x"))
        mib = rows * cols * 2 / MiB
        DEFAULT_VARIANTS[f"tma vocab {mib:.1f} MiB {text}"] = ("vocab", None, (rows, cols), True)
    if args.tma_variants:
        triton_function.TMA_VARIANTS = [
            {flag: True for flag in text.split("+") if flag != "-"}
            for text in args.tma_variants.split(",")
        ]
    for text in filter(None, args.tma_shapes.split(",")):
        tile, warps, stages = text.split("/")
        shape = (*(int(x) for x in tile.split("x")), int(warps), int(stages))
        triton_function.TMA_SHAPES = [*triton_function.TMA_SHAPES, shape]
    if not torch.cuda.is_available():
        log("needs a CUDA GPU")
        return 1
    tflops = matmul_tflops()
    dev = torch.cuda.get_device_name()
    log(f"{dev}, torch {torch.__version__}, bf16 matmul {tflops:.0f} TFLOP/s")
    results = {
        "device": dev,
        "torch": torch.__version__,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "host": platform.node(),
        "matmul_tflops": tflops,
        "command": " ".join(sys.argv),
        "rows": [],
    }
    wanted = [s for s in args.only.split(",") if s]
    timeline = [s for s in args.timeline.split(",") if s]
    for shape in args.shapes.split(","):
        n, d, v = (int(x) for x in shape.split("x"))
        h, w, y = make_inputs(n, d, v, args.kind)
        ref = reference_grads(h, w, y)
        floor = 8 * n * v * d / (tflops * 1e12) * 1e3
        log(f"\nN={n} D={d} V={v} {args.kind}: floor {floor:.1f} ms")
        for label, (order, ws, plan, tma) in DEFAULT_VARIANTS.items():
            if wanted and not any(s in label for s in wanted):
                continue
            fn = ours(False, ws or 64)
            with Schedule(order, plan, tma):
                try:
                    r = measure(fn, h, w, y, args.reps, ref)
                    if any(s in label for s in timeline):
                        r.update(idle_share(fn, h, w, y))
                except torch.cuda.OutOfMemoryError as exc:
                    r = {"error": str(exc)[:200]}
                got = triton_schedule.plan_exact(n, v, d, 2, (ws or 64) * MiB, 256, (True, True))
            r.update(label=label, shape=shape, floor_ms=floor, plan=str(got))
            results["rows"].append(r)
            if "error" in r:
                log(f"  {label:40s} {r['error']}")
                continue
            extra = (
                f"  idle {r['idle_ms']:.1f} of {r['bwd_wall_ms']:.1f} ms, {r['kernels']} kernels"
                if "idle_ms" in r
                else ""
            )
            log(
                f"  {label:40s} {r['ms']:7.1f} ms ({r['ms'] / floor:.2f}x)  fwd {r['fwd_ms']:5.1f}"
                f"  extra {r['extra_mib']:6.1f} MiB  dH {r['grad_h_err']:.1e}"
                f"  dW {r['grad_w_err']:.1e}{extra}"
            )
            torch.cuda.empty_cache()
        del h, w, y, ref
        torch.cuda.empty_cache()
    results["tuning"] = {" ".join(map(str, k)): v for k, v in triton_function.TUNING_LOG.items()}
    for key, entry in results["tuning"].items():
        log(f"tuning {key}: chose {entry['chosen']}; ms {entry['ms']}")
    Path(args.out).write_text(json.dumps(results, indent=1))
    log(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
