"""Optimizer states and fp32 master weights off the GPU, with the step on the CPU.

For parameters whose layer the plan puts in ``optimizer: cpu | cxl | nvme``, gradients leave
the GPU as soon as they are accumulated (a post-accumulate hook copies them into a persistent
pinned fp32 buffer on a side stream and drops the GPU gradient), a CPU optimizer of the user's
class steps fp32 master copies, and the updated weights are copied back. Their states live in
plain host memory (cpu), in a pool bound to the CXL NUMA node (cxl), or in files between steps
(nvme). Parameters planned on the GPU keep an ordinary optimizer on the GPU.
"""

from __future__ import annotations

import os
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from memtrain.errors import MemtrainError
from memtrain.offload.pool import HostPool
from memtrain.optim.step_in_backward import step_one

HOST_PLACES = ("cpu", "cxl", "nvme")
_GPU_ONLY_OPTIONS = ("fused", "capturable", "differentiable")


class _NvmeStates:
    """Optimizer state tensors written to files after each step and read back before the next."""

    def __init__(self, path: str | Path) -> None:
        from memtrain.offload.nvme import check_path

        root = check_path(path)
        self.directory = root / f"memtrain-optim-{os.getpid()}-{id(self):x}"
        self.directory.mkdir()
        self.shapes: dict[tuple[int, str], tuple[torch.Size, torch.dtype]] = {}

    def _file(self, index: int, key: str) -> Path:
        return self.directory / f"{index}-{key}.bin"

    def store(self, optimizer: torch.optim.Optimizer, masters: list[torch.Tensor]) -> None:
        for index, master in enumerate(masters):
            state = optimizer.state.get(master, {})
            for key, value in list(state.items()):
                if isinstance(value, torch.Tensor) and value.numel() > 1:
                    value.contiguous().view(-1).view(torch.uint8).numpy().tofile(
                        self._file(index, key)
                    )
                    self.shapes[(index, key)] = (value.shape, value.dtype)
                    state[key] = torch.empty(0, dtype=value.dtype)

    def load(self, optimizer: torch.optim.Optimizer, masters: list[torch.Tensor]) -> None:
        for (index, key), (shape, dtype) in self.shapes.items():
            path = self._file(index, key)
            expected = shape.numel() * dtype.itemsize
            if path.stat().st_size != expected:
                raise MemtrainError(f"optimizer state file {path} is not {expected} bytes")
            raw = torch.from_numpy(np.fromfile(path, dtype=np.uint8))
            optimizer.state[masters[index]][key] = raw.view(dtype).view(shape)

    def files(self) -> list[Path]:
        return sorted(self.directory.glob("*.bin"))

    def close(self) -> None:
        import shutil

        shutil.rmtree(self.directory, ignore_errors=True)


def host_options(optimizer_cls: type[torch.optim.Optimizer], options: dict[str, Any]) -> dict:
    """The options of the host optimizer: GPU-only ones dropped, and torch's fused CPU kernel
    where the class has one (one vectorised pass per tensor: 4.7x torch's for-each AdamW on two
    cores, DeepSpeed's cpu_adam 1.2x faster still; benchmarks/bench_host_optimizer.py), unless the
    caller turned ``fused`` off."""
    out = {k: v for k, v in options.items() if k not in _GPU_ONLY_OPTIONS}
    if options.get("fused") is not False and _fused_on_cpu(optimizer_cls):
        out["fused"] = True
    return out


def _fused_on_cpu(optimizer_cls: type[torch.optim.Optimizer]) -> bool:
    """Whether ``optimizer_cls`` steps float32 CPU tensors with a fused kernel in this torch."""
    probe = torch.nn.Parameter(torch.zeros(2))
    probe.grad = torch.zeros(2)
    try:
        optimizer_cls([probe], lr=1e-3, fused=True).step()
    except (TypeError, RuntimeError, ValueError):
        return False
    return True


class OffloadedOptimizer:
    """A GPU optimizer for on-device parameters plus a CPU optimizer on host master weights."""

    def __init__(
        self,
        placements: dict[nn.Parameter, str],
        optimizer_cls: type[torch.optim.Optimizer],
        *,
        nvme_path: str | None = None,
        cxl_node: int | None = None,
        overlap: bool = False,
        **options: Any,
    ) -> None:
        self.device_params = [p for p, place in placements.items() if place == "gpu"]
        self.host_params = [p for p, place in placements.items() if place != "gpu"]
        places = {placements[p] for p in self.host_params}
        if len(places) > 1:
            raise MemtrainError(
                f"optimizer states planned on several host tiers ({', '.join(sorted(places))}); "
                "this executor keeps them on one: re-plan with one host tier for states"
            )
        self.place = places.pop() if places else "cpu"
        self.device_optimizer = (
            optimizer_cls(self.device_params, **options) if self.device_params else None
        )
        cpu_options = host_options(optimizer_cls, options)
        pin = any(p.is_cuda for p in self.host_params)
        self.masters = []
        for param in self.host_params:
            master = torch.empty(param.shape, dtype=torch.float32, pin_memory=pin)
            master.copy_(param.detach())
            master.grad = torch.zeros(param.shape, dtype=torch.float32, pin_memory=pin)
            self.masters.append(master)
        self.host_optimizer = optimizer_cls(self.masters, **cpu_options) if self.masters else None
        self._has_grad = [False] * len(self.masters)
        self._in_flight: list[tuple[Any, torch.Tensor]] = []
        self._stream = None
        if pin and torch.cuda.is_available():
            self._stream = torch.cuda.Stream(self.host_params[0].device)
        # Overlapped host step: each parameter steps on the host in a worker thread as soon as
        # its gradient has arrived, while backward goes on; step() waits and writes back.
        self.overlap = overlap and self.host_optimizer is not None
        self._worker: ThreadPoolExecutor | None = None
        self._steps: list[Future] = []
        if self.overlap:
            if self.place != "cpu":
                raise MemtrainError(
                    "an overlapped host step keeps optimizer states in host memory (cpu); "
                    f"these are planned on {self.place}: re-plan, or turn overlap off"
                )
            self._worker = ThreadPoolExecutor(1, thread_name_prefix="memtrain-host-step")
            self._group_of = {
                id(m): i
                for i, g in enumerate(self.host_optimizer.param_groups)
                for m in g["params"]
            }
        self._hooks = [
            p.register_post_accumulate_grad_hook(self._grad_hook(i))
            for i, p in enumerate(self.host_params)
        ]
        self.nvme = None
        if self.place == "nvme" and self.masters:
            if not nvme_path:
                raise MemtrainError("optimizer states on NVMe need a path; set the plan's nvme")
            self.nvme = _NvmeStates(nvme_path)
        self.cxl_node = cxl_node
        self.cxl_pool: HostPool | None = None
        if self.place == "cxl" and self.masters:
            if cxl_node is None:
                raise MemtrainError("optimizer states on CXL need its NUMA node; pass cxl_node=")
            from memtrain.offload.numa import check_node

            check_node(cxl_node)

    # -- gradients leave the GPU as they are produced --------------------------------------

    def _grad_hook(self, index: int):
        def hook(param: torch.Tensor) -> None:
            grad = param.grad
            buffer = self.masters[index].grad
            event = None
            if self._has_grad[index]:
                if self.overlap:
                    raise MemtrainError(
                        "an overlapped host step takes one backward per optimizer step; with "
                        "gradient accumulation turn overlap off"
                    )
                buffer.add_(grad.to("cpu", torch.float32))
            elif self._stream is not None:
                self._stream.wait_stream(torch.cuda.current_stream(grad.device))
                with torch.cuda.stream(self._stream):
                    buffer.copy_(grad, non_blocking=True)
                    event = torch.cuda.Event()
                    event.record(self._stream)
                self._in_flight.append((event, grad))
                self._drop_finished()
            else:
                buffer.copy_(grad)
            self._has_grad[index] = True
            param.grad = None
            if self.overlap:
                self._steps.append(self._worker.submit(self._step_master, index, event))

        return hook

    def _drop_finished(self) -> None:
        self._in_flight = [(e, g) for e, g in self._in_flight if not e.query()]

    # -- step -------------------------------------------------------------------------------

    def _step_master(self, index: int, event: Any) -> None:
        """One master's host step, in the worker, once its gradient has landed."""
        if event is not None:
            event.synchronize()
        master = self.masters[index]
        step_one(self.host_optimizer, master, self._group_of[id(master)])

    def _finish_overlapped(self) -> None:
        """Wait for every overlapped host step (their errors raise here)."""
        steps, self._steps = self._steps, []
        for future in steps:
            future.result()

    def step(self) -> None:
        if self.device_optimizer is not None:
            self.device_optimizer.step()
        if self.host_optimizer is None:
            return
        if self.overlap:
            self._finish_overlapped()
            self._in_flight.clear()
            self._write_back()
            self._has_grad = [False] * len(self.masters)  # each step takes one backward
            return
        for event, _ in self._in_flight:
            event.synchronize()
        self._in_flight.clear()
        # Parameters that got no gradient are skipped, as a plain optimizer skips grad=None.
        idle = [(m, m.grad) for m, has in zip(self.masters, self._has_grad, strict=True) if not has]
        for master, _ in idle:
            master.grad = None
        if self.nvme is not None:
            self.nvme.load(self.host_optimizer, self.masters)
        self.host_optimizer.step()
        for master, buffer in idle:
            master.grad = buffer
        if self.place == "cxl":
            self._states_to_cxl()
        if self.nvme is not None:
            self.nvme.store(self.host_optimizer, self.masters)
        self._write_back()

    def _write_back(self) -> None:
        with torch.no_grad():
            for param, master in zip(self.host_params, self.masters, strict=True):
                param.copy_(master, non_blocking=param.is_cuda)

    def _states_to_cxl(self) -> None:
        """Move states into the CXL-bound pool once they exist (sized exactly, first step)."""
        tensors = [
            (state, key, value)
            for state in (self.host_optimizer.state[m] for m in self.masters)
            for key, value in state.items()
            if isinstance(value, torch.Tensor) and value.numel() > 1
        ]
        if self.cxl_pool is None:
            need = sum(v.numel() * v.element_size() + 512 for _, _, v in tensors)
            self.cxl_pool = HostPool(need, name="cxl-optimizer", numa_node=self.cxl_node)
            for state, key, value in tensors:
                nbytes = value.numel() * value.element_size()
                block = self.cxl_pool.allocate(nbytes)
                target = self.cxl_pool.view(block, nbytes).view(value.dtype).view(value.shape)
                target.copy_(value)
                state[key] = target

    def zero_grad(self, set_to_none: bool = True) -> None:
        if self.device_optimizer is not None:
            self.device_optimizer.zero_grad(set_to_none=set_to_none)
        self._has_grad = [False] * len(self.masters)

    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """Clip every gradient (device and host) to a global norm; returns the norm."""
        if self.overlap:
            raise MemtrainError(
                "global gradient clipping needs every gradient before any step; an overlapped "
                "host step has taken them already: turn overlap off or clipping off"
            )
        for event, _ in self._in_flight:
            event.synchronize()
        self._in_flight.clear()
        norms = [p.grad.float().norm().cpu() for p in self.device_params if p.grad is not None]
        norms += [m.grad.norm() for m, has in zip(self.masters, self._has_grad, strict=True) if has]
        total = torch.stack(norms).norm() if norms else torch.zeros(())
        scale = max_norm / (float(total) + 1e-6)
        if scale < 1:
            for p in self.device_params:
                if p.grad is not None:
                    p.grad.mul_(scale)
            for m, has in zip(self.masters, self._has_grad, strict=True):
                if has:
                    m.grad.mul_(scale)
        return total

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        """Both optimizers' groups, so schedules can set ``lr`` as on any torch optimizer."""
        groups: list[dict[str, Any]] = []
        for optimizer in (self.device_optimizer, self.host_optimizer):
            if optimizer is not None:
                groups.extend(optimizer.param_groups)
        return groups

    def state_dict(self) -> dict[str, Any]:
        """Device and host optimizer states plus the float32 master weights (exact resume)."""
        self._finish_overlapped()
        if self.nvme is not None:
            raise MemtrainError(
                "saving optimizer states kept on NVMe is not supported; plan them on cpu to "
                "checkpoint, or set train.checkpoint_every=0"
            )
        return {
            "device": self.device_optimizer.state_dict() if self.device_optimizer else None,
            "host": self.host_optimizer.state_dict() if self.host_optimizer else None,
            "masters": [m.detach().clone() for m in self.masters],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if len(state["masters"]) != len(self.masters):
            raise MemtrainError("the optimizer checkpoint was saved for another placement")
        if self.device_optimizer is not None:
            self.device_optimizer.load_state_dict(state["device"])
        if self.host_optimizer is not None:
            self.host_optimizer.load_state_dict(state["host"])
        with torch.no_grad():
            for param, master, saved in zip(
                self.host_params, self.masters, state["masters"], strict=True
            ):
                master.copy_(saved)
                param.copy_(master)

    def state_files(self) -> list[Path]:
        return self.nvme.files() if self.nvme is not None else []

    def close(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()
        if self._worker is not None:
            self._worker.shutdown(wait=True)
            self._worker = None
        if self.nvme is not None:
            self.nvme.close()


def placements_from_handle(handle: Any) -> dict[nn.Parameter, str]:
    """Each parameter's optimizer place from the layer that first owns it (tied: the first)."""
    out: dict[nn.Parameter, str] = {}
    for name, modules in handle.layers.items():
        policy = handle.policy.layers.get(name)
        for module in modules:
            for param in module.parameters():
                if param.requires_grad and param not in out:
                    place = "gpu" if policy is None else policy.optimizer
                    if policy is not None and policy.grads != "gpu" and place == "gpu":
                        place = "cpu"
                    out[param] = place
    for param in handle.model.parameters():
        if param.requires_grad and param not in out:
            out[param] = "gpu"
    return out


def offload_optimizer(
    handle: Any,
    optimizer_cls: type[torch.optim.Optimizer],
    *,
    overlap: bool = False,
    **options: Any,
) -> OffloadedOptimizer:
    """The optimizer the plan asks for: states of each layer where its ``optimizer`` says.

    ``overlap``: host-placed parameters step in a worker thread as their gradients arrive,
    overlapping the host step with the rest of backward (one backward per step, no global
    clipping); ``step()`` then waits for them and writes the weights back."""
    optimizer = OffloadedOptimizer(
        placements_from_handle(handle),
        optimizer_cls,
        nvme_path=handle.policy.nvme_path,
        cxl_node=handle.policy.cxl_node,
        overlap=overlap,
        **options,
    )
    handle.optimizer_attached = True
    handle.attach_cleanup(optimizer.close)
    return optimizer
