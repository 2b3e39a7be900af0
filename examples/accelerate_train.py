"""Train a causal LM under a memtrain plan with Hugging Face Accelerate, in several processes.

On GPUs (one process per GPU, DDP over NCCL)::

    accelerate launch --multi_gpu --num_processes 2 examples/accelerate_train.py

On a CPU-only machine (DDP over gloo; ``--cpu`` makes the script ask for ``Accelerator(cpu=True)``;
``accelerate launch --cpu`` alone starts a single process unless mpirun is configured, so the
processes are started by ``--multi_gpu``, which is accelerate's torchrun launcher)::

    accelerate launch --multi_gpu --num_processes 2 examples/accelerate_train.py --cpu --tiny

The one rule: ``memtrain.prepare`` gets the bare model and ``accelerator.prepare`` gets what it
returned (the model with the plan installed, and the optimizer the plan chose). memtrain plans
the model, installs activation swap/recompute hooks on its layers and the fused loss, then DDP
wraps it; the hooks run inside DDP's forward and backward unchanged. (A model that Accelerate
already wrapped is unwrapped by ``memtrain.prepare``, so the other order works too.) In several
processes the plan keeps optimizer states on the device: memtrain's host optimizer step would
read gradients before DDP averages them; DeepSpeed ZeRO-Offload moves states off the GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
from accelerate import Accelerator

import memtrain


class CountingSequences(torch.utils.data.Dataset):
    """Token ``t + 1`` follows token ``t`` (mod the vocabulary): learnable in a few steps."""

    def __init__(self, count: int, seq: int, vocab: int, seed: int = 0):
        generator = torch.Generator().manual_seed(seed)
        starts = torch.randint(0, vocab, (count, 1), generator=generator)
        self.ids = (starts + torch.arange(seq)) % vocab

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.ids[index]


def build_model(args: argparse.Namespace) -> torch.nn.Module:
    config = memtrain.load_config(args.model)
    if args.tiny:  # a few MB: runs anywhere in seconds
        config.update(
            {
                "hidden_size": 64,
                "intermediate_size": 128,
                "num_hidden_layers": 2,
                "num_attention_heads": 4,
                "num_key_value_heads": 2,
                "head_dim": 16,
                "vocab_size": 256,
            }
        )
    return memtrain.build_causal_lm(config, args.dtype, "cpu", seed=args.seed)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="llama-3.2-1b", help="preset name or config.json")
    parser.add_argument("--tiny", action="store_true", help="shrink the model to a toy size")
    parser.add_argument("--dtype", default="fp32")
    parser.add_argument("--seq", type=int, default=32)
    parser.add_argument("--batch", type=int, default=2, help="micro-batch per process")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--optimizer", default="galore:rank=8,update_proj_gap=5")
    parser.add_argument("--hardware", default="h100-sxm-80g")
    parser.add_argument(
        "--gpu-budget-fraction",
        type=float,
        default=0.7,
        help="plan for this share of the unplanned peak (makes a small model swap/recompute)",
    )
    parser.add_argument("--cpu", action="store_true", help="train on the CPU (gloo)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="folder for one JSON report per rank")
    args = parser.parse_args()

    accelerator = Accelerator(cpu=args.cpu)
    model = build_model(args).to(accelerator.device)
    model.train()
    prepared = memtrain.prepare(
        model,
        seq=args.seq,
        batch=args.batch,
        hardware=args.hardware,
        optimizer=args.optimizer,
        lr=args.lr,
        gpu_budget_fraction=args.gpu_budget_fraction,
    )
    accelerator.print(prepared.report())
    vocab = model.config.vocab_size
    loader = torch.utils.data.DataLoader(
        CountingSequences(args.steps * args.batch * accelerator.num_processes, args.seq, vocab),
        batch_size=args.batch,
        shuffle=True,
        generator=torch.Generator().manual_seed(args.seed),
        drop_last=True,
    )
    # DDP-wrapped model, optimizer, and a loader that gives each process its own batches.
    ddp_model, optimizer, loader = accelerator.prepare(model, prepared.optimizer, loader)

    local, mean = [], []
    seen = []
    for step, ids in enumerate(loader):
        if step == args.steps:
            break
        loss = ddp_model(input_ids=ids, labels=ids).loss  # the fused loss: no logits stored
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        local.append(float(loss.detach()))
        mean.append(float(accelerator.reduce(loss.detach(), reduction="mean")))
        seen.append(ids[:, 0].tolist())
        accelerator.print(f"step {step + 1}: loss {mean[-1]:.4f} (mean over processes)")
    prepared.remove()  # the model is as it was (its trained weights aside)

    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        report = {
            "rank": accelerator.process_index,
            "world_size": accelerator.num_processes,
            "distributed_type": str(accelerator.distributed_type),
            "wrapped": type(ddp_model).__name__,
            "optimizer": type(prepared.optimizer).__name__,
            "plan_moves": bool(
                prepared.summary()["layers_swapped"] or prepared.summary()["layers_recomputed"]
            ),
            "local_losses": local,
            "mean_losses": mean,
            "first_tokens": seen,
            "param_checksum": float(sum(p.detach().double().sum() for p in model.parameters())),
        }
        (out / f"rank{accelerator.process_index}.json").write_text(json.dumps(report))
    accelerator.end_training()
    if accelerator.num_processes > 1:
        # Everything is written: leave without C++ static teardown, where gloo threads still
        # joinable abort a finished process now and then ("terminate called without an active
        # exception"), which the launcher reports as a failed job (memtrain run does the same).
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


if __name__ == "__main__":
    main()
