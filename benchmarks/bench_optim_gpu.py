"""GPU benchmark: GaLore refresh and step cost against torch fused AdamW and galore-torch.

Model: a random-weight Llama-style model from a memtrain preset (default llama-3.2-1b, 1.2B
parameters, bf16, on cuda). Gradients come from real forward/backward passes on random tokens.
For each optimizer it reports optimizer-state bytes, peak memory above the pre-step
allocation, and step time, with refresh steps (new projections) and ordinary steps separately.
It then trains ``--train-steps`` real steps with memtrain's GaLoreAdamW and, at the warm
refresh that follows, measures the captured gradient energy ||P^T G||^2 / (top-r sum of
squared singular values) of several refresh variants against the exact SVD of that gradient.

Reproduce (GPU machine, galore-torch wheel in .whl_optim/):

    python3 -m pip install -q --no-deps --target /tmp/site .whl_optim/*.whl
    PYTHONPATH=/tmp/site:. python3 benchmarks/bench_optim_gpu.py --out results.json
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import statistics
import sys
import time
import types
from typing import Any

import torch

from memtrain.models import build_causal_lm, load_config
from memtrain.optim import GaLoreAdamW, lowrank_targets
from memtrain.optim.lowrank import projection_side, projection_to_basis
from memtrain.optim.subspace import captured_energy, subspace_iteration
from memtrain.profile.optimizer_state import measured_state_bytes

GIB = 1024**3


def load_galore_torch() -> Any | None:
    """galore-torch's AdamW without running its package __init__ (which needs bitsandbytes)."""
    loaded = sys.modules.get("galore_torch")
    spec = loaded.__spec__ if loaded is not None else importlib.util.find_spec("galore_torch")
    if spec is None or not spec.submodule_search_locations:
        return None
    if importlib.util.find_spec("transformers") is None:
        return None
    if "galore_torch" not in sys.modules:
        package = types.ModuleType("galore_torch")
        package.__spec__ = spec
        package.__path__ = list(spec.submodule_search_locations)
        sys.modules["galore_torch"] = package
    return importlib.import_module("galore_torch.adamw")


def galore_torch_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    total = 0
    for state in optimizer.state.values():
        for value in state.values():
            if isinstance(value, torch.Tensor):
                total += value.numel() * value.element_size()
        projector = state.get("projector")
        if projector is not None and projector.ortho_matrix is not None:
            ortho = projector.ortho_matrix
            total += ortho.numel() * ortho.element_size()
    return total


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn) -> float:
    sync()
    start = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - start


def step_peak(optimizer: torch.optim.Optimizer) -> tuple[float, int]:
    """(seconds, peak bytes allocated above the allocation before the step)."""
    if not torch.cuda.is_available():  # smoke runs on CPU: time only
        return timed(optimizer.step), 0
    sync()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    seconds = timed(optimizer.step)
    return seconds, torch.cuda.max_memory_allocated() - before


def ordinary_steps(optimizer: torch.optim.Optimizer, count: int) -> float:
    times = [timed(optimizer.step) for _ in range(count)]
    return statistics.median(times)


def galore_groups(model: torch.nn.Module, keys: dict[str, Any]) -> list[dict[str, Any]]:
    targets = {id(p) for _, p in lowrank_targets(model)}
    rest = [p for p in model.parameters() if id(p) not in targets]
    return [
        {"params": rest},
        {"params": [p for p in model.parameters() if id(p) in targets], **keys},
    ]


def force_refresh(optimizer: GaLoreAdamW, gap: int) -> None:
    """Make the next step a (warm) refresh step for every projected weight."""
    for group in optimizer.param_groups:
        if "rank" in group:
            for p in group["params"]:
                optimizer.state[p]["step"].fill_(gap * 10)


def run_optimizer(name: str, make, model, args, results: dict[str, Any]) -> None:
    optimizer = make()
    first_s, first_peak = step_peak(optimizer)
    row: dict[str, Any] = {"first_step_s": first_s, "first_step_peak_gib": first_peak / GIB}
    row["ordinary_step_s"] = ordinary_steps(optimizer, args.steps)
    _, row["ordinary_peak_gib"] = (lambda t: (t[0], t[1] / GIB))(step_peak(optimizer))
    if isinstance(optimizer, GaLoreAdamW):
        refresh = []
        for _ in range(args.refreshes):
            force_refresh(optimizer, args.gap)
            refresh.append(step_peak(optimizer))
        row["warm_refresh_step_s"] = statistics.median(t for t, _ in refresh)
        row["warm_refresh_peak_gib"] = max(p for _, p in refresh) / GIB
        row["state_bytes"] = optimizer.state_bytes()
    elif name == "galore-torch":
        row["state_bytes"] = galore_torch_state_bytes(optimizer)
    else:
        row["state_bytes"] = sum(measured_state_bytes(optimizer).values())
    row["state_gib"] = row["state_bytes"] / GIB
    results["optimizers"][name] = row
    print(name, json.dumps(row), flush=True)
    del optimizer
    torch.cuda.empty_cache()


def energy_study(model, backward, args, results: dict[str, Any]) -> None:
    """Train with our GaLore, then compare refresh variants on the gradient at the refresh."""
    gap = args.train_steps
    keys = {"rank": args.rank, "update_proj_gap": gap, "scale": args.scale, "proj_type": "std"}
    optimizer = GaLoreAdamW(galore_groups(model, keys), lr=args.train_lr)
    names = {id(p): n for n, p in model.named_parameters()}
    layers = {int(x) for x in args.energy_layers.split(",")}
    sample = [p for n, p in lowrank_targets(model) if any(f"layers.{i}." in n for i in layers)]
    cold: list[float] = []
    losses = []
    for step in range(gap + 1):
        losses.append(backward())
        if step == gap:
            break
        optimizer.step()
        if step == 0:
            for p in sample:
                side = projection_side(p.shape, "std")
                mat = p.grad.mT if side == "right" else p.grad
                basis = projection_to_basis(optimizer.state[p]["projection"], side)
                cold.append(captured_energy(mat, basis))
    stale = [optimizer.state[p]["projection"].clone() for p in sample]
    tops = []
    for p in sample:
        side = projection_side(p.shape, "std")
        mat = p.grad.mT if side == "right" else p.grad
        tops.append(float(torch.linalg.svdvals(mat.float())[: args.rank].square().sum()))
    variants: dict[str, dict[str, Any]] = {}
    configs = {
        "iter1_qr": dict(iters=1, oversample=0, orth="qr"),
        "iter1_cholqr": dict(iters=1, oversample=0, orth="cholqr"),
        "iter2_qr": dict(iters=2, oversample=0, orth="qr"),
        "iter1_qr_oversample32": dict(iters=1, oversample=32, orth="qr"),
        "iter2_qr_oversample32": dict(iters=2, oversample=32, orth="qr"),
        "iter1_cholqr_oversample32": dict(iters=1, oversample=32, orth="cholqr"),
        "stale (no refresh)": None,
    }
    for label, cfg in configs.items():
        energies, kept, best, seconds = [], 0.0, 0.0, 0.0
        for p, old, top in zip(sample, stale, tops, strict=True):
            side = projection_side(p.shape, "std")
            mat = p.grad.mT if side == "right" else p.grad
            prev = projection_to_basis(old, side).float()
            if cfg is None:
                basis = prev
            else:
                holder: dict[str, torch.Tensor] = {}

                def run(mat=mat, prev=prev, cfg=cfg, holder=holder) -> None:
                    holder["b"] = subspace_iteration([mat], args.rank, prev[None], **cfg)[0]

                seconds += timed(run)
                basis = holder["b"].to(torch.bfloat16)
            energies.append(captured_energy(mat, basis))
            kept += energies[-1] * top
            best += top
        variants[label] = {
            "aggregate_energy": kept / best,
            "min_energy": min(energies),
            "mean_energy": statistics.mean(energies),
            "unbatched_seconds_for_sample": seconds,
        }
        print("energy", label, json.dumps(variants[label]), flush=True)
    # the optimizer's own warm refresh (batched, stored in bf16) on the same gradient
    refresh_s = timed(optimizer.step)
    own = []
    for p in sample:
        side = projection_side(p.shape, "std")
        mat = p.grad.mT if side == "right" else p.grad
        own.append(
            captured_energy(mat, projection_to_basis(optimizer.state[p]["projection"], side))
        )
    results["energy"] = {
        "sampled_layers": sorted(layers),
        "matrices": len(sample),
        "matrix_names": [names[id(p)] for p in sample][:7],
        "train_steps_between_refreshes": gap,
        "train_lr": args.train_lr,
        "loss_first_last": [losses[0], losses[-1]],
        "cold_refresh_min": min(cold),
        "cold_refresh_mean": statistics.mean(cold),
        "warm_refresh_in_optimizer_min": min(own),
        "warm_refresh_in_optimizer_mean": statistics.mean(own),
        "warm_refresh_step_s_whole_model": refresh_s,
        "variants": variants,
    }
    print("energy summary", json.dumps(results["energy"]), flush=True)
    del optimizer
    torch.cuda.empty_cache()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="llama-3.2-1b")
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--rank", type=int, default=256)
    parser.add_argument("--gap", type=int, default=200)
    parser.add_argument("--scale", type=float, default=0.25)
    parser.add_argument("--steps", type=int, default=20, help="timed ordinary steps")
    parser.add_argument("--refreshes", type=int, default=3, help="timed warm refresh steps")
    parser.add_argument("--train-steps", type=int, default=50)
    parser.add_argument("--train-lr", type=float, default=1e-3)
    parser.add_argument("--energy-layers", default="0,5,10,15")
    parser.add_argument("--skip-galore-torch", action="store_true")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--out", default="bench_optim_gpu.json")
    args = parser.parse_args()

    torch.manual_seed(0)
    config = load_config(args.model)
    model = build_causal_lm(config, dtype="bf16", device=args.device)
    model.config.use_cache = False
    tokens = torch.randint(0, config.vocab_size, (1, args.seq), device=args.device)

    def backward() -> float:
        model.zero_grad(set_to_none=True)
        loss = model(input_ids=tokens, labels=tokens).loss
        loss.backward()
        return float(loss.detach())

    results: dict[str, Any] = {
        "device": torch.cuda.get_device_name() if args.device == "cuda" else args.device,
        "torch": torch.__version__,
        "model": args.model,
        "params": sum(p.numel() for p in model.parameters()),
        "projected_params": sum(p.numel() for _, p in lowrank_targets(model)),
        "args": vars(args),
        "optimizers": {},
    }
    print(json.dumps({k: v for k, v in results.items() if k != "optimizers"}), flush=True)
    results["backward_s"] = timed(backward)
    keys = {"rank": args.rank, "update_proj_gap": args.gap, "scale": args.scale, "proj_type": "std"}

    run_optimizer(
        "torch fused AdamW",
        lambda: torch.optim.AdamW(model.parameters(), lr=1e-6, fused=args.device == "cuda"),
        model,
        args,
        results,
    )
    for label, extra in {
        "memtrain GaLoreAdamW (iter1, qr)": {},
        "memtrain GaLoreAdamW (iter1, cholqr)": {"proj_orth": "cholqr"},
        "memtrain GaLoreAdamW (iter2, qr)": {"proj_iters": 2},
        "memtrain GaLoreAdamW (iter1, qr, oversample32)": {"proj_oversample": 32},
        "memtrain GaLoreAdamW (iter1, cholqr, oversample32)": {
            "proj_oversample": 32,
            "proj_orth": "cholqr",
        },
    }.items():
        run_optimizer(
            label,
            lambda extra=extra: GaLoreAdamW(galore_groups(model, {**keys, **extra}), lr=1e-6),
            model,
            args,
            results,
        )
    reference = None if args.skip_galore_torch else load_galore_torch()
    if reference is not None:
        run_optimizer(
            "galore-torch",
            lambda: reference.AdamW(
                galore_groups(model, keys), lr=1e-6, no_deprecation_warning=True
            ),
            model,
            args,
            results,
        )
    else:
        print("galore-torch not importable: skipped", flush=True)

    energy_study(model, backward, args, results)
    with open(args.out, "w") as fh:
        json.dump(results, fh, indent=2)
    print("wrote", args.out)


if __name__ == "__main__":
    main()
