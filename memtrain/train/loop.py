"""``memtrain run``: a real training loop for a recipe.

Dry-run plan of a big model (optional), then: build the model, prepare it (profile, plan, apply,
fused loss, optimizer), train with a warm-up + decay schedule and gradient clipping, log JSON
lines, checkpoint atomically every ``checkpoint_every`` steps (model, optimizer, schedule, data
position, RNG states, plan), resume from the newest checkpoint, and end with measured against
predicted memory.
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from pathlib import Path
from typing import Any

import torch

from memtrain.errors import ConfigError, MemtrainError
from memtrain.train.data import TokenStream

CHECKPOINT = "checkpoint.pt"


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise MemtrainError("train.device is cuda but no CUDA device is available here")
    if name not in ("cpu",) and not name.startswith("cuda"):
        raise ConfigError(f"train.device {name!r}: use auto, cpu or cuda")
    return torch.device(name)


def build_model(section: dict[str, Any], device: torch.device):
    """A causal LM from a preset, a config file, or a local checkpoint directory."""
    from memtrain.models import build_causal_lm, load_config

    source = section["preset"] or section["config"] or section["checkpoint"]
    if section["checkpoint"]:
        from transformers import AutoModelForCausalLM

        from memtrain.models.build import parse_dtype

        if not Path(source, "config.json").exists():
            raise ConfigError(f"model.checkpoint {source!r}: no config.json there")
        try:
            model = AutoModelForCausalLM.from_pretrained(
                source, dtype=parse_dtype(section["dtype"]), local_files_only=True
            )
        except OSError as exc:
            raise ConfigError(f"model.checkpoint {source!r}: {str(exc).splitlines()[0]}") from None
        return model.to(device)
    config = load_config(source)
    for key, value in section["overrides"].items():
        if not hasattr(config, key):
            raise ConfigError(f"model.overrides: {config.model_type} configs have no {key!r}")
        setattr(config, key, value)
    return build_causal_lm(config, section["dtype"], device)


def lr_factor(step: int, schedule: dict[str, Any]) -> float:
    """Linear warm-up, then cosine/linear decay to ``min_lr_ratio`` (or constant)."""
    warmup, total = schedule["warmup"], schedule["steps"]
    if warmup and step < warmup:
        return (step + 1) / warmup
    if schedule["decay"] == "constant" or total <= warmup:
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    floor = schedule["min_lr_ratio"]
    if schedule["decay"] == "linear":
        return floor + (1 - floor) * (1 - progress)
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def _clip(model, optimizer, max_norm: float) -> torch.Tensor:
    """Global gradient clipping; an offloaded optimizer holds some gradients on the host."""
    if hasattr(optimizer, "clip_grad_norm_"):
        return optimizer.clip_grad_norm_(max_norm)
    return torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)


def _rng_state(device: torch.device) -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def save_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    """Write atomically: a crash mid-write leaves the previous checkpoint intact."""
    tmp = path.with_suffix(".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)


class MetricsLog:
    def __init__(self, path: Path, append: bool):
        self.handle = path.open("a" if append else "w")

    def write(self, record: dict[str, Any]) -> None:
        self.handle.write(json.dumps(record) + "\n")
        self.handle.flush()

    def close(self) -> None:
        self.handle.close()


def recipe_stream(data: dict[str, Any], vocab_size: int, rank: int = 0, world_size: int = 1):
    """The token stream a recipe's data section describes (this rank's share of it)."""
    return TokenStream(
        data["source"],
        data["seq"],
        data["batch"],
        vocab_size,
        path=data["path"],
        text_field=data["text_field"],
        seed=data["seed"],
        rank=rank,
        world_size=world_size,
    )


def prepare_recipe(model, recipe: dict[str, Any], limit: dict[str, Any], **options: Any):
    """``prepare()`` with a recipe's data, plan and optimizer sections, plus ``options``."""
    from memtrain.train.prepare import prepare

    opt, plan_cfg, data = recipe["optimizer"], recipe["plan"], recipe["data"]
    spec = opt["name"] + (
        ":" + ",".join(f"{k}={v}" for k, v in opt["options"].items()) if opt["options"] else ""
    )
    prepared = prepare(
        model,
        seq=data["seq"],
        batch=data["batch"],
        hardware=plan_cfg["hardware"],
        gpu_budget=limit["plan_gpu_budget"],
        gpu_budget_fraction=plan_cfg["gpu_budget_fraction"],
        cpu=plan_cfg["cpu"],
        cxl=plan_cfg["cxl"],
        nvme=plan_cfg["nvme"],
        optimizer=spec,
        lr=float(opt["lr"]),
        weight_decay=float(opt["weight_decay"]),
        fused_loss=plan_cfg["fused_loss"],
        plan=plan_cfg["enabled"],
        **options,
    )
    prepared.notes.extend(limit["notes"])
    return prepared


def run_recipe(recipe: dict[str, Any], console=None, progress: bool = True) -> dict[str, Any]:
    """Run a validated recipe; returns the final summary (also written to ``summary.json``)."""
    from rich.console import Console

    from memtrain.train import distributed

    if distributed.world_from_env(recipe) is not None:  # one rank of a launched job
        return distributed.run_distributed(recipe, console=console, progress=progress)
    if distributed.needs_launch(recipe):
        distributed.check_launcher(recipe)
        raise ConfigError(
            f"launcher.kind={recipe['launcher']['kind']} runs through `memtrain run` (or torchrun "
            "/ deepspeed), which starts one process per rank"
        )
    console = console or Console()
    summary: dict[str, Any] = {"recipe": recipe["name"]}
    if recipe["dry_run"] is not None:
        from memtrain.train.dry_run import dry_run_plan

        summary["dry_run"] = dry_run_plan(
            recipe["dry_run"], console, step_in_backward=recipe["train"]["step_in_backward"]
        )
        if recipe["dry_run"]["only"]:
            gpus = recipe["dry_run"]["world_size"]
            console.print(
                "dry run only (dry_run.only): no training here"
                + (
                    f"; training this plan needs {gpus} GPUs under DeepSpeed ZeRO (+ Ulysses "
                    "sequence parallel): memtrain export-deepspeed PLAN writes its config; "
                    "memtrain does not execute per-rank plans"
                    if gpus > 1
                    else ""
                )
            )
            return summary
    train, data, sched = recipe["train"], recipe["data"], recipe["schedule"]
    device = pick_device(train["device"])
    if train["threads"]:
        torch.set_num_threads(train["threads"])  # small CPU runs: no thread contention
    out_dir = Path(train["out_dir"])
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(train["seed"])
    random.seed(train["seed"])
    limit = gpu_memory_limit(train["gpu_memory_limit"], recipe["plan"], device)
    model = build_model(recipe["model"], device)
    model.train()
    stream = recipe_stream(data, model.config.vocab_size)
    prepared = prepare_recipe(model, recipe, limit, step_in_backward=train["step_in_backward"])
    optimizer = prepared.optimizer
    base_lrs = [group["lr"] for group in optimizer.param_groups]
    in_backward = None
    if train["step_in_backward"]:
        if sched["grad_clip"]:
            raise ConfigError(
                "train.step_in_backward steps each weight as its gradient arrives, so there is "
                "no global gradient norm to clip: set schedule.grad_clip=0"
            )
        from memtrain.optim import register_step_in_backward

        in_backward = register_step_in_backward(model, optimizer)
    console.print(f"[bold]training[/bold] {recipe['name']} on {device}:")
    console.print(prepared.report())
    if prepared.plan is not None:
        prepared.plan.save(out_dir / "plan.yaml")

    ckpt_path = out_dir / CHECKPOINT
    start_step = 0
    if train["resume"] and ckpt_path.exists():
        state = torch.load(ckpt_path, map_location=device, weights_only=False)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        stream.load_state_dict(state["data"])
        _set_rng_state(state["rng"], device)
        start_step = state["step"]
        console.print(f"resumed from {ckpt_path} at step {start_step}")
    metrics = MetricsLog(out_dir / "metrics.jsonl", append=start_step > 0)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    losses: list[float] = []
    tokens_per_step = data["seq"] * data["batch"]
    started = time.perf_counter()
    try:
        steps = range(start_step, sched["steps"])
        with _progress(console, progress, sched["steps"], start_step) as advance:
            for step in steps:
                for group, base in zip(optimizer.param_groups, base_lrs, strict=True):
                    group["lr"] = base * lr_factor(step, sched)
                ids = next(stream).to(device)
                t0 = time.perf_counter()
                loss = model(input_ids=ids, labels=ids).loss
                loss.backward()
                grad_norm = None
                if in_backward is None:
                    if sched["grad_clip"]:
                        grad_norm = float(_clip(model, optimizer, sched["grad_clip"]))
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                value = float(loss.detach())
                if not math.isfinite(value):
                    raise MemtrainError(f"the loss became {value} at step {step + 1}; stopping")
                losses.append(value)
                elapsed = time.perf_counter() - t0
                if (step + 1) % train["log_every"] == 0 or step + 1 == sched["steps"]:
                    metrics.write(
                        {
                            "step": step + 1,
                            "loss": value,
                            "lr": optimizer.param_groups[0]["lr"],
                            "grad_norm": grad_norm,
                            "step_s": elapsed,
                            "tokens_per_s": tokens_per_step / elapsed,
                            # the run's peak so far (step 1 holds GaLore's first refresh)
                            "gpu_peak_bytes": torch.cuda.max_memory_allocated(device)
                            if device.type == "cuda"
                            else None,
                        }
                    )
                every = train["checkpoint_every"]
                if every and ((step + 1) % every == 0 or step + 1 == sched["steps"]):
                    save_checkpoint(
                        ckpt_path,
                        {
                            "step": step + 1,
                            "model": model.state_dict(),
                            "optimizer": optimizer.state_dict(),
                            "data": stream.state_dict(),
                            "rng": _rng_state(device),
                            "plan": prepared.plan.to_dict() if prepared.plan else None,
                            "recipe": recipe,
                        },
                    )
                advance(value)
    finally:
        metrics.close()
        if in_backward is not None:
            in_backward.remove()
        prepared.remove()
    wall = time.perf_counter() - started
    summary["train"] = {
        "device": str(device),
        "steps_run": len(losses),
        "first_loss": losses[0] if losses else None,
        "last_loss": losses[-1] if losses else None,
        "wall_s": wall,
        "tokens_per_s": tokens_per_step * len(losses) / wall if losses else None,
        "memory": memory_summary(prepared, device, limit["bytes"], limit["enforced"]),
    }
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    print_summary(summary, console)
    return summary


def gpu_memory_limit(limit: str | int | None, plan_cfg: dict[str, Any], device) -> dict[str, Any]:
    """``train.gpu_memory_limit``: on CUDA, cap this process's caching allocator at ``limit``
    (``set_per_process_memory_fraction``, before the model is built); the plan's GPU capacity
    becomes the limit where the hardware has more. On the CPU it is noted, not enforced."""
    from memtrain.units import format_bytes, parse_bytes

    out: dict[str, Any] = {
        "bytes": None,
        "enforced": False,
        "plan_gpu_budget": plan_cfg["gpu_budget"],
        "notes": [],
    }
    if limit is None:
        return out
    cap = parse_bytes(limit)
    if cap <= 0:
        raise ConfigError(f"train.gpu_memory_limit must be positive, got {limit!r}")
    out["bytes"] = cap
    if plan_cfg["gpu_budget"] is not None:
        if parse_bytes(plan_cfg["gpu_budget"]) > cap:
            raise ConfigError(
                f"plan.gpu_budget {plan_cfg['gpu_budget']} is more than train.gpu_memory_limit "
                f"{limit}: the plan would not fit the capped allocator"
            )
    elif plan_cfg["enabled"]:
        from memtrain.hardware import load_hardware

        if load_hardware(plan_cfg["hardware"]).capacity("gpu") > cap:
            out["plan_gpu_budget"] = cap
            out["notes"].append(f"plan GPU capacity: train.gpu_memory_limit {format_bytes(cap)}")
    if device.type != "cuda":
        out["notes"].append(
            f"train.gpu_memory_limit {format_bytes(cap)} is not enforced on {device.type}"
        )
        return out
    index = device.index if device.index is not None else torch.cuda.current_device()
    total = torch.cuda.get_device_properties(index).total_memory
    if cap >= total:
        out["notes"].append(
            f"train.gpu_memory_limit {format_bytes(cap)} is not below this GPU's "
            f"{format_bytes(total)}: not capped"
        )
        return out
    torch.cuda.set_per_process_memory_fraction(cap / total, index)
    out["notes"].append(
        f"CUDA allocator capped at {format_bytes(cap)} of this GPU's {format_bytes(total)}"
    )
    out["enforced"] = True
    return out


def memory_summary(
    prepared, device: torch.device, limit: int | None = None, enforced: bool = False
) -> dict[str, Any]:
    """Measured against predicted device memory (measured only where an allocator reports it)."""
    predicted = None
    if prepared.plan is not None:
        predicted = prepared.plan.predicted["peak_bytes"].get("gpu")
    measured = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    result = {"predicted_gpu_peak_bytes": predicted, "measured_gpu_peak_bytes": measured}
    if predicted and measured:
        result["error"] = (measured - predicted) / predicted
    if device.type == "cuda":  # what the allocator held, fragmentation included
        result["measured_gpu_reserved_peak_bytes"] = torch.cuda.max_memory_reserved(device)
    if limit is not None:
        result["gpu_memory_limit_bytes"] = limit
        result["gpu_memory_limit_enforced"] = enforced
    if prepared.plan is not None and prepared.plan.step_in_backward:
        result["step_in_backward"] = True
    return result


def print_summary(summary: dict[str, Any], console) -> None:
    from rich.table import Table

    from memtrain.units import format_bytes

    train = summary["train"]
    table = Table(title="run summary", show_header=False)
    table.add_column("what")
    table.add_column("value", justify="right")
    table.add_row("steps", str(train["steps_run"]))
    if train["first_loss"] is not None:
        table.add_row(
            "loss first -> last", f"{train['first_loss']:.4f} -> {train['last_loss']:.4f}"
        )
        table.add_row("tokens / s", f"{train['tokens_per_s']:,.0f}")
    memory = train["memory"]
    if memory["predicted_gpu_peak_bytes"] is not None:
        table.add_row("predicted GPU peak (plan)", format_bytes(memory["predicted_gpu_peak_bytes"]))
    if memory["measured_gpu_peak_bytes"] is not None:
        table.add_row("measured GPU peak", format_bytes(memory["measured_gpu_peak_bytes"]))
        if "error" in memory:
            table.add_row("measured vs predicted", f"{memory['error']:+.1%}")
    else:
        table.add_row("measured GPU peak", f"n/a on {train['device']} (no device allocator)")
    if memory.get("gpu_memory_limit_bytes") is not None:
        enforced = "" if memory["gpu_memory_limit_enforced"] else " (not enforced)"
        table.add_row("GPU memory limit", format_bytes(memory["gpu_memory_limit_bytes"]) + enforced)
    console.print(table)


class _progress:
    """A rich progress bar (or nothing) that shows the latest loss."""

    def __init__(self, console, enabled: bool, total: int, done: int):
        self.enabled, self.console, self.total, self.done = enabled, console, total, done
        self._progress = None

    def __enter__(self):
        if not self.enabled:
            return lambda loss: None
        from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

        self._progress = Progress(
            TextColumn("step {task.completed}/{task.total}"),
            BarColumn(),
            TextColumn("loss {task.fields[loss]}"),
            TimeRemainingColumn(),
            console=self.console,
        )
        self._progress.start()
        task = self._progress.add_task("train", total=self.total, completed=self.done, loss="-")
        return lambda loss: self._progress.update(task, advance=1, loss=f"{loss:.4f}")

    def __exit__(self, *exc):
        if self._progress is not None:
            self._progress.stop()
