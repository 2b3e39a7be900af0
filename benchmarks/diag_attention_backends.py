"""Which fused attention kernel stock SDPA runs, and how fast each one the executor could call is.

Causal attention in the 1.2B model's shapes (32 query heads, 8 key/value heads, head dim 64,
bf16, the [batch, heads, seq, dim] views Hugging Face passes): forward and backward seconds of
``F.scaled_dot_product_attention`` (as Hugging Face calls it, with ``enable_gqa``), of the flash
and cuDNN ATen ops called directly as the executor calls them (grouped heads native, and
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


def direct_case(seq: int, kernel: str, native: bool) -> dict:
    """The executor's own direct calls (``memtrain.offload.memo.FlashAttention``)."""
    from memtrain.offload.memo import FlashAttention

    attention = FlashAttention(DIM**-0.5)
    forward = attention.cudnn_forward if kernel == "cudnn" else attention.flash_forward
    name = f"{kernel} native_gqa={native}"
    q, k, v = inputs(seq, KV_HEADS)
    if not native:
        k = k.repeat_interleave(HEADS // KV_HEADS, dim=1)
        v = v.repeat_interleave(HEADS // KV_HEADS, dim=1)
    try:
        out, lse, extra = forward(q, k, v)
        grad = torch.randn_like(out)
        attention.cuda_backward(grad, q, k, v, out, lse, extra)
    except (RuntimeError, TypeError) as exc:
        return {"case": name, "error": str(exc)[:200]}
    fwd = timed(lambda: forward(q, k, v))
    bwd = timed(lambda: attention.cuda_backward(grad, q, k, v, out, lse, extra))
    return {"case": name, "fwd_s": fwd, "bwd_s": bwd}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int, nargs="*", default=[65536])
    args = parser.parse_args()
    rows = [{"device": torch.cuda.get_device_name(), "torch": torch.__version__}]
    for seq in args.seq:
        for case, extra in (
            (sdpa_case, ()),
            (direct_case, ("flash", True)),
            (direct_case, ("flash", False)),
            (direct_case, ("cudnn", True)),
            (direct_case, ("cudnn", False)),
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
