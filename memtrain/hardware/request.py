"""The hardware a user asks to plan for: a device preset or calibrated YAML plus tier sizes.

Declared once here; recipe sections, the command line and ``prepare()`` all take these fields
and turn them into a :class:`~memtrain.hardware.tiers.HardwareModel` with :meth:`load`.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

from memtrain.hardware.tiers import HardwareModel, load_hardware


def _knob(default, help: str):
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class HardwareRequest:
    """Which machine to plan for and how much of each memory tier the plan may use."""

    hardware: str = _knob(
        "h100-sxm-80g", "device preset (see `memtrain presets`) or a YAML from `memtrain calibrate`"
    )
    gpu_budget: str | int | None = _knob(None, "GPU memory to plan for, e.g. 70GiB")
    cpu: str | int | None = _knob(None, "pinned host memory to use (default 128GiB)")
    cxl: str | int | None = _knob(None, "CXL memory to use, e.g. 256GiB")
    nvme: str | None = _knob(None, "NVMe swap as PATH:SIZE, e.g. /mnt/nvme:2TB")

    def load(self) -> HardwareModel:
        return load_hardware(
            self.hardware, gpu_budget=self.gpu_budget, cpu=self.cpu, cxl=self.cxl, nvme=self.nvme
        )

    def check_sizes(self, where: str) -> None:
        """Read every tier size now, so a bad one is a one-line error naming ``where`` (a
        recipe section) even where nothing is planned from it (a dry-run-only recipe)."""
        from memtrain.errors import ConfigError, MemtrainError
        from memtrain.hardware.tiers import parse_nvme
        from memtrain.units import parse_bytes

        for name in ("gpu_budget", "cpu", "cxl", "nvme"):
            value = getattr(self, name)
            if value is None:
                continue
            try:
                parse_nvme(value) if name == "nvme" else parse_bytes(value)
            except MemtrainError as exc:
                raise ConfigError(f"{where}.{name}: {exc}") from None

    def hardware_request(self) -> HardwareRequest:
        """The hardware fields alone (from a subclass such as a recipe section)."""
        names = [f.name for f in fields(HardwareRequest)]
        return HardwareRequest(**{name: getattr(self, name) for name in names})


HARDWARE_FIELDS = tuple(f.name for f in fields(HardwareRequest))
