"""GPU benchmark: GaLore refresh and step cost against torch fused AdamW and galore-torch.

Model: a random-weight Llama-style model from a memtrain preset (default llama-3.2-1b, 1.2B
parameters, bf16, on cuda). Gradients come from real forward/backward passes on byte tokens of the Python standard
library's sources (2048-token windows).
For each optimizer it reports optimizer-state bytes, peak memory above the pre-step
allocation, and step time, with refresh steps (new projections) and ordinary steps separately.
It then trains ``--train-steps`` real steps with memtrain's GaLoreAdamW and, at the warm
refresh that follows, measures the captured gradient energy ||P^T G||^2 / (top-r sum of
squared singular values) of several refresh variants against the exact SVD of that gradient.

Example (galore-torch installed without its dependencies, or its wheel on PYTHONPATH):

    python -m benchmarks.bench_optim_gpu
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import statistics
import sys
import types
from pathlib import Path
from typing import Any

import torch

from benchmarks.harness import GiB, parser, results_for, synchronize, time_call
from memtrain.models import build_causal_lm, load_config
from memtrain.optim import GaLoreAdamW, lowrank_targets, register_step_in_backward, subspace
from memtrain.optim.galore_adamw import refresh_due
from memtrain.optim.lowrank import projection_side, projection_to_basis
from memtrain.optim.memory import measured_state_bytes
from memtrain.optim.subspace import captured_energy, subspace_iteration


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
    synchronize()


def timed(fn) -> float:
    return time_call(fn, warmup=0, repeats=1)[0]


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


def run_optimizer(name: str, make, model, args, results: dict[str, Any], new_gradient=None) -> None:
    """First step, ordinary steps and (for ours) warm refreshes, each on a fresh gradient
    from the next text window, so the previous basis is one batch out of date."""
    optimizer = make()
    fallbacks = subspace.CHOLQR_FALLBACKS
    first_s, first_peak = step_peak(optimizer)
    row: dict[str, Any] = {"first_step_s": first_s, "first_step_peak_gib": first_peak / GiB}
    row["ordinary_step_s"] = ordinary_steps(optimizer, args.steps)
    _, row["ordinary_peak_gib"] = (lambda t: (t[0], t[1] / GiB))(step_peak(optimizer))
    if isinstance(optimizer, GaLoreAdamW):
        refresh = []
        for _ in range(args.refreshes):
            new_gradient()
            force_refresh(optimizer, args.gap)
            refresh.append(step_peak(optimizer))
        row["cholqr_fallbacks"] = subspace.CHOLQR_FALLBACKS - fallbacks
        row["warm_refresh_step_s"] = statistics.median(t for t, _ in refresh)
        row["warm_refresh_peak_gib"] = max(p for _, p in refresh) / GiB
        row["state_bytes"] = optimizer.state_bytes()
    elif name == "galore-torch":
        row["state_bytes"] = galore_torch_state_bytes(optimizer)
    else:
        row["state_bytes"] = sum(measured_state_bytes(optimizer).values())
    row["state_gib"] = row["state_bytes"] / GiB
    results["optimizers"][name] = row
    print(name, json.dumps(row), flush=True)
    del optimizer
    torch.cuda.empty_cache()


def text_windows(seq: int, seed: int = 0):
    """Endless random windows of byte tokens from the Python standard library's sources: a
    local text corpus on every machine, so gradients have language-like structure."""
    root = Path(os.__file__).parent
    chunks, total = [], 0
    for path in sorted(root.rglob("*.py")):
        data = path.read_bytes()
        chunks.append(data)
        total += len(data)
        if total > 32 * 1024 * 1024:
            break
    corpus = torch.frombuffer(bytearray(b"".join(chunks)), dtype=torch.uint8)
    gen = torch.Generator().manual_seed(seed)
    while True:
        start = int(torch.randint(0, corpus.numel() - seq - 1, (1,), generator=gen))
        yield corpus[start : start + seq].long()[None]


def grad_dtype(param: torch.Tensor) -> torch.dtype:
    return param.grad.dtype


def sides_and_mats(params: list[torch.Tensor]) -> list[tuple[torch.Tensor, str]]:
    out = []
    for p in params:
        side = projection_side(p.shape, "std")
        out.append((p.grad.mT if side == "right" else p.grad, side))
    return out


def energies(mats, bases, tops) -> dict[str, float]:
    values, kept = [], 0.0
    for (mat, _), basis, top in zip(mats, bases, tops, strict=True):
        values.append(captured_energy(mat, basis))
        kept += values[-1] * top
    return {
        "aggregate": kept / sum(tops),
        "mean": statistics.mean(values),
        "min": min(values),
    }


def top_energies(mats, rank: int) -> list[float]:
    return [float(torch.linalg.svdvals(m.float())[:rank].square().sum()) for m, _ in mats]


def energy_study(model, backward, windows, args, results: dict[str, Any]) -> None:
    """Train with our GaLore on text, then compare refresh variants against the exact SVD of
    the gradient at the cold start (step 0) and at the first warm refresh (step T)."""
    gap = args.train_steps
    keys = {"rank": args.rank, "update_proj_gap": gap, "scale": args.scale, "proj_type": "std"}
    optimizer = GaLoreAdamW(galore_groups(model, keys), lr=args.train_lr)
    sample = [p for _, p in lowrank_targets(model)]
    cold_variants = {
        "cold: 4 iterations (default)": dict(iters=4),
        "cold: 2 iterations": dict(iters=2),
    }
    warm_variants = {
        "warm: 1 iteration": dict(iters=1),
        "warm: 2 iterations (default)": dict(iters=2),
    }
    study: dict[str, Any] = {"train_steps_between_refreshes": gap, "train_lr": args.train_lr}
    losses = []
    for step in range(gap + 1):
        losses.append(backward(next(windows)))
        if step in (0, gap):
            mats = sides_and_mats(sample)
            tops = top_energies(mats, args.rank)
            previous = None
            if step == gap:
                previous = [
                    projection_to_basis(optimizer.state[p]["projection"], side).float()
                    for p, (_, side) in zip(sample, mats, strict=True)
                ]
                study["stale (no refresh)"] = energies(mats, previous, tops)
            for label, cfg in (cold_variants if step == 0 else warm_variants).items():
                bases = []
                for i, (mat, _) in enumerate(mats):
                    prev = None if previous is None else previous[i][None]
                    bases.append(
                        subspace_iteration([mat], args.rank, prev, orth="cholqr", **cfg)[0]
                    )
                study[label] = energies(mats, bases, tops)
                print("energy", label, json.dumps(study[label]), flush=True)
        if step == gap:
            break
        seconds = timed(optimizer.step)
        if step == 0:
            study["cold refresh step (batched, whole model) s"] = seconds
    group = next(g for g in optimizer.param_groups if "rank" in g)
    stale = [optimizer.state[p]["projection"].clone() for p in sample]
    fallbacks = subspace.CHOLQR_FALLBACKS
    refresh_times = []
    for _ in range(args.refreshes):  # the refresh alone, from the same out-of-date bases
        for p, old in zip(sample, stale, strict=True):
            optimizer.state[p]["projection"].copy_(old)

        def refresh(group=group, optimizer=optimizer) -> None:
            refresh_due(optimizer, group, group["params"], dtype_of=grad_dtype)

        refresh_times.append(timed(refresh))
    study["warm refresh alone (batched, whole model, 50 steps of drift) s"] = statistics.median(
        refresh_times
    )
    study["cholqr fallbacks in those refreshes"] = subspace.CHOLQR_FALLBACKS - fallbacks
    for p, old in zip(sample, stale, strict=True):
        optimizer.state[p]["projection"].copy_(old)
    seconds = timed(optimizer.step)
    study["warm refresh step (batched, whole model) s"] = seconds
    bases = [
        projection_to_basis(optimizer.state[p]["projection"], side)
        for p, (_, side) in zip(sample, mats, strict=True)
    ]
    study["optimizer's own warm refresh (bf16 projections)"] = energies(mats, bases, tops)
    study["matrices"] = len(sample)
    study["loss_first_last"] = [losses[0], losses[-1]]
    results["energy"] = study
    print("energy summary", json.dumps(study), flush=True)
    del optimizer
    torch.cuda.empty_cache()


def full_step_memory(model, backward, windows, args, results: dict[str, Any]) -> None:
    """Peak memory and time of whole training steps (forward, backward, optimizer), with the
    optimizer step after backward or inside it (gradients freed as they are consumed)."""
    keys = {"rank": args.rank, "update_proj_gap": args.gap, "scale": args.scale}
    rows = {}
    for label, make, inside in [
        (
            "torch fused AdamW",
            lambda: torch.optim.AdamW(model.parameters(), lr=1e-6, fused=True),
            False,
        ),
        ("memtrain GaLoreAdamW", lambda: GaLoreAdamW(galore_groups(model, keys), lr=1e-6), False),
        (
            "memtrain GaLoreAdamW, step in backward",
            lambda: GaLoreAdamW(galore_groups(model, keys), lr=1e-6),
            True,
        ),
    ]:
        optimizer = make()
        handle = register_step_in_backward(model, optimizer) if inside else None
        times, peaks, after = [], [], []
        for i in range(4):
            tokens = next(windows)
            model.zero_grad(set_to_none=True)
            sync()
            torch.cuda.reset_peak_memory_stats()

            held: dict[str, int] = {}

            def one_step(tokens=tokens, optimizer=optimizer, handle=handle, held=held) -> None:
                backward(tokens, zero=False)
                held["after_backward"] = torch.cuda.memory_allocated()
                if handle is None:
                    optimizer.step()

            seconds = timed(one_step)
            if i >= 2:  # after the cold refresh and allocation of states
                times.append(seconds)
                peaks.append(torch.cuda.max_memory_allocated())
                after.append(held["after_backward"])
        if handle is not None:
            handle.remove()
        model.zero_grad(set_to_none=True)
        rows[label] = {
            "step_s": statistics.median(times),
            "peak_gib": max(peaks) / GiB,
            "allocated_after_backward_gib": max(after) / GiB,
        }
        print("full step", label, json.dumps(rows[label]), flush=True)
        del optimizer
        torch.cuda.empty_cache()
    results["full_step"] = rows


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--model", default="llama-3.2-1b")
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--rank", type=int, default=256)
    p.add_argument("--gap", type=int, default=200)
    p.add_argument("--scale", type=float, default=0.25)
    p.add_argument("--steps", type=int, default=20, help="timed ordinary steps")
    p.add_argument("--refreshes", type=int, default=3, help="timed warm refresh steps")
    p.add_argument("--train-steps", type=int, default=50)
    p.add_argument("--train-lr", type=float, default=1e-3)
    p.add_argument("--skip-galore-torch", action="store_true")
    p.add_argument("--device", default="cuda")
    args = p.parse_args()
    out = results_for("bench_optim_gpu", args, device=args.device)

    torch.manual_seed(0)
    config = load_config(args.model)
    model = build_causal_lm(config, dtype="bf16", device=args.device)
    model.config.use_cache = False
    tokens = next(text_windows(args.seq, seed=1)).to(args.device)
    windows = text_windows(args.seq)

    def backward(batch: torch.Tensor | None = None, zero: bool = True) -> float:
        batch = tokens if batch is None else batch.to(args.device)
        if zero:
            model.zero_grad(set_to_none=True)
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        return float(loss.detach())

    setup = {
        "model": args.model,
        "params": sum(p.numel() for p in model.parameters()),
        "projected_params": sum(p.numel() for _, p in lowrank_targets(model)),
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
        "args": {k: v for k, v in vars(args).items() if k not in ("results_dir", "fresh")},
    }
    print(json.dumps(setup), flush=True)
    results: dict[str, Any] = {"optimizers": {}}
    setup["backward_s"] = timed(backward)
    out.write("setup", **setup)
    # load the solver libraries once so no optimizer below pays their start-up in its timing
    warm = torch.randn(2, 64, 16, device=args.device)
    torch.linalg.qr(warm)
    torch.linalg.eigh(warm.mT @ warm)
    torch.linalg.cholesky_ex(warm.mT @ warm)
    torch.linalg.svd(warm[0])
    sync()
    keys = {"rank": args.rank, "update_proj_gap": args.gap, "scale": args.scale, "proj_type": "std"}

    run_optimizer(
        "torch fused AdamW",
        lambda: torch.optim.AdamW(model.parameters(), lr=1e-6, fused=args.device == "cuda"),
        model,
        args,
        results,
    )
    for label, extra in {
        "memtrain GaLoreAdamW (default: 2 warm iterations, cholqr)": {},
        "memtrain GaLoreAdamW (1 warm iteration, cholqr)": {"proj_iters": 1},
        "memtrain GaLoreAdamW (2 warm iterations, Householder qr)": {"proj_orth": "qr"},
    }.items():
        run_optimizer(
            label,
            lambda extra=extra: GaLoreAdamW(galore_groups(model, {**keys, **extra}), lr=1e-6),
            model,
            args,
            results,
            new_gradient=lambda: backward(next(windows)),
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
    for name, row in results["optimizers"].items():
        out.write(f"optimizer/{name}", **row)
    if args.device == "cuda":
        full_step_memory(model, backward, windows, args, results)
        for name, row in results["full_step"].items():
            out.write(f"full step/{name}", **row)
    energy_study(model, backward, windows, args, results)
    out.write("energy", **results["energy"])
    print("wrote", out.path)


if __name__ == "__main__":
    main()
