"""Several processes for ``memtrain run``: torchrun (DDP) or DeepSpeed, one rank per device.

``memtrain run RECIPE launcher.kind=torchrun launcher.nproc=8`` re-launches the same command as
``python -m torch.distributed.run --standalone --nproc_per_node 8 -m memtrain run RECIPE ...``;
``launcher.kind=deepspeed`` re-launches it through the DeepSpeed launcher
(``python -m deepspeed.launcher.runner --num_gpus 8 --no_local_rank --module memtrain run ...``,
the ``deepspeed`` command). Inside each rank (``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` in the
environment) :func:`run_distributed`:

- starts the process group (nccl on CUDA, gloo on the CPU), one device per local rank;
- reads its own shard of the data: rank ``r`` of ``W`` takes batches ``r, r + W, ...`` of the
  recipe's stream, so ranks see different data and a checkpoint resumes every shard;
- plans and installs the plan on every rank (each rank holds a whole replica, so the plan of one
  device applies; the ranks' plans are checked to be identical), then wraps the model in DDP
  (torchrun) or hands it to a DeepSpeed engine configured from the plan by
  :func:`memtrain.offload.deepspeed.deepspeed_config`, at the recipe's ``launcher.zero_stage``;
- averages the loss over ranks for logging. Rank 0 alone prints, writes ``metrics.jsonl`` and
  ``summary.json``, and writes DDP checkpoints (the unwrapped model, optimizer, data position and
  every rank's RNG state; rank 0's optimizer state stands for all, as DDP keeps them equal).
  DeepSpeed checkpoints are written by every rank through ``engine.save_checkpoint`` (each
  holds its own ZeRO shard) and read back with ``engine.load_checkpoint``.

On a CPU-only machine both kinds run with gloo (DeepSpeed with ``DS_ACCELERATOR=cpu``, which
the launch sets when training on the CPU).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import math
import os
import random
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from memtrain.errors import ConfigError, MemtrainError

# kind -> the module run as ``python -m MODULE`` to launch the ranks (the launcher "binary").
LAUNCHERS = {"torchrun": "torch.distributed.run", "deepspeed": "deepspeed.launcher.runner"}
# Optimizers DeepSpeed builds itself (its CPU Adam where ZeRO-Offload moves the states).
DEEPSPEED_OPTIMIZERS = {"adamw": "AdamW", "adam": "Adam"}
DS_CHECKPOINTS = "deepspeed"  # folder under train.out_dir for engine.save_checkpoint


@dataclass(frozen=True)
class World:
    """This process's place among the ranks."""

    rank: int
    world_size: int
    local_rank: int
    kind: str  # "torchrun" (DDP) or "deepspeed"

    @property
    def main(self) -> bool:
        return self.rank == 0


def world_from_env(recipe: dict[str, Any]) -> World | None:
    """The rank this process is, from a launcher's environment; None for a single process."""
    env = os.environ
    if "RANK" not in env or "WORLD_SIZE" not in env:
        return None
    size = int(env["WORLD_SIZE"])
    kind = recipe["launcher"]["kind"]
    if size == 1 and kind == "single":
        return None
    rank = int(env["RANK"])
    local = int(env.get("LOCAL_RANK", rank))
    return World(rank, size, local, "deepspeed" if kind == "deepspeed" else "torchrun")


def needs_launch(recipe: dict[str, Any]) -> bool:
    """Whether ``memtrain run`` must start the ranks (it is not one of them yet)."""
    launcher = recipe["launcher"]
    wants = launcher["kind"] != "single" or launcher["nproc"] > 1
    if recipe["dry_run"] is not None and recipe["dry_run"].get("only"):
        return False  # a dry run alone plans in this process
    return wants and "RANK" not in os.environ


def check_launcher(recipe: dict[str, Any]) -> None:
    """Refuse launcher settings that cannot run, before any process is started."""
    launcher, optimizer = recipe["launcher"], recipe["optimizer"]
    kind, nproc, stage = launcher["kind"], launcher["nproc"], launcher["zero_stage"]
    if kind == "single" and nproc > 1:
        raise ConfigError(
            f"launcher.nproc={nproc} needs several processes: set launcher.kind=torchrun (DDP) "
            "or launcher.kind=deepspeed"
        )
    if stage is not None:
        if kind != "deepspeed":
            raise ConfigError("launcher.zero_stage is for launcher.kind=deepspeed")
        if stage not in (0, 1, 2, 3):
            raise ConfigError(f"launcher.zero_stage must be 0, 1, 2 or 3, got {stage}")
    if kind == "deepspeed" and optimizer["name"] not in DEEPSPEED_OPTIMIZERS:
        raise ConfigError(
            f"launcher.kind=deepspeed trains with DeepSpeed's own optimizer: optimizer.name "
            f"{' or '.join(DEEPSPEED_OPTIMIZERS)}, not {optimizer['name']!r} (use "
            "launcher.kind=torchrun for memtrain's optimizers)"
        )
    if kind != "single" and recipe["train"]["step_in_backward"]:
        raise ConfigError(
            "train.step_in_backward steps each weight before the gradients are averaged over "
            "ranks; it runs in a single process only"
        )


def _launch_device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return "cuda" if name.startswith("cuda") else "cpu"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch_command(recipe: dict[str, Any], cli_args: list[str]) -> tuple[list[str], dict[str, str]]:
    """The launcher command line (and environment) that runs ``memtrain CLI_ARGS`` per rank."""
    check_launcher(recipe)
    launcher = recipe["launcher"]
    kind, nproc = launcher["kind"], launcher["nproc"]
    kind = "torchrun" if kind == "single" else kind
    module = LAUNCHERS[kind]
    # The top-level package only: finding a submodule imports its parents, and DeepSpeed's
    # import logs on stdout.
    found = importlib.util.find_spec(module.partition(".")[0]) is not None
    if not found:
        extra = " (pip install 'memtrain[deepspeed]')" if kind == "deepspeed" else ""
        raise ConfigError(
            f"launcher.kind={kind}: its launcher ({module}) is not installed for "
            f"{sys.executable}{extra}"
        )
    device = _launch_device(recipe["train"]["device"])
    if device == "cuda":
        visible = torch.cuda.device_count()
        if nproc > visible:
            raise ConfigError(
                f"launcher.nproc={nproc} but {visible} CUDA device(s) are visible; one rank "
                "runs per GPU (check CUDA_VISIBLE_DEVICES)"
            )
    env = dict(os.environ)
    if kind == "torchrun":
        cmd = [sys.executable, "-m", module, "--standalone", "--nnodes=1"]
        cmd += [f"--nproc_per_node={nproc}", "-m", "memtrain", *cli_args]
    else:
        if device == "cpu":
            env.setdefault("DS_ACCELERATOR", "cpu")
        visible = [d for d in env.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
        if device == "cuda" and visible:
            # The DeepSpeed launcher ignores CUDA_VISIBLE_DEVICES when given --num_gpus.
            chosen = f"--include=localhost:{','.join(visible[:nproc])}"
        else:
            chosen = f"--num_gpus={nproc}"
        cmd = [sys.executable, "-m", module, chosen, "--no_local_rank"]
        cmd += [f"--master_port={_free_port()}", "--module", "memtrain", *cli_args]
    return cmd, env


def launch(recipe: dict[str, Any], cli_args: list[str], json_summary: bool = False) -> int:
    """Start the ranks of ``memtrain CLI_ARGS`` and wait for them; returns the exit status.

    With ``json_summary`` everything the launcher and the ranks print goes to stderr and, once
    they succeed, rank 0's ``summary.json`` is printed on stdout (launchers log on stdout).
    """
    cmd, env = launch_command(recipe, cli_args)
    code = relaunch(cmd, env, stdout=sys.stderr if json_summary else None)
    if json_summary and code == 0:
        summary = Path(recipe["train"]["out_dir"]) / "summary.json"
        sys.stdout.write(summary.read_text() + "\n")
    return code


def relaunch(cmd: list[str], env: dict[str, str], stdout=None) -> int:
    """Run the launcher and wait; SIGTERM is passed on to it. Returns its exit status."""
    print(f"memtrain run: launching {' '.join(cmd)}", file=sys.stderr, flush=True)
    sys.stderr.flush()
    proc = subprocess.Popen(cmd, env=env, stdout=stdout)
    previous = signal.signal(signal.SIGTERM, lambda *_: proc.send_signal(signal.SIGTERM))
    try:
        while True:
            try:
                return proc.wait()
            except KeyboardInterrupt:
                proc.send_signal(signal.SIGINT)  # the launcher stops its ranks
    finally:
        signal.signal(signal.SIGTERM, previous)


# ---------------------------------------------------------------------------- inside a rank


def _gather(value: Any, world: World) -> list[Any]:
    import torch.distributed as dist

    out: list[Any] = [None] * world.world_size
    dist.all_gather_object(out, value)
    return out


def _mean(value: torch.Tensor, world: World) -> float:
    import torch.distributed as dist

    total = value.detach().float().clone().reshape(1)
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return float(total) / world.world_size


def _init_process_group(world: World, device: torch.device) -> bool:
    """Start the process group unless the caller did; returns whether this call started it."""
    import torch.distributed as dist

    if dist.is_initialized():
        return False
    backend = "nccl" if device.type == "cuda" else "gloo"
    if world.kind == "deepspeed":
        import deepspeed

        deepspeed.init_distributed(dist_backend=backend)
    else:
        dist.init_process_group(backend=backend)
    return True


def _plan_digest(prepared) -> str | None:
    if prepared.plan is None:
        return None
    text = json.dumps(prepared.plan.layers, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def build_deepspeed_config(prepared, recipe: dict[str, Any], world: World) -> dict[str, Any]:
    """The DeepSpeed config for this run: the plan's placements, the recipe's ZeRO stage."""
    from memtrain.offload.deepspeed import deepspeed_config

    dtype = {"fp32": "fp32", "float32": "fp32", "bf16": "bf16", "bfloat16": "bf16"}.get(
        recipe["model"]["dtype"], "fp16"
    )
    opt, data, sched = recipe["optimizer"], recipe["data"], recipe["schedule"]
    if prepared.plan is not None:
        config = deepspeed_config(
            prepared.plan,
            dtype=dtype,
            mixed="offload-all",
            lr=float(opt["lr"]),
            weight_decay=float(opt["weight_decay"]),
        )
    else:
        config = {
            "zero_optimization": {"stage": 0},
            "bf16": {"enabled": dtype == "bf16"},
            "fp16": {"enabled": dtype == "fp16"},
        }
    config["optimizer"] = {
        "type": DEEPSPEED_OPTIMIZERS[opt["name"]],
        "params": {"lr": float(opt["lr"]), "weight_decay": float(opt["weight_decay"])},
    }
    zero = config["zero_optimization"]
    stage = recipe["launcher"]["zero_stage"]
    if stage is not None:
        if stage < 3 and "offload_param" in zero:
            raise ConfigError(
                f"the plan moves parameters off the GPU, which needs ZeRO-3; launcher.zero_stage "
                f"is {stage}"
            )
        if stage == 0 and "offload_optimizer" in zero:
            raise ConfigError(
                "the plan moves optimizer states off the GPU (ZeRO-Offload), which needs "
                "launcher.zero_stage 1 or more"
            )
        zero["stage"] = stage
    config["train_micro_batch_size_per_gpu"] = data["batch"]
    config["gradient_accumulation_steps"] = 1
    config["train_batch_size"] = data["batch"] * world.world_size
    config["gradient_clipping"] = float(sched["grad_clip"] or 0.0)
    config["steps_per_print"] = 2**31 - 1  # memtrain logs
    config["wall_clock_breakdown"] = False
    return config


def _rng_states(device: torch.device, world: World) -> list[dict[str, Any]]:
    from memtrain.train.loop import _rng_state

    return _gather(_rng_state(device), world)


def _restore_rng(state: dict[str, Any], device: torch.device, world: World) -> None:
    from memtrain.train.loop import _set_rng_state

    ranks = state.get("rng_ranks")
    mine = ranks[world.rank] if ranks and len(ranks) == world.world_size else state["rng"]
    _set_rng_state(mine, device)


def _trim_metrics(path: Path, last_step: int) -> None:
    """Drop lines a killed run logged after its last checkpoint (they are run again)."""
    if not path.exists():
        return
    kept = [line for line in path.read_text().splitlines() if json.loads(line)["step"] <= last_step]
    path.write_text("".join(line + "\n" for line in kept))


def run_distributed(recipe: dict[str, Any], console=None, progress: bool = True) -> dict[str, Any]:
    """Run a validated recipe as one rank of a launched job; returns the summary (rank 0 prints
    it and writes ``summary.json``)."""
    from rich.console import Console

    from memtrain.train.loop import pick_device

    world = world_from_env(recipe)
    if world is None:
        raise MemtrainError(
            "run_distributed runs inside a launched process (RANK and WORLD_SIZE set): start it "
            "with `memtrain run RECIPE launcher.kind=torchrun launcher.nproc=N`"
        )
    check_launcher(recipe)
    if recipe["train"]["step_in_backward"]:  # also when torchrun was run by hand (kind single)
        raise ConfigError(
            "train.step_in_backward steps each weight before the gradients are averaged over "
            "ranks; it runs in a single process only"
        )
    device = pick_device(recipe["train"]["device"])
    if device.type == "cuda":
        if world.local_rank >= torch.cuda.device_count():
            raise MemtrainError(
                f"local rank {world.local_rank} has no GPU ({torch.cuda.device_count()} visible)"
            )
        device = torch.device("cuda", world.local_rank)
        torch.cuda.set_device(device)
    if world.main:
        console = console or Console()
    else:
        console, progress = Console(quiet=True), False
    if recipe["train"]["threads"]:
        torch.set_num_threads(recipe["train"]["threads"])
    started = _init_process_group(world, device)
    try:
        return _train(recipe, world, device, console, progress)
    finally:
        import torch.distributed as dist

        if started and dist.is_initialized():
            # every rank past its last collective before any closes its connections (a gloo
            # peer torn down mid-collective aborts the other rank at exit)
            if sys.exc_info()[0] is None:
                dist.barrier()
            dist.destroy_process_group()


def _train(recipe, world: World, device: torch.device, console, progress: bool) -> dict[str, Any]:
    import torch.distributed as dist

    from memtrain.train import loop

    train, data = recipe["train"], recipe["data"]
    backend = dist.get_backend()
    summary: dict[str, Any] = {
        "recipe": recipe["name"],
        "launcher": {"kind": world.kind, "world_size": world.world_size, "backend": backend},
    }
    if recipe["dry_run"] is not None and world.main:
        from memtrain.train.dry_run import dry_run_plan

        summary["dry_run"] = dry_run_plan(recipe["dry_run"], console)
    out_dir = Path(train["out_dir"])
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(train["seed"])
    random.seed(train["seed"])
    limit = loop.gpu_memory_limit(train.get("gpu_memory_limit"), recipe["plan"], device)
    model = loop.build_model(recipe["model"], device)
    model.train()
    stream = loop.recipe_stream(
        data, model.config.vocab_size, rank=world.rank, world_size=world.world_size
    )
    deepspeed_kind = world.kind == "deepspeed"
    prepared = loop.prepare_recipe(
        model,
        recipe,
        limit,
        # DeepSpeed builds the optimizer and moves its states (ZeRO-Offload) where planned.
        build_optimizer=not deepspeed_kind,
        state_offload=True if deepspeed_kind else None,
    )
    try:
        digests = _gather(_plan_digest(prepared), world)
        if len(set(digests)) > 1:
            raise MemtrainError("the ranks made different plans; they must train the same way")
        if world.main:
            console.print(
                f"[bold]training[/bold] {recipe['name']} on {world.world_size} x {device.type} "
                f"({world.kind}, {backend}):"
            )
            console.print(prepared.report())
            if prepared.plan is not None:
                prepared.plan.save(out_dir / "plan.yaml")
        runner = _DeepSpeedRunner if deepspeed_kind else _DdpRunner
        return runner(
            recipe, world, device, console, progress, prepared, stream, summary, limit
        ).run()
    finally:
        prepared.remove()


class _Runner:
    """The loop shared by DDP and DeepSpeed; subclasses wrap, step and checkpoint."""

    def __init__(self, recipe, world, device, console, progress, prepared, stream, summary, limit):
        self.recipe, self.world, self.device = recipe, world, device
        self.console, self.progress, self.prepared = console, progress, prepared
        self.stream, self.summary, self.limit = stream, summary, limit
        self.out_dir = Path(recipe["train"]["out_dir"])
        self.model = prepared.model

    # subclasses -------------------------------------------------------------------------
    def setup(self) -> None:  # wrap the model
        raise NotImplementedError

    def resume(self) -> int:  # load the newest checkpoint; returns the step to start from
        raise NotImplementedError

    def param_groups(self) -> list[dict[str, Any]]:
        raise NotImplementedError

    def step(self, ids: torch.Tensor) -> tuple[torch.Tensor, float | None]:
        raise NotImplementedError

    def checkpoint(self, step: int) -> None:
        raise NotImplementedError

    def teardown(self) -> None:
        pass

    # ------------------------------------------------------------------------------------
    def client_state(self, step: int) -> dict[str, Any]:
        rng = _rng_states(self.device, self.world)
        return {
            "step": step,
            "data": self.stream.state_dict(),
            "rng": rng[0],
            "rng_ranks": rng,
            "world_size": self.world.world_size,
            "plan": self.prepared.plan.to_dict() if self.prepared.plan else None,
            "recipe": self.recipe,
        }

    def restore_client_state(self, state: dict[str, Any]) -> int:
        self.stream.load_state_dict(state["data"])
        _restore_rng(state, self.device, self.world)
        return int(state["step"])

    def run(self) -> dict[str, Any]:
        from memtrain.train import loop

        recipe, world, sched, train = (
            self.recipe,
            self.world,
            self.recipe["schedule"],
            self.recipe["train"],
        )
        self.setup()
        base_lrs = [group["lr"] for group in self.param_groups()]  # before a checkpoint's
        start_step = self.resume() if train["resume"] else 0
        if start_step:
            self.console.print(f"resumed at step {start_step} on {world.world_size} ranks")
        metrics = None
        if world.main:
            if start_step:
                _trim_metrics(self.out_dir / "metrics.jsonl", start_step)
            metrics = loop.MetricsLog(self.out_dir / "metrics.jsonl", append=start_step > 0)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        data = recipe["data"]
        tokens_per_step = data["seq"] * data["batch"] * world.world_size
        losses: list[float] = []
        digest = hashlib.sha256()
        first_position = self.stream.position * world.world_size + world.rank
        batches = 0
        started = time.perf_counter()
        try:
            with loop._progress(self.console, self.progress, sched["steps"], start_step) as advance:
                for step in range(start_step, sched["steps"]):
                    groups = self.param_groups()  # loading a checkpoint replaces the groups
                    for group, base in zip(groups, base_lrs, strict=True):
                        group["lr"] = base * loop.lr_factor(step, sched)
                    ids = next(self.stream)
                    digest.update(ids.numpy().tobytes())
                    batches += 1
                    t0 = time.perf_counter()
                    loss, grad_norm = self.step(ids.to(self.device))
                    value = _mean(loss, world)
                    if not math.isfinite(value):
                        raise MemtrainError(f"the loss became {value} at step {step + 1}; stopping")
                    losses.append(value)
                    elapsed = time.perf_counter() - t0
                    last = step + 1 == sched["steps"]
                    if metrics is not None and ((step + 1) % train["log_every"] == 0 or last):
                        metrics.write(
                            {
                                "step": step + 1,
                                "loss": value,
                                "lr": groups[0]["lr"],
                                "grad_norm": grad_norm,
                                "step_s": elapsed,
                                "tokens_per_s": tokens_per_step / elapsed,
                            }
                        )
                    every = train["checkpoint_every"]
                    if every and ((step + 1) % every == 0 or last):
                        self.checkpoint(step + 1)
                    advance(value)
        finally:
            if metrics is not None:
                metrics.close()
            self.teardown()
        wall = time.perf_counter() - started
        memory = loop.memory_summary(
            self.prepared, self.device, self.limit["bytes"], self.limit["enforced"]
        )
        measured = _gather(memory["measured_gpu_peak_bytes"], world)
        if all(m is not None for m in measured):
            memory["measured_gpu_peak_bytes"] = max(measured)
            memory["measured_gpu_peak_bytes_per_rank"] = measured
            predicted = memory["predicted_gpu_peak_bytes"]
            if predicted:
                memory["error"] = (max(measured) - predicted) / predicted
        if world.kind == "deepspeed":
            memory["note"] = "the plan predicts one unsharded replica; ZeRO shards model states"
        ranks = _gather(
            {
                "rank": world.rank,
                "batches": batches,
                "first_position": first_position,
                "data_digest": digest.hexdigest(),
            },
            world,
        )
        self.summary["train"] = {
            "device": f"{world.world_size} x {self.device.type}",
            "steps_run": len(losses),
            "first_loss": losses[0] if losses else None,
            "last_loss": losses[-1] if losses else None,
            "wall_s": wall,
            "tokens_per_s": tokens_per_step * len(losses) / wall if losses else None,
            "memory": memory,
            "ranks": ranks,
        }
        if world.main:
            (self.out_dir / "summary.json").write_text(
                json.dumps(self.summary, indent=1, default=str)
            )
            loop.print_summary(self.summary, self.console)
        return self.summary


class _DdpRunner(_Runner):
    def setup(self) -> None:
        from torch.nn.parallel import DistributedDataParallel

        from memtrain.train.loop import CHECKPOINT

        self.optimizer = self.prepared.optimizer
        self.ckpt_path = self.out_dir / CHECKPOINT
        self.wrapped = DistributedDataParallel(
            self.model,
            device_ids=[self.device.index] if self.device.type == "cuda" else None,
            gradient_as_bucket_view=True,
        )

    def resume(self) -> int:
        if not self.ckpt_path.exists():
            return 0
        state = torch.load(self.ckpt_path, map_location=self.device, weights_only=False)
        self.model.load_state_dict(state["model"])  # in place: the DDP replica follows
        self.optimizer.load_state_dict(state["optimizer"])
        return self.restore_client_state(state)

    def param_groups(self):
        return self.optimizer.param_groups

    def step(self, ids):
        from memtrain.train.loop import _clip

        loss = self.wrapped(input_ids=ids, labels=ids).loss
        loss.backward()  # DDP averages the gradients over ranks here
        grad_norm = None
        clip = self.recipe["schedule"]["grad_clip"]
        if clip:
            grad_norm = float(_clip(self.model, self.optimizer, clip))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss, grad_norm

    def checkpoint(self, step: int) -> None:
        import torch.distributed as dist

        from memtrain.train.loop import save_checkpoint

        payload = self.client_state(step)  # collective: every rank's RNG state
        if self.world.main:
            payload["model"] = self.model.state_dict()  # unwrapped: loads without DDP too
            payload["optimizer"] = self.optimizer.state_dict()
            save_checkpoint(self.ckpt_path, payload)
        dist.barrier()


class _DeepSpeedRunner(_Runner):
    def setup(self) -> None:
        import deepspeed

        self.ds_dir = self.out_dir / DS_CHECKPOINTS
        config = build_deepspeed_config(self.prepared, self.recipe, self.world)
        if self.world.main:
            (self.out_dir / "deepspeed_config.json").write_text(json.dumps(config, indent=1))
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.engine, *_ = deepspeed.initialize(
            model=self.model, model_parameters=params, config=config
        )
        if self.engine.zero_optimization_stage() == 3 and self.prepared.fused_loss:
            # The fused loss reads the LM head's weight outside the head's forward; ZeRO-3
            # gathers it for the whole model's forward and backward once told so.
            head = self.model.get_output_embeddings().weight
            deepspeed.zero.register_external_parameter(self.model, head)

    def resume(self) -> int:
        if not (self.ds_dir / "latest").exists():
            return 0
        path, client = self.engine.load_checkpoint(str(self.ds_dir))
        if path is None:
            raise MemtrainError(f"DeepSpeed could not load the checkpoint in {self.ds_dir}")
        return self.restore_client_state(client)

    def param_groups(self):
        return self.engine.optimizer.param_groups

    def step(self, ids):
        loss = self.engine(input_ids=ids, labels=ids).loss
        self.engine.backward(loss)
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        return loss, None if norm is None else float(norm)

    def checkpoint(self, step: int) -> None:
        import shutil

        import torch.distributed as dist

        tag = f"step{step}"
        state = self.client_state(step)
        self.engine.save_checkpoint(str(self.ds_dir), tag=tag, client_state=state)
        dist.barrier()
        if self.world.main:  # keep the newest only; "latest" already names it
            for old in self.ds_dir.glob("step*"):
                if old.is_dir() and old.name != tag:
                    shutil.rmtree(old, ignore_errors=True)
        dist.barrier()
