"""How one training step runs: in one process, under DDP or FSDP2, or in a DeepSpeed engine.

The runner (:mod:`memtrain.train.runner`) owns the loop; a strategy does only what differs:
start and stop the process group, wrap the model, forward/backward/step, the optimizer's param
groups, the checkpoint payload it saves and loads, and the collectives (the loss averaged over
ranks, a value gathered from every rank). A single process is a world of one whose collectives
return their input.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from memtrain.dtypes import short_name
from memtrain.errors import ConfigError, MemtrainError
from memtrain.optim.sharded import init_states, step_sharded
from memtrain.train.async_checkpoint import CheckpointWriter
from memtrain.train.checkpoint import (
    CHECKPOINT,
    DS_CHECKPOINTS,
    DS_CLIENT,
    FSDP_CHECKPOINTS,
    FSDP_CLIENT,
    KEEP,
    clear_partial,
    newest_good,
)
from memtrain.train.fsdp_step import clip_when_needed
from memtrain.train.launch import DEEPSPEED_OPTIMIZERS, World
from memtrain.train.recipe import Recipe

# check(client state, where it came from): raises MemtrainError where this run cannot resume it
Check = Callable[[dict[str, Any], Path], None]


class SingleProcess:
    """The prepared model and optimizer as they are; ``checkpoint-<step>.pt`` (the newest also
    as ``checkpoint.pt``) holds the model, its optimizer state and the client state."""

    prepare_options: dict[str, Any] = {}

    # Whether checkpoints may be written in the background (DeepSpeed's engine writes its own).
    background_checkpoints = True

    def __init__(self, world: World, device: torch.device, sequence_parallel: int = 1):
        self.world, self.device = world, device
        # Ranks that share each sequence (DeepSpeed only; check_launcher refuses the others).
        self.sequence_parallel = sequence_parallel
        self.in_backward, self.started = None, False
        self.loaded: Path | None = None  # the checkpoint a resume read
        self.keep, self.writer = KEEP, None
        self.note: Callable[[str], None] = print

    def start(self) -> str | None:
        """Start the process group; returns its backend (None for a single process)."""
        return None

    def plan_parallelism(self, recipe: Recipe):
        """The split each rank's plan is made for (None: one replica's plan)."""
        return None

    def model_state_bytes(self) -> dict[str, int] | None:
        """This rank's parameter and optimizer-state bytes, measured (engines that shard)."""
        return None

    def data_shard(self) -> tuple[int, int]:
        """(this rank's place, their number) among the ranks that read different batches: the
        ranks of one sequence-parallel group read the same batch."""
        degree = self.sequence_parallel
        return self.world.rank // degree, self.world.world_size // degree

    def stop(self, ok: bool) -> None:
        pass

    def setup(self, prepared, recipe: Recipe, out_dir: Path) -> None:
        self.model = self.forward = prepared.model
        self.optimizer, self.clip = prepared.optimizer, recipe.schedule.grad_clip
        self.path = out_dir / CHECKPOINT
        self.start_writer(recipe)
        if recipe.train.step_in_backward:
            from memtrain.optim import register_step_in_backward

            self.in_backward = register_step_in_backward(self.model, self.optimizer)

    def start_writer(self, recipe: Recipe) -> None:
        self.keep = recipe.train.keep_checkpoints
        if self.world.main:
            background = recipe.train.async_checkpoints and self.background_checkpoints
            self.writer = CheckpointWriter(self.keep, background, self.note)

    def finish_writes(self) -> None:
        """Wait for the checkpoint write in flight (the end of a run); raises its failure."""
        if self.writer is not None:
            self.writer.wait()

    def teardown(self, interrupted: bool = False) -> None:
        if self.writer is not None:
            self.writer.close(interrupted)
        if self.in_backward is not None:
            self.in_backward.remove()

    def param_groups(self) -> list[dict[str, Any]]:
        return self.optimizer.param_groups

    def step(self, ids: torch.Tensor) -> tuple[torch.Tensor, float | None]:
        """One step on ``ids``; returns the loss and the gradient norm (None if not clipped)."""
        loss = self.forward(input_ids=ids, labels=ids).loss
        loss.backward()  # DDP averages the gradients over ranks here
        if self.in_backward is not None:  # every weight stepped as its gradient arrived
            return loss, None
        grad_norm = None
        if self.clip:  # an offloaded optimizer holds some gradients on the host: it clips them
            if hasattr(self.optimizer, "clip_grad_norm_"):
                grad_norm = float(self.optimizer.clip_grad_norm_(self.clip))
            else:
                grad_norm = float(nn.utils.clip_grad_norm_(self.model.parameters(), self.clip))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss, grad_norm

    def mean(self, loss: torch.Tensor) -> float:
        """The loss averaged over ranks."""
        return float(loss.detach())

    def gather(self, value: Any) -> list[Any]:
        """``value`` from every rank, in rank order."""
        return [value]

    def barrier(self) -> None:
        pass

    def load(self, check: Check, note: Callable[[str], None]) -> dict[str, Any] | None:
        """Load the model and optimizer of the newest checkpoint that reads back intact, once
        ``check`` accepts its client state; returns that state (None: no checkpoint)."""
        if self.world.main:
            clear_partial(self.path.parent, note)
        self.barrier()  # no rank reads while rank 0 clears
        found = newest_good(self.path, self.device, note)
        if found is None:
            return None
        self.loaded, state = found
        check(state, self.loaded)
        try:
            self.model.load_state_dict(state["model"])  # in place: a DDP replica follows
            self.optimizer.load_state_dict(state["optimizer"])
        except (RuntimeError, ValueError, KeyError, TypeError) as exc:
            raise _does_not_fit(self.loaded, exc) from None
        return state

    def save(self, state: dict[str, Any]) -> None:
        """Rank 0 writes the unwrapped model (it loads without DDP too) and its optimizer state,
        which stands for all as DDP keeps them equal."""
        if self.world.main:
            state.update(model=self.model.state_dict(), optimizer=self.optimizer.state_dict())
            self.writer.write(self.path, state)
        self.barrier()


def _does_not_fit(path, exc: BaseException) -> MemtrainError:
    """A checkpoint that cannot load into this model and optimizer, with the cause's first line."""
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return MemtrainError(f"checkpoint {path} does not fit this model and optimizer ({first})")


STOP_TIMEOUT_S = 120.0  # a rank's process group closes well within this after its last step


@contextlib.contextmanager
def leave_if_stuck(seconds: float, rank: int, ok: bool, leave=os._exit):
    """Around closing a finished rank's process group: if that has not returned in ``seconds``
    (a gloo peer stuck in teardown was seen now and then on the CPU), say so in one line and
    leave the process, with status 0 if the run itself succeeded (its checkpoints and summary
    are written by then), else 1."""

    def expire() -> None:
        print(
            f"memtrain: rank {rank}: the process group did not close within {seconds:.0f} s "
            "after the run ended; leaving without it",
            file=sys.stderr,
            flush=True,
        )
        sys.stdout.flush()
        leave(0 if ok else 1)

    timer = threading.Timer(seconds, expire)
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()


class DDPStrategy(SingleProcess):
    """One replica per rank in DistributedDataParallel (nccl on CUDA, gloo on the CPU)."""

    def start(self) -> str:
        import torch.distributed as dist

        self.started = not dist.is_initialized()  # unless the caller started it
        if self.started:
            self.init_process_group("nccl" if self.device.type == "cuda" else "gloo")
        return dist.get_backend()

    def init_process_group(self, backend: str) -> None:
        torch.distributed.init_process_group(backend=backend)

    def stop(self, ok: bool) -> None:
        import torch.distributed as dist

        if self.started and dist.is_initialized():
            # every rank past its last collective before any closes its connections (a gloo
            # peer torn down mid-collective aborts the other rank at exit)
            with leave_if_stuck(STOP_TIMEOUT_S, self.world.rank, ok):
                if ok:
                    dist.barrier()
                dist.destroy_process_group()

    def setup(self, prepared, recipe: Recipe, out_dir: Path) -> None:
        from torch.nn.parallel import DistributedDataParallel

        super().setup(prepared, recipe, out_dir)
        self.forward = DistributedDataParallel(
            self.model,
            device_ids=[self.device.index] if self.device.type == "cuda" else None,
            gradient_as_bucket_view=True,
        )

    def mean(self, loss: torch.Tensor) -> float:
        total = loss.detach().float().clone().reshape(1)
        torch.distributed.all_reduce(total, op=torch.distributed.ReduceOp.SUM)
        return float(total) / self.world.world_size

    def gather(self, value: Any) -> list[Any]:
        out: list[Any] = [None] * self.world.world_size
        torch.distributed.all_gather_object(out, value)
        return out

    def barrier(self) -> None:
        torch.distributed.barrier()


class DeepSpeedStrategy(DDPStrategy):
    """A DeepSpeed engine configured from the plan (:func:`build_deepspeed_config`) builds the
    optimizer and moves its states (ZeRO-Offload) where planned. Every rank saves its own ZeRO
    shard through ``engine.save_checkpoint`` under ``out_dir/deepspeed``."""

    prepare_options = {"build_optimizer": False, "state_offload": True}
    background_checkpoints = False  # every rank writes its shard inside engine.save_checkpoint
    ulysses = None  # UlyssesSP with launcher.sequence_parallel > 1

    def init_process_group(self, backend: str) -> None:
        import deepspeed

        deepspeed.init_distributed(dist_backend=backend)

    def plan_parallelism(self, recipe: Recipe):
        """With ``launcher.zero_stage`` each rank is planned with its ZeRO partition of the
        model states (fp32 master weights and states for 16-bit models, as DeepSpeed keeps
        them) and the host shared with the ranks beside it; the plan's tokens are the rank's
        own (its shard of each sequence under Ulysses, planned as a whole sequence of that
        length). Without a stage, one replica's plan sets the stage (its ZeRO-Offload)."""
        from memtrain.planner.distributed import Parallelism

        stage = recipe.launcher.zero_stage
        if stage is None:
            return None
        return Parallelism(
            world_size=self.world.world_size,
            zero_stage=stage,
            gpus_per_node=_ranks_per_host(self.world),
        )

    def stop(self, ok: bool) -> None:
        super().stop(ok)
        if self.device.type == "cpu":
            release_shm_buffer(self.world.rank)

    def setup(self, prepared, recipe: Recipe, out_dir: Path) -> None:
        import deepspeed

        self.model, self.path = prepared.model, out_dir / DS_CHECKPOINTS
        self.keep = recipe.train.keep_checkpoints  # the engine writes synchronously
        config = build_deepspeed_config(prepared, recipe, self.world)
        if self.world.main:
            (out_dir / "deepspeed_config.json").write_text(json.dumps(config, indent=1))
        mpu = None
        if self.sequence_parallel > 1:
            from memtrain.train.sequence_parallel import UlyssesSP, exchange_plan

            self.ulysses = UlyssesSP(
                self.model, self.sequence_parallel, recipe.data.batch, recipe.data.seq
            )
            try:  # token-wise layers run their own attention: between Ulysses' all-to-alls
                exchange_plan(prepared.handle, self.ulysses.group, self.sequence_parallel)
            except MemtrainError:
                self.ulysses.close()
                self.ulysses = None
                raise
            mpu = self.ulysses.mpu  # gradients reduced over the sequence and data ranks
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.engine, *_ = deepspeed.initialize(
            model=self.model, model_parameters=params, config=config, mpu=mpu
        )
        if self.ulysses is not None:
            self.ulysses.set_zero_stage(self.engine.zero_optimization_stage())
        if self.engine.zero_optimization_stage() == 3 and prepared.fused_loss:
            # The fused loss reads the LM head's weight outside the head's forward; ZeRO-3
            # gathers it for the whole model's forward and backward once told so.
            head = self.model.get_output_embeddings().weight
            deepspeed.zero.register_external_parameter(self.model, head)

    def param_groups(self) -> list[dict[str, Any]]:
        return self.engine.optimizer.param_groups

    def model_state_bytes(self) -> dict[str, int] | None:
        """This rank's parameter bytes (its ZeRO-3 partitions) and optimizer-state bytes (the
        fp32 partitions ZeRO keeps as master weights, and the states of the optimizer that
        steps them), on its device and on the host; None where the engine's optimizer is not
        one of ZeRO's."""
        from memtrain.offload.deepspeed import zero_state_tensors

        tensors = zero_state_tensors(self.engine.optimizer)
        if tensors is None:
            return None
        out = {"params": 0, "optimizer": 0, "host_params": 0, "host_optimizer": 0}
        on_host = self.device.type != "cpu"  # in a CPU run, host and device are one memory
        for p in self.model.parameters():
            part = getattr(p, "ds_tensor", p)
            where = "host_params" if on_host and part.device.type == "cpu" else "params"
            out[where] += part.numel() * part.element_size()
        seen: set[int] = set()
        for tensor in tensors:
            storage = tensor.untyped_storage()
            if storage._cdata in seen:
                continue
            seen.add(storage._cdata)
            where = "host_optimizer" if on_host and tensor.device.type == "cpu" else "optimizer"
            out[where] += storage.nbytes()
        return out

    def step(self, ids: torch.Tensor) -> tuple[torch.Tensor, float | None]:
        if self.ulysses is None:
            loss = backward = self.engine(input_ids=ids, labels=ids).loss
        else:  # this rank's shard of the group's sequence; labels shifted before sharding
            batch = self.ulysses.shard(ids)
            labels = batch.pop("shift_labels")
            local = self.engine(**batch, labels=labels, shift_labels=labels).loss
            backward, loss = self.ulysses.loss(local, labels)
        self.engine.backward(backward)
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        return loss, None if norm is None else float(norm)

    def teardown(self, interrupted: bool = False) -> None:
        super().teardown(interrupted)
        if self.ulysses is not None:
            self.ulysses.close()
            self.ulysses = None

    def load(self, check: Check, note: Callable[[str], None]) -> dict[str, Any] | None:
        """The tag ``latest`` names, once ``check`` accepts its ``memtrain.json`` (read before
        the engine loads anything; checkpoints without one are checked after loading); a tag
        that cannot be read falls back to the newest older kept one, with a note."""
        latest = self.path / "latest"
        if not latest.exists():
            return None
        tag = latest.read_text(errors="replace").strip()
        candidates = [tag] + [
            p.name for _, p in _step_tags(self.path) if p.name != tag and _step(p.name, tag)
        ]
        for index, name in enumerate(candidates):
            folder = self.path / name
            try:
                return self._load_tag(name, folder, check)
            except _Unreadable as exc:
                if index + 1 == len(candidates):
                    raise MemtrainError(str(exc)) from None
                note(f"{exc}; resuming from the previous kept checkpoint instead")
        return None

    def _load_tag(self, tag: str, folder: Path, check: Check) -> dict[str, Any]:
        self.loaded = folder
        if not tag or not folder.is_dir():
            raise _Unreadable(f"{self.path / 'latest'} names {tag!r}, but there is no {folder}")
        client = folder / DS_CLIENT
        if client.exists():
            try:
                stored = json.loads(client.read_text())
            except ValueError:
                raise _Unreadable(f"{client} is damaged: not JSON") from None
            check(stored, folder)
        try:
            path, state = self.engine.load_checkpoint(str(self.path), tag=tag)
        except MemtrainError:
            raise
        except Exception as exc:  # noqa: BLE001 - any failure inside DeepSpeed, on one line
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise _Unreadable(
                f"DeepSpeed could not load the checkpoint {folder} ({type(exc).__name__}: {first})"
            ) from None
        if path is None or state is None:
            raise _Unreadable(f"DeepSpeed could not load the checkpoint {folder}")
        if not client.exists():
            check(state, folder)
        return state

    def save(self, state: dict[str, Any]) -> None:
        tag = f"step{state['step']}"
        self.engine.save_checkpoint(str(self.path), tag=tag, client_state=state)
        self.barrier()
        if self.world.main:  # what a resume compares before loading the shards
            keys = ("step", "world_size", "recipe", "plan")
            client = json.dumps({k: state.get(k) for k in keys}, default=str)
            (self.path / tag / DS_CLIENT).write_text(client)
            # "latest" already names this tag: keep it and the keep - 1 before it
            for old in stale_tags(self.path, int(state["step"]), self.keep):
                shutil.rmtree(old, ignore_errors=True)
        self.barrier()


class FSDPStrategy(DDPStrategy):
    """FSDP2: ``fully_shard`` on every decoder block, then on the root (embeddings, final norm,
    LM head); each parameter is a DTensor sharded along dim 0 over the ranks. The recipe's
    optimizer steps those shards: torch's and memtrain's row-wise ones (AdamW, 8-bit AdamW,
    GaLore, APOLLO, ...) on each rank's rows, the others one gathered weight at a time
    (:mod:`memtrain.optim.sharded`). Every rank holds a replica's activations, so the plan's
    activation modes run inside each rank; blocks the plan puts on the host are sharded with
    FSDP2's CPU offload (their weights, gradients and optimizer states in host memory, stepped
    there: memtrain.offload.shard_as_planned). Checkpoints: torch.distributed.checkpoint under
    ``out_dir/fsdp/step<N>``, with the client state (data position, RNG, recipe) beside it."""

    prepare_options = {"build_optimizer": False, "state_offload": True}
    background_checkpoints = False  # every rank writes its shard inside dcp.save

    def plan_parallelism(self, recipe: Recipe):
        """Each rank is planned with its rows of every weight, gradient and optimizer state
        (ZeRO-3's split, by rows) and the host shared with the ranks beside it."""
        from memtrain.planner.distributed import Parallelism

        return Parallelism.of_engine(
            "fsdp", world_size=self.world.world_size, gpus_per_node=_ranks_per_host(self.world)
        )

    def model_state_bytes(self) -> dict[str, int]:
        """This rank's parameter and optimizer-state bytes on its device and on the host (where
        the shards are; in a CPU run, the blocks FSDP2 was told to offload)."""
        from memtrain.optim.memory import measured_state_bytes
        from memtrain.optim.sharded import local

        out = {"params": 0, "optimizer": 0, "host_params": 0, "host_optimizer": 0}
        states = measured_state_bytes(self.optimizer)
        for p in self.model.parameters():
            if self.device.type == "cpu":
                host = id(p) in self.host_param_ids
            else:
                host = local(p).device.type == "cpu"
            out[("host_" if host else "") + "params"] += local(p).nbytes
            out[("host_" if host else "") + "optimizer"] += states.get(id(p), 0)
        return out

    def setup(self, prepared, recipe: Recipe, out_dir: Path) -> None:
        from memtrain.models.build import causal_lm_layers
        from memtrain.offload.fsdp import shard_as_planned
        from memtrain.optim import build_optimizer
        from memtrain.optim.memory import parse_optimizer_spec
        from memtrain.train.fsdp_step import host_step_spec

        self.model = self.forward = prepared.model
        self.clip, self.keep = recipe.schedule.grad_clip, recipe.train.keep_checkpoints
        self.path = out_dir / FSDP_CHECKPOINTS
        self.host_blocks = shard_as_planned(self.model, prepared.plan)
        self.host_param_ids = {  # the sharded parameters (DTensors) of those blocks
            id(p)
            for layer in causal_lm_layers(self.model)
            if layer.name in self.host_blocks
            for module in layer.modules
            for p in module.parameters()
        }
        opt = recipe.optimizer
        spec = host_step_spec(parse_optimizer_spec(opt.spec), bool(self.host_blocks))
        decay = float(spec.options.get("weight_decay", opt.weight_decay))
        self.optimizer = build_optimizer(self.model, spec, lr=float(opt.lr))
        for group in self.optimizer.param_groups:
            group["weight_decay"] = decay
        self.optimizer_name = spec.name

    def optimizer_step(self) -> None:
        step_sharded(self.optimizer, self.optimizer_name)

    def step(self, ids: torch.Tensor) -> tuple[torch.Tensor, float | None]:
        loss = self.model(input_ids=ids, labels=ids).loss
        loss.backward()  # reduce-scatter: each rank gets its shard of the averaged gradients
        grad_norm = None
        if self.clip:
            grad_norm = clip_when_needed(list(self.model.parameters()), self.clip)
        self.optimizer_step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss, grad_norm

    def load(self, check: Check, note: Callable[[str], None]) -> dict[str, Any] | None:
        """The newest ``step<N>`` whose client state was written (it is written after every
        rank's shards), once ``check`` accepts it; its shards read back with DCP."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        tags = [p for _, p in _step_tags(self.path) if (p / FSDP_CLIENT).exists()]
        if not tags:
            return None
        folder = self.loaded = tags[0]
        try:
            state = torch.load(folder / FSDP_CLIENT, map_location="cpu", weights_only=False)
        except Exception as exc:  # noqa: BLE001 - a damaged file, on one line
            raise MemtrainError(f"{folder / FSDP_CLIENT} cannot be read ({exc})") from None
        check(state, folder)
        init_states(self.optimizer, self.optimizer_step)
        model_state, optim_state = get_state_dict(self.model, self.optimizer)
        loaded = {"model": model_state, "optimizer": optim_state}
        try:
            dcp.load(loaded, checkpoint_id=str(folder))
            set_state_dict(
                self.model,
                self.optimizer,
                model_state_dict=loaded["model"],
                optim_state_dict=loaded["optimizer"],
            )
        except Exception as exc:  # noqa: BLE001 - any failure inside DCP, on one line
            raise _does_not_fit(folder, exc) from None
        return state

    def save(self, state: dict[str, Any]) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        step = int(state["step"])
        folder = self.path / f"step{step}"
        if self.world.main and folder.exists():  # a resumed run's dropped future
            shutil.rmtree(folder)
        self.barrier()
        model_state, optim_state = get_state_dict(self.model, self.optimizer)
        dcp.save({"model": model_state, "optimizer": optim_state}, checkpoint_id=str(folder))
        self.barrier()
        if self.world.main:  # last: a folder with its client state is whole
            partial = folder / (FSDP_CLIENT + ".partial")
            torch.save(state, partial)
            partial.replace(folder / FSDP_CLIENT)
            for old in stale_tags(self.path, step, self.keep):
                shutil.rmtree(old, ignore_errors=True)
        self.barrier()


def _ranks_per_host(world: World) -> int:
    """Ranks sharing this rank's host (torchrun's ``LOCAL_WORLD_SIZE``, DeepSpeed's ``LOCAL_SIZE``)."""
    local = os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("LOCAL_SIZE")
    return max(1, int(local or world.world_size))


class _Unreadable(Exception):
    """A DeepSpeed tag that cannot be read (a damaged or missing checkpoint, not a refusal)."""


def _step_tags(folder: Path) -> list[tuple[int, Path]]:
    """``step<n>`` tag folders, newest first."""
    tags = [
        (int(p.name[4:]), p) for p in folder.glob("step*") if p.is_dir() and p.name[4:].isdigit()
    ]
    return sorted(tags, reverse=True)


def _step(name: str, latest: str) -> bool:
    """Whether tag ``name`` is older than the ``latest`` one (tags after it are a future a
    resumed run dropped)."""
    if not latest.startswith("step") or not latest[4:].isdigit():
        return True
    return int(name[4:]) < int(latest[4:])


def stale_tags(folder: Path, step: int, keep: int) -> list[Path]:
    """DeepSpeed tag folders (``step<n>``) past the ``keep`` newest up to ``step``, and any past
    ``step`` (a run resumed from an older tag drops the future it left)."""
    tags = _step_tags(folder)
    kept = [p for n, p in tags if n <= step][: max(1, keep)]
    return [p for _, p in tags if p not in kept]


STRATEGIES = {
    "single": SingleProcess,
    "torchrun": DDPStrategy,
    "fsdp": FSDPStrategy,
    "deepspeed": DeepSpeedStrategy,
}


def build_deepspeed_config(prepared, recipe: Recipe, world: World) -> dict[str, Any]:
    """The DeepSpeed config for this run: the plan's placements, the recipe's ZeRO stage."""
    from memtrain.offload.deepspeed import deepspeed_config

    dtype = short_name(recipe.model.dtype)
    opt = recipe.optimizer
    lr, weight_decay = float(opt.lr), float(opt.weight_decay)
    if prepared.plan is not None:
        config = deepspeed_config(
            prepared.plan, dtype=dtype, mixed="offload-all", lr=lr, weight_decay=weight_decay
        )
    else:
        config = {
            "zero_optimization": {"stage": 0},
            "bf16": {"enabled": dtype == "bf16"},
            "fp16": {"enabled": dtype == "fp16"},
        }
    params: dict[str, Any] = {"lr": lr, "weight_decay": weight_decay}
    if "eps" in opt.options:
        params["eps"] = float(opt.options["eps"])
    if "beta1" in opt.options or "beta2" in opt.options:
        params["betas"] = [
            float(opt.options.get("beta1", 0.9)),
            float(opt.options.get("beta2", 0.999)),
        ]
    config["optimizer"] = {"type": DEEPSPEED_OPTIMIZERS[opt.name], "params": params}
    zero, stage = config["zero_optimization"], recipe.launcher.zero_stage
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
    batch, degree = recipe.data.batch, recipe.launcher.sequence_parallel
    config["train_micro_batch_size_per_gpu"] = batch
    config["gradient_accumulation_steps"] = 1
    config["train_batch_size"] = batch * (world.world_size // degree)  # data-parallel ranks
    if degree > 1:
        config["sequence_parallel_size"] = degree
        if zero["stage"] == 3:  # one averaging path (memtrain.train.sequence_parallel)
            zero["reduce_scatter"] = True
    config["gradient_clipping"] = float(recipe.schedule.grad_clip or 0.0)
    config["steps_per_print"] = 2**31 - 1  # memtrain logs
    config["wall_clock_breakdown"] = False
    return config


def release_shm_buffer(rank: int, root: str = "/dev/shm") -> None:
    """Remove this rank's shared-memory all-reduce buffer that DeepSpeed's CPU communication op
    creates and never unlinks (69 MB per rank and launch, left in /dev/shm otherwise). Called
    once every rank is past its last collective; peers keep their mappings."""
    import os

    addr, port = os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", "")
    name = f"deepspeed_allreduce_buffer_{os.getuid()}_{addr}_{port}_{rank}"
    try:
        os.unlink(os.path.join(root, name))
    except OSError:
        pass  # not created (another communication backend) or already gone
