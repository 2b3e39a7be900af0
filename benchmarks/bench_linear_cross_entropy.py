"""Benchmark memtrain's fused linear cross-entropy against the usual ways to compute the loss.

For each shape and input kind (random, or peaked softmax) and each method it prints the
forward+backward time (median of CUDA-event timings), the extra peak memory (peak allocated
during forward+backward minus the inputs and the gradients every method must return) and the
relative errors of the loss and both gradients against a float32 reference (no TF32).

Methods: naive PyTorch, torch.compile of the same, cut-cross-entropy (gradient filter on and
off), Liger's fused linear cross-entropy, memtrain exact (Triton), memtrain filtered (Triton;
also without the pre-skip, so that blocks bounded negligible by the forward are recomputed too)
and memtrain cublas (``impl="cublas"``, at several workspace sizes and explicit block plans).
The filtered rows also give the shares of backward blocks skipped from the forward's bound
("pre") and by the kernel's own check after recomputing them ("kernel").
Third-party packages that are not installed are reported as missing, not skipped silently.
Two reference rows without errors: "floor: 4 cuBLAS products" times the four products of
2·N·V·D alone (logits stored, no softmax), "memtrain cublas matmuls only" the cuBLAS path with
its elementwise kernels replaced by no-ops (what its products and launches cost).

Also: a GPU correctness check of memtrain's paths on small odd shapes against a float64
reference (and of the shifted-logits epilogue of the cuBLAS path), a per-kernel profile, and
the peak memory of a training step of the ``llama-3.2-1b`` preset with and without the fused
loss.

Reproduce (one GPU):  python benchmarks/bench_linear_cross_entropy.py --out results.json
Only memtrain's rows and the floors, ~3 minutes:  ... --quick --out results.json
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import platform
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from memtrain.kernels import linear_cross_entropy, reference_linear_cross_entropy  # noqa: E402

MiB = 1024 * 1024
DEFAULT_SHAPES = "8192x2304x256000,32768x2304x256000,8192x2048x128256"


def log(*args) -> None:
    print(*args, flush=True)


# ----------------------------------------------------------------------------- methods


def naive(h, w, y):
    return F.cross_entropy((h @ w.t()).float(), y)


_compiled = None


def compiled(h, w, y):
    global _compiled
    if _compiled is None:
        _compiled = torch.compile(naive)
    return _compiled(h, w, y)


def cce(filter_on: bool):
    from cut_cross_entropy import linear_cross_entropy as cce_lce

    eps = "auto" if filter_on else None
    return lambda h, w, y: cce_lce(h, w, y, filter_eps=eps)


def liger():
    from liger_kernel.transformers.fused_linear_cross_entropy import (
        LigerFusedLinearCrossEntropyLoss,
    )

    loss_fn = LigerFusedLinearCrossEntropyLoss()

    def run(h, w, y):
        out = loss_fn(w, h, y)
        if isinstance(out, tuple):
            return out[0]
        return getattr(out, "loss", out)

    return run


def ours(filter_on: bool, workspace_mib: int | None = None, impl: str = "triton"):
    ws = workspace_mib * MiB if workspace_mib else None
    return lambda h, w, y: linear_cross_entropy(
        h, w, y, grad_filter=filter_on, impl=impl, workspace_bytes=ws
    )


def ours_filtered(workspace_mib: int, preskip: bool = True):
    """The filtered Triton path, with or without the pre-skip (read when the forward runs)."""
    from memtrain.kernels.cross_entropy import triton_bwd

    base = ours(True, workspace_mib)

    def run(h, w, y):
        saved, triton_bwd.PRESKIP = triton_bwd.PRESKIP, preskip
        try:
            return base(h, w, y)
        finally:
            triton_bwd.PRESKIP = saved

    run.skip_stats = True
    return run


def cublas_plan(plan):
    """The cuBLAS path with explicit block sizes (rows x columns, forward and backward)."""
    from memtrain.kernels.cross_entropy.blas import BlasLinearCrossEntropy

    def run(h, w, y):
        targets = y.to(torch.int32)  # no ignored labels in these inputs
        return BlasLinearCrossEntropy.apply(h, w, None, targets, None, 0.0, plan).mean()

    return run


def parse_plan(text):
    """'FRxFC/BRxBC' -> BlasPlan."""
    from memtrain.kernels.cross_entropy.blas import BlasPlan

    fwd, bwd = text.split("/")
    return BlasPlan(*(int(x) for x in fwd.split("x")), *(int(x) for x in bwd.split("x")))


def cublas_matmuls_only(workspace_mib):
    """The cuBLAS path with its elementwise kernels as no-ops: products and launches only."""
    from memtrain.kernels.cross_entropy import blas_kernels

    saved = (blas_kernels.row_stats, blas_kernels.grad_logits)
    blas_kernels.row_stats = lambda *a, **k: None
    blas_kernels.grad_logits = lambda *a, **k: None

    def restore():
        blas_kernels.row_stats, blas_kernels.grad_logits = saved

    fn = ours(False, workspace_mib, impl="cublas")
    fn.restore, fn.no_errors = restore, True
    return fn


def cublas_triton_forward(workspace_mib):
    """The cuBLAS path's backward after the Triton path's fused forward."""
    from memtrain.kernels.cross_entropy import blas

    blas.FORWARD = "triton"

    def restore():
        blas.FORWARD = "cublas"

    fn = ours(False, workspace_mib, impl="cublas")
    fn.restore = restore
    return fn


class _StoredLogitsProducts(torch.autograd.Function):
    """The four products of the floor and nothing else: logits in forward, again in backward
    (as a method that does not keep them must), then dH = Z·W and dW = Zᵀ·H."""

    @staticmethod
    def forward(ctx, h, w):
        z = h @ w.t()
        ctx.save_for_backward(h, w, z)
        return z[0, 0].float()

    @staticmethod
    def backward(ctx, grad):
        h, w, z = ctx.saved_tensors
        torch.mm(h, w.t(), out=z)
        return z @ w, z.t() @ h


def floor_products():
    fn = lambda h, w, y: _StoredLogitsProducts.apply(h, w)  # noqa: E731
    fn.no_errors = True
    return fn


def methods(args) -> dict:
    table = {}
    if not args.quick:
        table["naive torch"] = lambda: naive
        if not args.skip_compile:
            table["torch.compile"] = lambda: compiled
        table["cce (filter on)"] = lambda: cce(True)
        table["cce (filter off)"] = lambda: cce(False)
        table["liger"] = liger
    table["floor: 4 cuBLAS products"] = floor_products
    for ws in args.workspaces:
        table[f"memtrain exact ({ws} MiB ws)"] = lambda ws=ws: ours(False, ws)
    for ws in args.filter_workspaces:
        table[f"memtrain filtered ({ws} MiB ws)"] = lambda ws=ws: ours_filtered(ws)
        table[f"memtrain filtered, no pre-skip ({ws} MiB ws)"] = lambda ws=ws: ours_filtered(
            ws, preskip=False
        )
    for ws in args.cublas_workspaces:
        table[f"memtrain cublas ({ws} MiB ws)"] = lambda ws=ws: ours(False, ws, impl="cublas")
    if args.cublas_workspaces:
        ws = main_cublas_workspace(args)
        table[f"memtrain cublas matmuls only ({ws} MiB ws)"] = lambda: cublas_matmuls_only(ws)
        table[f"memtrain cublas, Triton forward ({ws} MiB ws)"] = lambda: cublas_triton_forward(ws)
    if args.only:
        table = {k: v for k, v in table.items() if any(o in k for o in args.only)}
    return table


def main_cublas_workspace(args) -> int:
    """The cuBLAS workspace (MiB) profiled and run without elementwise kernels: the default."""
    from memtrain.kernels.cross_entropy.blas import DEFAULT_BLAS_WORKSPACE_BYTES

    default = DEFAULT_BLAS_WORKSPACE_BYTES // MiB
    return default if default in args.cublas_workspaces else args.cublas_workspaces[-1]


def plan_methods(args, n, d, v) -> dict:
    """Explicit cuBLAS block plans, for the shape named by --plan-shape only."""
    if f"{n}x{d}x{v}" != args.plan_shape:
        return {}
    return {f"memtrain cublas plan {p}": lambda p=p: cublas_plan(parse_plan(p)) for p in args.plans}


# ----------------------------------------------------------------------------- inputs


def make_inputs(n, d, v, kind, seed=0):
    """Random inputs, or 'peaked' ones: hidden = a * W[target] + noise, so each row's softmax
    puts most of its mass on its target, like a trained model's head."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    w = torch.randn(v, d, device="cuda", generator=g) / math.sqrt(d)
    y = torch.randint(0, v, (n,), device="cuda", generator=g)
    if kind == "random":
        h = torch.randn(n, d, device="cuda", generator=g)
    else:
        h = 14.0 * w[y] + 0.5 * torch.randn(n, d, device="cuda", generator=g)
    return h.bfloat16().contiguous(), w.bfloat16().contiguous(), y


def softmax_stats(h, w, y, rows=1024):
    z = (h[:rows].float() @ w.float().t()).float()
    p = torch.softmax(z, -1)
    pt = p.gather(1, y[:rows, None]).mean().item()
    ent = -(p * torch.log(p.clamp_min(1e-30))).sum(-1).mean().item()
    return {"mean_target_prob": pt, "mean_entropy_nats": ent}


def reference_grads(h, w, y):
    """Float32 loss and gradients, full precision matmuls, chunked over rows to bound memory."""
    prev = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    hf, wf = h.float(), w.float()
    n = h.shape[0]
    gh = torch.empty_like(hf)
    gw = torch.zeros_like(wf)
    total = torch.zeros((), device=h.device, dtype=torch.float64)
    step = 2048
    for s in range(0, n, step):
        hc = hf[s : s + step].clone().requires_grad_()
        wc = wf.detach().requires_grad_()
        loss = F.cross_entropy(hc @ wc.t(), y[s : s + step], reduction="sum") / n
        loss.backward()
        total += loss.double()
        gh[s : s + step] = hc.grad
        gw += wc.grad
        del hc, wc, loss
    torch.backends.cuda.matmul.allow_tf32 = prev
    return total.float(), gh, gw


def rel(a, b):
    """Relative error ||a - b|| / ||b||; 0 when both are zero (e.g. every label ignored)."""
    a, b = a.double(), b.double()
    if b.norm() == 0:
        return (a - b).norm().item()
    return ((a - b).norm() / b.norm()).item()


# ----------------------------------------------------------------------------- measurement


def measure(fn, h, w, y, reps, ref):
    hp = h.detach().clone().requires_grad_()
    wp = w.detach().clone().requires_grad_()

    def step():
        hp.grad = None
        wp.grad = None
        loss = fn(hp, wp, y)
        loss.backward()
        return loss

    loss = step()  # warm-up (compilation, autotuning)
    torch.cuda.synchronize()
    errs = {}
    if ref is not None:
        errs = {
            "loss_err": rel(loss.detach(), ref[0]),
            "grad_h_err": rel(hp.grad, ref[1]),
            "grad_w_err": rel(wp.grad, ref[2]),
        }
    hp.grad = None
    wp.grad = None
    del loss
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    grad_bytes = hp.numel() * hp.element_size() + wp.numel() * wp.element_size()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base - grad_bytes
    times = []
    for _ in range(reps):
        start = torch.cuda.Event(enable_timing=True)
        stop = torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        stop.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(stop))
    fwd_times = []
    for _ in range(reps):
        start = torch.cuda.Event(enable_timing=True)
        stop = torch.cuda.Event(enable_timing=True)
        start.record()
        loss = fn(hp, wp, y)
        stop.record()
        torch.cuda.synchronize()
        fwd_times.append(start.elapsed_time(stop))
        del loss
    hp.grad = None
    wp.grad = None
    if getattr(fn, "skip_stats", False):
        errs.update(skip_shares(fn, hp, wp, y))
    return {
        "ms": statistics.median(times),
        "fwd_ms": statistics.median(fwd_times),
        "extra_mib": extra / MiB,
        **errs,
    }


def skip_shares(fn, hp, wp, y):
    """Shares of the filtered backward's blocks skipped from the forward's bound and by the
    kernel's own check, from one more untimed step (counting them syncs once per chunk)."""
    from memtrain.kernels.cross_entropy import triton_bwd

    triton_bwd.FILTER_STATS = {}
    try:
        fn(hp, wp, y).backward()
        stats = dict(triton_bwd.FILTER_STATS)
    finally:
        triton_bwd.FILTER_STATS = None
        hp.grad = wp.grad = None
    if not stats.get("tiles"):
        return {}
    pre, tiles = stats["pre_skipped"], stats["tiles"]
    return {"pre_skipped": pre / tiles, "kernel_skipped": (stats["skipped"] - pre) / tiles}


def run_shape(n, d, v, kind, args, results):
    h, w, y = make_inputs(n, d, v, kind)
    stats = softmax_stats(h, w, y)
    log(f"\n== N={n} D={d} V={v} {kind}: {stats}")
    ref = reference_grads(h, w, y) if n <= args.max_ref_rows else None
    floor_ms = 8 * n * v * d / (args.tflops * 1e12) * 1e3
    log(f"   floor 8·N·V·D at {args.tflops:.0f} TFLOP/s: {floor_ms:.1f} ms")
    table = {**methods(args), **(plan_methods(args, n, d, v) if kind == "peaked" else {})}
    for name, make in table.items():
        if name in args.skip_methods_for_big and n > 8192:
            continue
        row = {"n": n, "d": d, "v": v, "kind": kind, "method": name, "floor_ms": floor_ms, **stats}
        fn = None
        try:
            fn = make()
            errs_ref = None if getattr(fn, "no_errors", False) else ref
            row.update(measure(fn, h, w, y, args.reps, errs_ref))
            row["x_floor"] = row["ms"] / floor_ms
        except ImportError as exc:
            row["error"] = f"not installed: {exc}"
        except torch.OutOfMemoryError:
            row["error"] = "out of memory"
        except Exception as exc:  # report and carry on with the other methods
            row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
        finally:
            getattr(fn, "restore", lambda: None)()
        gc.collect()
        torch.cuda.empty_cache()
        results["rows"].append(row)
        log(format_row(row))
    del h, w, y, ref
    gc.collect()
    torch.cuda.empty_cache()


def breakdown(n, d, v, kind, args, results):
    """Per-kernel GPU time of one forward+backward of memtrain's paths (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile

    h, w, y = make_inputs(n, d, v, kind)
    paths = []
    if args.workspaces:
        paths.append(("exact", ours(False, args.workspaces[-1])))
    if args.filter_workspaces:
        paths.append(("filtered", ours_filtered(args.filter_workspaces[-1])))
        paths.append(("filtered, no pre-skip", ours_filtered(args.filter_workspaces[-1], False)))
    if args.cublas_workspaces:
        ws = main_cublas_workspace(args)
        paths.append((f"cublas {ws} MiB", ours(False, ws, impl="cublas")))
    for label, fn in paths:
        hp = h.detach().clone().requires_grad_()
        wp = w.detach().clone().requires_grad_()
        fn(hp, wp, y).backward()  # warm
        torch.cuda.synchronize()
        hp.grad = wp.grad = None
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            fn(hp, wp, y).backward()
            torch.cuda.synchronize()
        rows = []
        for e in prof.key_averages():
            ms = getattr(e, "device_time_total", 0) / 1e3
            if ms > 0:
                rows.append((ms, e.count, e.key[:70]))
        rows.sort(reverse=True)
        total = sum(r[0] for r in rows)
        log(f"\nkernel time, memtrain {label}, N={n} D={d} V={v} {kind}: {total:.1f} ms in all")
        for ms, count, name in rows[:10]:
            log(f"  {ms:8.2f} ms  x{count:<5} {name}")
        results["breakdown"][label] = [list(r) for r in rows[:20]]
    del h, w, y
    gc.collect()
    torch.cuda.empty_cache()


def format_row(r):
    if "error" in r:
        return f"  {r['method']:<30} {r['error']}"
    err = ""
    if "grad_h_err" in r:
        err = f" loss {r['loss_err']:.1e} dH {r['grad_h_err']:.1e} dW {r['grad_w_err']:.1e}"
    if "pre_skipped" in r:
        err += f" skipped: pre {r['pre_skipped']:.1%} kernel {r['kernel_skipped']:.1%}"
    return (
        f"  {r['method']:<44} {r['ms']:8.1f} ms ({r['x_floor']:.2f}x floor, fwd "
        f"{r['fwd_ms']:6.1f}) {r['extra_mib']:9.1f} MiB{err}"
    )


# ----------------------------------------------------------------------------- correctness


def epilogue_check(results):
    """The cuBLAS path's backward relies on ``addmm(bias, a, b)`` adding the bias in float32
    before the one rounding to bf16. With logits up to 40 and the bias minus row 0's logits,
    each output's error must stay within |output|·2⁻⁷ (twice its rounding) + |logit|·2⁻¹²
    (float32 accumulation); rounding the logit first costs up to |logit|·2⁻⁹ (ratio ~25)."""
    g = torch.Generator(device="cuda").manual_seed(1)
    a = torch.randn(512, 256, device="cuda", generator=g).bfloat16()
    b = torch.randn(256, 384, device="cuda", generator=g).bfloat16()
    a = (a.double() * (40.0 / (a.double() @ b.double()).abs().amax())).bfloat16()
    exact = a.double() @ b.double()
    shift = (-exact[0]).bfloat16()  # row 0's outputs are close to 0
    out = torch.empty(512, 384, device="cuda", dtype=torch.bfloat16)
    torch.addmm(shift, a, b, out=out)
    want = exact + shift.double()
    err = (out.double() - want).abs()
    ratio = (err / (want.abs() * 2**-7 + exact.abs() * 2**-12 + 1e-30)).amax().item()
    ok = ratio <= 1.0
    results["epilogue_check"] = {"max_err_over_bound": ratio, "ok": ok}
    verdict = "ok" if ok else "FAIL: the bias is not added before rounding"
    log(f"shifted-logits epilogue: max error / bound = {ratio:.2f} ({verdict})")


def gpu_correctness(results, impls=("triton", "cublas")):
    """memtrain's CUDA paths vs float64 on odd shapes, every option; prints the worst errors."""
    torch.manual_seed(0)
    worst = 0.0
    cases = []
    for impl, dtype, tol in (
        (impl, dtype, tol)
        for impl in impls
        for dtype, tol in ((torch.bfloat16, 2e-2), (torch.float16, 1e-2), (torch.float32, 1e-3))
    ):
        for n, d, v in ((1, 64, 1000), (257, 96, 3001), (1000, 200, 50257)):
            for opts in (
                {},
                {"softcap": 30.0, "reduction": "sum"},
                {"label_smoothing": 0.1, "bias": True},
                {"reduction": "none", "shift": True},
                {"grad_filter": True, "grad_filter_eps": 1e-30, "bias": True},
                {"peaked": True},
            ):
                opts = dict(opts)
                if impl == "cublas" and opts.get("grad_filter"):
                    continue
                peaked = opts.pop("peaked", False)
                h = torch.randn(n, d, device="cuda")
                w = torch.randn(v, d, device="cuda") / math.sqrt(d) * 4
                y = torch.randint(0, v, (n,), device="cuda")
                if peaked:  # logits ~25 on the target, target probability near 1
                    h = 25.0 * w[y] / 16 + 0.3 * torch.randn(n, d, device="cuda")
                h = h.to(dtype).requires_grad_()
                w = w.to(dtype).requires_grad_()
                y[torch.rand(n, device="cuda") < 0.1] = -100
                y[0] = 0  # at least one valid label, or "mean" is 0/0 in both
                ins = [h, w]
                if opts.pop("bias", False):
                    b = torch.randn(v, device="cuda").to(dtype).requires_grad_()
                    opts["bias"] = b
                    ins.append(b)
                out = linear_cross_entropy(h, w, y, impl=impl, **opts)
                ref_ins = [t.detach().double().requires_grad_() for t in ins]
                ref_opts = {k: v for k, v in opts.items() if not k.startswith("grad_filter")}
                if "bias" in opts:
                    ref_opts["bias"] = ref_ins[2]
                ref = reference_linear_cross_entropy(ref_ins[0], ref_ins[1], y, **ref_opts)
                gw = torch.randn_like(ref) if ref.dim() else torch.ones_like(ref)
                grads = torch.autograd.grad(out.float(), ins, gw.float())
                ref_grads = torch.autograd.grad(ref, ref_ins, gw)
                errs = [rel(out.double(), ref)]
                errs += [rel(a.double(), b) for a, b in zip(grads, ref_grads, strict=True)]
                bad = max(errs) > tol or not all(math.isfinite(e) for e in errs)
                worst = max(worst, max(errs) / tol)
                extra = ["peaked"] if peaked else []
                case = (
                    f"{impl:6} {str(dtype)[6:]:8} N={n:<5} D={d:<4} V={v:<6} {sorted(opts) + extra}"
                )
                cases.append({"case": case, "errs": errs, "tol": tol, "ok": not bad})
                if bad:
                    log(f"  FAIL {case}: {errs} > {tol}")
    results["correctness"] = cases
    ok = sum(c["ok"] for c in cases)
    log(f"GPU correctness: {ok}/{len(cases)} cases within tolerance (worst at {worst:.2f}x tol)")


# ----------------------------------------------------------------------------- end to end


def end_to_end(tokens, results):
    """Peak memory and time of one AdamW training step of the llama-3.2-1b preset."""
    from memtrain.kernels.cross_entropy.hf import patch_causal_lm_loss
    from memtrain.models import build_causal_lm, load_config

    for fused in (False, True):
        gc.collect()
        torch.cuda.empty_cache()
        row = {"tokens": tokens, "fused_loss": fused}
        try:
            model = build_causal_lm(load_config("llama-3.2-1b"), "bf16", "cuda")
            model.train()
            if fused:
                patch_causal_lm_loss(model)
            opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
            ids = torch.randint(0, model.config.vocab_size, (1, tokens), device="cuda")
            times = []
            for i in range(3):
                torch.cuda.synchronize()
                if i == 1:
                    torch.cuda.reset_peak_memory_stats()
                t0 = time.perf_counter()
                out = model(input_ids=ids, labels=ids)
                out.loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                torch.cuda.synchronize()
                times.append(time.perf_counter() - t0)
                del out
            row["peak_gib"] = torch.cuda.max_memory_allocated() / 1024**3
            row["step_s"] = min(times[1:])
            row["tokens_per_s"] = tokens / row["step_s"]
            del model, opt
        except torch.OutOfMemoryError:
            row["error"] = "out of memory"
        except Exception as exc:
            row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
        results["end_to_end"].append(row)
        log(f"end-to-end llama-3.2-1b {tokens} tokens fused={fused}: {row}")


# ----------------------------------------------------------------------------- main


def _matmul_rate(warm: int, timed: int) -> float:
    """TFLOP/s of ``timed`` back-to-back 8192³ bf16 products after ``warm`` untimed ones."""
    a = torch.randn(8192, 8192, device="cuda").bfloat16()
    b = torch.randn(8192, 8192, device="cuda").bfloat16()
    for _ in range(warm):
        a @ b
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(timed):
        a @ b
    stop.record()
    torch.cuda.synchronize()
    return 2 * 8192**3 * timed / (start.elapsed_time(stop) / 1e3) / 1e12


def matmul_tflops() -> float:
    """The bf16 matmul rate of a short burst (the floors use it)."""
    return _matmul_rate(3, 20)


def sustained_matmul_tflops(seconds: float = 4.0) -> float:
    """The same product's rate after ``seconds`` of back-to-back runs, over the last quarter:
    a GPU at its power limit lowers its clocks within a second or two (an H200 went from 1980
    to 1560-1725 MHz at 650-680 W), which the short burst above does not see but every
    benchmark row that runs for longer does."""
    per_ms = 2 * 8192**3 / (_matmul_rate(0, 1) * 1e12) * 1e3
    reps = max(4, int(seconds * 1e3 / max(per_ms, 0.1)))
    warm = reps * 3 // 4
    return _matmul_rate(warm, reps - warm)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="lce_results.json")
    p.add_argument("--shapes", default=DEFAULT_SHAPES)
    p.add_argument("--kinds", default="random,peaked")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--workspaces", default="64", help="comma-separated MiB for the exact path")
    p.add_argument("--filter-workspaces", default="256", help="MiB, filtered path")
    p.add_argument("--cublas-workspaces", default="16,32,64,128", help="MiB, cuBLAS path")
    p.add_argument(
        "--plans",
        default="2048x2048/1024x3072,4096x2048/2048x4096,4096x4096/2048x8192,"
        "8192x2048/4096x4096,8192x4096/4096x8192,2048x8192/8192x2048",
        help="explicit cuBLAS-path plans FWDROWSxFWDCOLS/BWDROWSxBWDCOLS, run on --plan-shape "
        "(peaked inputs only); empty to skip",
    )
    p.add_argument("--plan-shape", default="8192x2304x256000")
    p.add_argument("--only", default="", help="comma-separated substrings of method names")
    p.add_argument(
        "--quick",
        action="store_true",
        help="memtrain's rows and the floors only, cuBLAS-path correctness, a profile of the "
        "Gemma head, no end-to-end run (~3 minutes on an H100)",
    )
    p.add_argument("--breakdown", default="", help="NxDxV:kind to profile per kernel")
    p.add_argument("--max-ref-rows", type=int, default=32768)
    p.add_argument("--skip-compile", action="store_true")
    p.add_argument("--skip-correctness", action="store_true")
    p.add_argument("--e2e-tokens", type=int, default=16384, help="0 to skip")
    p.add_argument(
        "--skip-methods-for-big",
        default="naive torch",
        help="methods not run when N > 8192 (they need too long or too much memory)",
    )
    args = p.parse_args()
    if args.quick:
        if args.shapes == DEFAULT_SHAPES:  # plus a small hidden size (Qwen2.5-0.5B's head)
            args.shapes += ",8192x896x151936"
        args.skip_compile = True
        args.e2e_tokens = 0
        args.breakdown = args.breakdown or "8192x2304x256000:peaked"
    args.workspaces = [int(x) for x in args.workspaces.split(",") if x]
    args.filter_workspaces = [int(x) for x in args.filter_workspaces.split(",") if x]
    args.cublas_workspaces = [int(x) for x in args.cublas_workspaces.split(",") if x]
    args.plans = [x for x in args.plans.split(",") if x]
    args.only = [x for x in args.only.split(",") if x]
    args.skip_methods_for_big = set(args.skip_methods_for_big.split(","))
    if not torch.cuda.is_available():
        log("this benchmark needs a CUDA GPU")
        return 1
    props = torch.cuda.get_device_properties(0)
    args.tflops = matmul_tflops()
    sustained = sustained_matmul_tflops()
    results = {
        "device": props.name,
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "command": " ".join(sys.argv),
        "bf16_matmul_tflops": args.tflops,
        "bf16_matmul_tflops_sustained": sustained,
        "rows": [],
        "end_to_end": [],
        "breakdown": {},
    }
    log(
        f"{props.name}, torch {torch.__version__}, bf16 matmul {args.tflops:.0f} TFLOP/s"
        f" (floors use this), {sustained:.0f} TFLOP/s after 4 s of load"
    )
    log(f"command: python {' '.join(sys.argv)}")
    from memtrain.kernels.cross_entropy import blas

    results["cublas_plans"] = {}
    for shape in args.shapes.split(","):
        n, d, v = (int(x) for x in shape.split("x"))
        for ws in args.cublas_workspaces:
            plan = blas.plan_blas(n, v, d, torch.bfloat16, ws * MiB)
            results["cublas_plans"][f"{shape}/{ws}MiB"] = plan._asdict()
            log(f"cublas plan {shape} {ws} MiB: {plan}")
    results["fp32_out_products"] = blas.fp32_out_supported(torch.device("cuda"))
    log(f"float32-output bf16 products (torch.mm out_dtype): {results['fp32_out_products']}")
    if not args.skip_correctness:
        epilogue_check(results)
        gpu_correctness(results, ("cublas",) if args.quick else ("triton", "cublas"))
    if args.breakdown:
        shape, kind = args.breakdown.split(":")
        breakdown(*(int(x) for x in shape.split("x")), kind, args, results)
    for shape in args.shapes.split(","):
        n, d, v = (int(x) for x in shape.split("x"))
        for kind in args.kinds.split(","):
            run_shape(n, d, v, kind, args, results)
            Path(args.out).write_text(json.dumps(results, indent=1))
    from memtrain.kernels.cross_entropy import triton_bwd, triton_function

    results["tuning"] = {"/".join(map(str, k)): v for k, v in triton_function.TUNING_LOG.items()}
    results["float32_out_matmul"] = triton_bwd._NATIVE_FLOAT32_OUT
    results["cublas_dh_accumulation"] = blas.ACCUMULATION
    log(f"tuning: {json.dumps(results['tuning'], indent=1)}")
    log(f"float32-output matmul for the hidden gradient: {triton_bwd._NATIVE_FLOAT32_OUT}")
    log(f"cuBLAS path's float32 dH accumulation: {blas.ACCUMULATION}")
    if args.e2e_tokens:
        end_to_end(args.e2e_tokens, results)
    Path(args.out).write_text(json.dumps(results, indent=1))
    log("\nsummary (median fwd+bwd ms, extra peak MiB, rel. errors vs float32 reference)")
    for r in results["rows"]:
        log(f"N={r['n']} D={r['d']} V={r['v']} {r['kind']:7}" + format_row(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
