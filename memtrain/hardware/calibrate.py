"""Measure what this machine offers and write it as a hardware model the planner reads.

Measured where possible: NUMA nodes and their memory (``/sys/devices/system/node``; a node with
memory and no CPUs is CXL memory), available host memory, sequential read and write rates of a
file at the NVMe path (bounded size, page cache bypassed where the file system allows), the CPU
optimizer step rate, and, with CUDA, GPU memory, the host link (pinned each way, both ways at
once, pageable) and the compute rates dry runs price time with (a large bf16 matrix product,
fused causal attention, a device copy: :mod:`memtrain.hardware.compute_rates`). Everything not
measured comes from the device preset and is named in ``notes``.
"""

from __future__ import annotations

import mmap
import os
import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path

from memtrain.errors import MemtrainError
from memtrain.hardware.devices import DeviceSpec, get_device
from memtrain.hardware.tiers import (
    DEFAULT_CXL_BANDWIDTH,
    HardwareModel,
    MemoryTier,
    build_hardware,
)
from memtrain.units import MiB, format_bytes, parse_bytes

NODE_ROOT = "/sys/devices/system/node"
GPU_NAMES = {  # substrings of torch.cuda.get_device_name -> preset
    "H200": "h200",
    "H100": "h100-sxm-80g",
    "A100-SXM4-40GB": "a100-40g",
    "A100-PCIE-40GB": "a100-40g",
    "A100": "a100-80g",
    "4090": "rtx-4090",
    "L4": "l4",
}


@dataclass(frozen=True)
class NumaNode:
    node: int
    cpus: tuple[int, ...]
    mem_total: int
    mem_free: int

    @property
    def cpu_less(self) -> bool:
        """A node with memory but no CPUs: how CXL-attached memory appears to software."""
        return not self.cpus and self.mem_total > 0


def _parse_cpulist(text: str) -> tuple[int, ...]:
    cpus: list[int] = []
    for part in filter(None, text.strip().split(",")):
        lo, _, hi = part.partition("-")
        cpus.extend(range(int(lo), int(hi or lo) + 1))
    return tuple(cpus)


def _node_meminfo(path: Path) -> tuple[int, int]:
    total = free = 0
    for line in path.read_text().splitlines():
        fields = line.split()
        # "Node 0 MemTotal:  24684084 kB"
        if len(fields) >= 4 and fields[2] in ("MemTotal:", "MemFree:"):
            value = int(fields[3]) * (1024 if fields[-1] == "kB" else 1)
            if fields[2] == "MemTotal:":
                total = value
            else:
                free = value
    return total, free


def numa_nodes(root: str | Path = NODE_ROOT) -> list[NumaNode]:
    """NUMA nodes from sysfs; empty where sysfs has none (containers, other systems)."""
    base = Path(root)
    nodes = []
    for entry in sorted(base.glob("node[0-9]*"), key=lambda p: int(p.name[4:])):
        try:
            cpus = _parse_cpulist((entry / "cpulist").read_text())
            total, free = _node_meminfo(entry / "meminfo")
        except (OSError, ValueError):
            continue
        nodes.append(NumaNode(int(entry.name[4:]), cpus, total, free))
    return nodes


def available_memory(meminfo: str | Path = "/proc/meminfo") -> int:
    """``MemAvailable`` in bytes: what the host can give without swapping."""
    try:
        for line in Path(meminfo).read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def locked_memory_limit() -> int | None:
    """The soft locked-memory limit (RLIMIT_MEMLOCK, ``ulimit -l``) in bytes; None: unlimited
    or unknown."""
    try:
        import resource

        soft, _ = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    except (ImportError, OSError, ValueError, AttributeError):
        return None
    return None if soft == resource.RLIM_INFINITY or soft < 0 else int(soft)


def pinnable_memory(meminfo: str | Path = "/proc/meminfo") -> tuple[int, int | None, int]:
    """(MemAvailable, the locked-memory limit or None, what can be pinned: the smaller)."""
    available = available_memory(meminfo)
    limit = locked_memory_limit()
    return available, limit, available if limit is None else min(available, limit)


def host_memory_line() -> str:
    """One clause naming what this host has available and may lock, for error messages."""
    available, limit, _ = pinnable_memory()
    lockable = "unlimited" if limit is None else format_bytes(limit)
    return f"{format_bytes(available)} available (MemAvailable), locked-memory limit {lockable}"


@dataclass(frozen=True)
class DiskRates:
    read: float
    write: float
    direct: bool  # True when O_DIRECT bypassed the page cache


def _aligned_buffer(size: int) -> mmap.mmap:
    buf = mmap.mmap(-1, size)  # page aligned, as O_DIRECT needs
    buf.write(os.urandom(min(size, MiB)) * (size // min(size, MiB)))
    return buf


def disk_rates(path: str | Path, size: int = 256 * MiB, block: int = 8 * MiB) -> DiskRates:
    """Sequential write then read of a ``size``-byte file under ``path`` (removed afterwards).

    O_DIRECT bypasses the page cache where the file system allows it; elsewhere the write is
    fsynced and the cache dropped before reading, which is the next best thing.
    """
    directory = Path(path)
    if not directory.is_dir():
        raise MemtrainError(f"NVMe path {path} is not a directory; give a folder on the drive")
    if size <= 0:
        raise MemtrainError("the calibration file size must be positive, e.g. 256MiB")
    block = min(block, size)
    size = max(block, size // block * block)
    target = directory / f".memtrain-calibrate-{os.getpid()}"
    buf = _aligned_buffer(block)
    try:
        if getattr(os, "O_DIRECT", 0):
            try:
                return _measure(target, size, buf, direct=True)
            except OSError:
                pass  # tmpfs and some network file systems refuse O_DIRECT
        return _measure(target, size, buf, direct=False)
    except OSError as exc:
        raise MemtrainError(f"cannot measure {path}: {exc.strerror}") from None
    finally:
        buf.close()
        target.unlink(missing_ok=True)


def _measure(target: Path, size: int, buf: mmap.mmap, direct: bool) -> DiskRates:
    extra = os.O_DIRECT if direct else 0
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | extra, 0o600)
    try:
        started = time.perf_counter()
        written = 0
        while written < size:
            written += os.write(fd, buf)
        os.fsync(fd)
        write_s = max(time.perf_counter() - started, 1e-9)
    finally:
        os.close(fd)
    fd = os.open(target, os.O_RDONLY | extra)
    try:
        if not direct and hasattr(os, "posix_fadvise"):
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        started = time.perf_counter()
        done = 0
        while done < size:
            n = os.readv(fd, [buf])
            if n <= 0:
                break
            done += n
        read_s = max(time.perf_counter() - started, 1e-9)
    finally:
        os.close(fd)
    return DiskRates(read=done / read_s, write=written / write_s, direct=direct)


def cpu_optimizer_bandwidth(params: int = 16 * 2**20, steps: int = 3) -> float:
    """Bytes/s the CPU AdamW step streams (params, grads, two moments; read and write), with the
    kernel the host optimizer runs: torch's fused CPU AdamW where this torch has it (4-5x its
    for-each path), else for-each."""
    import torch

    p = torch.nn.Parameter(torch.zeros(params))
    p.grad = torch.randn(params)
    try:
        opt = torch.optim.AdamW([p], lr=1e-3, fused=True)
        opt.step()  # allocates the moments
    except (RuntimeError, TypeError, ValueError):
        opt = torch.optim.AdamW([p], lr=1e-3, foreach=True)
        opt.step()
    started = time.perf_counter()
    for _ in range(steps):
        opt.step()
    seconds = (time.perf_counter() - started) / steps
    touched = (2 * 8 + 4 + 2 * 4) * params  # 2 x states + grads + 2 x params, fp32
    return touched / seconds


@dataclass(frozen=True)
class LinkRates:
    host_to_device: float
    device_to_host: float
    duplex: float
    pageable: float


def host_link_rates(size: int = 512 * MiB, repeats: int = 5) -> LinkRates:  # pragma: no cover
    """Pinned copies each way, both ways at once on two streams, and a pageable copy."""
    import torch

    elems = size // 4
    host_a = torch.empty(elems, pin_memory=True)
    host_b = torch.empty(elems, pin_memory=True)
    pageable = torch.empty(elems)
    dev_a = torch.empty(elems, device="cuda")
    dev_b = torch.empty(elems, device="cuda")
    up, down = torch.cuda.Stream(), torch.cuda.Stream()

    def timed(fn) -> float:
        fn()
        torch.cuda.synchronize()
        started = time.perf_counter()
        for _ in range(repeats):
            fn()
        torch.cuda.synchronize()
        return (time.perf_counter() - started) / repeats

    h2d = size / timed(lambda: dev_a.copy_(host_a, non_blocking=True))
    d2h = size / timed(lambda: host_b.copy_(dev_b, non_blocking=True))

    def both() -> None:
        with torch.cuda.stream(up):
            dev_a.copy_(host_a, non_blocking=True)
        with torch.cuda.stream(down):
            host_b.copy_(dev_b, non_blocking=True)

    duplex = 2 * size / timed(both)
    slow = size / timed(lambda: dev_a.copy_(pageable))
    return LinkRates(h2d, d2h, duplex, slow)


def measured_device(spec: DeviceSpec, device) -> DeviceSpec:
    """``spec`` with the matrix-product rate, attention's share of it and the copy bandwidth
    measured on ``device`` (what the profiler turns FLOPs and bytes into time with)."""
    from memtrain.hardware.compute_rates import measure_compute_rates

    rates = measure_compute_rates(device, small=device.type != "cuda")
    return replace(
        spec,
        achievable_bf16_flops=rates.matmul,
        attention_efficiency=rates.attention_efficiency,
        achievable_hbm_bandwidth=rates.copy,
    )


def _compute_note(spec: DeviceSpec) -> str:
    return (
        f"compute measured: matrix product {spec.achievable_bf16_flops / 1e12:.0f} TFLOP/s, "
        f"causal attention {spec.attention_rate(2) / 1e12:.0f} TFLOP/s "
        f"({spec.attention_efficiency:.2f} of it), device copy "
        f"{spec.achievable_hbm_bandwidth / 1e9:.0f} GB/s"
    )


def detect_device() -> DeviceSpec | None:
    """The preset matching the CUDA device here, or None without CUDA."""
    try:
        import torch
    except ImportError:  # pragma: no cover
        return None
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(0)  # pragma: no cover - needs a GPU
    for marker, preset in GPU_NAMES.items():  # pragma: no cover
        if marker in name:
            return get_device(preset)
    raise MemtrainError(  # pragma: no cover
        f"no preset for GPU {name!r}; pass --device with the closest preset"
    )


def calibrate(
    *,
    device: str | None = None,
    nvme_path: str | None = None,
    nvme_size: str | int | None = None,
    test_bytes: str | int = 256 * MiB,
    cpu: str | int | None = None,
    node_root: str | Path = NODE_ROOT,
    measure_optimizer: bool = True,
    measure_compute: bool = True,
) -> HardwareModel:
    """A hardware model of this machine: measured where possible, preset figures elsewhere."""
    notes: list[str] = []
    detected = detect_device()
    if device is not None:
        spec = get_device(device)
    elif detected is not None:  # pragma: no cover - needs a GPU
        spec = detected
    else:
        spec = get_device("h100-sxm-80g")
        notes.append("no CUDA device here: GPU figures are the h100-sxm-80g preset")
    nodes = numa_nodes(node_root)
    cpu_nodes = [n for n in nodes if not n.cpu_less]
    cxl_nodes = [n for n in nodes if n.cpu_less]
    if cpu is not None:
        cpu_bytes = parse_bytes(cpu)
        notes.append(f"CPU memory {format_bytes(cpu_bytes)} as given")
    mem_available, memlock, _ = pinnable_memory()
    if cxl_nodes:  # MemAvailable counts CXL nodes too; take them out of the CPU tier
        mem_available = max(0, mem_available - sum(n.mem_free for n in cxl_nodes))
    pinnable = mem_available if memlock is None else min(mem_available, memlock)
    lockable = "unlimited" if memlock is None else format_bytes(memlock)
    if cpu is not None:
        if cpu_bytes > pinnable:
            notes.append(
                f"CPU memory as given exceeds what this machine can pin now "
                f"({format_bytes(mem_available)} available, locked-memory limit {lockable})"
            )
    else:
        cpu_bytes = pinnable
        notes.append(
            f"CPU memory: {format_bytes(cpu_bytes)} pinnable (measured: "
            f"{format_bytes(mem_available)} available, locked-memory limit {lockable})"
        )
    model = build_hardware(spec, cpu=cpu_bytes)
    tiers = dict(model.tiers)
    if detected is not None and device is None:  # pragma: no cover - needs a GPU
        import torch

        free, total = torch.cuda.mem_get_info()
        tiers["gpu"] = replace(tiers["gpu"], capacity_bytes=int(total))
        link = host_link_rates()
        model = replace(
            model,
            host_to_device=link.host_to_device,
            device_to_host=link.device_to_host,
            host_link_duplex=link.duplex,
        )
        notes.append(
            f"host link measured: {link.host_to_device / 1e9:.1f} GB/s up, "
            f"{link.device_to_host / 1e9:.1f} GB/s down, {link.duplex / 1e9:.1f} GB/s both, "
            f"{link.pageable / 1e9:.1f} GB/s pageable"
        )
        if measure_compute:
            model = replace(model, device=measured_device(model.device, torch.device("cuda")))
            notes.append(_compute_note(model.device))
        else:
            notes.append("compute rates: preset figures (not measured)")
    else:
        notes.append("host link: preset figures (no CUDA device measured)")
    if cxl_nodes:
        cxl_bytes = sum(n.mem_free for n in cxl_nodes)
        tiers["cxl"] = MemoryTier(
            "cxl",
            cxl_bytes,
            DEFAULT_CXL_BANDWIDTH,
            DEFAULT_CXL_BANDWIDTH,
            numa_node=cxl_nodes[0].node,
        )
        notes.append(
            f"CXL: NUMA node(s) {', '.join(str(n.node) for n in cxl_nodes)} without CPUs, "
            f"{format_bytes(cxl_bytes)} free; bandwidth is the default "
            f"{DEFAULT_CXL_BANDWIDTH / 1e9:.0f} GB/s (not measured)"
        )
    else:
        notes.append(f"NUMA nodes: {len(nodes)}, none without CPUs (no CXL memory)")
    if cpu_nodes and "cpu" in tiers:
        tiers["cpu"] = replace(tiers["cpu"], numa_node=cpu_nodes[0].node)
    if nvme_path is not None:
        rates = disk_rates(nvme_path, parse_bytes(test_bytes))
        capacity = (
            parse_bytes(nvme_size) if nvme_size is not None else shutil.disk_usage(nvme_path).free
        )
        tiers["nvme"] = MemoryTier(
            "nvme", capacity, rates.read, rates.write, path=str(Path(nvme_path).resolve())
        )
        notes.append(
            f"NVMe at {nvme_path}: read {rates.read / 1e9:.2f} GB/s, write "
            f"{rates.write / 1e9:.2f} GB/s over {format_bytes(parse_bytes(test_bytes))}"
            + (" (O_DIRECT)" if rates.direct else " (page cache dropped, not bypassed)")
        )
    optimizer_bw = model.cpu_optimizer_bandwidth
    if measure_optimizer:
        optimizer_bw = cpu_optimizer_bandwidth()
        notes.append(f"CPU AdamW step streams {optimizer_bw / 1e9:.1f} GB/s (measured)")
    model = replace(
        model,
        tiers=tiers,
        cpu_optimizer_bandwidth=optimizer_bw,
        source="memtrain calibrate on this machine; " + spec.source,
        notes=notes,
        host_mem_available=mem_available,
        host_memlock_limit=memlock,
    )
    model.validate()
    return model
