"""What the machine offers: accelerator presets (and, for the planner, memory tiers)."""

from memtrain.hardware.devices import DeviceSpec, device_names, get_device

__all__ = ["DeviceSpec", "device_names", "get_device"]
