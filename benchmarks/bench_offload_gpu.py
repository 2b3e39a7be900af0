"""Training steps of a 1.2B Llama under memtrain's plans beside stock recipes, on one GPU.

Model: preset ``llama-3.2-1b`` (hidden 2048, 16 layers, 32/8 heads, MLP 8192, vocab 128256,
tied), bf16, fused AdamW, batch 1, random tokens, the fused linear cross-entropy in every run.
A run is KIND@TOKENS[:BLOCKS] (BLOCKS: a copy of the model with that many decoder layers):

  stock-nockpt     no checkpointing
  stock-ckpt       Hugging Face non-reentrant checkpointing of every decoder layer
  stock-ckpt-host  the same with checkpoints in pinned host memory (save_on_cpu)
  alst             the same plus ALST's sequence-tiled MLP, each tile recomputed on its own
  memtrain         memtrain.apply(model, plan, profile=...) under the planner's plan (H100
                   80 GB preset, --host-gib pinned host, attention output stored); plans come
                   from benchmarks/data/offload_plans.json (--make-plans rewrites it) or, for
                   a copy with BLOCKS layers, are made on the spot (needs pulp)
  plan-depth       the full-depth plan's interior block on every block of a BLOCKS-layer copy
                   (where a full-depth step outlasts one device command)

Each row: peak torch.cuda.max_memory_allocated over the last step, step time, tokens/s; plans
add their predicted peak and step time and the share of planned host bytes that moved.
--moments also records, for memtrain runs, the allocator's peak inside every layer's forward
and backward beside the plan's prediction for that moment (--plot DIR writes the JSON that
`memtrain plan --measured` reads, and the plot).

Examples:
  python -m benchmarks.bench_offload_gpu --gpu-cap-gib 79.2 --runs memtrain@65536 stock-ckpt@65536
  python -m benchmarks.bench_offload_gpu --group 256k
  python -m benchmarks.bench_offload_gpu --gpu-cap-gib 79.2 --runs memtrain@524288 --steps 1 \\
      --moments --first-step --plot /tmp/plots
  python -m benchmarks.bench_offload_gpu --make-plans          (any machine with pulp)
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import torch

from benchmarks.harness import DATA, GiB, cap_gpu_memory, parser, release_memory, results_for
from memtrain.errors import MemtrainError
from memtrain.models import build_causal_lm, load_config

MODEL = "llama-3.2-1b"
PLANS = DATA / "offload_plans.json"
PLAN_SEQS = (16384, 32768, 65536, 262144, 524288, 1048576)
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
    "plan-depth": ["plan-depth@1048576:1", "plan-depth@1048576:2", "plan-depth@1048576:4"],
}
# What `memtrain run` sets too: without it the caching allocator strands gigabytes between
# differently sized segments at long context (set before CUDA starts).
os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")


# -- plans (any machine) ------------------------------------------------------------------


def plan_for(
    seq: int,
    host_gib: float,
    layers: int | None = None,
    gpu_budget: str | None = None,
    preset: str = MODEL,
):
    """Plan the model, or a copy with ``layers`` blocks, through the pipeline ``prepare()`` uses
    (parameters stay on the GPU: memtrain's executor moves activations and optimizer states)."""
    from memtrain.hardware import HardwareRequest
    from memtrain.planner import PlanOptions
    from memtrain.planner.pipeline import PlanRequest, plan_model

    request = PlanRequest(
        seq=seq,
        optimizers=("adamw:fused=true",),
        hardware=HardwareRequest("h100-sxm-80g", gpu_budget=gpu_budget, cpu=f"{host_gib}GiB"),
        # MEMO stores attention output
        options=PlanOptions(allow_param_offload=False, always_store_ops=("flash",)),
    )
    with tempfile.TemporaryDirectory() as folder:
        model = preset
        if layers is not None:
            config = load_config(preset)
            config.num_hidden_layers = layers
            config.save_pretrained(folder)
            model = str(Path(folder, "config.json"))
        planned = plan_model(model, request)
    return planned.plan.to_dict(), planned.profile


def make_plans(host_gib: float) -> dict[str, Any]:
    out: dict[str, Any] = {"host_gib": host_gib, "plans": {}}
    for seq in PLAN_SEQS:
        try:
            plan, profile = plan_for(seq, host_gib)
        except MemtrainError as exc:
            print(f"{seq}: no plan ({exc})", flush=True)
            continue
        out["plans"][str(seq)] = {"plan": plan, "profile": profile.to_dict()}
        peaks = plan["predicted"]["peak_bytes"]
        print(
            f"{seq}: predicted GPU {peaks['gpu'] / GiB:.1f} GiB, host "
            f"{peaks.get('cpu', 0) / GiB:.1f} GiB, {plan['predicted']['tokens_per_s']:.0f} tokens/s",
            flush=True,
        )
    return out


def load_plan(
    seq: int, host_gib: float, layers: int | None = None, gpu_budget=None, preset: str = MODEL
):
    """The stored plan for ``seq`` tokens, or a fresh one (another model, depth, budget or
    host)."""
    from memtrain.profile.result import ProfileResult

    stored = json.loads(PLANS.read_text()) if PLANS.exists() else {"plans": {}}
    same = stored.get("host_gib") == host_gib and gpu_budget is None and layers is None
    data = stored["plans"].get(str(seq)) if same and preset == MODEL else None
    if data is None:
        return plan_for(seq, host_gib, layers, gpu_budget, preset)
    return data["plan"], ProfileResult.from_dict(data["profile"])


# -- recipes ----------------------------------------------------------------------------------


def tile_mlp_alst(model: torch.nn.Module, seq: int) -> None:
    """ALST's tiled MLP: ceil(seq / hidden) tiles, each recomputed on its own in backward."""
    from torch.utils.checkpoint import checkpoint

    tiles = max(1, -(-seq // model.config.hidden_size))
    for layer in model.model.layers:
        forward = layer.mlp.forward

        def tiled(x, forward=forward):
            bounds = [x.shape[1] * i // tiles for i in range(tiles + 1)]
            parts = [x[:, a:b] for a, b in zip(bounds, bounds[1:], strict=False) if b > a]
            return torch.cat([checkpoint(forward, p, use_reentrant=False) for p in parts], dim=1)

        layer.mlp.forward = tiled


def plan_depth_policy(plan: dict[str, Any], blocks: int):
    """The full-depth plan's interior block policy on every block of a shallower copy."""
    from memtrain.offload import OffloadPolicy
    from memtrain.offload.policy import layer_policy_from_entry

    entries = {e["name"]: e for e in plan["layers"]}
    interior = [e for e in plan["layers"] if e["kind"] == "block"]
    interior = interior[len(interior) // 2]
    policies = {f"block.{i}": layer_policy_from_entry(interior) for i in range(blocks)}
    for name in ("norm", "lm_head", "loss"):
        if name in entries:
            policies[name] = layer_policy_from_entry(entries[name])
    return OffloadPolicy(policies), interior


def parse_run(spec: str) -> tuple[str, int, int | None]:
    kind, _, rest = spec.partition("@")
    seq, _, layers = rest.partition(":")
    return kind, int(seq), int(layers) if layers else None


def moments_of(scopes, plan: dict[str, Any], absent: int) -> list[dict[str, Any]]:
    """Measured (plus ``absent`` bytes) and predicted GiB at every layer moment."""
    measured: dict[str, int] = {}
    for phase, name, value in scopes.timeline:
        key = f"{phase} {name}"
        measured[key] = max(measured.get(key, 0), value + absent)
    predicted = dict(plan["predicted"].get("gpu_moments", []))
    rows = []
    for key in dict.fromkeys([*predicted, *measured]):
        pred, meas = predicted.get(key), measured.get(key)
        rows.append(
            {
                "moment": key,
                "predicted_gib": None if pred is None else round(pred / GiB, 3),
                "measured_gib": None if meas is None else round(meas / GiB, 3),
                "error": None if not pred or meas is None else round(meas / pred - 1, 4),
            }
        )
    return rows


def run_one(spec: str, steps: int, args) -> dict[str, Any]:
    from memtrain.kernels import patch_causal_lm_loss
    from memtrain.models.build import causal_lm_layers
    from memtrain.offload import apply, offload_optimizer
    from memtrain.profile.scopes import Clock, CudaMemory, LayerScopes

    kind, seq, layers = parse_run(spec)
    config = load_config(args.model)
    if layers is not None:
        config.num_hidden_layers = layers
    config.use_cache = False
    row: dict[str, Any] = {"run": spec, "kind": kind, "seq": seq, "model": args.model}
    row["layers"] = config.num_hidden_layers
    release_memory()
    row["allocated_before_gib"] = torch.cuda.memory_allocated() / GiB  # counts in the peak
    model = build_causal_lm(config, "bf16", "cuda")
    model.train()
    patch_causal_lm_loss(model)
    handle = optimizer = plan = scopes = None
    context = contextlib.nullcontext
    try:
        if kind in ("stock-ckpt", "stock-ckpt-host", "alst"):
            model.gradient_checkpointing_enable({"use_reentrant": False})
        if kind in ("stock-ckpt-host", "alst"):
            context = lambda: torch.autograd.graph.save_on_cpu(pin_memory=True)  # noqa: E731
        if kind == "alst":
            tile_mlp_alst(model, seq)
        if kind == "memtrain":
            plan, profile = load_plan(seq, args.host_gib, layers, args.gpu_budget, args.model)
            started = time.perf_counter()
            handle = apply(model, plan, profile=profile)
            row["apply_s"] = round(time.perf_counter() - started, 2)
            row["predicted_gpu_peak_gib"] = plan["predicted"]["peak_bytes"]["gpu"] / GiB
            row["predicted_step_s"] = plan["predicted"]["step_time_s"]
            if handle.needs_optimizer_offload:
                optimizer = offload_optimizer(handle, torch.optim.AdamW, lr=1e-5, fused=True)
        if kind == "plan-depth":
            full, _ = load_plan(seq, args.host_gib, preset=args.model)
            policy, row["plan_policy"] = plan_depth_policy(full, config.num_hidden_layers)
            # block input, attention output and log-sum-exp of every token, per block
            per_layer = 2 * seq * config.hidden_size * 2 + seq * 32 * 4 + seq * 64 * 4
            host = {"cpu": per_layer * config.num_hidden_layers + GiB}
            handle = apply(model, policy, host_pool_bytes=host)
        if optimizer is None:
            optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
        ids = torch.randint(0, config.vocab_size, (1, seq), device="cuda")
        if args.first_step and plan is not None:  # AdamW's states appear in its first step
            row["optimizer_states_added_gib"] = (
                plan["predicted"]["gpu_resident_bytes"]["optimizer"] / GiB
            )
        for step in range(steps):
            last = step == steps - 1
            torch.cuda.synchronize()
            if last:
                torch.cuda.reset_peak_memory_stats()
                if args.moments and plan is not None:
                    device = torch.device("cuda")
                    blocks = causal_lm_layers(model)
                    scopes = LayerScopes(blocks, CudaMemory(device), Clock(device))
            started = time.perf_counter()
            with context():
                if scopes is not None:
                    scopes.begin("forward")
                loss = model(input_ids=ids, labels=ids).loss
                if scopes is not None:
                    scopes.begin("backward")
                loss.backward()
                if scopes is not None:
                    scopes.end()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            del loss
            torch.cuda.synchronize()
            seconds = time.perf_counter() - started
            print(f"  {spec} step {step}: {seconds:.2f} s", flush=True)
        row.update(status="ok", step_s=seconds, tokens_per_s=seq / seconds)
        row["peak_gib"] = torch.cuda.max_memory_allocated() / GiB
        row["reserved_peak_gib"] = torch.cuda.max_memory_reserved() / GiB
        if handle is not None:
            stats = handle.stats()
            moved = {t: stats["totals"][t] // steps for t in ("cpu", "cxl", "nvme")}
            planned = sum(handle.expected_host_bytes.values())
            row["moved_bytes_per_step"] = moved
            row["moved_share_of_planned"] = sum(moved.values()) / planned if planned else None
    except torch.OutOfMemoryError as exc:
        row["status"] = "out of memory"
        row["peak_gib"] = torch.cuda.max_memory_allocated() / GiB
        row["error"] = str(exc).split("\n")[0][:300]
    except MemtrainError as exc:
        row["status"] = f"refused: {exc}"
    except Exception as exc:  # report it and go on with the other runs
        row["status"] = f"error: {type(exc).__name__}: {exc}"
        row["traceback"] = traceback.format_exc(limit=8)
        print(row["traceback"], flush=True)
    finally:
        if scopes is not None:  # the moments up to an out-of-memory error still count
            scopes.remove()
            absent = int(row.get("optimizer_states_added_gib", 0) * GiB)
            row["moments"] = moments_of(scopes, plan, absent)
            row["moments_peak_gib"] = (scopes.global_peak + absent) / GiB
            row["predicted_peak_at"] = plan["predicted"]["peak_at"]["gpu"]
            row["plan"] = plan
        if handle is not None:
            handle.remove()
        # The handle references the model, whose patched forward makes a reference cycle:
        # drop both before collecting, or the model outlives this run on the GPU.
        del model, optimizer, handle, scopes
        release_memory()
    return row


def write_plot(row: dict[str, Any], folder: str) -> None:
    """The JSON `memtrain plan --plot --measured` reads, and the plot itself."""
    from memtrain.planner.plot import measured_moments, write_plan_plot

    path = Path(folder, f"plan_moments_{row['run'].replace('@', '_').replace(':', '_')}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"moments": row["moments"], "plan": row["plan"]}))
    write_plan_plot(row["plan"], path.with_suffix(".png"), measured_moments(row))
    print(f"wrote {path} and {path.with_suffix('.png')}")


def summary(row: dict[str, Any]) -> str:
    nan = float("nan")
    text = (
        f"{row['run']:>22}  {row['status']:<14} peak {row.get('peak_gib', nan):6.2f} GiB"
        f"  step {row.get('step_s', nan):8.2f} s  {row.get('tokens_per_s', nan):8.0f} tokens/s"
    )
    if "predicted_gpu_peak_gib" in row:
        text += f"  predicted {row['predicted_gpu_peak_gib']:.2f} GiB"
    for moment in row.get("moments", []):
        text += f"\n    {moment['moment']:24s} predicted {moment['predicted_gib']}"
        text += f" GiB, measured {moment['measured_gib']} GiB"
    return text


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--group", choices=sorted(GROUPS), action="append", default=[])
    p.add_argument("--runs", nargs="*", default=[], help="KIND@TOKENS[:BLOCKS] ...")
    p.add_argument("--steps", type=int, default=2, help="the last one is measured")
    p.add_argument("--host-gib", type=float, default=80.0)
    p.add_argument("--model", default=MODEL, help="preset (other than the 1.2B: plans made here)")
    p.add_argument("--gpu-budget", help="plan for this much GPU memory (e.g. 66GiB)")
    p.add_argument("--gpu-cap-gib", type=float, help="allocate at most this (79.2: an H100)")
    p.add_argument("--moments", action="store_true", help="memtrain runs: per-layer moments")
    p.add_argument(
        "--first-step",
        action="store_true",
        help="with --moments and --steps 1: add the plan's optimizer-state bytes to each moment",
    )
    p.add_argument("--plot", metavar="DIR", help="with --moments: plan-vs-measured JSON and PNG")
    p.add_argument("--make-plans", action="store_true", help="rewrite the stored plans (CPU)")
    args = p.parse_args()
    if args.make_plans:
        PLANS.parent.mkdir(parents=True, exist_ok=True)
        PLANS.write_text(json.dumps(make_plans(args.host_gib)))
        print(f"wrote {PLANS}")
        return
    runs = [r for g in args.group for r in GROUPS[g]] + list(args.runs)
    if not runs:
        p.error("name --group or --runs")
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU (--make-plans runs anywhere)")
    limits = cap_gpu_memory(args.gpu_cap_gib)
    extra = {**limits, "host_gib": args.host_gib, "gpu_budget": args.gpu_budget}
    results = results_for("bench_offload_gpu", args, extra=extra)
    print(json.dumps(results.environment), flush=True)
    for spec in runs:
        steps = 1 if spec.startswith("plan-depth") else args.steps
        row = run_one(spec, steps, args)
        print(summary(row), flush=True)
        if args.plot and row.get("moments"):
            write_plot(row, args.plot)
        row.pop("plan", None)
        key = f"moments:{spec}" if args.moments and "moments" in row else spec
        key += "" if args.model == MODEL else f"|{args.model}"
        results.write(key, **row)
    print(f"wrote {results.path}")


if __name__ == "__main__":
    sys.exit(main())
