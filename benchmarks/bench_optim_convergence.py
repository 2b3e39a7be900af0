"""Convergence benchmark: memory-lean optimizers against AdamW on a small byte-level Llama.

A random-init Llama-style model (built from a config dict by ``memtrain.models.build_causal_lm``)
learns the bytes of the Python standard library's sources (a text corpus present on every
machine) with each optimizer: the same model seed, token stream, batch, warmup-cosine schedule
and step count for all. The last 5% of the corpus is held out for validation. Low-rank methods
project every block linear at rank r. Reports train loss (mean of the last 20 steps), held-out
loss, optimizer-state bytes (measured, and equal to the registered formula) and seconds per step.

Examples: the defaults (a 0.4M-parameter model, about 15 minutes on 2 busy, shared CPU cores),
and a 57M-parameter model for a few thousand steps on a GPU (weights and states float32, the
forward and backward under bf16 autocast; --eval-batches held-out batches):

    python -m benchmarks.bench_optim_convergence
    python -m benchmarks.bench_optim_convergence --device cuda --autocast bf16 --steps 2000 \
        --seq 512 --batch 32 --hidden 768 --intermediate 2048 --layers 8 --heads 12 \
        --rank 128 --gap 200 --eval-batches 32
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.harness import parser as make_parser
from benchmarks.harness import results_for
from memtrain.optim import build_optimizer, predicted_state_bytes


def corpus_bytes(limit: int) -> torch.Tensor:
    root = Path(os.__file__).parent
    chunks, total = [], 0
    for path in sorted(root.rglob("*.py")):
        data = path.read_bytes()
        chunks.append(data)
        total += len(data)
        if total >= limit:
            break
    return torch.frombuffer(bytearray(b"".join(chunks)), dtype=torch.uint8).long()


def model_config(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "model_type": "llama",
        "vocab_size": 256,
        "hidden_size": args.hidden,
        "intermediate_size": args.intermediate,
        "num_hidden_layers": args.layers,
        "num_attention_heads": args.heads,
        "num_key_value_heads": args.heads,
        "max_position_embeddings": args.seq,
        "tie_word_embeddings": True,
    }


def make_model(args: argparse.Namespace) -> torch.nn.Module:
    from transformers import AutoConfig

    from memtrain.models import build_causal_lm

    values = model_config(args)
    config = AutoConfig.for_model(values.pop("model_type"), **values)
    return build_causal_lm(config, dtype="fp32", device=args.device, seed=0)


def autocast(args: argparse.Namespace):
    """bf16 autocast for forward and backward where asked (states and weights stay float32)."""
    import contextlib

    if args.autocast == "bf16":
        return torch.autocast(torch.device(args.device).type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def batches(data: torch.Tensor, seq: int, batch: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    while True:
        starts = torch.randint(0, data.numel() - seq - 1, (batch,), generator=gen)
        yield torch.stack([data[s : s + seq] for s in starts.tolist()])


def evaluate(model: torch.nn.Module, eval_batches: list[torch.Tensor], args) -> float:
    model.eval()
    with torch.no_grad(), autocast(args):
        losses = [float(model(input_ids=b, labels=b).loss) for b in eval_batches]
    model.train()
    return statistics.mean(losses)


def run(name: str, spec: str, lr: float, args, train_data, eval_batches) -> dict[str, Any]:
    model = make_model(args)
    optimizer = build_optimizer(model, spec, lr=lr)
    warmup = max(1, args.steps // 10)

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, args.steps - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    stream = batches(train_data, args.seq, args.batch, seed=1)
    losses = []
    start = time.perf_counter()
    for step in range(args.steps):
        tokens = next(stream).to(args.device)
        with autocast(args):
            loss = model(input_ids=tokens, labels=tokens).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        losses.append(loss.detach())
        if step % 50 == 0 or step == args.steps - 1:
            losses[-1] = float(losses[-1])
            print(f"{name:>14} step {step:4d} loss {losses[-1]:.4f}", flush=True)
    losses = [float(x) for x in losses]
    seconds = (time.perf_counter() - start) / args.steps
    state = (
        optimizer.state_bytes()
        if hasattr(optimizer, "state_bytes")
        else sum(
            v.numel() * v.element_size()
            for s in optimizer.state.values()
            for v in s.values()
            if isinstance(v, torch.Tensor)
        )
    )
    return {
        "spec": spec,
        "lr": lr,
        "train_loss_last20": statistics.mean(losses[-20:]),
        "eval_loss": evaluate(model, eval_batches, args),
        "state_bytes": state,
        "state_bytes_formula": predicted_state_bytes(model, spec),
        "seconds_per_step": seconds,
        "params": sum(p.numel() for p in model.parameters()),
    }


DEFAULT_RUNS = (
    "adamw",
    "adamw8bit",
    "galore",
    "natural-galore",
    "frugal",
    "apollo",
    "apollo-mini",
    "cosmos",
)


def run_specs(r: int, gap: int, hidden: int) -> dict[str, tuple[str, float]]:
    """Run name -> (spec, peak learning rate). Learning rates are the methods' published
    defaults for small Llamas where they exist (GaLore and APOLLO 1e-2 with their scales),
    AdamW's 1e-3 otherwise; none was tuned on this benchmark."""
    galore = f"rank={r},update_proj_gap={gap}"
    return {
        "adamw": ("adamw:weight_decay=0", 1e-3),
        "adamw8bit": ("adamw8bit:weight_decay=0", 1e-3),
        "galore": (f"galore:{galore},scale=0.25", 1e-2),
        "galore-8bit": (f"galore:{galore},scale=0.25,bits=8", 1e-2),
        "natural-galore": (f"natural-galore:{galore},scale=0.25", 1e-2),
        "frugal": (f"frugal:rank={r},proj_type=svd,update_proj_gap={gap}", 1e-3),
        "frugal-reset": (
            f"frugal:rank={r},proj_type=svd,update_proj_gap={gap},moment_transfer=reset",
            1e-3,
        ),
        "frugal-8bit": (f"frugal:rank={r},proj_type=svd,update_proj_gap={gap},bits=8", 1e-3),
        "frugal-columns": (
            f"frugal:density={r / hidden},proj_type=columns,update_proj_gap={gap}",
            1e-3,
        ),
        "apollo": (f"apollo:rank={r},update_proj_gap={gap}", 1e-2),
        "apollo-mini": (f"apollo-mini:update_proj_gap={gap}", 1e-2),
        "cosmos": (f"cosmos:rank={r}", 1e-3),
    }


def main() -> None:
    parser = make_parser(__doc__)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--intermediate", type=int, default=352)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--gap", type=int, default=50, help="projection refresh period")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu", help="cpu | cuda")
    parser.add_argument("--autocast", choices=("off", "bf16"), default="off")
    parser.add_argument("--eval-batches", type=int, default=8)
    parser.add_argument(
        "--runs",
        default=",".join(DEFAULT_RUNS),
        help="comma-separated runs among " + ", ".join(sorted(run_specs(32, 50, 128))),
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    data = corpus_bytes(16 * 1024 * 1024)
    split = int(data.numel() * 0.95)
    train_data, eval_data = data[:split], data[split:]
    eval_stream = batches(eval_data, args.seq, args.batch, seed=2)
    eval_batches = [next(eval_stream).to(args.device) for _ in range(args.eval_batches)]
    runs = run_specs(args.rank, args.gap, args.hidden)
    unknown = set(args.runs.split(",")) - set(runs)
    if unknown:
        parser.error(f"unknown runs {sorted(unknown)}; choose from {sorted(runs)}")
    runs = {k: v for k, v in runs.items() if k in args.runs.split(",")}
    results = results_for("bench_optim_convergence", args, device=args.device)
    rows = {}
    for name, (spec, lr) in runs.items():
        rows[name] = run(name, spec, lr, args, train_data, eval_batches)
        settings = {"steps": args.steps, "batch": args.batch, "seq": args.seq}
        settings.update(autocast=args.autocast, eval_batches=len(eval_batches))
        settings["model"] = model_config(args)
        results.write(name, **rows[name], **settings)
    print("\n| optimizer | spec | lr | train loss (last 20) | held-out loss | state | s/step |")
    print("|---|---|---|---|---|---|---|")
    for name, row in rows.items():
        print(
            f"| {name} | `{row['spec']}` | {row['lr']:g} | {row['train_loss_last20']:.3f} | "
            f"{row['eval_loss']:.3f} | {row['state_bytes'] / 2**20:.1f} MiB | "
            f"{row['seconds_per_step']:.2f} |"
        )
    print(f"wrote {results.path}")


if __name__ == "__main__":
    main()
