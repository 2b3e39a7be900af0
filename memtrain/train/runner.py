"""``memtrain run``: one training loop for a recipe, in one process or as one rank of several.

Optional dry-run plan of a big model; then build the model, prepare it (plan, fused loss,
optimizer), train with warm-up + decay and clipping, log JSON lines, checkpoint atomically and
resume, and end with measured against predicted memory. One process, DDP and DeepSpeed differ
only in their strategy (:mod:`memtrain.train.strategy`). Rank ``r`` of ``W`` reads batches
``r, r + W, ...``; every rank plans (the plans must agree); rank 0 alone prints and writes.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from memtrain.errors import ConfigError, MemtrainError
from memtrain.train.checkpoint import compare_resume, restore_rng, rng_state, trim_metrics
from memtrain.train.data import TokenStream
from memtrain.train.launch import World, check_launcher, needs_launch, world_from_env
from memtrain.train.memory_errors import PREPARE_ADVICE, STEP_ADVICE, out_of_memory
from memtrain.train.recipe import ModelSection, PlanSection, Recipe, ScheduleSection
from memtrain.train.strategy import STRATEGIES, SingleProcess


def run_recipe(recipe: Recipe, console=None, progress: bool = True) -> dict[str, Any]:
    """Run a validated recipe here, or as one rank of a launched job; returns the final summary
    (rank 0 prints it and writes ``summary.json``)."""
    world = world_from_env(recipe)
    if world.distributed:
        check_launcher(recipe, launched=True)
    elif needs_launch(recipe):
        check_launcher(recipe)
        raise ConfigError(
            f"launcher.kind={recipe.launcher.kind} runs through `memtrain run` (or torchrun "
            "/ deepspeed), which starts one process per rank"
        )
    return Runner(recipe, world, console, progress).run()


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise MemtrainError("train.device is cuda but no CUDA device is available here")
    if name not in ("cpu",) and not name.startswith("cuda"):
        raise ConfigError(f"train.device {name!r}: use auto, cpu or cuda")
    return torch.device(name)


def build_model(section: ModelSection, device: torch.device):
    """A causal LM from a preset, a config file, or a local checkpoint directory."""
    from memtrain.models import build_causal_lm, load_config

    source = section.preset or section.config or section.checkpoint
    if section.checkpoint:
        from transformers import AutoModelForCausalLM

        from memtrain.dtypes import parse_dtype

        if not Path(source, "config.json").exists():
            raise ConfigError(f"model.checkpoint {source!r}: no config.json there")
        try:
            model = AutoModelForCausalLM.from_pretrained(
                source, dtype=parse_dtype(section.dtype), local_files_only=True
            )
        except OSError as exc:
            raise ConfigError(f"model.checkpoint {source!r}: {str(exc).splitlines()[0]}") from None
        return model.to(device)
    config = load_config(source)
    for key, value in section.overrides.items():
        if not hasattr(config, key):
            raise ConfigError(f"model.overrides: {config.model_type} configs have no {key!r}")
        setattr(config, key, value)
    return build_causal_lm(config, section.dtype, device)


def lr_factor(step: int, schedule: ScheduleSection) -> float:
    """Linear warm-up, then cosine/linear decay to ``min_lr_ratio`` (or constant)."""
    warmup, total = schedule.warmup, schedule.steps
    if warmup and step < warmup:
        return (step + 1) / warmup
    if schedule.decay == "constant" or total <= warmup:
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    floor = schedule.min_lr_ratio
    if schedule.decay == "linear":
        return floor + (1 - floor) * (1 - progress)
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def prepare_recipe(
    model,
    recipe: Recipe,
    limit: dict[str, Any],
    stored: Any = None,
    seq: int | None = None,
    **options: Any,
):
    """``prepare()`` with a recipe's data, plan and optimizer sections, plus ``options``;
    ``stored``: the plan a resumed run's checkpoints were written under, installed as it is;
    ``seq``: the tokens of a sequence this process holds (``data.seq`` unless sequence-parallel
    ranks share each sequence)."""
    from memtrain.train.prepare import prepare

    opt, plan = recipe.optimizer, recipe.plan
    hardware = {**asdict(plan.hardware_request()), "gpu_budget": limit["plan_gpu_budget"]}
    prepared = prepare(
        model,
        seq=seq or recipe.data.seq,
        batch=recipe.data.batch,
        **hardware,
        gpu_budget_fraction=plan.gpu_budget_fraction,
        optimizer=opt.spec,
        lr=float(opt.lr),
        weight_decay=float(opt.weight_decay),
        fused_loss=plan.fused_loss,
        plan=stored if stored is not None and plan.enabled else plan.enabled,
        **options,
    )
    prepared.notes.extend(limit["notes"])
    return prepared


class Runner:
    """The loop: one step body, one checkpoint and resume path, one summary."""

    def __init__(self, recipe: Recipe, world: World, console=None, progress: bool = True):
        from rich.console import Console

        self.recipe, self.world, self.out_dir = recipe, world, Path(recipe.train.out_dir)
        if world.main:
            self.console, self.progress = console or Console(), progress
        else:
            self.console, self.progress = Console(quiet=True), False

    def run(self) -> dict[str, Any]:
        recipe, world, console, train = self.recipe, self.world, self.console, self.recipe.train
        summary: dict[str, Any] = {"recipe": recipe.name}
        if recipe.dry_run is not None:
            if world.main:
                from memtrain.train.dry_run import dry_run_plan

                summary["dry_run"] = dry_run_plan(
                    recipe.dry_run, console, step_in_backward=train.step_in_backward
                )
            if recipe.dry_run.only:
                gpus = recipe.dry_run.world_size
                if recipe.dry_run.engine == "fsdp":
                    how = f"launcher.kind=fsdp launcher.nproc={gpus} plans each rank this way"
                else:
                    how = (
                        "launcher.kind=deepspeed, launcher.zero_stage and "
                        "launcher.sequence_parallel trains it (each rank planned with its ZeRO "
                        "partition for its shard of the sequence), or memtrain export-deepspeed "
                        "PLAN writes its config"
                    )
                more = f"; training this split needs {gpus} GPUs: memtrain run with {how}"
                console.print(
                    "dry run only (dry_run.only): no training here" + (more if gpus > 1 else "")
                )
                return summary
        if train.overlap_host_step and recipe.schedule.grad_clip:
            raise ConfigError(
                "train.overlap_host_step steps each host weight as its gradient arrives, so "
                "there is no global gradient norm to clip: set schedule.grad_clip=0"
            )
        if train.step_in_backward and recipe.schedule.grad_clip:
            raise ConfigError(
                "train.step_in_backward steps each weight as its gradient arrives, so there is "
                "no global gradient norm to clip: set schedule.grad_clip=0"
            )
        device = pick_device(train.device)
        if world.distributed and device.type == "cuda":
            if world.local_rank >= torch.cuda.device_count():
                raise MemtrainError(
                    f"local rank {world.local_rank} has no GPU ({torch.cuda.device_count()} "
                    "visible)"
                )
            device = torch.device("cuda", world.local_rank)
            torch.cuda.set_device(device)
        if train.threads:
            torch.set_num_threads(train.threads)  # small CPU runs: no thread contention
        strategy = STRATEGIES[world.kind](world, device, recipe.launcher.sequence_parallel)
        backend = strategy.start()
        try:
            if world.distributed:
                size = world.world_size
                summary["launcher"] = {"kind": world.kind, "world_size": size, "backend": backend}
                if strategy.sequence_parallel > 1:
                    summary["launcher"]["sequence_parallel"] = strategy.sequence_parallel
            summary["train"] = self.train(strategy, device, backend)
            if world.main:  # before the process group closes: a rank stuck there may leave
                (self.out_dir / "summary.json").write_text(
                    json.dumps(summary, indent=1, default=str)
                )
                print_summary(summary, console)
        finally:
            strategy.stop(ok=sys.exc_info()[0] is None)
        return summary

    def train(self, strategy: SingleProcess, device: torch.device, backend) -> dict[str, Any]:
        recipe, world, console, out_dir = self.recipe, self.world, self.console, self.out_dir
        train, sched = recipe.train, recipe.schedule
        out_dir.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(train.seed)
        random.seed(train.seed)
        limit = gpu_memory_limit(train.gpu_memory_limit, recipe.plan, device)
        model = build_model(recipe.model, device)
        model.train()
        vocab = model.config.vocab_size
        # The ranks of a sequence-parallel group read the same batches, each holding a shard.
        data_rank, readers = strategy.data_shard()
        self.stream = TokenStream(
            **asdict(recipe.data), vocab_size=vocab, rank=data_rank, world_size=readers
        )
        options = {"step_in_backward": train.step_in_backward, **strategy.prepare_options}
        if train.overlap_host_step:
            options["overlap_host_step"] = True
        options["seq"] = recipe.data.seq // strategy.sequence_parallel  # planned per rank
        parallelism = strategy.plan_parallelism(recipe)
        if parallelism is not None:
            options["parallelism"] = parallelism
        stored = self.stored_plan()
        try:
            self.prepared = prepared = prepare_recipe(model, recipe, limit, stored, **options)
        except (RuntimeError, OSError, MemoryError) as exc:
            error = out_of_memory(exc, "preparing the model", PREPARE_ADVICE, device)
            if error is None:
                raise
        else:
            error = None
        if error is not None:
            raise error  # outside the handler: the failed allocation's frames are freed
        metrics, interrupted = None, False
        strategy.note = self.note
        try:
            if len(set(strategy.gather(plan_digest(prepared)))) > 1:
                raise MemtrainError("the ranks made different plans; they must train the same way")
            where = f"{world.world_size} x {device.type}" if world.distributed else str(device)
            launched = f" ({world.kind}, {backend})" if world.distributed else ""
            console.print(f"[bold]training[/bold] {recipe.name} on {where}{launched}:")
            console.print(prepared.report())
            if prepared.plan is not None and world.main:
                prepared.plan.save(out_dir / PLAN_FILE)
                (out_dir / PLAN_INPUTS).write_text(json.dumps(self.plan_inputs(), default=str))
            strategy.setup(prepared, recipe, out_dir)
            base_lrs = [group["lr"] for group in strategy.param_groups()]  # before a checkpoint's
            start = self.resume(strategy, device)
            if world.main:
                if start:
                    trim_metrics(out_dir / "metrics.jsonl", start)
                metrics = (out_dir / "metrics.jsonl").open("a" if start else "w")
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            tokens_per_step = recipe.data.seq * recipe.data.batch * readers
            losses: list[float] = []
            step_times: list[float] = []
            digest = hashlib.sha256()
            first_position = self.stream.position * readers + data_rank
            started = time.perf_counter()
            with progress_bar(console, self.progress, sched.steps, start) as advance:
                for step in range(start, sched.steps):
                    groups = strategy.param_groups()  # loading a checkpoint replaces the groups
                    for group, base in zip(groups, base_lrs, strict=True):
                        group["lr"] = base * lr_factor(step, sched)
                    ids = next(self.stream)
                    digest.update(ids.numpy().tobytes())
                    t0 = time.perf_counter()
                    loss, grad_norm = self.step(strategy, ids.to(device), step + 1)
                    value = strategy.mean(loss)
                    if not math.isfinite(value):
                        raise MemtrainError(f"the loss became {value} at step {step + 1}; stopping")
                    losses.append(value)
                    elapsed = time.perf_counter() - t0
                    step_times.append(elapsed)
                    last = step + 1 == sched.steps
                    if metrics is not None and ((step + 1) % train.log_every == 0 or last):
                        record = {
                            "step": step + 1,
                            "loss": value,
                            "lr": groups[0]["lr"],
                            "grad_norm": grad_norm,
                            "step_s": elapsed,
                            "tokens_per_s": tokens_per_step / elapsed,
                            # the run's peak so far (step 1 holds GaLore's first refresh)
                            "gpu_peak_bytes": gpu_peak(device),
                        }
                        metrics.write(json.dumps(record) + "\n")
                        metrics.flush()
                    every = train.checkpoint_every
                    if every and ((step + 1) % every == 0 or last):
                        self.checkpoint(strategy, device, step + 1)
                    advance(value)
            strategy.finish_writes()  # the last checkpoint is on disk before the summary
            wall = time.perf_counter() - started
            memory = memory_summary(prepared, device, limit["bytes"], limit["enforced"])
            result = {
                "device": where,
                "steps_run": len(losses),
                "first_loss": losses[0] if losses else None,
                "last_loss": losses[-1] if losses else None,
                "wall_s": wall,
                "tokens_per_s": tokens_per_step * len(losses) / wall if losses else None,
                # the steps after the first (which compiles kernels and warms the allocator),
                # checkpoint writes left out: the rate a long run settles at
                "steady_tokens_per_s": (
                    tokens_per_step * (len(step_times) - 1) / sum(step_times[1:])
                    if len(step_times) > 1
                    else None
                ),
                "memory": memory,
            }
            if strategy.writer is not None and strategy.writer.written:
                result["checkpoints"] = {
                    "written": strategy.writer.written,
                    "background": strategy.writer.background,
                    "waited_s": strategy.writer.waited_s,
                }
            if world.distributed:
                mine = {
                    "rank": world.rank,
                    "batches": len(losses),
                    "first_position": first_position,
                    "data_digest": digest.hexdigest(),
                }
                result["ranks"] = self.per_rank(strategy, memory, mine)
            return result
        except KeyboardInterrupt:
            interrupted = True
            raise
        finally:
            if metrics is not None:
                metrics.close()
            strategy.teardown(interrupted)
            prepared.remove()

    def step(self, strategy: SingleProcess, ids: torch.Tensor, number: int):
        """One step; running out of memory inside it is one line with the numbers."""
        try:
            return strategy.step(ids)
        except (RuntimeError, MemoryError) as exc:
            error = out_of_memory(exc, f"step {number}", STEP_ADVICE, ids.device)
            if error is None:
                raise
        raise error  # outside the handler: the step's tensors are freed with its frames

    def plan_inputs(self) -> dict[str, Any]:
        """What a plan is made from: a stored plan is reused only while these are unchanged."""
        recipe = asdict(self.recipe)
        keys = ("model", "data", "optimizer", "plan", "launcher")
        planned = ("step_in_backward", "overlap_host_step", "gpu_memory_limit")
        train = {k: recipe["train"][k] for k in planned}
        return {**{k: recipe[k] for k in keys}, "train": train, "world": self.world.world_size}

    def stored_plan(self):
        """The plan this run's checkpoints were written under, when resuming a run whose plan
        inputs are unchanged: the resumed run executes it as it was (a new solve could differ,
        e.g. where the solver's time limit binds), so resumes stay bit-identical."""
        out_dir = self.out_dir
        path, inputs = out_dir / PLAN_FILE, out_dir / PLAN_INPUTS
        if not (self.recipe.train.resume and path.exists() and inputs.exists()):
            return None
        if not any(out_dir.glob("checkpoint-*.pt")):
            return None
        try:
            same = json.loads(inputs.read_text()) == json.loads(
                json.dumps(self.plan_inputs(), default=str)
            )
            if not same:
                return None
            from memtrain.planner import Plan

            plan = Plan.load(path)
        except (OSError, ValueError, MemtrainError) as exc:
            self.note(f"resume: the stored plan {path} is not usable ({exc}); planning again")
            return None
        self.note(f"resume: the plan the checkpoints were written under ({path})")
        return plan

    def resume(self, strategy: SingleProcess, device: torch.device) -> int:
        """Load the newest good checkpoint, if any and asked to, once its recipe and plan agree
        with this run's; returns the step to start from."""
        if not self.recipe.train.resume:
            return 0
        state = strategy.load(self.check_resume, self.note)
        if state is None:
            return 0
        self.stream.load_state_dict(state["data"])
        restore_rng(state, device, self.world.rank, self.world.world_size)
        ranks = f" on {self.world.world_size} ranks" if self.world.distributed else ""
        self.note(f"resumed from {strategy.loaded} at step {state['step']}{ranks}")
        return int(state["step"])

    def note(self, text: str) -> None:
        self.console.print(text, markup=False, highlight=False)

    def check_resume(self, stored: dict[str, Any], path: Path) -> None:
        """Refuse a checkpoint this run cannot continue (one line); note the allowed changes."""
        plan = self.prepared.plan
        problem, notes = compare_resume(
            stored, asdict(self.recipe), plan.to_dict() if plan else None, self.world.world_size
        )
        if problem:
            raise MemtrainError(
                f"cannot resume from {path}: {problem} (a change that breaks the run; use "
                "another train.out_dir or train.resume=false)"
            )
        for text in notes:
            self.note(f"resume: {text}")

    def checkpoint(self, strategy: SingleProcess, device: torch.device, step: int) -> None:
        """What every kind of run stores besides the model and optimizer (plain data)."""
        rng = strategy.gather(rng_state(device))  # collective: every rank's RNG state
        plan = self.prepared.plan
        state = {
            "step": step,
            "data": self.stream.state_dict(),
            "rng": rng[0],
            "rng_ranks": rng,
            "world_size": self.world.world_size,
            "plan": plan.to_dict() if plan else None,
            "recipe": asdict(self.recipe),
        }
        strategy.save(state)

    def per_rank(self, strategy: SingleProcess, memory: dict[str, Any], mine: dict[str, Any]):
        """Every rank's measured peak into ``memory``; returns every rank's ``mine``."""
        measured = strategy.gather(memory["measured_gpu_peak_bytes"])
        if all(m is not None for m in measured):
            memory["measured_gpu_peak_bytes"] = max(measured)
            memory["measured_gpu_peak_bytes_per_rank"] = measured
            predicted = memory["predicted_gpu_peak_bytes"]
            if predicted:
                memory["error"] = (max(measured) - predicted) / predicted
        if self.world.kind == "deepspeed":
            memory["note"] = (
                "the plan is one rank's: its ZeRO partition of the model states"
                if self.prepared.plan is not None and self.prepared.plan.parallelism
                else "the plan predicts one unsharded replica; ZeRO shards model states"
            )
        if self.world.kind == "fsdp":
            memory["note"] = "the plan is one rank's: its rows of the model states (FSDP2)"
        held = strategy.gather(strategy.model_state_bytes())
        plan = self.prepared.plan
        if all(h is not None for h in held) and plan is not None:
            resident = plan.predicted.get("gpu_resident_bytes", {})
            host = plan.predicted.get("host_resident_bytes", {})
            predicted = {k: resident.get(k) for k in ("params", "optimizer")}
            predicted.update({f"host_{k}": host.get(k) for k in ("params", "optimizer")})
            memory["model_states_per_rank"] = {
                "predicted": {k: v for k, v in predicted.items() if k in held[0]},
                "measured": held,
            }
        return strategy.gather(mine)


def gpu_peak(device: torch.device) -> int | None:
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None


PLAN_FILE = "plan.yaml"
PLAN_INPUTS = "plan-inputs.json"  # the recipe sections plan.yaml was made from


def plan_digest(prepared) -> str | None:
    if prepared.plan is None:
        return None
    text = json.dumps([x.to_dict() for x in prepared.plan.layers], sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def gpu_memory_limit(limit: str | int | None, plan: PlanSection, device) -> dict[str, Any]:
    """``train.gpu_memory_limit``: on CUDA, cap this process's caching allocator at ``limit``
    (``set_per_process_memory_fraction``, before the model is built); the plan's GPU capacity
    becomes the limit where the hardware has more. On the CPU it is noted, not enforced."""
    from memtrain.units import format_bytes, parse_bytes

    out = {"bytes": None, "enforced": False, "plan_gpu_budget": plan.gpu_budget, "notes": []}
    if limit is None:
        return out
    cap = parse_bytes(limit)
    if cap <= 0:
        raise ConfigError(f"train.gpu_memory_limit must be positive, got {limit!r}")
    out["bytes"] = cap
    if plan.gpu_budget is not None:
        if parse_bytes(plan.gpu_budget) > cap:
            raise ConfigError(
                f"plan.gpu_budget {plan.gpu_budget} is more than train.gpu_memory_limit "
                f"{limit}: the plan would not fit the capped allocator"
            )
    elif plan.enabled and plan.hardware_request().load().capacity("gpu") > cap:
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


def peak_rss_bytes() -> int | None:
    """This process's peak resident set (Linux reports kilobytes; None where unknown)."""
    try:
        import resource
    except ImportError:  # pragma: no cover - not on Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak) * (1 if sys.platform == "darwin" else 1024)


def memory_summary(
    prepared, device: torch.device, limit: int | None = None, enforced: bool = False
) -> dict[str, Any]:
    """Measured against predicted device memory (measured only where an allocator reports it),
    and the plan's host peak beside the process's peak resident set (which also holds the
    libraries, the data and whatever the plan does not place)."""
    predicted = None
    if prepared.plan is not None:
        predicted = prepared.plan.predicted["peak_bytes"].get("gpu")
        split = prepared.plan.parallelism or {}
        if split.get("gpu_peak_bytes"):  # one rank's plan: with its communication buffers
            predicted = split["gpu_peak_bytes"]
    measured = gpu_peak(device)
    result = {"predicted_gpu_peak_bytes": predicted, "measured_gpu_peak_bytes": measured}
    if predicted and measured:
        result["error"] = (measured - predicted) / predicted
    if device.type == "cuda":  # what the allocator held, fragmentation included
        result["measured_gpu_reserved_peak_bytes"] = torch.cuda.max_memory_reserved(device)
    if prepared.plan is not None:
        result["predicted_host_peak_bytes"] = prepared.plan.predicted["peak_bytes"].get("cpu")
    rss = peak_rss_bytes()
    if rss is not None:
        result["measured_host_rss_peak_bytes"] = rss
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
    if train.get("steady_tokens_per_s"):
        table.add_row("tokens / s after step 1", f"{train['steady_tokens_per_s']:,.0f}")
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


@contextmanager
def progress_bar(console, enabled: bool, total: int, done: int):
    """A rich progress bar (or nothing) that shows the latest loss."""
    if not enabled:
        yield lambda loss: None
        return
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    step, loss = (
        TextColumn("step {task.completed}/{task.total}"),
        TextColumn("loss {task.fields[loss]}"),
    )
    with Progress(step, BarColumn(), loss, TimeRemainingColumn(), console=console) as bar:
        task = bar.add_task("train", total=total, completed=done, loss="-")
        yield lambda value: bar.update(task, advance=1, loss=f"{value:.4f}")
