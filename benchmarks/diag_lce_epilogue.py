"""What the fused loss's tile epilogues cost: the logits-gradient kernel against the same
persistent matmul loop whose epilogue only stores the products (one GPU).

The Triton kernels run one loop over (tile, hidden step) without warp specialization, so a
tile's epilogue (exponentials, row statistics, the one-hot) runs while the matrix units wait.
The bare kernel here has the same loop, tiles, descriptors and grid, and stores the raw
float32 products rounded to the dtype: the difference in time is what the epilogue costs; the
bare kernel's rate against cuBLAS on the same product is what the loop itself leaves.

Reproduce:  python benchmarks/diag_lce_epilogue.py --out epilogue.json
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import datetime, timezone
from pathlib import Path

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_linear_cross_entropy import make_inputs  # noqa: E402
from diag_lce_launch import gpu_ms  # noqa: E402

from memtrain.kernels.cross_entropy import triton_function, triton_tma  # noqa: E402


@triton.jit
def _bare_flat_kernel(
    h_desc, w_desc, out_ptr, rows, cols, dim, stride_out, programs,
    BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    tiles_m = tl.cdiv(rows, BLOCK_M)
    tiles = tiles_m * tl.cdiv(cols, BLOCK_V)
    k_steps = tl.cdiv(dim, BLOCK_D)
    steps = tl.cdiv(tiles - pid, programs) * k_steps
    acc = tl.zeros((BLOCK_M, BLOCK_V), dtype=tl.float32)
    for i in range(0, steps):
        k = i % k_steps
        tile = pid + (i // k_steps) * programs
        r0 = (tile % tiles_m) * BLOCK_M
        c0 = (tile // tiles_m) * BLOCK_V
        h = h_desc.load([r0, k * BLOCK_D])
        w = w_desc.load([c0, k * BLOCK_D])
        acc = tl.dot(h, w.T, acc)
        if k == k_steps - 1:
            r = (r0 + tl.arange(0, BLOCK_M)).to(tl.int64)
            c = c0 + tl.arange(0, BLOCK_V)
            mask = (r < rows)[:, None] & (c < cols)[None, :]
            ptrs = out_ptr + r[:, None] * stride_out + c[None, :]
            tl.store(ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask)
            acc = tl.zeros((BLOCK_M, BLOCK_V), dtype=tl.float32)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="lce_epilogue.json")
    p.add_argument("--shape", default="8192x2304x256000")
    p.add_argument("--chunks", default="2048x3584,2048x4096,2816x7168")
    p.add_argument("--tile", default="128x256x64/8/4")
    args = p.parse_args()
    n, d, v = (int(x) for x in args.shape.split("x"))
    tile, warps, stages = args.tile.split("/")
    bm, bv, bd = (int(x) for x in tile.split("x"))
    h, w, y = make_inputs(n, d, v, "peaked")
    lse = torch.full((n,), 12.0, device="cuda")
    grad_rows = torch.full((n,), 1.0 / n, device="cuda")
    targets = y.int()
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    cfg = dict(
        triton_function._config(bm, bv, bd, int(warps), int(stages), "ieee"),
        tma=True, flat=True, pdl=True, programs=sms,
    )  # fmt: skip
    desc = triton_tma.Descriptors(h, w, cfg)
    h_desc = TensorDescriptor.from_tensor(h, [bm, bd])
    w_desc = TensorDescriptor.from_tensor(w, [bv, bd])
    out = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(sys.argv),
        "tile": args.tile,
        "chunks": {},
    }
    for text in args.chunks.split(","):
        r, c = (int(x) for x in text.split("x"))
        buf = torch.empty((r, c), dtype=h.dtype, device="cuda")
        tiles = -(-r // bm) * -(-c // bv)
        programs = min(tiles, sms)
        flops = 2 * r * c * d

        def loss_kernel(r=r, c=c, buf=buf):
            triton_tma.grad_logits_tma(
                cfg, desc, h, w, None, targets, lse, grad_rows, buf, (0, r), (0, c), None, 0.0
            )

        def bare(r=r, c=c, buf=buf, programs=programs):
            _bare_flat_kernel[(programs,)](
                h_desc, w_desc, buf, r, c, d, buf.stride(0), programs,
                BLOCK_M=bm, BLOCK_V=bv, BLOCK_D=bd, num_warps=int(warps),
                num_stages=int(stages),
            )  # fmt: skip

        ht, wt = h[:r], w[:c]

        def cublas(ht=ht, wt=wt, buf=buf):
            torch.mm(ht, wt.t(), out=buf)

        row = {"tiles": tiles, "waves": tiles / sms}
        for name, fn in (("logits gradient", loss_kernel), ("bare loop", bare), ("cuBLAS", cublas)):
            ms = gpu_ms(fn)
            row[name] = {"ms": ms, "tflops": flops / ms / 1e9}
            if name == "bare loop":  # the bare kernel computes the product it claims to
                ref = ht.float() @ wt.float().t()
                row["bare_rel_err"] = ((buf.float() - ref).norm() / ref.norm()).item()
                del ref
        out["chunks"][text] = row
        desc.release_chunks()
        print(text, json.dumps(row), flush=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
