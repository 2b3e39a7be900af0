"""The fused linear cross-entropy against the usual ways to compute a language-model head's loss.

For each shape N x D x V, input kind (random: a near-uniform softmax; peaked: hidden =
14 W[target] + 0.5 noise, as in a trained head) and method: forward+backward time (median of
CUDA-event timings after a warm-up), extra peak memory (peak allocated during forward+backward
minus the inputs and the two gradients every method returns) and the relative errors
||x - ref|| / ||ref|| of the loss and both gradients against a float32 reference (no TF32).
Floor: 8 N V D FLOPs at the measured bf16 matmul rate; "floor: 4 cuBLAS products" times the
four products alone with the logits stored.

Methods: naive PyTorch, torch.compile of it, cut-cross-entropy (gradient filter on / off),
Liger's fused linear cross-entropy (packages not installed are reported as missing), memtrain
exact (``grad_filter=False``) and filtered (``grad_filter=True``) at each workspace, and
memtrain's cuBLAS path (``impl="cublas"``). ``--correctness`` checks memtrain's paths against
float64 on small odd shapes; ``--e2e-tokens`` measures a training step of ``llama-3.2-1b``
with and without the fused loss.

Examples:
  python -m benchmarks.bench_linear_cross_entropy --correctness --e2e-tokens 16384
  python -m benchmarks.bench_linear_cross_entropy --shapes 8192x2304x256000 --kinds peaked \\
      --only "cce,liger,memtrain filtered"
"""

from __future__ import annotations

import math
import sys

import torch
import torch.nn.functional as F

from benchmarks.harness import GiB, MiB, PeakMemory, median, parser, release_memory, results_for
from benchmarks.harness import time_call as timed
from memtrain.kernels import linear_cross_entropy, reference_linear_cross_entropy

SHAPES = "8192x2304x256000,32768x2304x256000,8192x2048x128256"


# -- methods ----------------------------------------------------------------------------------


def naive(h, w, y):
    return F.cross_entropy((h @ w.t()).float(), y)


def cce(filter_on: bool):
    from cut_cross_entropy import linear_cross_entropy as cce_lce

    return lambda h, w, y: cce_lce(h, w, y, filter_eps="auto" if filter_on else None)


def liger():
    from liger_kernel.transformers.fused_linear_cross_entropy import (
        LigerFusedLinearCrossEntropyLoss,
    )

    loss_fn = LigerFusedLinearCrossEntropyLoss()

    def run(h, w, y):
        out = loss_fn(w, h, y)
        return out[0] if isinstance(out, tuple) else getattr(out, "loss", out)

    return run


def memtrain(grad_filter: bool, workspace_mib: int, impl: str = "triton"):
    workspace = workspace_mib * MiB
    return lambda h, w, y: linear_cross_entropy(
        h, w, y, grad_filter=grad_filter, impl=impl, workspace_bytes=workspace
    )


class StoredLogitsProducts(torch.autograd.Function):
    """The four products of the floor and nothing else: logits in forward, again in backward,
    then dH = Z W and dW = Z^T H."""

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
    fn = lambda h, w, y: StoredLogitsProducts.apply(h, w)  # noqa: E731
    fn.no_errors = True
    return fn


def methods(args) -> dict:
    table = {
        "naive torch": lambda: naive,
        "torch.compile": lambda: torch.compile(naive),
        "cce (filter on)": lambda: cce(True),
        "cce (filter off)": lambda: cce(False),
        "liger": liger,
        "floor: 4 cuBLAS products": floor_products,
    }
    for ws in args.workspaces:
        table[f"memtrain exact ({ws} MiB ws)"] = lambda ws=ws: memtrain(False, ws)
    for ws in args.filter_workspaces:
        table[f"memtrain filtered ({ws} MiB ws)"] = lambda ws=ws: memtrain(True, ws)
    for ws in args.cublas_workspaces:
        table[f"memtrain cublas ({ws} MiB ws)"] = lambda ws=ws: memtrain(False, ws, "cublas")
    if args.only:
        table = {k: v for k, v in table.items() if any(o in k for o in args.only)}
    return table


# -- inputs and errors ------------------------------------------------------------------------


def make_inputs(n, d, v, kind, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    w = torch.randn(v, d, device="cuda", generator=g) / math.sqrt(d)
    y = torch.randint(0, v, (n,), device="cuda", generator=g)
    if kind == "random":
        h = torch.randn(n, d, device="cuda", generator=g)
    else:
        h = 14.0 * w[y] + 0.5 * torch.randn(n, d, device="cuda", generator=g)
    return h.bfloat16().contiguous(), w.bfloat16().contiguous(), y


def softmax_stats(h, w, y, rows=1024):
    p = torch.softmax(h[:rows].float() @ w.float().t(), -1)
    entropy = -(p * torch.log(p.clamp_min(1e-30))).sum(-1).mean().item()
    return {"mean_target_prob": p.gather(1, y[:rows, None]).mean().item(), "entropy": entropy}


def reference_grads(h, w, y, step=2048):
    """Float32 loss and gradients, full-precision products, in row chunks."""
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    hf, wf = h.float(), w.float()
    gh, gw = torch.empty_like(hf), torch.zeros_like(wf)
    total = torch.zeros((), device=h.device, dtype=torch.float64)
    for s in range(0, h.shape[0], step):
        hc = hf[s : s + step].clone().requires_grad_()
        wc = wf.detach().requires_grad_()
        loss = F.cross_entropy(hc @ wc.t(), y[s : s + step], reduction="sum") / h.shape[0]
        loss.backward()
        total += loss.double()
        gh[s : s + step] = hc.grad
        gw += wc.grad
    torch.backends.cuda.matmul.allow_tf32 = saved
    return total.float(), gh, gw


def rel(a, b):
    """||a - b|| / ||b||; the absolute norm where b is zero."""
    a, b = a.double(), b.double()
    return ((a - b).norm() / (b.norm() if b.norm() > 0 else 1)).item()


# -- measurement ------------------------------------------------------------------------------


def measure(fn, h, w, y, reps, ref):
    hp = h.detach().clone().requires_grad_()
    wp = w.detach().clone().requires_grad_()

    def step():
        hp.grad = wp.grad = None
        loss = fn(hp, wp, y)
        loss.backward()
        return loss

    loss = step()  # warm-up: compilation, autotuning
    out = {}
    if ref is not None:
        out = {
            "loss_err": rel(loss.detach(), ref[0]),
            "grad_h_err": rel(hp.grad, ref[1]),
            "grad_w_err": rel(wp.grad, ref[2]),
        }
    hp.grad = wp.grad = None
    del loss
    release_memory()
    with PeakMemory() as memory:
        step()
    returned = hp.numel() * hp.element_size() + wp.numel() * wp.element_size()
    out["extra_mib"] = (memory.extra - returned) / MiB
    out["ms"] = median(timed(step, warmup=0, repeats=reps)) * 1e3
    out["fwd_ms"] = median(timed(lambda: fn(hp, wp, y), warmup=0, repeats=reps)) * 1e3
    return out


def matmul_tflops() -> float:
    a = torch.randn(8192, 8192, device="cuda").bfloat16()
    seconds = median(timed(lambda: a @ a, warmup=3, repeats=20))
    return 2 * 8192**3 / seconds / 1e12


def run_shape(n, d, v, kind, args, results) -> None:
    h, w, y = make_inputs(n, d, v, kind)
    stats = softmax_stats(h, w, y)
    ref = reference_grads(h, w, y) if n <= args.max_ref_rows else None
    floor_ms = 8 * n * v * d / (args.tflops * 1e12) * 1e3
    print(f"\n== N={n} D={d} V={v} {kind}: {stats}, floor {floor_ms:.1f} ms", flush=True)
    for name, make in methods(args).items():
        if name == "naive torch" and n > 8192:
            continue  # 4x its 22.8 GB at N=8192
        row = {"n": n, "d": d, "v": v, "kind": kind, "method": name, "floor_ms": floor_ms}
        try:
            fn = make()
            row.update(measure(fn, h, w, y, args.reps, None if hasattr(fn, "no_errors") else ref))
            row["x_floor"] = row["ms"] / floor_ms
        except ImportError as exc:
            row["error"] = f"not installed: {exc}"
        except torch.OutOfMemoryError:
            row["error"] = "out of memory"
        except Exception as exc:  # report and carry on with the other methods
            row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
        release_memory()
        results.write(f"{n}x{d}x{v}/{kind}/{name}", **row, **stats, tflops=args.tflops)
        print(format_row(row), flush=True)


def format_row(r) -> str:
    if "error" in r:
        return f"  {r['method']:<34} {r['error']}"
    err = ""
    if "grad_h_err" in r:
        err = f" loss {r['loss_err']:.1e} dH {r['grad_h_err']:.1e} dW {r['grad_w_err']:.1e}"
    return (
        f"  {r['method']:<34} {r['ms']:8.1f} ms ({r['x_floor']:.2f}x floor, fwd "
        f"{r['fwd_ms']:6.1f}) {r['extra_mib']:9.1f} MiB{err}"
    )


# -- correctness and end to end ---------------------------------------------------------------

CASES = (
    {},
    {"softcap": 30.0, "reduction": "sum"},
    {"label_smoothing": 0.1, "bias": True},
    {"reduction": "none", "shift": True},
    {"grad_filter": True, "grad_filter_eps": 1e-30, "bias": True},
    {"peaked": True},
    {"z_loss": 1e-4, "label_smoothing": 0.1, "softcap": 30.0, "bias": True},
    {"z_loss": 1e-4, "grad_filter": True, "grad_filter_eps": 1e-30, "peaked": True},
)
TOLERANCES = ((torch.bfloat16, 2e-2), (torch.float16, 1e-2), (torch.float32, 1e-3))


def correctness(results, impls=("triton", "cublas")) -> None:
    """memtrain's GPU paths against float64 on odd shapes, every option."""
    torch.manual_seed(0)
    cases = []
    for impl in impls:
        for dtype, tol in TOLERANCES:
            for n, d, v in ((1, 64, 1000), (257, 96, 3001), (1000, 200, 50257)):
                for case in CASES:
                    if impl == "cublas" and case.get("grad_filter"):
                        continue
                    errs = check_case(impl, dtype, n, d, v, dict(case))
                    ok = all(math.isfinite(e) and e <= tol for e in errs)
                    cases.append({"case": f"{impl} {dtype} {n}x{d}x{v} {case}", "ok": ok})
                    cases[-1].update(errs=errs, tol=tol, worst_over_tol=max(errs) / tol)
                    if not ok:
                        print(f"  FAIL {cases[-1]}", flush=True)
    passed = sum(c["ok"] for c in cases)
    worst = max(c["worst_over_tol"] for c in cases)
    results.write("correctness", passed=passed, cases=len(cases), worst_over_tol=worst)
    print(f"GPU correctness: {passed}/{len(cases)} within tolerance (worst {worst:.2f}x tol)")


def check_case(impl, dtype, n, d, v, opts) -> list[float]:
    peaked = opts.pop("peaked", False)
    h = torch.randn(n, d, device="cuda")
    w = torch.randn(v, d, device="cuda") / math.sqrt(d) * 4
    y = torch.randint(0, v, (n,), device="cuda")
    if peaked:  # logits ~25 on the target
        h = 25.0 * w[y] / 16 + 0.3 * torch.randn(n, d, device="cuda")
    y[torch.rand(n, device="cuda") < 0.1] = -100
    y[0] = 0  # at least one valid label, or "mean" is 0/0 in both
    ins = [h.to(dtype).requires_grad_(), w.to(dtype).requires_grad_()]
    if opts.pop("bias", False):
        ins.append(torch.randn(v, device="cuda").to(dtype).requires_grad_())
        opts["bias"] = ins[2]
    out = linear_cross_entropy(ins[0], ins[1], y, impl=impl, **opts)
    ref_ins = [t.detach().double().requires_grad_() for t in ins]
    ref_opts = {k: x for k, x in opts.items() if not k.startswith("grad_filter")}
    if "bias" in opts:
        ref_opts["bias"] = ref_ins[2]
    ref = reference_linear_cross_entropy(ref_ins[0], ref_ins[1], y, **ref_opts)
    grad = torch.randn_like(ref) if ref.dim() else torch.ones_like(ref)
    grads = torch.autograd.grad(out.float(), ins, grad.float())
    ref_grads = torch.autograd.grad(ref, ref_ins, grad)
    return [rel(out, ref)] + [rel(a, b) for a, b in zip(grads, ref_grads, strict=True)]


def end_to_end(tokens: int, results) -> None:
    """Peak memory and time of an AdamW step of llama-3.2-1b with and without the fused loss."""
    from memtrain.kernels import patch_causal_lm_loss
    from memtrain.models import build_causal_lm, load_config

    for fused in (False, True):
        release_memory()
        row = {"tokens": tokens, "fused_loss": fused}
        try:
            model = build_causal_lm(load_config("llama-3.2-1b"), "bf16", "cuda")
            model.train()
            if fused:
                patch_causal_lm_loss(model)
            opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
            ids = torch.randint(0, model.config.vocab_size, (1, tokens), device="cuda")

            def step(model=model, opt=opt, ids=ids):
                model(input_ids=ids, labels=ids).loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)

            step()  # AdamW's states exist from here on
            with PeakMemory() as memory:
                seconds = min(timed(step, warmup=0, repeats=2))
            row.update(peak_gib=memory.peak / GiB, step_s=seconds, tokens_per_s=tokens / seconds)
            del model, opt, step
        except torch.OutOfMemoryError:
            row["error"] = "out of memory"
        results.write(f"end-to-end/{tokens}/{'fused' if fused else 'stock'} loss", **row)
        print(f"llama-3.2-1b, {tokens} tokens, fused loss {fused}: {row}", flush=True)


def main() -> int:
    p = parser(__doc__)
    p.add_argument("--shapes", default=SHAPES, help="NxDxV,...")
    p.add_argument("--kinds", default="random,peaked")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--workspaces", default="14,64", help="MiB, exact path")
    p.add_argument("--filter-workspaces", default="256", help="MiB, filtered path")
    p.add_argument("--cublas-workspaces", default="64", help="MiB, cuBLAS path")
    p.add_argument("--only", default="", help="comma-separated substrings of method names")
    p.add_argument("--max-ref-rows", type=int, default=32768)
    p.add_argument("--correctness", action="store_true")
    p.add_argument("--e2e-tokens", type=int, default=0, help="0: no end-to-end step")
    p.add_argument(
        "--no-tuning-cache", action="store_true",
        help="time the launch settings again instead of reading the on-disk choices",
    )  # fmt: skip
    args = p.parse_args()
    if args.no_tuning_cache:
        from memtrain.kernels.cross_entropy import tuning_cache

        tuning_cache.ENABLED = False
    for name in ("workspaces", "filter_workspaces", "cublas_workspaces"):
        setattr(args, name, [int(x) for x in getattr(args, name).split(",") if x])
    args.only = [x for x in args.only.split(",") if x]
    if not torch.cuda.is_available():
        print("this benchmark needs a CUDA GPU")
        return 1
    results = results_for("bench_linear_cross_entropy", args)
    args.tflops = matmul_tflops()
    print(f"{results.environment}, bf16 matmul {args.tflops:.0f} TFLOP/s", flush=True)
    if args.correctness:
        correctness(results)
    for shape in args.shapes.split(","):
        n, d, v = (int(x) for x in shape.split("x"))
        for kind in args.kinds.split(","):
            run_shape(n, d, v, kind, args, results)
    if args.e2e_tokens:
        end_to_end(args.e2e_tokens, results)
    print(f"wrote {results.path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
