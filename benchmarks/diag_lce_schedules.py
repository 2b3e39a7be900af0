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
import time
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
    rel,
)

from memtrain.kernels.cross_entropy import (  # noqa: E402
    triton_function,
    triton_launch,
    triton_schedule,
)

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


def _busy(spans: list[tuple[float, float]]) -> float:
    """Length of the union of the intervals (sorted by start)."""
    busy, end = 0.0, spans[0][0]
    for s, t in spans:
        s = max(s, end)
        if t > s:
            busy += t - s
            end = t
    return busy


def idle_share(fn, h, w, y) -> dict:
    """Forward and backward wall time, the parts of them with no kernel running, and the
    longest gaps between kernels with their neighbours (profiler trace of one step)."""
    from torch.profiler import ProfilerActivity, profile

    hp = h.detach().clone().requires_grad_()
    wp = w.detach().clone().requires_grad_()
    fn(hp, wp, y).backward()
    torch.cuda.synchronize()
    hp.grad = wp.grad = None
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        loss = fn(hp, wp, y)
        torch.cuda.synchronize()
        time.sleep(0.05)  # the longest pause of the trace marks the forward's end
        loss.backward()
        torch.cuda.synchronize()
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        prof.export_chrome_trace(f.name)
        trace = json.load(open(f.name))
    events = sorted(
        (e["ts"], e["ts"] + e["dur"], e["name"])
        for e in trace["traceEvents"]
        if e.get("cat") == "kernel" and "dur" in e
    )
    if not events:
        return {}
    # The forward ends at its last kernel before the longest pause (the sleep).
    pauses = [events[i + 1][0] - events[i][1] for i in range(len(events) - 1)]
    cut = max(range(len(pauses)), key=pauses.__getitem__) + 1 if pauses else len(events)
    out: dict = {}
    for name, part in (("fwd", events[:cut]), ("bwd", events[cut:])):
        if not part:
            continue
        spans = [(s, t) for s, t, _ in part]
        wall = part[-1][1] - part[0][0]
        busy = _busy(spans)
        out[f"{name}_wall_ms"] = wall / 1e3
        out[f"{name}_busy_ms"] = busy / 1e3
        out[f"{name}_idle_ms"] = (wall - busy) / 1e3
        out[f"{name}_kernels"] = len(part)
        gaps = sorted(
            (
                (part[i + 1][0] - part[i][1], part[i][2][:40], part[i + 1][2][:40])
                for i in range(len(part) - 1)
            ),
            reverse=True,
        )
        out[f"{name}_longest_gaps_us"] = [(round(g, 1), a, b) for g, a, b in gaps[:5]]
    kernels: dict[str, float] = {}
    for s, t, name in events:
        kernels[name[:60]] = kernels.get(name[:60], 0.0) + (t - s) / 1e3
    out["top_kernels_ms"] = sorted(kernels.items(), key=lambda kv: -kv[1])[:8]
    # The backward's figures also under the names of earlier result files.
    out.update(idle_ms=out.get("bwd_idle_ms", 0.0), kernels=out.get("bwd_kernels", 0))
    return out


def split_timing(fn, h, w, y, reps: int) -> dict:
    """Per step: forward and backward GPU time (CUDA events around each, no synchronize in
    between, as in training) and the CPU time each call took to return. A backward whose CPU
    time reaches its GPU time is launch-bound."""
    hp = h.detach().clone().requires_grad_()
    wp = w.detach().clone().requires_grad_()
    rows = []
    for _ in range(reps):
        hp.grad = wp.grad = None
        ev = [torch.cuda.Event(enable_timing=True) for _ in range(3)]
        ev[0].record()
        t0 = time.perf_counter()
        loss = fn(hp, wp, y)
        t1 = time.perf_counter()
        ev[1].record()
        loss.backward()
        t2 = time.perf_counter()
        ev[2].record()
        torch.cuda.synchronize()
        rows.append(
            dict(
                fwd_ms=ev[0].elapsed_time(ev[1]),
                bwd_ms=ev[1].elapsed_time(ev[2]),
                fwd_cpu_ms=(t1 - t0) * 1e3,
                bwd_cpu_ms=(t2 - t1) * 1e3,
            )
        )
    hp.grad = wp.grad = None
    return {"split": rows}


def cpu_profile(fn, h, w, y, steps: int = 3, top: int = 30) -> str:
    """Where the host's time goes in a few steps (cProfile, by own and by cumulative time):
    the launch overhead that leaves the GPU idle when the host falls behind."""
    import cProfile
    import io
    import pstats

    hp = h.detach().clone().requires_grad_()
    wp = w.detach().clone().requires_grad_()
    fn(hp, wp, y).backward()
    torch.cuda.synchronize()
    prof = cProfile.Profile()
    for _ in range(steps):
        hp.grad = wp.grad = None
        prof.enable()
        loss = fn(hp, wp, y)
        loss.backward()
        prof.disable()
        torch.cuda.synchronize()
    buf = io.StringIO()
    for key in ("tottime", "cumulative"):
        pstats.Stats(prof, stream=buf).sort_stats(key).print_stats(top)
    return buf.getvalue()


def check_variants(shapes_text: str) -> list[dict]:
    """Each descriptor launch setting alone (shape x backward variant) on odd shapes that cross
    every tile edge, against the float32 reference: the timed runs only exercise the ones the
    tuning picks."""
    shapes = list(triton_function.TMA_SHAPES)
    variants = list(triton_function.TMA_VARIANTS)
    out = []
    for text in shapes_text.split(","):
        n, d, v = (int(x) for x in text.split("x"))
        for kind in ("random", "peaked"):
            h, w, y = make_inputs(n, d, v, kind, seed=7)
            ref = reference_grads(h, w, y)
            for shape in shapes:
                for variant in variants:
                    triton_function.TMA_SHAPES = [shape]
                    triton_function.TMA_VARIANTS = [variant]
                    chosen = dict(triton_function._CHOSEN)
                    triton_function._CHOSEN.clear()
                    try:
                        hp = h.detach().clone().requires_grad_()
                        wp = w.detach().clone().requires_grad_()
                        loss = ours(False, 1)(hp, wp, y)  # 1 MiB: many chunks
                        loss.backward()
                        errs = [
                            rel(loss.detach(), ref[0]),
                            rel(hp.grad, ref[1]),
                            rel(wp.grad, ref[2]),
                        ]
                    finally:
                        triton_function.TMA_SHAPES = shapes
                        triton_function.TMA_VARIANTS = variants
                        triton_function._CHOSEN.clear()
                        triton_function._CHOSEN.update(chosen)
                    config = f"{shape} {variant}"
                    row = dict(shape=text, kind=kind, config=config, errs=errs)
                    row["ok"] = max(errs) < 2e-2
                    out.append(row)
                    verdict = "ok" if row["ok"] else "FAIL"
                    log(
                        f"  check {text} {kind:6s} {config:40s} loss/dH/dW {errs[0]:.1e}"
                        f" {errs[1]:.1e} {errs[2]:.1e} {verdict}"
                    )
    return out


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
    p.add_argument("--cpu-profile", default="", help="variant labels to profile the host side of")
    p.add_argument(
        "--launch",
        default="direct",
        choices=["direct", "jit", "both"],
        help="repeat launches straight to the compiled kernel (triton_launch), through Triton's"
        " entry point, or each variant both ways",
    )
    p.add_argument(
        "--check",
        default="777x1000x5003,300x2304x20000",
        help="NxDxV shapes to check every descriptor setting on against float32 ('' skips)",
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
    if args.check:
        results["variant_check"] = check_variants(args.check)
    wanted = [s for s in args.only.split(",") if s]
    timeline = [s for s in args.timeline.split(",") if s]
    for shape in args.shapes.split(","):
        n, d, v = (int(x) for x in shape.split("x"))
        h, w, y = make_inputs(n, d, v, args.kind)
        ref = reference_grads(h, w, y)
        floor = 8 * n * v * d / (tflops * 1e12) * 1e3
        log(f"\nN={n} D={d} V={v} {args.kind}: floor {floor:.1f} ms")
        modes = {"direct": [True], "jit": [False], "both": [True, False]}[args.launch]
        runs = [
            (label + ("" if direct else " (jit launch)"), spec, direct)
            for label, spec in DEFAULT_VARIANTS.items()
            for direct in modes
        ]
        for label, (order, ws, plan, tma), direct in runs:
            if wanted and not any(s in label for s in wanted):
                continue
            fn = ours(False, ws or 64)
            triton_launch.ENABLED = direct
            counts_before = dict(triton_launch.LAUNCH_COUNTS)
            with Schedule(order, plan, tma):
                try:
                    r = measure(fn, h, w, y, args.reps, ref)
                    if any(s in label for s in timeline):
                        r.update(idle_share(fn, h, w, y))
                        r.update(split_timing(fn, h, w, y, args.reps))
                    if args.cpu_profile and any(s in label for s in args.cpu_profile.split(",")):
                        r["cpu_profile"] = cpu_profile(fn, h, w, y)
                        log(r["cpu_profile"])
                except torch.cuda.OutOfMemoryError as exc:
                    r = {"error": str(exc)[:200]}
                got = triton_schedule.plan_exact(n, v, d, 2, (ws or 64) * MiB, 256, (True, True))
            triton_launch.ENABLED = True
            r_launches = {
                k: triton_launch.LAUNCH_COUNTS[k] - counts_before[k] for k in counts_before
            }
            r.update(label=label, shape=shape, floor_ms=floor, plan=str(got), launches=r_launches)
            results["rows"].append(r)
            if "error" in r:
                log(f"  {label:40s} {r['error']}")
                continue
            extra = (
                f"  idle fwd {r.get('fwd_idle_ms', 0):.2f} of {r.get('fwd_wall_ms', 0):.1f} ms,"
                f" bwd {r['idle_ms']:.1f} of {r['bwd_wall_ms']:.1f} ms, {r['kernels']} kernels"
                f"\n    gaps fwd {r.get('fwd_longest_gaps_us')}\n    gaps bwd"
                f" {r.get('bwd_longest_gaps_us')}\n    top {r.get('top_kernels_ms')}"
                + "".join(
                    f"\n    step: fwd {x['fwd_ms']:.1f} ms (cpu {x['fwd_cpu_ms']:.1f}),"
                    f" bwd {x['bwd_ms']:.1f} ms (cpu {x['bwd_cpu_ms']:.1f})"
                    for x in r.get("split", [])
                )
                if "idle_ms" in r
                else ""
            )
            log(
                f"  {label:40s} {r['ms']:7.1f} ms ({r['ms'] / floor:.2f}x)  fwd {r['fwd_ms']:5.1f}"
                f"  extra {r['extra_mib']:6.1f} MiB  dH {r['grad_h_err']:.1e}"
                f"  dW {r['grad_w_err']:.1e}  launches {r_launches}{extra}"
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
