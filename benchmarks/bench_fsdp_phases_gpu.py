"""Where an FSDP2 step's time goes when a plan offloads blocks: forward, backward, gradient
clipping and the optimizer step, timed apart (synchronised), beside the plan's prediction.

One FSDP2 rank (a process group of one) of a preset model, random init, planned for the GPU
budget as ``memtrain run ... launcher.kind=fsdp`` plans it (the fsdp engine: whole blocks on
the host where the states do not fit), sharded with ``memtrain.offload.shard_as_planned`` and
stepped as the run steps it (torch's fused AdamW for host shards, clipping at 1.0 only where
the norm is over it). The CUDA allocator is capped at the budget. ``--resident`` runs the same
plan's activation decisions with every block on the GPU and no cap, which separates what the
offload costs from what the activation plan costs. Each row: median seconds of each phase over
the steps after the first, and the plan's compute and optimizer tail.

Example: python -m benchmarks.bench_fsdp_phases_gpu --model llama-3.1-8b --seq 8192 \\
    --gpu-budget 48GiB --cpu 100GiB
"""

from __future__ import annotations

import functools
import os
import time

import torch

from benchmarks.harness import median, parse_overrides, parser, results_for

PHASES = ("forward", "backward", "clip", "optimizer")


def _mark(marks: list[float], cuda: bool) -> None:
    """Append the time once the GPU has finished what was queued."""
    if cuda:
        torch.cuda.synchronize()
    marks.append(time.perf_counter())


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--model", default="llama-3.1-8b", help="a preset name")
    p.add_argument("--seq", type=int, default=8192)
    p.add_argument("--gpu-budget", default="48GiB")
    p.add_argument("--cpu", default="100GiB")
    p.add_argument("--optimizer", default="adamw")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--resident", action="store_true", help="same plan, nothing offloaded")
    p.add_argument("--device", default="cuda", help="cuda, or cpu for a smoke test")
    p.add_argument("--set", nargs="*", default=[], help="model config overrides KEY=JSON")
    args = p.parse_args()

    import torch.distributed as dist

    import memtrain
    from memtrain.models import build_causal_lm, load_config
    from memtrain.offload import shard_as_planned
    from memtrain.optim import build_optimizer
    from memtrain.optim.memory import parse_optimizer_spec
    from memtrain.planner.distributed import Parallelism
    from memtrain.train.fsdp_step import clip_when_needed, host_step_spec
    from memtrain.units import parse_bytes

    cuda = args.device == "cuda"
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29571")
    dist.init_process_group("nccl" if cuda else "gloo", rank=0, world_size=1)
    try:
        if cuda:
            torch.cuda.set_device(0)
            if not args.resident:
                total = torch.cuda.get_device_properties(0).total_memory
                torch.cuda.set_per_process_memory_fraction(parse_bytes(args.gpu_budget) / total)
        config = load_config(args.model)
        for key, value in parse_overrides(args.set).items():
            setattr(config, key, value)
        model = build_causal_lm(config, "bf16", args.device)
        prepared = memtrain.prepare(
            model,
            seq=args.seq,
            hardware="h100-sxm-80g",
            gpu_budget=args.gpu_budget,
            cpu=args.cpu,
            optimizer=args.optimizer,
            build_optimizer=False,
            state_offload=True,
            parallelism=Parallelism.of_engine("fsdp", world_size=1),
            fused_loss=True,
        )
        plan = prepared.plan
        host = shard_as_planned(model, None if args.resident else plan)
        spec = host_step_spec(parse_optimizer_spec(args.optimizer), bool(host))
        optimizer = build_optimizer(model, spec, lr=1e-5)
        ids = torch.randint(0, config.vocab_size, (1, args.seq), device=args.device)
        times: dict[str, list[float]] = {phase: [] for phase in PHASES}
        for step in range(args.steps):
            marks = [time.perf_counter()]
            mark = functools.partial(_mark, marks, cuda)
            loss = model(input_ids=ids, labels=ids).loss
            mark()
            loss.backward()
            mark()
            clip_when_needed(list(model.parameters()), 1.0)
            mark()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            mark()
            if step:  # the first step compiles kernels and warms the allocator
                for phase, a, b in zip(PHASES, marks, marks[1:], strict=False):
                    times[phase].append(b - a)
        row = {phase: round(median(values), 4) for phase, values in times.items() if values}
        row["step_s"] = round(sum(row.values()), 4)
        predicted = plan.predicted
        row.update(
            model=args.model,
            seq=args.seq,
            gpu_budget=args.gpu_budget,
            resident=args.resident,
            host_blocks=len(host),
            chunks=plan.chunks,
            predicted_step_s=round(predicted["step_time_s"], 4),
            predicted_compute_s=round(predicted["compute_s"], 4),
            predicted_optimizer_tail_s=round(predicted["optimizer_tail_s"], 4),
            measured_gpu_peak_gib=(
                round(torch.cuda.max_memory_allocated() / 2**30, 3) if cuda else None
            ),
        )
        key = f"{args.model}@{args.seq}@{args.gpu_budget}" + ("@resident" if args.resident else "")
        results_for("bench_fsdp_phases_gpu", args).write(key, **row)
        print(row, flush=True)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
