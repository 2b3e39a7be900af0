"""What the machine offers: accelerator presets and the memory tiers the planner fills."""

from memtrain.hardware.calibrate import calibrate
from memtrain.hardware.devices import DeviceSpec, device_names, get_device
from memtrain.hardware.request import HARDWARE_FIELDS, HardwareRequest
from memtrain.hardware.tiers import (
    HOST_TIERS,
    TIERS,
    HardwareModel,
    MemoryTier,
    build_hardware,
    load_hardware,
    parse_nvme,
)

__all__ = [
    "HARDWARE_FIELDS",
    "HOST_TIERS",
    "TIERS",
    "DeviceSpec",
    "HardwareModel",
    "HardwareRequest",
    "MemoryTier",
    "build_hardware",
    "calibrate",
    "device_names",
    "get_device",
    "load_hardware",
    "parse_nvme",
]
