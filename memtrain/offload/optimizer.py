"""Optimizer states and fp32 master weights off the GPU, with the step on the CPU.

For parameters whose layer the plan puts in ``optimizer: cpu | cxl | nvme``, gradients leave
the GPU as soon as they are accumulated (a post-accumulate hook copies them into a pinned host
buffer on a side stream and drops the GPU gradient), a CPU optimizer of the user's class steps
fp32 master copies, and the updated weights are copied back.

Gradient buffers are in the parameter's dtype (bf16/fp16 parameters: half the host bytes and
half the PCIe traffic of a float32 buffer; float32 parameters keep float32 buffers). A bf16/fp16
gradient widened to float32 is exactly what a float32 buffer would have received, so one
backward per step gives bit-identical results; the widening happens one parameter at a time,
into a transient, just before that parameter steps. A second backward before the step
(gradient accumulation) accumulates as a GPU-resident gradient in the parameter's dtype does:
both widened to float32, added, rounded back once to the buffer's dtype; not a float32
accumulator. ``grad_buffer_dtype=torch.float32`` keeps float32 buffers (float32 accumulation,
twice the host bytes). With an overlapped host step (``overlap=True``) there is no
whole-model buffer at all: gradients land in a small ring of pinned slots
(``GRAD_RING_SLOTS``, each sized for the largest host parameter), a slot reused once the step
that read it is done. Their states live in
plain host memory (cpu), in a pool bound to the CXL NUMA node (cxl), or in files (nvme), streamed
through host memory a layer at a time for the step: the next layer's states are read in a small
thread pool while one steps and the previous one's are written back behind it, so at most three
adjacent layers' states are in host memory at once (memtrain.planner.hostmem charges that
window). Parameters planned on the GPU keep an ordinary optimizer on the GPU.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any

import torch
from torch import nn

from memtrain.errors import MemtrainError
from memtrain.offload.pool import HostPool
from memtrain.optim.step_in_backward import step_one
from memtrain.planner.hostmem import GRAD_RING_SLOTS

HOST_PLACES = ("cpu", "cxl", "nvme")
_GPU_ONLY_OPTIONS = ("fused", "capturable", "differentiable")


# Layers whose optimizer states are in host memory at once when they live on NVMe: the next
# one being read, the current one stepping, the previous one being written back
# (memtrain.planner.hostmem.NVME_STATE_WINDOW).
NVME_WINDOW = 3
_FAR = 1 << 40  # position of a parameter that belongs to no layer: adjacent to none


class _NvmeStates:
    """Optimizer states in files between steps, streamed through host memory one layer at a time.

    States are grouped by layer (``groups``: master indices; ``positions``: each group's layer
    index in the model's layer order). A group's files are read into host memory in a small
    thread pool ahead of its step and written back behind it, then dropped (their tensors
    replaced by empty ones). Groups resident in host memory (being read, stepping or being
    written) always lie within ``NVME_WINDOW`` consecutive layers of the model, the window the
    planner charges (memtrain.planner.hostmem.nvme_state_window); reads wait for older writes to
    finish to keep it. Only the thread that steps (the training thread, or the overlapped
    host-step worker) calls these methods; the pool only moves bytes.
    """

    def __init__(
        self,
        path: str | Path,
        optimizer: torch.optim.Optimizer,
        masters: list[torch.Tensor],
        groups: list[list[int]],
        positions: list[int],
    ) -> None:
        from memtrain.offload.nvme import check_path

        root = check_path(path)
        self.directory = root / f"memtrain-optim-{os.getpid()}-{id(self):x}"
        self.directory.mkdir()
        self.optimizer = optimizer
        self.masters = masters
        self.groups = groups
        self.positions = positions
        self.group_of = {i: g for g, members in enumerate(groups) for i in members}
        self.shapes: dict[tuple[int, str], tuple[torch.Size, torch.dtype]] = {}
        self.pool = ThreadPoolExecutor(2, thread_name_prefix="memtrain-optim-io")
        self.loaded: list[int] = []  # groups installed in the optimizer's state, oldest first
        self.reads: dict[int, Future] = {}
        self.writes: dict[int, Future] = {}  # insertion order: oldest first
        self._bytes: dict[int, int] = {}  # host bytes of each resident group
        self._lock = threading.Lock()
        self.resident_bytes = 0
        self.peak_bytes = 0  # most state bytes in host memory at once (reset_peak() clears)
        self.peak_groups = 0

    def _file(self, index: int, key: str) -> Path:
        return self.directory / f"{index}-{key}.bin"

    # -- accounting ---------------------------------------------------------------------------

    def _account(self, group: int, nbytes: int) -> None:
        with self._lock:
            self._bytes[group] = self._bytes.get(group, 0) + nbytes
            if self._bytes[group] == 0:
                del self._bytes[group]
            self.resident_bytes += nbytes
            self.peak_bytes = max(self.peak_bytes, self.resident_bytes)
            self.peak_groups = max(self.peak_groups, len(self._bytes))

    def reset_peak(self) -> None:
        with self._lock:
            self.peak_bytes = self.resident_bytes
            self.peak_groups = len(self._bytes)

    def _resident(self) -> set[int]:
        return set(self.loaded) | set(self.reads) | set(self.writes)

    def _fits(self, groups: set[int]) -> bool:
        if len(groups) <= 1:
            return True
        where = [self.positions[g] for g in groups]
        return max(where) - min(where) < NVME_WINDOW

    def _settle(self, group: int) -> bool:
        """Wait for the oldest writes until ``group`` may join the resident groups; False if
        groups being read or stepped keep it out."""
        for done in [g for g, f in self.writes.items() if f.done()]:
            self.writes.pop(done).result()
        while not self._fits(self._resident() | {group}) and self.writes:
            oldest = next(iter(self.writes))
            self.writes.pop(oldest).result()
        return self._fits(self._resident() | {group})

    # -- reads ----------------------------------------------------------------------------------

    def _members(self, group: int) -> list[tuple[int, str, torch.Size, torch.dtype]]:
        return [
            (index, key, shape, dtype)
            for index in self.groups[group]
            for (i, key), (shape, dtype) in self.shapes.items()
            if i == index
        ]

    def _read(self, group: int, members: list) -> dict[tuple[int, str], torch.Tensor]:
        out = {}
        for index, key, shape, dtype in members:
            path = self._file(index, key)
            tensor = torch.empty(shape, dtype=dtype)
            expected = tensor.numel() * tensor.element_size()
            view = memoryview(tensor.view(-1).view(torch.uint8).numpy())
            try:
                with open(path, "rb", buffering=0) as handle:
                    size = os.fstat(handle.fileno()).st_size
                    got = 0
                    while got < expected and size == expected:
                        n = handle.readinto(view[got:])
                        if not n:
                            break
                        got += n
            except OSError as error:
                raise MemtrainError(
                    f"optimizer state file {path} cannot be read back: {error.strerror}"
                ) from None
            if size != expected or got != expected:
                raise MemtrainError(
                    f"optimizer state file {path} is {size} bytes, not {expected}: "
                    "damaged or truncated; resume from a checkpoint"
                )
            out[(index, key)] = tensor
        return out

    def prefetch(self, group: int) -> None:
        """Start reading ``group``'s states if it fits the window beside the resident ones."""
        if group in self._resident() or not self._settle(group):
            return
        members = self._members(group)
        if not members:
            return
        nbytes = sum(shape.numel() * dtype.itemsize for *_, shape, dtype in members)
        self._account(group, nbytes)
        self.reads[group] = self.pool.submit(self._read, group, members)

    def acquire(self, group: int) -> None:
        """``group``'s states in the optimizer, read now if no prefetch has read them."""
        if group in self.loaded:
            return
        if group in self.writes:  # written back too early (evicted): its file must be whole
            self.writes.pop(group).result()
        while group not in self.reads and not self._settle(group):
            # groups being stepped stand in the way (overlapped steps of interleaved layers):
            # write the oldest back, or take a read that is under way
            stepped = [g for g in self.loaded if not self._fits({g, group})]
            if stepped:
                self.release(stepped[0])
            else:
                read = next(g for g in self.reads if not self._fits({g, group}))
                self._install(read)
                self.release(read)
        if group not in self.reads:
            self.prefetch(group)
        if group in self.reads:
            self._install(group)
        else:  # nothing on disk yet (first step): the optimizer creates the states
            self.loaded.append(group)

    def _install(self, group: int) -> None:
        tensors = self.reads.pop(group).result()
        for (index, key), tensor in tensors.items():
            self.optimizer.state[self.masters[index]][key] = tensor
        self.loaded.append(group)

    # -- writes ---------------------------------------------------------------------------------

    def _write(self, group: int, tensors: list[tuple[Path, torch.Tensor]], nbytes: int) -> None:
        try:
            for path, tensor in tensors:
                raw = memoryview(tensor.view(-1).view(torch.uint8).numpy())
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
                try:
                    done = 0
                    while done < len(raw):
                        done += os.pwrite(fd, raw[done:], done)
                finally:
                    os.close(fd)
        except OSError as error:
            raise MemtrainError(
                f"optimizer state file {path} cannot be written: {error.strerror}"
            ) from None
        finally:
            tensors.clear()
            self._account(group, -nbytes)

    def release(self, group: int) -> None:
        """Write ``group``'s states back behind the step and drop them from host memory."""
        if group in self.loaded:
            self.loaded.remove(group)
        tensors, held = [], self._bytes.get(group, 0)
        for index in self.groups[group]:
            state = self.optimizer.state.get(self.masters[index], {})
            for key, value in list(state.items()):
                if isinstance(value, torch.Tensor) and value.numel() > 1:
                    tensors.append((self._file(index, key), value.contiguous()))
                    self.shapes[(index, key)] = (value.shape, value.dtype)
                    state[key] = torch.empty(0, dtype=value.dtype)
        nbytes = sum(t.numel() * t.element_size() for _, t in tensors)
        if nbytes > held:  # created by this step (the first): count them until written
            self._account(group, nbytes - held)
        elif held > nbytes:
            self._account(group, nbytes - held)
        if tensors:
            self.writes[group] = self.pool.submit(self._write, group, tensors, nbytes)

    def finish(self) -> None:
        """Write back every group still in host memory and wait for all I/O (errors raise)."""
        errors = []
        for group in list(self.reads):
            try:
                self._install(group)
            except MemtrainError as error:
                errors.append(error)
        for group in list(self.loaded):
            self.release(group)
        for group in list(self.writes):
            try:
                self.writes.pop(group).result()
            except MemtrainError as error:
                errors.append(error)
        if errors:
            raise errors[0]

    def read_all(self) -> dict[int, dict[str, torch.Tensor]]:
        """Every master's states on disk, read back one layer at a time (checkpoints)."""
        self.finish()
        out: dict[int, dict[str, torch.Tensor]] = {}
        for group in range(len(self.groups)):
            for (index, key), tensor in self._read(group, self._members(group)).items():
                out.setdefault(index, {})[key] = tensor
        return out

    def files(self) -> list[Path]:
        return sorted(self.directory.glob("*.bin"))

    def close(self) -> None:
        import shutil

        try:
            self.finish()
        except MemtrainError:
            pass
        self.pool.shutdown(wait=True)
        shutil.rmtree(self.directory, ignore_errors=True)


def _step_subset(
    optimizer: torch.optim.Optimizer, params: list[torch.Tensor], group_of: dict[int, int]
) -> None:
    """Step ``params`` alone, each with the settings of its own group (step_one's trick)."""
    if len(params) == 1:
        step_one(optimizer, params[0], group_of[id(params[0])])
        return
    views = []
    for index, group in enumerate(optimizer.param_groups):
        mine = [p for p in params if group_of[id(p)] == index]
        if mine:
            view = dict(group)
            view["params"] = mine
            views.append(view)
    groups = optimizer.param_groups
    optimizer.param_groups = views
    try:
        optimizer.step()
    finally:
        optimizer.param_groups = groups


def grad_buffer_dtype_for(param: torch.Tensor, requested: torch.dtype | None) -> torch.dtype:
    """The dtype of ``param``'s host gradient buffer: ``requested``, else the parameter's own
    when it is bf16/fp16, else float32 (the masters' dtype)."""
    if requested is not None:
        return requested
    return param.dtype if param.dtype in (torch.bfloat16, torch.float16) else torch.float32


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
        layers: Mapping[nn.Parameter, str] | None = None,
        grad_buffer_dtype: torch.dtype | None = None,
        **options: Any,
    ) -> None:
        """``layers``: each parameter's layer name, in the model's layer order (NVMe states
        stream through host memory a layer at a time; a parameter without one is its own
        group). memtrain.offload.optimizer.offload_optimizer passes the plan's layers.
        ``grad_buffer_dtype``: the host gradient buffers' dtype (None: the parameter's dtype
        for bf16/fp16 parameters, else float32; ``torch.float32``: float32 buffers that
        accumulate in float32, as this class always did)."""
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
        if grad_buffer_dtype is not None and not grad_buffer_dtype.is_floating_point:
            raise MemtrainError(
                f"grad_buffer_dtype must be a floating dtype, not {grad_buffer_dtype}"
            )
        self.grad_buffer_dtype = grad_buffer_dtype
        self.overlap = overlap and bool(self.host_params)
        self.masters = []
        # Where each host parameter's gradient lands between backward and its step. A float32
        # buffer is the master's own ``.grad`` (the optimizer reads it in place); a narrower one
        # is widened into a transient just before the parameter steps. Overlapped: no
        # per-parameter buffers, a ring of slots (below).
        self._grads: list[torch.Tensor] = []
        self._buffer_dtypes: list[torch.dtype] = []
        for param in self.host_params:
            master = torch.empty(param.shape, dtype=torch.float32, pin_memory=pin)
            master.copy_(param.detach())
            dtype = grad_buffer_dtype_for(param, grad_buffer_dtype)
            self._buffer_dtypes.append(dtype)
            if not self.overlap:
                buffer = torch.zeros(param.shape, dtype=dtype, pin_memory=pin)
                if dtype == torch.float32:
                    master.grad = buffer
                self._grads.append(buffer)
            self.masters.append(master)
        self._ring: list[torch.Tensor] = []
        self._ring_busy: list[Future | None] = []
        self._next_slot = 0
        if self.overlap:
            largest = max(
                p.numel() * d.itemsize
                for p, d in zip(self.host_params, self._buffer_dtypes, strict=True)
            )
            slots = min(GRAD_RING_SLOTS, len(self.host_params))
            self._ring = [
                torch.empty(largest, dtype=torch.uint8, pin_memory=pin) for _ in range(slots)
            ]
            self._ring_busy = [None] * slots
        self._clip_scale: float | None = None  # pending clip of narrow buffers (at widening)
        self.peak_transient_bytes = 0  # the largest float32 widening of a gradient so far
        self.host_optimizer = optimizer_cls(self.masters, **cpu_options) if self.masters else None
        self._group_of = (
            {id(m): i for i, g in enumerate(self.host_optimizer.param_groups) for m in g["params"]}
            if self.host_optimizer is not None
            else {}
        )
        self.layer_groups, self._positions = _layer_groups(self.host_params, layers)
        self._stepped = [0] * len(self.layer_groups)
        self._has_grad = [False] * len(self.masters)
        self._in_flight: list[tuple[Any, torch.Tensor]] = []
        self._stream = None
        if pin and torch.cuda.is_available():
            self._stream = torch.cuda.Stream(self.host_params[0].device)
        # Overlapped host step: each parameter steps on the host in a worker thread as soon as
        # its gradient has arrived, while backward goes on; step() waits and writes back.
        self._worker: ThreadPoolExecutor | None = None
        self._steps: list[Future] = []
        if self.overlap and self.place == "cxl":
            raise MemtrainError(
                "an overlapped host step keeps optimizer states in host memory (cpu) or streams "
                "them from NVMe; these are planned on cxl: re-plan, or turn overlap off"
            )
        self.nvme: _NvmeStates | None = None
        if self.place == "nvme" and self.masters:
            if not nvme_path:
                raise MemtrainError("optimizer states on NVMe need a path; set the plan's nvme")
            self.nvme = _NvmeStates(
                nvme_path, self.host_optimizer, self.masters, self.layer_groups, self._positions
            )
        if self.overlap:
            self._worker = ThreadPoolExecutor(1, thread_name_prefix="memtrain-host-step")
        self._hooks = [
            p.register_post_accumulate_grad_hook(self._grad_hook(i))
            for i, p in enumerate(self.host_params)
        ]
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
            if self.overlap:
                if self._has_grad[index]:
                    raise MemtrainError(
                        "an overlapped host step takes one backward per optimizer step; with "
                        "gradient accumulation turn overlap off"
                    )
                slot = self._take_slot()
                buffer = self._slot_view(slot, index)
                event = self._copy_in(buffer, grad)
                self._has_grad[index] = True
                param.grad = None
                future = self._worker.submit(self._step_master, index, event, buffer)
                self._ring_busy[slot] = future
                self._steps.append(future)
                return
            buffer = self._grads[index]
            if self._has_grad[index]:
                # a second backward: the first one's copy must have landed
                for event, _ in self._in_flight:
                    event.synchronize()
                self._in_flight.clear()
                if buffer.dtype == torch.float32:
                    buffer.add_(grad.to("cpu", torch.float32))
                else:
                    # as a GPU-resident gradient of this dtype accumulates: widened, added,
                    # rounded back once
                    incoming = grad.to("cpu").to(torch.float32)
                    buffer.copy_(buffer.to(torch.float32).add_(incoming))
            else:
                self._copy_in(buffer, grad)
            self._has_grad[index] = True
            param.grad = None

        return hook

    def _copy_in(self, buffer: torch.Tensor, grad: torch.Tensor) -> Any:
        """Copy ``grad`` into the host ``buffer``: on the side stream (the event it records
        returned) when the gradient is on a GPU, else at once (None)."""
        if self._stream is None:
            buffer.copy_(grad)
            return None
        self._stream.wait_stream(torch.cuda.current_stream(grad.device))
        with torch.cuda.stream(self._stream):
            buffer.copy_(grad, non_blocking=True)
            event = torch.cuda.Event()
            event.record(self._stream)
        self._in_flight.append((event, grad))
        self._drop_finished()
        return event

    def _take_slot(self) -> int:
        """The next ring slot, once the step that read its last gradient is done (the oldest
        busy slot: one worker steps in arrival order). Its error, if any, raises in step()."""
        slot = self._next_slot
        self._next_slot = (slot + 1) % len(self._ring)
        busy = self._ring_busy[slot]
        if busy is not None:
            wait([busy])
            self._ring_busy[slot] = None
        return slot

    def _slot_view(self, slot: int, index: int) -> torch.Tensor:
        """Ring slot ``slot`` as a buffer for host parameter ``index``'s gradient."""
        dtype = self._buffer_dtypes[index]
        shape = self.host_params[index].shape
        nbytes = self.host_params[index].numel() * dtype.itemsize
        return self._ring[slot][:nbytes].view(dtype).view(shape)

    def _drop_finished(self) -> None:
        self._in_flight = [(e, g) for e, g in self._in_flight if not e.query()]

    # -- step -------------------------------------------------------------------------------

    def _widen(self, buffer: torch.Tensor) -> torch.Tensor:
        """The float32 gradient the optimizer steps with: the buffer itself when it is float32,
        else a transient widened copy (exact: every bf16/fp16 value is a float32 value), with a
        pending clip applied as a float32 buffer would have had it."""
        if buffer.dtype == torch.float32:
            return buffer
        wide = buffer.to(torch.float32)
        self.peak_transient_bytes = max(self.peak_transient_bytes, wide.numel() * 4)
        if self._clip_scale is not None:
            wide.mul_(self._clip_scale)
        return wide

    def _step_one_master(self, index: int, buffer: torch.Tensor) -> None:
        """Step master ``index`` alone on the gradient in ``buffer``."""
        master = self.masters[index]
        if buffer is master.grad:  # a float32 buffer: the master's own gradient
            step_one(self.host_optimizer, master, self._group_of[id(master)])
            return
        master.grad = self._widen(buffer)
        try:
            step_one(self.host_optimizer, master, self._group_of[id(master)])
        finally:
            master.grad = None

    def _step_master(self, index: int, event: Any, buffer: torch.Tensor) -> None:
        """One master's host step, in the worker, once its gradient has landed in ``buffer``
        (a ring slot)."""
        if event is not None:
            event.synchronize()
        if self.nvme is None:
            self._step_one_master(index, buffer)
            return
        # NVMe states: this layer's are read now unless a prefetch has read them, the layer
        # before it (next in backward) is read ahead, and the layer is written back behind
        # once all its parameters have stepped.
        group = self.nvme.group_of[index]
        self.nvme.acquire(group)
        if group > 0:
            self.nvme.prefetch(group - 1)
        self._step_one_master(index, buffer)
        self._stepped[group] += 1
        if self._stepped[group] == len(self.layer_groups[group]):
            self.nvme.release(group)

    def _finish_overlapped(self) -> None:
        """Wait for every overlapped host step (their errors raise here)."""
        steps, self._steps = self._steps, []
        errors = [f.exception() for f in steps]  # waits for every one, failed or not
        failed = next((e for e in errors if e is not None), None)
        if failed is not None:
            if self.nvme is not None:
                self._stepped = [0] * len(self.layer_groups)
                try:  # leave no I/O in flight; the first error is the one to report
                    self.nvme.finish()
                except MemtrainError:
                    pass
            raise failed

    def step(self) -> None:
        if self.device_optimizer is not None:
            self.device_optimizer.step()
        if self.host_optimizer is None:
            return
        if self.overlap:
            self._finish_overlapped()
            self._in_flight.clear()
            if self.nvme is not None:
                self._stepped = [0] * len(self.layer_groups)
                self.nvme.finish()
            self._write_back()
            self._has_grad = [False] * len(self.masters)  # each step takes one backward
            self._ring_busy = [None] * len(self._ring)
            return
        for event, _ in self._in_flight:
            event.synchronize()
        self._in_flight.clear()
        if self.nvme is not None:
            self._step_streamed()
            self._clip_scale = None
            self._write_back()
            return
        if all(d == torch.float32 for d in self._buffer_dtypes):
            # Float32 buffers are the masters' own gradients: one step over all of them.
            # Parameters that got no gradient are skipped, as a plain optimizer skips None.
            idle = [
                (m, m.grad) for m, has in zip(self.masters, self._has_grad, strict=True) if not has
            ]
            for master, _ in idle:
                master.grad = None
            self.host_optimizer.step()
            for master, buffer in idle:
                master.grad = buffer
        else:
            # Narrower buffers: a parameter at a time, each gradient widened just before its
            # step (torch's fused CPU kernels step each tensor on its own anyway).
            for index, has in enumerate(self._has_grad):
                if has:
                    self._step_one_master(index, self._grads[index])
        self._clip_scale = None
        if self.place == "cxl":
            self._states_to_cxl()
        self._write_back()

    def _step_streamed(self) -> None:
        """The host step with states on NVMe, a layer at a time: the next layer's states are
        read while this one steps and the previous one's are written back (at most
        ``NVME_WINDOW`` adjacent layers' states in host memory). Layers without gradients keep
        their files untouched."""
        nvme = self.nvme
        active = [
            (g, [self.masters[i] for i in members if self._has_grad[i]])
            for g, members in enumerate(self.layer_groups)
        ]
        active = [(g, params) for g, params in active if params]
        index_of = {id(m): i for i, m in enumerate(self.masters)}
        try:
            for n, (group, params) in enumerate(active):
                nvme.acquire(group)
                if n + 1 < len(active):
                    nvme.prefetch(active[n + 1][0])
                if all(p.grad is not None for p in params):  # float32 buffers
                    _step_subset(self.host_optimizer, params, self._group_of)
                else:  # narrower buffers: widened a parameter at a time
                    for master in params:
                        index = index_of[id(master)]
                        self._step_one_master(index, self._grads[index])
                nvme.release(group)
        except BaseException:
            try:  # leave no I/O in flight; the first error is the one to report
                nvme.finish()
            except MemtrainError:
                pass
            raise
        nvme.finish()

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
        self._clip_scale = None

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
        # a narrow buffer's norm is its widened gradient's: what a float32 buffer gives
        host = zip(self._grads, self._has_grad, strict=True)
        norms += [b.to(torch.float32).norm() for b, has in host if has]
        total = torch.stack(norms).norm() if norms else torch.zeros(())
        scale = max_norm / (float(total) + 1e-6)
        if scale < 1:
            for p in self.device_params:
                if p.grad is not None:
                    p.grad.mul_(scale)
            for buffer, has in zip(self._grads, self._has_grad, strict=True):
                if has and buffer.dtype == torch.float32:
                    buffer.mul_(scale)
            # narrow buffers are scaled in float32 when widened for the step (as a float32
            # buffer would be), not rounded here
            self._clip_scale = scale
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
        host = self.host_optimizer.state_dict() if self.host_optimizer else None
        if self.nvme is not None:
            # A checkpoint holds the states: NVMe ones are read back (one layer at a time from
            # disk, all of them in the returned dict), so saving needs host memory for one copy.
            on_disk = self.nvme.read_all()
            index_of = {id(m): i for i, m in enumerate(self.masters)}
            order = [p for g in self.host_optimizer.param_groups for p in g["params"]]
            for packed, master in enumerate(order):
                saved = on_disk.get(index_of[id(master)])
                if saved:
                    host["state"][packed] = {**host["state"][packed], **saved}
        return {
            "device": self.device_optimizer.state_dict() if self.device_optimizer else None,
            "host": host,
            "masters": [m.detach().clone() for m in self.masters],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if len(state["masters"]) != len(self.masters):
            raise MemtrainError("the optimizer checkpoint was saved for another placement")
        if self.device_optimizer is not None:
            self.device_optimizer.load_state_dict(state["device"])
        if self.host_optimizer is not None:
            if self.nvme is not None:
                self._finish_overlapped()
                self.nvme.finish()
            self.host_optimizer.load_state_dict(state["host"])
            if self.nvme is not None:  # back to their files, a layer at a time
                for group in range(len(self.layer_groups)):
                    self.nvme.release(group)
                self.nvme.finish()
        with torch.no_grad():
            for param, master, saved in zip(
                self.host_params, self.masters, state["masters"], strict=True
            ):
                master.copy_(saved)
                param.copy_(master)

    def grad_buffer_bytes(self) -> int:
        """Host bytes held for gradients between backward and the step: every parameter's
        buffer, or the ring's slots when overlapped (not the step's widening transient,
        ``peak_transient_bytes``)."""
        return sum(t.numel() * t.element_size() for t in (*self._grads, *self._ring))

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


def _layer_groups(
    params: list[nn.Parameter], layers: Mapping[nn.Parameter, str] | None
) -> tuple[list[list[int]], list[int]]:
    """Indices of ``params`` grouped by layer (groups in the order they first appear) and each
    group's layer position in ``layers``' order; parameters without a layer are alone, far
    from every other group."""
    layers = layers or {}
    position: dict[str, int] = {}
    for name in layers.values():
        position.setdefault(name, len(position))
    groups: dict[Any, list[int]] = {}
    where: dict[Any, int] = {}
    for index, param in enumerate(params):
        name = layers.get(param)
        key = ("layer", name) if name is not None else ("alone", index)
        if key not in groups:
            groups[key] = []
            where[key] = position[name] if name is not None else _FAR * (len(groups) + 1)
        groups[key].append(index)
    return list(groups.values()), [where[k] for k in groups]


def layers_from_handle(handle: Any) -> dict[nn.Parameter, str]:
    """Each parameter's layer (the first that owns it, as placements_from_handle places it),
    in the model's layer order."""
    out: dict[nn.Parameter, str] = {}
    for name, modules in handle.layers.items():
        for module in modules:
            for param in module.parameters():
                if param.requires_grad and param not in out:
                    out[param] = name
    return out


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
    clipping); ``step()`` then waits for them and writes the weights back. Gradients wait on
    the host in the parameters' dtype (``grad_buffer_dtype=torch.float32`` in ``options``:
    float32 buffers, float32 accumulation)."""
    optimizer = OffloadedOptimizer(
        placements_from_handle(handle),
        optimizer_cls,
        nvme_path=handle.policy.nvme_path,
        cxl_node=handle.policy.cxl_node,
        overlap=overlap,
        layers=layers_from_handle(handle),
        **options,
    )
    handle.optimizer_attached = True
    handle.attach_cleanup(optimizer.close)
    return optimizer
