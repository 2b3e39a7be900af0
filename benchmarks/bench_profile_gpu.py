"""Dry-run peak prediction against a real CUDA training step.

For the 1.2B Llama-style model (preset ``llama-3.2-1b``: hidden 2048, 16 layers, 32/8 heads,
MLP 8192, vocab 128256, tied embeddings), bf16, fused AdamW, SDPA, batch 1, no checkpointing:

1. the dry run on meta tensors (no GPU involved) predicts the step's peak memory;
2. a plain training loop with no memtrain code in it measures ``torch.cuda.max_memory_allocated``
   over its second step (the first creates the optimizer state);
3. the measured-mode profiler on CUDA checks per-layer saved bytes against the dry run.

Run:  python benchmarks/bench_profile_gpu.py [--seqs 4096 8192 16384] [--out results.json]
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import platform
import time

import torch

from memtrain.models import build_causal_lm, load_config
from memtrain.profile import profile_causal_lm

GiB = 2**30


def plain_loop_peak(model_name: str, seq: int, steps: int = 3) -> dict:
    """A stock training loop: the reference measurement, no memtrain instruments."""
    config = load_config(model_name)
    model = build_causal_lm(config, "bf16", "cuda")
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
    ids = torch.randint(0, config.vocab_size, (1, seq), device="cuda")
    times = []
    peak = 0
    for step in range(steps):
        torch.cuda.synchronize()
        if step == 1:
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        del out
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        if step == 1:
            peak = torch.cuda.max_memory_allocated()
    del model, optimizer, ids
    gc.collect()
    torch.cuda.empty_cache()
    return {"peak": peak, "step_s": min(times[1:])}


def attention_rate(seq: int = 16384, heads: int = 32, kv_heads: int = 8, dim: int = 64) -> dict:
    """Achieved FLOP/s of causal fused attention (forward, backward), GQA as in the model."""
    q = torch.randn(1, heads, seq, dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(1, kv_heads, seq, dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn_like(k, requires_grad=True)
    flops_fwd = 4 * heads * seq * seq * dim * 0.5
    fwd, bwd = [], []
    for _ in range(6):
        a, b, c = (torch.cuda.Event(enable_timing=True) for _ in range(3))
        a.record()
        out = torch.nn.functional.scaled_dot_product_attention(
            q, k, v, is_causal=True, enable_gqa=True
        )
        b.record()
        out.backward(torch.ones_like(out))
        c.record()
        torch.cuda.synchronize()
        fwd.append(a.elapsed_time(b) / 1e3)
        bwd.append(b.elapsed_time(c) / 1e3)
    fwd_s, bwd_s = sorted(fwd[1:])[2], sorted(bwd[1:])[2]
    return {"fwd_tflops": flops_fwd / fwd_s / 1e12, "bwd_tflops": 2.5 * flops_fwd / bwd_s / 1e12}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="llama-3.2-1b")
    parser.add_argument("--seqs", type=int, nargs="+", default=[4096, 8192, 16384])
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    device = torch.cuda.get_device_name()
    rates = attention_rate()
    print(json.dumps({"attention_rate": rates}), flush=True)
    rows = []
    for seq in args.seqs:
        started = time.perf_counter()
        dry = profile_causal_lm(
            args.model,
            seq=seq,
            dtype="bf16",
            device="meta",
            target="h100-sxm-80g",
            optimizer="adamw:fused=true",
        )
        dry_s = time.perf_counter() - started
        plain = plain_loop_peak(args.model, seq)
        try:
            measured = profile_causal_lm(
                args.model, seq=seq, dtype="bf16", device="cuda", optimizer="adamw:fused=true"
            )
        except Exception as exc:  # report the reference numbers even if this part fails
            print(f"measured-mode profiler failed: {exc!r}", flush=True)
            measured = None
        mismatched = {}
        if measured is not None:
            mismatched = {
                a.name: (a.saved_bytes, b.saved_bytes)
                for a, b in zip(dry.layers, measured.layers, strict=False)
                if a.saved_bytes != b.saved_bytes
            }
        gc.collect()
        torch.cuda.empty_cache()
        row = {
            "seq": seq,
            "dry_simulated_peak_gib": dry.simulated_peak_bytes / GiB,
            "dry_upper_bound_gib": dry.predicted_peak_bytes / GiB,
            "measured_peak_gib": plain["peak"] / GiB,
            "error_pct": 100 * (dry.simulated_peak_bytes - plain["peak"]) / plain["peak"],
            "profiler_cuda_peak_gib": measured.measured_peak_bytes / GiB if measured else None,
            "dry_saved_gib": dry.saved_bytes / GiB,
            "cuda_saved_gib": measured.saved_bytes / GiB if measured else None,
            "cuda_layer_times_ms": {
                x.name: (round(x.forward_time_s * 1e3, 2), round(x.backward_time_s * 1e3, 2))
                for x in measured.layers
            }
            if measured
            else None,
            "dry_layer_times_ms": {
                x.name: (round(x.forward_time_s * 1e3, 2), round(x.backward_time_s * 1e3, 2))
                for x in dry.layers
            },
            "saved_layers_mismatched": mismatched,
            "dry_step_s_est": dry.step_time_s,
            "measured_step_s": plain["step_s"],
            "tokens_per_s": seq / plain["step_s"],
            "dry_run_s": dry_s,
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
    print()
    print(
        f"device: {device}; torch {torch.__version__}; python {platform.python_version()}; "
        f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC"
    )
    print(
        "| seq | dry-run peak (GiB) | measured max_memory_allocated (GiB) | error | "
        "upper bound (GiB) | est. step (s) | measured step (s) | tokens/s |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['seq']} | {r['dry_simulated_peak_gib']:.2f} | {r['measured_peak_gib']:.2f} | "
            f"{r['error_pct']:+.1f}% | {r['dry_upper_bound_gib']:.2f} | "
            f"{r['dry_step_s_est']:.3f} | {r['measured_step_s']:.3f} | {r['tokens_per_s']:,.0f} |"
        )
    print(
        f"causal GQA flash attention at 16384 tokens: forward {rates['fwd_tflops']:.0f} "
        f"TFLOP/s, backward {rates['bwd_tflops']:.0f} TFLOP/s"
    )
    if args.out:
        with open(args.out, "w") as handle:
            json.dump(
                {
                    "device": device,
                    "torch": torch.__version__,
                    "rows": rows,
                    "attention_rate": rates,
                },
                handle,
                indent=1,
            )


if __name__ == "__main__":
    main()
