"""Which fused attention kernel stock SDPA runs, and how fast each one the executor could call is.

Causal attention in the 1.2B model's shapes (32 query heads, 8 key/value heads, head dim 64,
bf16, the [batch, heads, seq, dim] views Hugging Face passes): forward and backward seconds of
``F.scaled_dot_product_attention`` (as Hugging Face calls it, with ``enable_gqa``), of the flash
and cuDNN ATen ops called directly (grouped heads native where the op accepts them, else
expanded), and the kernel names stock SDPA launched.

Run:  python benchmarks/diag_attention_backends.py --seq 65536 131072
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch
import torch.nn.functional as F

HEADS, KV_HEADS, DIM = 32, 8, 64


def timed(fn, repeats: int = 3) -> float:
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1000 / repeats


def inputs(seq: int, kv_heads: int):
    def make(heads):
        return torch.randn(1, seq, heads, DIM, device="cuda", dtype=torch.bfloat16).transpose(1, 2)

    return make(HEADS), make(kv_heads), make(kv_heads)


def sdpa_case(seq: int) -> dict:
    q, k, v = (t.requires_grad_() for t in inputs(seq, KV_HEADS))
    out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    grad = torch.randn_like(out)
    fwd = timed(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True))
    both = timed(
        lambda: torch.autograd.grad(
            F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True),
            (q, k, v),
            grad,
        )
    )
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        torch.autograd.grad(
            F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True),
            (q, k, v),
            grad,
        )
        torch.cuda.synchronize()
    names = sorted(
        {
            e.key[:90]
            for e in prof.key_averages()
            if "attn" in e.key.lower() or "fmha" in e.key.lower()
        }
    )
    return {"case": "sdpa(enable_gqa)", "fwd_s": fwd, "bwd_s": both - fwd, "kernels": names}


def flash_case(seq: int, native: bool) -> dict:
    q, k, v = inputs(seq, KV_HEADS)
    if not native:
        k = k.repeat_interleave(HEADS // KV_HEADS, dim=1)
        v = v.repeat_interleave(HEADS // KV_HEADS, dim=1)
    op = torch.ops.aten._scaled_dot_product_flash_attention
    bwd_op = torch.ops.aten._scaled_dot_product_flash_attention_backward
    try:
        res = op(q, k, v, 0.0, True, False)
    except RuntimeError as exc:
        return {"case": f"flash native_gqa={native}", "error": str(exc)[:200]}
    out, lse = res[0], res[1]
    grad = torch.randn_like(out)
    fwd = timed(lambda: op(q, k, v, 0.0, True, False))
    bwd = timed(lambda: bwd_op(grad, q, k, v, out, lse, *res[2:6], 0.0, True, res[6], res[7]))
    return {"case": f"flash native_gqa={native}", "fwd_s": fwd, "bwd_s": bwd}


def cudnn_case(seq: int, native: bool) -> dict:
    q, k, v = inputs(seq, KV_HEADS)
    if not native:
        k = k.repeat_interleave(HEADS // KV_HEADS, dim=1)
        v = v.repeat_interleave(HEADS // KV_HEADS, dim=1)
    op = torch.ops.aten._scaled_dot_product_cudnn_attention
    bwd_op = torch.ops.aten._scaled_dot_product_cudnn_attention_backward
    try:
        res = op(q, k, v, None, True, 0.0, True, False)
        out, lse = res[0], res[1]
        grad = torch.randn_like(out)
        empty = None  # no bias: an undefined tensor
        bwd_op(
            grad,
            q,
            k,
            v,
            out,
            lse,
            res[6],
            res[7],
            empty,
            res[2],
            res[3],
            res[4],
            res[5],
            0.0,
            True,
        )
    except RuntimeError as exc:
        return {"case": f"cudnn native_gqa={native}", "error": str(exc)[:200]}
    fwd = timed(lambda: op(q, k, v, None, True, 0.0, True, False))
    bwd = timed(
        lambda: bwd_op(
            grad,
            q,
            k,
            v,
            out,
            lse,
            res[6],
            res[7],
            empty,
            res[2],
            res[3],
            res[4],
            res[5],
            0.0,
            True,
        )
    )
    return {"case": f"cudnn native_gqa={native}", "fwd_s": fwd, "bwd_s": bwd}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int, nargs="*", default=[65536])
    args = parser.parse_args()
    rows = [{"device": torch.cuda.get_device_name(), "torch": torch.__version__}]
    for seq in args.seq:
        for case, extra in (
            (sdpa_case, ()),
            (flash_case, (True,)),
            (flash_case, (False,)),
            (cudnn_case, (True,)),
            (cudnn_case, (False,)),
        ):
            row = {"seq": seq, **case(seq, *extra)}
            rows.append(row)
            print(json.dumps(row), flush=True)
            torch.cuda.empty_cache()
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "diag_attention_backends.json").write_text(
            json.dumps(rows, indent=1)
        )


if __name__ == "__main__":
    main()
