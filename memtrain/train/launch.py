"""Starting the ranks of ``memtrain run``: torchrun (DDP, FSDP2) or DeepSpeed, one rank per device.

``memtrain run RECIPE launcher.kind=torchrun launcher.nproc=8`` re-launches the same command as
``python -m torch.distributed.run --standalone --nproc_per_node 8 -m memtrain run RECIPE ...``;
``launcher.kind=deepspeed`` re-launches it through the DeepSpeed launcher
(``python -m deepspeed.launcher.runner --num_gpus 8 --no_local_rank --module memtrain run ...``,
the ``deepspeed`` command); ``launcher.kind=fsdp`` starts its ranks as torchrun does. Each rank
finds its place (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``) with :func:`world_from_env` and trains
in :mod:`memtrain.train.runner`. On a CPU-only machine every kind runs with gloo (DeepSpeed with ``DS_ACCELERATOR=cpu``, which the launch sets).
"""

from __future__ import annotations

import importlib.util
import os
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from memtrain.errors import ConfigError
from memtrain.train.recipe import Recipe

# kind -> the module run as ``python -m MODULE`` to launch the ranks (the launcher "binary").
LAUNCHERS = {
    "torchrun": "torch.distributed.run",
    "fsdp": "torch.distributed.run",
    "deepspeed": "deepspeed.launcher.runner",
}
# Optimizers DeepSpeed builds itself (its CPU Adam where ZeRO-Offload moves the states).
DEEPSPEED_OPTIMIZERS = {"adamw": "AdamW", "adam": "Adam"}


@dataclass(frozen=True)
class World:
    """This process's place among the ranks; one process alone is a world of one."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    kind: str = "single"  # "single", "torchrun" (DDP), "fsdp" (FSDP2) or "deepspeed"

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.kind != "single"


def world_from_env(recipe: Recipe) -> World:
    """The rank this process is, from a launcher's environment (a world of one otherwise)."""
    env, kind = os.environ, recipe.launcher.kind
    if "RANK" not in env or "WORLD_SIZE" not in env:
        return World()
    size = int(env["WORLD_SIZE"])
    if size == 1 and kind == "single":
        return World()
    rank = int(env["RANK"])
    local = int(env.get("LOCAL_RANK", rank))
    return World(rank, size, local, kind if kind in ("deepspeed", "fsdp") else "torchrun")


def needs_launch(recipe: Recipe) -> bool:
    """Whether ``memtrain run`` must start the ranks (it is not one of them yet)."""
    wants = recipe.launcher.kind != "single" or recipe.launcher.nproc > 1
    if recipe.dry_run is not None and recipe.dry_run.only:
        return False  # a dry run alone plans in this process
    return wants and "RANK" not in os.environ


def check_launcher(recipe: Recipe, launched: bool = False) -> None:
    """Refuse launcher settings that cannot run, before any process is started (``launched``:
    this process is one of several ranks, however it was started)."""
    kind, nproc, stage = recipe.launcher.kind, recipe.launcher.nproc, recipe.launcher.zero_stage
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
    name = recipe.optimizer.name
    if kind == "deepspeed" and name not in DEEPSPEED_OPTIMIZERS:
        raise ConfigError(
            f"launcher.kind=deepspeed trains with DeepSpeed's own optimizer: optimizer.name "
            f"{' or '.join(DEEPSPEED_OPTIMIZERS)}, not {name!r} (launcher.kind=fsdp shards "
            "memtrain's optimizers over the ranks; launcher.kind=torchrun replicates them)"
        )
    from memtrain.train.sequence_parallel import check_sequence_parallel

    check_sequence_parallel(recipe, int(os.environ.get("WORLD_SIZE", nproc)) if launched else None)
    if (kind != "single" or launched) and recipe.train.step_in_backward:
        raise ConfigError(
            "train.step_in_backward steps each weight before the gradients are averaged over "
            "ranks; it runs in a single process only"
        )
    if (kind != "single" or launched) and recipe.train.overlap_host_step:
        raise ConfigError(
            "train.overlap_host_step steps each host weight before the gradients are averaged "
            "over ranks; it runs in a single process only"
        )


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch_command(recipe: Recipe, cli_args: list[str]) -> tuple[list[str], dict[str, str]]:
    """The launcher command line (and environment) that runs ``memtrain CLI_ARGS`` per rank."""
    check_launcher(recipe)
    nproc = recipe.launcher.nproc
    kind = "torchrun" if recipe.launcher.kind == "single" else recipe.launcher.kind
    module = LAUNCHERS[kind]
    # The top-level package only: finding a submodule imports its parents, and DeepSpeed's
    # import logs on stdout.
    if importlib.util.find_spec(module.partition(".")[0]) is None:
        extra = " (pip install 'memtrain[deepspeed]')" if kind == "deepspeed" else ""
        raise ConfigError(
            f"launcher.kind={kind}: its launcher ({module}) is not installed for "
            f"{sys.executable}{extra}"
        )
    device = recipe.train.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = "cuda" if device.startswith("cuda") else "cpu"
    if device == "cuda" and nproc > torch.cuda.device_count():
        raise ConfigError(
            f"launcher.nproc={nproc} but {torch.cuda.device_count()} CUDA device(s) are visible; "
            "one rank runs per GPU (check CUDA_VISIBLE_DEVICES)"
        )
    env = dict(os.environ)
    if module == LAUNCHERS["torchrun"]:
        cmd = [sys.executable, "-m", module, "--standalone", "--nnodes=1"]
        return cmd + [f"--nproc_per_node={nproc}", "-m", "memtrain", *cli_args], env
    if device == "cpu":
        env.setdefault("DS_ACCELERATOR", "cpu")
    visible = [d for d in env.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    if device == "cuda" and visible:
        # The DeepSpeed launcher ignores CUDA_VISIBLE_DEVICES when given --num_gpus.
        chosen = f"--include=localhost:{','.join(visible[:nproc])}"
    else:
        chosen = f"--num_gpus={nproc}"
    cmd = [sys.executable, "-m", module, chosen, "--no_local_rank"]
    return cmd + [f"--master_port={_free_port()}", "--module", "memtrain", *cli_args], env


def launch(recipe: Recipe, cli_args: list[str], json_summary: bool = False) -> int:
    """Start the ranks of ``memtrain CLI_ARGS`` and wait for them; returns the exit status.

    With ``json_summary`` everything the launcher and the ranks print goes to stderr and, once
    they succeed, rank 0's ``summary.json`` is printed on stdout (launchers log on stdout).
    """
    cmd, env = launch_command(recipe, cli_args)
    code = relaunch(cmd, env, stdout=sys.stderr if json_summary else None)
    if json_summary and code == 0:
        summary = Path(recipe.train.out_dir) / "summary.json"
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
