"""Memory tiers around one GPU and the machine model the planner optimises against.

A tier is a place bytes can live during a training step: GPU HBM, pinned CPU DRAM, CXL memory
(a NUMA node without CPUs) and NVMe. Each has a capacity and the bandwidth at which bytes move
between it and the GPU. The host link (PCIe) is shared by every host tier and by both
directions, so its duplex rate is part of the model too.
"""

from __future__ import annotations

import difflib
import types
import typing
from dataclasses import MISSING, asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from memtrain.errors import ConfigError, MemtrainError, check_schema
from memtrain.hardware.devices import GB, DeviceSpec, get_device
from memtrain.units import GiB, parse_bytes

HOST_TIERS = ("cpu", "cxl", "nvme")
TIERS = ("gpu", *HOST_TIERS)

SCHEMA = "memtrain.hardware"
SCHEMA_VERSION = 1

# Defaults for host tiers when the user gives only a capacity. Each is a typical figure, stated
# so a calibrated YAML can replace it: CXL 2.0 x16 add-in cards reach about 30 GB/s in practice,
# a PCIe Gen4 NVMe drive about 6 GB/s read and 4 GB/s write, a two-socket server's CPU Adam step
# streams about 40 GB/s of optimizer state.
DEFAULT_CXL_BANDWIDTH = 30 * GB
DEFAULT_NVME_READ = 6 * GB
DEFAULT_NVME_WRITE = 4 * GB
DEFAULT_CPU_OPTIMIZER_BANDWIDTH = 40 * GB
DEFAULT_CPU_BYTES = 128 * GiB


@dataclass(frozen=True)
class MemoryTier:
    """One place bytes can live. Bandwidths are in bytes/s as seen from the GPU.

    ``read_bandwidth`` moves bytes from the tier to the GPU, ``write_bandwidth`` from the GPU to
    the tier. For host tiers these are limits of the tier itself; every transfer also crosses the
    host link, which :class:`HardwareModel` models separately.
    """

    name: str
    capacity_bytes: int
    read_bandwidth: float
    write_bandwidth: float
    path: str | None = None  # NVMe: the directory swap files go to
    numa_node: int | None = None  # CPU/CXL: the NUMA node the memory sits on

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class HardwareModel:
    """Everything the planner needs to know about the machine.

    ``allocator_margin`` is the fraction of each tier kept free for fragmentation and rounding;
    ``gpu_reserved_bytes`` is GPU memory the CUDA context and library workspaces take before the
    first tensor is allocated.
    """

    device: DeviceSpec
    tiers: dict[str, MemoryTier]
    host_to_device: float
    device_to_host: float
    host_link_duplex: float
    cpu_optimizer_bandwidth: float = DEFAULT_CPU_OPTIMIZER_BANDWIDTH
    allocator_margin: float = 0.05
    gpu_reserved_bytes: int = GiB // 2
    # Host time to issue one sequence chunk of one layer pass (memtrain.planner.costmodel.
    # chunk_issue_time): about 4 ms for a Llama block under token-wise recompute (measured on an
    # H100 host: Llama-3.1-8B at 8,192 tokens in 8 chunks was host-bound at 4-5 ms a chunk pass).
    tile_overhead_s: float = 4e-3
    source: str = ""
    notes: list[str] = field(default_factory=list)
    # What ``memtrain calibrate`` read on the machine (None: not measured): MemAvailable and the
    # locked-memory limit (RLIMIT_MEMLOCK; None also where it is unlimited).
    host_mem_available: int | None = None
    host_memlock_limit: int | None = None

    @property
    def host_pinnable(self) -> int | None:
        """Host bytes this machine can pin, where measured: MemAvailable capped by the
        locked-memory limit."""
        if self.host_mem_available is None:
            return None
        limit = self.host_memlock_limit
        return self.host_mem_available if limit is None else min(self.host_mem_available, limit)

    @property
    def gpu_flops(self) -> float:
        return self.device.achievable_bf16_flops

    def capacity(self, tier: str) -> int:
        spec = self.tiers.get(tier)
        return 0 if spec is None else spec.capacity_bytes

    def usable(self, tier: str) -> float:
        """Bytes the planner may fill on ``tier``: capacity less the allocator margin."""
        usable = self.capacity(tier) * (1.0 - self.allocator_margin)
        if tier == "gpu":
            usable -= self.gpu_reserved_bytes
        return max(0.0, usable)

    def with_capacity(self, tier: str, capacity_bytes: float) -> HardwareModel:
        """A copy with one tier's capacity changed (the tier must exist unless it is a host tier)."""
        tiers = dict(self.tiers)
        if tier in tiers:
            tiers[tier] = replace(tiers[tier], capacity_bytes=int(capacity_bytes))
        else:
            tiers[tier] = _default_tier(tier, int(capacity_bytes))
        return replace(self, tiers=tiers)

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": SCHEMA,
            "schema_version": SCHEMA_VERSION,
            "device": self.device.to_dict(),
            "tiers": {name: tier.to_dict() for name, tier in self.tiers.items()},
            "host_to_device": self.host_to_device,
            "device_to_host": self.device_to_host,
            "host_link_duplex": self.host_link_duplex,
            "cpu_optimizer_bandwidth": self.cpu_optimizer_bandwidth,
            "allocator_margin": self.allocator_margin,
            "gpu_reserved_bytes": self.gpu_reserved_bytes,
            "tile_overhead_s": self.tile_overhead_s,
            "source": self.source,
            "notes": list(self.notes),
            **{
                k: v
                for k, v in (
                    ("host_mem_available", self.host_mem_available),
                    ("host_memlock_limit", self.host_memlock_limit),
                )
                if v is not None
            },
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> HardwareModel:
        check_schema(data, SCHEMA, SCHEMA_VERSION, "hardware file", "memtrain calibrate")
        top = _checked_fields(
            cls, {k: v for k, v in data.items() if k not in ("schema", "schema_version")}, ""
        )
        device_data = top["device"]
        if isinstance(device_data, str):
            device = get_device(device_data)
        elif isinstance(device_data, dict):
            device = DeviceSpec(**_checked_fields(DeviceSpec, device_data, "device."))
        else:
            raise ConfigError(
                f"'device' must be a preset name or a mapping of device fields, got {device_data!r}"
            )
        if not isinstance(top["tiers"], dict):
            raise ConfigError(
                f"'tiers' must be a mapping of tier name ({', '.join(TIERS)}) to its fields, "
                f"got {type(top['tiers']).__name__}"
            )
        tiers = {}
        for name, spec in top["tiers"].items():
            if not isinstance(spec, dict):
                raise ConfigError(f"'tiers.{name}' must be a mapping of tier fields, got {spec!r}")
            tiers[name] = MemoryTier(**_checked_fields(MemoryTier, spec, f"tiers.{name}."))
        model = cls(**{**top, "device": device, "tiers": tiers})
        model.validate()
        return model

    def validate(self) -> None:
        for spec in fields(DeviceSpec):
            value = getattr(self.device, spec.name)
            if not isinstance(value, int | float) or isinstance(value, bool):
                continue
            if not (value >= 0 if spec.name == "memory_bytes" else _positive(value)):
                raise ConfigError(f"'device.{spec.name}' must be a positive number, got {value!r}")
        if "gpu" not in self.tiers:
            raise ConfigError("hardware model has no 'gpu' tier")
        for name, tier in self.tiers.items():
            if name not in TIERS:
                raise ConfigError(f"unknown memory tier {name!r}; tiers are {', '.join(TIERS)}")
            bandwidths = (tier.read_bandwidth, tier.write_bandwidth)
            if tier.capacity_bytes < 0 or not all(_positive(b) for b in bandwidths):
                raise ConfigError(
                    f"tier {name!r} needs a non-negative capacity and positive bandwidths"
                )
        links = (self.host_to_device, self.device_to_host, self.host_link_duplex)
        if not all(_positive(b) for b in (*links, self.cpu_optimizer_bandwidth)):
            raise ConfigError(
                "host_to_device, device_to_host, host_link_duplex and cpu_optimizer_bandwidth "
                "must be positive numbers of bytes/s"
            )
        if not 0 <= self.allocator_margin < 1:
            raise ConfigError("allocator_margin must be in [0, 1)")
        if self.gpu_reserved_bytes < 0 or not self.tile_overhead_s >= 0:
            raise ConfigError("gpu_reserved_bytes and tile_overhead_s must not be negative")

    def save_yaml(self, path: str | Path) -> None:
        import yaml

        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))

    @classmethod
    def load_yaml(cls, path: str | Path) -> HardwareModel:
        import yaml

        try:
            data = yaml.safe_load(Path(path).read_text())
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read hardware file ({exc.strerror})") from None
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" at line {mark.line + 1}" if mark is not None else ""
            problem = getattr(exc, "problem", None) or str(exc).strip().splitlines()[0]
            raise ConfigError(
                f"{path}: hardware file is not valid YAML ({problem}{where})"
            ) from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: hardware file must be a YAML mapping")
        try:
            return cls.from_dict(data)
        except MemtrainError as exc:
            raise ConfigError(f"{path}: {exc}") from None


def _positive(value: float) -> bool:
    return value > 0  # NaN is not; infinite rates (the CPU preset's host link) are


def _accepts(hint: Any, value: Any) -> bool:
    """Whether a YAML value fits a field annotation (``float`` takes ints; bools are not
    numbers)."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return any(_accepts(arg, value) for arg in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is Any:
        return True
    origin = typing.get_origin(hint) or hint
    if origin is list:
        (item,) = typing.get_args(hint) or (Any,)
        return isinstance(value, list) and all(_accepts(item, v) for v in value)
    if origin is dict:
        return isinstance(value, dict)
    if isinstance(value, bool) and origin is not bool:
        return False
    if origin is float:
        return isinstance(value, int | float)
    return isinstance(value, origin)


def _type_name(hint: Any) -> str:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join(_type_name(arg) for arg in typing.get_args(hint))
    names = {int: "an integer", float: "a number", str: "text", bool: "true or false"}
    if hint is type(None):
        return "null"
    if typing.get_origin(hint) is list:
        return "a list"
    if hint in (dict, DeviceSpec) or typing.get_origin(hint) is dict:
        return "a mapping"
    return names.get(hint, getattr(hint, "__name__", str(hint)))


def _checked_fields(cls: type, data: dict[str, Any], prefix: str) -> dict[str, Any]:
    """``data`` with every key a field of dataclass ``cls`` and every value of its type; each
    unknown key, missing field or wrong type is a one-line error naming ``prefix + key``."""
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in fields(cls)}
    for key, value in data.items():
        if key not in known:
            close = difflib.get_close_matches(str(key), list(known), n=1, cutoff=0.6)
            hint = f"did you mean {close[0]!r}" if close else "known: " + ", ".join(known)
            raise ConfigError(f"unknown field '{prefix}{key}' ({hint})")
        if key in ("device", "tiers") and cls is HardwareModel:
            continue  # checked by from_dict, which knows their shapes
        if not _accepts(hints[key], value):
            raise ConfigError(f"'{prefix}{key}' must be {_type_name(hints[key])}, got {value!r}")
    missing = [
        name
        for name, spec in known.items()
        if name not in data and spec.default is MISSING and spec.default_factory is MISSING  # type: ignore[misc]
    ]
    if missing:
        raise ConfigError(f"missing field(s) {', '.join(prefix + m for m in missing)}")
    return dict(data)


def _default_tier(name: str, capacity: int, path: str | None = None) -> MemoryTier:
    if name == "cpu":
        # Pinned DRAM is never the bottleneck behind the host link.
        return MemoryTier("cpu", capacity, 200 * GB, 200 * GB)
    if name == "cxl":
        return MemoryTier("cxl", capacity, DEFAULT_CXL_BANDWIDTH, DEFAULT_CXL_BANDWIDTH)
    if name == "nvme":
        return MemoryTier("nvme", capacity, DEFAULT_NVME_READ, DEFAULT_NVME_WRITE, path=path)
    raise MemtrainError(f"unknown memory tier {name!r}; tiers are {', '.join(TIERS)}")


def parse_nvme(text: str) -> tuple[str, int]:
    """Parse ``/path:2TB`` into a path and a capacity."""
    path, sep, size = str(text).rpartition(":")
    if not sep or not path:
        raise MemtrainError(f"cannot read NVMe tier {text!r}: use PATH:SIZE, e.g. /mnt/nvme:2TB")
    return path, parse_bytes(size)


def build_hardware(
    device: str | DeviceSpec = "h100-sxm-80g",
    *,
    gpu_budget: str | int | None = None,
    cpu: str | int | None = DEFAULT_CPU_BYTES,
    cxl: str | int | None = None,
    nvme: str | tuple[str, int] | None = None,
    cpu_optimizer_bandwidth: float = DEFAULT_CPU_OPTIMIZER_BANDWIDTH,
    allocator_margin: float = 0.05,
) -> HardwareModel:
    """A hardware model from a device preset and the host tiers the user names.

    ``gpu_budget`` caps GPU memory below the device's (e.g. to leave room for other work);
    ``cpu`` is the pinned host memory the planner may use; ``cxl`` and ``nvme`` add those tiers.
    """
    spec = get_device(device) if isinstance(device, str) else device
    gpu_bytes = spec.memory_bytes if gpu_budget is None else parse_bytes(gpu_budget)
    if gpu_bytes <= 0:
        raise MemtrainError("the GPU budget must be positive, e.g. --gpu-budget 70GiB")
    if gpu_budget is not None and gpu_bytes > spec.memory_bytes * 1.1:
        raise MemtrainError(
            f"GPU budget {gpu_bytes / GiB:.1f} GiB exceeds the {spec.name}'s "
            f"{spec.memory_bytes / GiB:.1f} GiB; pick a smaller --gpu-budget"
        )
    tiers = {
        "gpu": MemoryTier(
            "gpu", gpu_bytes, spec.achievable_hbm_bandwidth, spec.achievable_hbm_bandwidth
        )
    }
    if cpu is not None and parse_bytes(cpu) > 0:
        tiers["cpu"] = _default_tier("cpu", parse_bytes(cpu))
    if cxl is not None and parse_bytes(cxl) > 0:
        tiers["cxl"] = _default_tier("cxl", parse_bytes(cxl))
    if nvme is not None:
        path, size = parse_nvme(nvme) if isinstance(nvme, str) else nvme
        tiers["nvme"] = _default_tier("nvme", size, path)
    model = HardwareModel(
        device=spec,
        tiers=tiers,
        host_to_device=spec.host_to_device,
        device_to_host=spec.device_to_host,
        host_link_duplex=spec.host_link_duplex,
        cpu_optimizer_bandwidth=cpu_optimizer_bandwidth,
        allocator_margin=allocator_margin,
        source=f"preset {spec.name}; host tiers as given; " + spec.source,
    )
    model.validate()
    return model


def load_hardware(name_or_path: str, **overrides: Any) -> HardwareModel:
    """A preset name (``h100-sxm-80g``) or a YAML written by ``memtrain calibrate``.

    ``overrides`` (gpu_budget, cpu, cxl, nvme) replace the matching capacities.
    """
    if name_or_path.endswith((".yaml", ".yml")) or Path(name_or_path).is_file():
        model = HardwareModel.load_yaml(name_or_path)
        if overrides.get("gpu_budget") is not None:
            model = model.with_capacity("gpu", parse_bytes(overrides["gpu_budget"]))
        for tier in ("cpu", "cxl"):
            if overrides.get(tier) is not None:
                model = model.with_capacity(tier, parse_bytes(overrides[tier]))
        if overrides.get("nvme") is not None:
            path, size = parse_nvme(overrides["nvme"])
            tiers = dict(model.tiers)
            base = tiers.get("nvme") or _default_tier("nvme", size, path)
            tiers["nvme"] = replace(base, capacity_bytes=size, path=path)
            model = replace(model, tiers=tiers)
        return model
    return build_hardware(name_or_path, **{k: v for k, v in overrides.items() if v is not None})
