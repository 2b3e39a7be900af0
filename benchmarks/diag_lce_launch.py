"""Host cost of each launch in the exact fused-loss backward, piece by piece (one GPU).

The exact backward at a small workspace launches about three kernels per chunk (logits
gradient, dH product, dW product); when the host needs longer per chunk than the GPU, the GPU
waits. This prints microseconds of host time per call (the GPU kept busy, so calls only queue)
for: the logits-gradient kernel through Triton's JIT entry, through the compiled kernel's own
launcher, the tensor-descriptor encoding alone, the two cuBLAS products as the schedule calls
them, and a one-element PyTorch op for scale; and the GPU time of the logits-gradient kernel on
a few chunk shapes (tiles against the GPU's multiprocessors).

Reproduce:  python benchmarks/diag_lce_launch.py --out launch.json
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_linear_cross_entropy import make_inputs  # noqa: E402

from memtrain.kernels.cross_entropy import triton_function, triton_launch, triton_tma  # noqa: E402
from memtrain.kernels.cross_entropy.triton_bwd import accumulate_mm  # noqa: E402


def host_us(fn, calls: int, busy: torch.Tensor) -> float:
    """Host microseconds per ``fn()``, with a long matmul queued first so the GPU is busy and
    the calls only enqueue (a launch queue of ~1000 entries holds them)."""
    fn()
    torch.cuda.synchronize()
    for _ in range(4):  # ~tens of ms of GPU work ahead of the calls
        busy @ busy
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    elapsed = time.perf_counter() - start
    torch.cuda.synchronize()
    return elapsed / calls * 1e6


def gpu_ms(fn, reps: int = 50) -> float:
    """GPU milliseconds per ``fn()`` (CUDA events around ``reps`` runs, after one warm-up)."""
    fn()
    torch.cuda.synchronize()
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    stop.record()
    stop.synchronize()
    return start.elapsed_time(stop) / reps


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="lce_launch.json")
    p.add_argument("--shape", default="8192x2304x256000")
    p.add_argument("--chunk", default="2048x3584")
    p.add_argument("--calls", type=int, default=300)
    p.add_argument("--gpu-chunks", default="2048x3584,2048x2112,1536x2816,2048x4096,2816x7168")
    args = p.parse_args()
    n, d, v = (int(x) for x in args.shape.split("x"))
    rows, cols = (int(x) for x in args.chunk.split("x"))
    h, w, y = make_inputs(n, d, v, "peaked")
    lse = torch.full((n,), 12.0, device="cuda")
    grad_rows = torch.full((n,), 1.0 / n, device="cuda")
    targets = y.int()
    dz = torch.empty((rows, cols), dtype=h.dtype, device="cuda")
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    cfg = dict(
        triton_function._config(128, 256, 64, 8, 3, "ieee", programs=16 * sms, tma=True),
        programs=sms,
        flat=True,
    )
    desc = triton_tma.Descriptors(h, w, cfg)
    busy = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    result: dict = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": __import__("triton").__version__,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "host": platform.node(),
        "command": " ".join(sys.argv),
        "chunk": [rows, cols],
    }

    def grad_launch():
        triton_tma.grad_logits_tma(
            cfg, desc, h, w, None, targets, lse, grad_rows, dz, (0, rows), (0, cols), None, 0.0
        )

    triton_launch.ENABLED = False
    us = {"grad_logits_tma, Triton's entry point": host_us(grad_launch, args.calls, busy)}
    triton_launch.ENABLED = True
    us["grad_logits_tma, repeat launch (default)"] = host_us(grad_launch, args.calls, busy)

    # The same launch through the compiled kernel's launcher (no argument binding, no cache key).
    compiled = triton_tma._grad_logits_tma_kernel[(sms,)](
        desc.hidden, desc.weight, desc.chunk(dz, rows, cols), dz, h, targets, lse, grad_rows,
        0, rows, 0, cols, v, d, dz.stride(0), 1.0, 0.0, 1.0 / v, sms,
        HAS_BIAS=False, HAS_SOFTCAP=False, BLOCK_M=128, BLOCK_V=256, BLOCK_D=64, UPCAST=False,
        TMA_STORE=False, FLAT=True, FLATTEN=False, WARP_SPECIALIZE=False,
        num_warps=8, num_stages=3,
    )  # fmt: skip
    kernel_args = (
        desc.hidden, desc.weight, desc.chunk(dz, rows, cols), dz, h, targets, lse, grad_rows,
        0, rows, 0, cols, v, d, dz.stride(0), 1.0, 0.0, 1.0 / v, sms,
        False, False, 128, 256, 64, False, False, True, False, False,
    )  # fmt: skip
    stream = torch.cuda.current_stream().cuda_stream

    def direct():
        compiled.run(
            sms, 1, 1, stream, compiled.function, compiled.packed_metadata, None, None, None,
            *kernel_args,
        )  # fmt: skip

    try:
        us["compiled kernel's launcher"] = host_us(direct, args.calls, busy)
    except Exception as exc:  # the launcher's calling convention differs between versions
        us["compiled kernel's launcher"] = f"failed: {type(exc).__name__}: {exc}"

    # Descriptor encoding alone (done for each descriptor argument at each launch).
    try:
        from triton.backends.nvidia import driver as nv

        meta = compiled.metadata.tensordesc_meta[0]
        encode = nv.make_tensordesc_arg
        n_params = encode.__code__.co_argcount

        def encode_one():
            encode(desc.hidden, meta) if n_params == 2 else encode(desc.hidden, meta, None)

        start = time.perf_counter()
        for _ in range(args.calls):
            encode_one()
        us["one descriptor encoding"] = (time.perf_counter() - start) / args.calls * 1e6
    except Exception as exc:
        us["one descriptor encoding"] = f"failed: {type(exc).__name__}: {exc}"

    acc = torch.zeros((rows, d), dtype=torch.float32, device="cuda")
    gw = torch.empty_like(w)
    chunk = dz[:rows, :cols]
    us["dH product (accumulate_mm)"] = host_us(
        lambda: accumulate_mm(acc, chunk, w[:cols]), args.calls, busy
    )
    us["dW product (addmm_)"] = host_us(
        lambda: gw[:cols].addmm_(chunk.t(), h[:rows]), args.calls, busy
    )
    tiny = torch.zeros(1, device="cuda")
    us["one-element add_"] = host_us(lambda: tiny.add_(1.0), args.calls, busy)
    result["host_us_per_call"] = us

    gpu = {}
    for text in args.gpu_chunks.split(","):
        r, c = (int(x) for x in text.split("x"))
        buf = torch.empty((r, c), dtype=h.dtype, device="cuda")
        tiles = -(-r // 128) * -(-c // 256)
        ms = gpu_ms(
            lambda r=r, c=c, buf=buf: triton_tma.grad_logits_tma(
                cfg, desc, h, w, None, targets, lse, grad_rows, buf, (0, r), (0, c), None, 0.0
            ),
            50,
        )
        tflops = 2 * r * c * d / ms / 1e9
        gpu[text] = {"tiles": tiles, "waves": tiles / sms, "ms": ms, "tflops": tflops}
        desc.release_chunks()
    result["grad_kernel_gpu"] = gpu
    print(json.dumps(result, indent=1))
    Path(args.out).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
