"""The dry run's peak and step time against a real CUDA training step.

The 1.2B Llama-style model (preset ``llama-3.2-1b``), bf16, fused AdamW, SDPA, batch 1, no
checkpointing: the dry run on meta tensors (no GPU) predicts the step's peak memory and time; a
plain training loop with no memtrain code in it measures ``torch.cuda.max_memory_allocated``
over its second step (the first creates the optimizer states); the measured-mode profiler on
CUDA checks the per-layer saved bytes against the dry run. Also the achieved rate of causal
GQA attention (the cost model uses it).

Example: python -m benchmarks.bench_profile_gpu --seqs 4096 8192 16384
"""

from __future__ import annotations

import time

import torch

from benchmarks.harness import GiB, PeakMemory, parser, release_memory, results_for, time_call
from memtrain.models import build_causal_lm, load_config
from memtrain.profile import profile_causal_lm


def plain_loop(model_name: str, seq: int) -> dict:
    """A stock training loop (no memtrain instruments): peak and time of its second step."""
    config = load_config(model_name)
    model = build_causal_lm(config, "bf16", "cuda")
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
    ids = torch.randint(0, config.vocab_size, (1, seq), device="cuda")

    def step() -> None:
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()
    with PeakMemory() as memory:
        seconds = time_call(step, warmup=0, repeats=1)[0]
    seconds = min(seconds, time_call(step, warmup=0, repeats=1)[0])
    return {"peak": memory.peak, "step_s": seconds}  # the caller releases the model


def attention_rate(seq: int = 16384, heads: int = 32, kv_heads: int = 8, dim: int = 64) -> dict:
    """Achieved TFLOP/s of causal SDPA attention, forward and backward, GQA as in the model."""
    q = torch.randn(1, heads, seq, dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(1, kv_heads, seq, dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn_like(k, requires_grad=True)
    sdpa = torch.nn.functional.scaled_dot_product_attention
    out = sdpa(q, k, v, is_causal=True, enable_gqa=True)
    flops = 4 * heads * seq * seq * dim * 0.5
    fwd = sorted(time_call(lambda: sdpa(q, k, v, is_causal=True, enable_gqa=True)))[2]
    bwd = sorted(time_call(lambda: out.backward(torch.ones_like(out), retain_graph=True)))[2]
    return {"fwd_tflops": flops / fwd / 1e12, "bwd_tflops": 2.5 * flops / bwd / 1e12}


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--model", default="llama-3.2-1b")
    p.add_argument("--seqs", type=int, nargs="+", default=[4096, 8192, 16384])
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU")
    results = results_for("bench_profile_gpu", args)
    rates = attention_rate()
    results.write("attention rate, 16384 tokens", **rates)
    print(f"causal GQA attention at 16384 tokens: {rates}", flush=True)
    print("| tokens | dry-run peak (GiB) | measured (GiB) | error | upper bound | est. step (s) "
          "| measured step (s) | tokens/s |\n|---|---|---|---|---|---|---|---|")  # fmt: skip
    for seq in args.seqs:
        started = time.perf_counter()
        dry = profile_causal_lm(
            args.model, seq=seq, dtype="bf16", device="meta", target="h100-sxm-80g",
            optimizer="adamw:fused=true",
        )  # fmt: skip
        dry_s = time.perf_counter() - started
        plain = plain_loop(args.model, seq)
        release_memory()
        try:
            measured = profile_causal_lm(
                args.model, seq=seq, dtype="bf16", device="cuda", optimizer="adamw:fused=true"
            )
        except Exception as exc:  # the reference numbers count even if this part fails
            print(f"measured-mode profiler failed: {exc!r}", flush=True)
            measured = None
        release_memory()
        row = {
            "model": args.model,
            "seq": seq,
            "dry_peak_gib": dry.simulated_peak_bytes / GiB,
            "dry_upper_bound_gib": dry.predicted_peak_bytes / GiB,
            "measured_peak_gib": plain["peak"] / GiB,
            "error": dry.simulated_peak_bytes / plain["peak"] - 1,
            "profiler_cuda_peak_gib": measured.measured_peak_bytes / GiB if measured else None,
            "saved_bytes_differ": None
            if measured is None
            else {
                a.name: (a.saved_bytes, b.saved_bytes)
                for a, b in zip(dry.layers, measured.layers, strict=False)
                if a.saved_bytes != b.saved_bytes
            },
            "dry_step_s": dry.step_time_s,
            "measured_step_s": plain["step_s"],
            "tokens_per_s": seq / plain["step_s"],
            "dry_run_s": dry_s,
        }
        results.write(f"{args.model}@{seq}", **row)
        print(
            f"| {seq} | {row['dry_peak_gib']:.2f} | {row['measured_peak_gib']:.2f} | "
            f"{100 * row['error']:+.1f}% | {row['dry_upper_bound_gib']:.2f} | "
            f"{row['dry_step_s']:.3f} | {row['measured_step_s']:.3f} | {row['tokens_per_s']:,.0f} |",
            flush=True,
        )
    print(f"wrote {results.path}")


if __name__ == "__main__":
    main()
