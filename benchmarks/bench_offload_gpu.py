"""The executor on one GPU, beside the strongest stock recipes, in the same process.

Model: preset ``llama-3.2-1b`` (1.2B, hidden 2048, 16 layers, 32/8 heads, MLP 8192, vocab 128256,
tied), bf16, fused AdamW, batch 1, random tokens; every run uses the fused linear cross-entropy
loss (``memtrain.kernels.patch_causal_lm_loss``), so logits are never stored. Runs:

  stock-nockpt     no checkpointing
  stock-ckpt       Hugging Face non-reentrant checkpointing of every decoder layer
  stock-ckpt-host  the same with checkpoints in pinned host memory (``save_on_cpu``)
  alst             the same plus a sequence-tiled MLP, each tile recomputed on its own
  memtrain         ``memtrain.apply(model, plan, profile=...)``: the planner's plan for this
                   sequence (H100 80 GB, ``--host-gib`` of pinned host memory, attention output
                   stored), executed; pools sized from the dry-run profile
  memo-depth       every block token-wise recomputed (MEMO: block input, attention output and
                   log-sum-exp in pinned host memory, MLP in chunks) on shallower copies of the
                   model, to show the GPU peak does not grow with depth where a full-depth step
                   is longer than one device command

Each run reports the peak of ``torch.cuda.max_memory_allocated`` over its last step, its step
time and tokens/s; memtrain runs add the plan's predicted peak and step time, and the share of
planned host bytes that really left the GPU. A run that runs out of memory says so.

Plans need the MIP solver (pulp); where it is missing the plans come from
``benchmarks/bench_offload_plans.json``, written on any machine by ``--make-plans``.

Run:  python benchmarks/bench_offload_gpu.py --group short      (16k, 32k)
      python benchmarks/bench_offload_gpu.py --group 256k
      python benchmarks/bench_offload_gpu.py --group 512k
      python benchmarks/bench_offload_gpu.py --group depth      (1M tokens, 1/2/4 layers)
      python benchmarks/bench_offload_gpu.py --group plan-depth (the 1M plan's block, 1/2 layers)
      python benchmarks/bench_offload_gpu.py --runs memtrain@262144 stock-ckpt@262144
      python benchmarks/bench_offload_gpu.py --make-plans        (CPU only, writes the plans)
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from memtrain.errors import MemtrainError  # noqa: E402
from memtrain.models import build_causal_lm, load_config  # noqa: E402

GiB = 2**30
MODEL = "llama-3.2-1b"
PLANS = HERE / "bench_offload_plans.json"
GROUPS = {
    "short": [
        "stock-nockpt@16384",
        "memtrain@16384",
        "stock-nockpt@32768",
        "memtrain@32768",
        "memtrain@65536",
    ],
    "256k": ["stock-ckpt@262144", "stock-ckpt-host@262144", "alst@262144", "memtrain@262144"],
    "512k": ["alst@524288", "memtrain@524288"],
    "depth": ["memo-depth@1048576:1", "memo-depth@1048576:2", "memo-depth@1048576:4"],
    "plan-depth": ["plan-depth@1048576:1", "plan-depth@1048576:2"],
}
SMOKE_MODES = {
    "swap-cpu-partial": {"keep": 0.3, "swap": {"cpu": 0.7}},
    "swap-cpu-all-tiled": {"keep": 0.0, "swap": {"cpu": 1.0}, "chunks": 4},
    "full-recompute-input-on-cpu": {
        "keep": 0.0, "full_recompute": True, "input_checkpoint": {"cpu": 1.0},
    },
    "full-recompute-tiled": {
        "keep": 0.0, "full_recompute": True, "input_checkpoint": {"cpu": 1.0}, "chunks": 4,
    },
    "tokenwise-half": {"keep": 0.2, "swap": {"cpu": 0.3}, "recompute": 0.5, "chunks": 2},
    "tokenwise-all-anchors-on-cpu": {
        "keep": 0.0, "recompute": 1.0, "input_checkpoint": {"cpu": 1.0}, "chunks": 4,
    },
}  # fmt: skip
PLAN_SEQS = (16384, 32768, 65536, 262144, 524288, 1048576)
GPU_BUDGET: str | None = None  # --gpu-budget: plan for less GPU memory than the card has
# What ``memtrain run`` sets too: without it the caching allocator strands gigabytes between
# differently sized segments at long context (set before CUDA starts; applies to every run).
os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")


def cap_gpu(gib: float | None) -> dict[str, Any]:
    """Let this process allocate at most ``gib`` GiB (an 80 GB H100 on a larger card)."""
    total = torch.cuda.get_device_properties(0).total_memory
    if gib is not None:
        if gib * GiB > total:
            raise SystemExit(f"--gpu-cap-gib {gib} exceeds the card's {total / GiB:.1f} GiB")
        torch.cuda.set_per_process_memory_fraction(gib * GiB / total)
    return {
        "gpu_total_gib": round(total / GiB, 2),
        "gpu_cap_gib": gib,
        "alloc_conf": os.environ.get("PYTORCH_CUDA_ALLOC_CONF"),
    }


# -- plans (any machine) ------------------------------------------------------------------


def plan_for(seq: int, host_gib: float, layers: int | None = None):
    """Profile (on meta tensors) and plan the model, or a copy with ``layers`` blocks."""
    import tempfile

    from memtrain.hardware.tiers import load_hardware
    from memtrain.planner.plan import PlanOptions, make_plan
    from memtrain.profile import profile_causal_lm

    hardware = load_hardware("h100-sxm-80g", cpu=f"{host_gib}GiB", gpu_budget=GPU_BUDGET)
    with tempfile.TemporaryDirectory() as folder:
        model = MODEL
        if layers is not None:
            config = load_config(MODEL)
            config.num_hidden_layers = layers
            config.save_pretrained(folder)
            model = str(Path(folder, "config.json"))
        profile = profile_causal_lm(
            model, seq=seq, dtype="bf16", device="meta", target="h100-sxm-80g",
            optimizer="adamw:fused=true",
        )  # fmt: skip
    options = PlanOptions(always_store_ops=("flash",))  # MEMO stores attention output
    return make_plan(profile, hardware, options), profile


def make_plans(host_gib: float) -> dict[str, Any]:
    out: dict[str, Any] = {"host_gib": host_gib, "plans": {}}
    for seq in PLAN_SEQS:
        try:
            plan, profile = plan_for(seq, host_gib)
        except MemtrainError as exc:
            print(f"{seq}: no plan ({exc})", flush=True)
            continue
        out["plans"][str(seq)] = {"plan": plan.to_dict(), "profile": profile.to_dict()}
        predicted = plan.predicted
        print(
            f"{seq}: predicted GPU {predicted['peak_bytes']['gpu'] / GiB:.1f} GiB, host "
            f"{predicted['peak_bytes'].get('cpu', 0) / GiB:.1f} GiB, "
            f"{predicted['tokens_per_s']:.0f} tokens/s",
            flush=True,
        )
    return out


def load_plan(seq: int, host_gib: float):
    """The stored plan for ``seq`` (made by --make-plans), or a fresh one where pulp exists."""
    from memtrain.profile.result import ProfileResult

    stored = json.loads(PLANS.read_text()) if PLANS.exists() else {"plans": {}}
    matches = stored.get("host_gib") == host_gib and GPU_BUDGET is None
    data = stored["plans"].get(str(seq)) if matches else None
    if data is None:
        try:
            import pulp  # noqa: F401
        except ImportError:
            raise SystemExit(
                f"no stored plan for {seq} tokens and {host_gib} GiB host; run --make-plans "
                "where pulp is installed"
            ) from None
        data = make_plans_for(seq, host_gib)
    return data["plan"], ProfileResult.from_dict(data["profile"])


def make_plans_for(seq: int, host_gib: float) -> dict[str, Any]:
    global PLAN_SEQS
    saved, PLAN_SEQS = PLAN_SEQS, (seq,)
    try:
        made = make_plans(host_gib)["plans"]
    finally:
        PLAN_SEQS = saved
    if str(seq) not in made:
        raise SystemExit(f"the planner finds no plan for {seq} tokens")
    return made[str(seq)]


# -- stock recipes --------------------------------------------------------------------------


def tile_mlp_alst(model: torch.nn.Module, seq: int) -> None:
    """ALST's tiled MLP: ceil(seq / hidden) tiles, each recomputed on its own in backward."""
    from torch.utils.checkpoint import checkpoint

    hidden = model.config.hidden_size
    tiles = max(1, -(-seq // hidden))
    for layer in model.model.layers:
        mlp = layer.mlp
        forward = mlp.forward

        def tiled(x, forward=forward):
            bounds = [x.shape[1] * i // tiles for i in range(tiles + 1)]
            outs = [
                checkpoint(forward, x[:, a:b], use_reentrant=False)
                for a, b in zip(bounds, bounds[1:], strict=False)
                if b > a
            ]
            return torch.cat(outs, dim=1)

        mlp.forward = tiled


# -- one run --------------------------------------------------------------------------------


def parse_run(spec: str) -> tuple[str, int, int | None]:
    kind, _, rest = spec.partition("@")
    seq, _, layers = rest.partition(":")
    return kind, int(seq), int(layers) if layers else None


ALLOCATOR_COUNTERS = ("num_alloc_retries", "num_sync_all_streams", "num_device_free")


def allocator_counters() -> dict[str, int]:
    stats = torch.cuda.memory_stats()
    return {name: int(stats.get(name, 0)) for name in ALLOCATOR_COUNTERS}


def run_one(spec: str, steps: int, host_gib: float) -> dict[str, Any]:
    from memtrain.kernels import patch_causal_lm_loss
    from memtrain.offload import LayerPolicy, OffloadPolicy, apply, offload_optimizer

    kind, seq, layers = parse_run(spec)
    config = load_config(MODEL)
    if layers is not None:
        config.num_hidden_layers = layers
    row: dict[str, Any] = {
        "run": spec,
        "kind": kind,
        "seq": seq,
        "layers": config.num_hidden_layers,
    }
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    # Bytes an earlier run of this process left allocated (they count in this run's peak).
    row["allocated_before_gib"] = torch.cuda.memory_allocated() / GiB
    config.use_cache = False  # training: no key/value cache in any run
    model = build_causal_lm(config, "bf16", "cuda")
    model.train()
    patch_causal_lm_loss(model)
    handle = None
    context = None
    optimizer = None
    try:
        if kind in ("stock-ckpt", "stock-ckpt-host", "alst"):
            model.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False}
            )
        if kind in ("stock-ckpt-host", "alst"):
            context = lambda: torch.autograd.graph.save_on_cpu(pin_memory=True)  # noqa: E731
        if kind == "alst":
            tile_mlp_alst(model, seq)
        if kind == "memtrain":
            plan, profile = load_plan(seq, host_gib)
            started = time.perf_counter()
            handle = apply(model, plan, profile=profile)
            row["apply_s"] = round(time.perf_counter() - started, 2)
            row["predicted_gpu_peak_gib"] = plan["predicted"]["peak_bytes"]["gpu"] / GiB
            row["predicted_step_s"] = plan["predicted"]["step_time_s"]
            row["planned_host_bytes"] = handle.expected_host_bytes
            row["plan_modes"] = sorted({p.mode for p in handle.policy.layers.values()})
            if handle.needs_optimizer_offload:
                optimizer = offload_optimizer(handle, torch.optim.AdamW, lr=1e-5, fused=True)
        depth_policies = None
        if kind == "plan-depth":
            # The full-depth plan's interior block policy on every block of a shallower copy:
            # where one full-depth step outlasts a device command, the peak per added layer.
            from memtrain.offload.policy import layer_policy_from_entry

            plan, _ = load_plan(seq, host_gib)
            entries = {e["name"]: e for e in plan["layers"]}
            blocks = [e for e in plan["layers"] if e["kind"] == "block"]
            row["plan_policy"] = blocks[len(blocks) // 2]
            interior = layer_policy_from_entry(row["plan_policy"])
            depth_policies = {f"block.{i}": interior for i in range(config.num_hidden_layers)}
            for name in ("norm", "lm_head", "loss"):
                if name in entries:
                    depth_policies[name] = layer_policy_from_entry(entries[name])
        if kind == "memo-depth":
            chunks = max(1, seq // 32768)
            memo = LayerPolicy(
                keep=0.0, recompute=1.0, input_checkpoint={"cpu": 1.0}, chunks=chunks
            )
            depth_policies = {f"block.{i}": memo for i in range(config.num_hidden_layers)}
        if depth_policies is not None:
            # block input, attention output and log-sum-exp of every token, per block
            per_layer = 2 * seq * config.hidden_size * 2 + seq * 32 * 4 + seq * 64 * 4
            handle = apply(
                model,
                OffloadPolicy(depth_policies),
                host_pool_bytes={"cpu": per_layer * config.num_hidden_layers + GiB},
            )
        if optimizer is None:
            optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
        ids = torch.randint(0, config.vocab_size, (1, seq), device="cuda")
        times = []
        for step in range(steps):
            torch.cuda.synchronize()
            if step == steps - 1:
                torch.cuda.reset_peak_memory_stats()
                before = allocator_counters()
            start = time.perf_counter()
            if context is not None:
                with context():
                    loss = model(input_ids=ids, labels=ids).loss
                    loss.backward()
            else:
                loss = model(input_ids=ids, labels=ids).loss
                loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            del loss
            torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
            print(f"  {spec} step {step}: {times[-1]:.2f} s", flush=True)
        row["status"] = "ok"
        row["step_s"] = times[-1]
        row["tokens_per_s"] = seq / times[-1]
        row["peak_gib"] = torch.cuda.max_memory_allocated() / GiB
        row["reserved_peak_gib"] = torch.cuda.max_memory_reserved() / GiB
        # Allocator events of the last step: retries and device frees synchronise the GPU,
        # which stops the host from queueing compute ahead of the copies.
        after = allocator_counters()
        row["allocator_last_step"] = {k: after[k] - before[k] for k in after}
        if handle is not None:
            stats = handle.stats()
            row["moved_bytes_per_step"] = {
                tier: stats["totals"][tier] // steps for tier in ("cpu", "cxl", "nvme")
            }
            planned = sum(handle.expected_host_bytes.values())
            moved = sum(row["moved_bytes_per_step"].values())
            row["moved_share_of_planned"] = moved / planned if planned else None
            row["pools"] = stats["pools"]
            row["attention_kernels"] = stats["attention_kernels"]
    except torch.OutOfMemoryError:
        row["status"] = "out of memory"
        row["peak_gib"] = torch.cuda.max_memory_allocated() / GiB
    except MemtrainError as exc:
        row["status"] = f"refused: {exc}"
    except Exception as exc:  # report it and go on with the other runs
        import traceback

        row["status"] = f"error: {type(exc).__name__}: {exc}"
        row["traceback"] = traceback.format_exc(limit=8)
        print(row["traceback"], flush=True)
    finally:
        if handle is not None:
            handle.remove()
        # The handle references the model, whose patched forward makes a reference cycle:
        # drop both before collecting, or the model outlives this run on the GPU (2.37 GiB
        # was still allocated when the next run started).
        del model, optimizer, handle
        gc.collect()
        torch.cuda.empty_cache()
        if hasattr(torch._C, "_host_emptyCache"):  # pinned blocks save_on_cpu left cached
            torch._C._host_emptyCache()
    return row


def smoke(seq: int = 4096, device: str = "cuda") -> list[dict[str, Any]]:
    """Every mode on a small bf16 Llama on the GPU: loss and gradients against the unmodified
    model (bf16: relative error of the largest gradient entry, stated per mode)."""
    from transformers import LlamaConfig

    from memtrain.offload import LayerPolicy, OffloadPolicy, apply

    config = LlamaConfig(
        hidden_size=512, intermediate_size=1536, num_hidden_layers=3, num_attention_heads=8,
        num_key_value_heads=2, head_dim=64, vocab_size=4096, tie_word_embeddings=True,
    )  # fmt: skip
    ids = torch.randint(0, config.vocab_size, (1, seq), device=device)

    def step(model):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        grads = {n: p.grad.float() for n, p in model.named_parameters()}
        model.zero_grad(set_to_none=True)
        return loss.float().item(), grads

    reference = step(build_causal_lm(config, "bf16", device))
    rows = []
    for name, fields in SMOKE_MODES.items():
        model = build_causal_lm(config, "bf16", device)
        policy = OffloadPolicy({f"block.{i}": LayerPolicy(**fields) for i in range(3)})
        row: dict[str, Any] = {"run": f"smoke:{name}", "seq": seq}
        try:
            with apply(model, policy, host_pool_bytes={"cpu": 2 * GiB}) as handle:
                results = [step(model) for _ in range(2)]
                row["modes"] = sorted(set(handle.stats()["modes"].values()))
                row["moved_bytes"] = handle.stats()["totals"]
            loss, grads = results[-1]
            row["loss_rel_err"] = abs(loss - reference[0]) / abs(reference[0])
            row["grad_rel_err"] = max(
                ((grads[k] - g).abs().max() / (g.abs().max() + 1e-12)).item()
                for k, g in reference[1].items()
            )
            row["steps_agree"] = results[0][0] == results[1][0]
            row["status"] = "ok"
        except Exception as exc:  # a smoke test reports every mode, whatever fails
            row["status"] = f"error: {type(exc).__name__}: {exc}"
        rows.append(row)
        print(json.dumps(row), flush=True)
        del model
        gc.collect()
        torch.cuda.empty_cache()
        if hasattr(torch._C, "_host_emptyCache"):  # pinned blocks save_on_cpu left cached
            torch._C._host_emptyCache()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--group", choices=sorted([*GROUPS, "smoke"]), action="append", default=[])
    parser.add_argument("--runs", nargs="*", default=[])
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--host-gib", type=float, default=80.0)
    parser.add_argument("--make-plans", action="store_true")
    parser.add_argument(
        "--gpu-budget", help="plan for this much GPU memory (e.g. 66GiB); plans made fresh"
    )
    parser.add_argument(
        "--gpu-cap-gib", type=float, help="allocate at most this much (79.2: an 80 GB H100)"
    )
    parser.add_argument("--out", default=os.environ.get("OUT"))
    args = parser.parse_args()
    global GPU_BUDGET
    GPU_BUDGET = args.gpu_budget
    if args.make_plans:
        PLANS.write_text(json.dumps(make_plans(args.host_gib)))
        print(f"wrote {PLANS}")
        return
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU (use --make-plans on a CPU machine)")
    runs = [r for g in args.group if g != "smoke" for r in GROUPS[g]] + list(args.runs)
    if not runs and "smoke" not in args.group:
        raise SystemExit("name --group or --runs")
    device = torch.cuda.get_device_name()
    header = {
        "device": device,
        "torch": torch.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "host": platform.node(),
        "command": " ".join(sys.argv),
        "host_gib": args.host_gib,
        "gpu_budget": args.gpu_budget,
        **cap_gpu(args.gpu_cap_gib),
    }
    print(json.dumps(header), flush=True)
    rows = smoke() if "smoke" in args.group else []
    for spec in runs:
        steps = 1 if spec.startswith(("memo-depth", "plan-depth")) else args.steps
        row = run_one(spec, steps, args.host_gib)
        rows.append(row)
        print(
            f"{row['run']:>28}  {row['status']:<14} peak {row.get('peak_gib', float('nan')):6.2f} GiB"
            f"  step {row.get('step_s', float('nan')):8.2f} s"
            f"  {row.get('tokens_per_s', float('nan')):9.0f} tok/s"
            + (
                f"  predicted {row['predicted_gpu_peak_gib']:.2f} GiB / {row['predicted_step_s']:.2f} s"
                if "predicted_gpu_peak_gib" in row
                else ""
            )
            + (
                f"  moved {row['moved_share_of_planned']:.3f} of planned host bytes"
                if row.get("moved_share_of_planned") is not None
                else ""
            ),
            flush=True,
        )
        if args.out:
            Path(args.out).mkdir(parents=True, exist_ok=True)
            path = Path(args.out) / "bench_offload.json"
            path.write_text(json.dumps({**header, "rows": rows}, indent=1, default=str))


if __name__ == "__main__":
    main()
