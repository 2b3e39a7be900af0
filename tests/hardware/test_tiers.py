"""Hardware model: presets with host tiers, YAML round trip, and clear errors for bad input."""

from __future__ import annotations

import pytest

from memtrain.errors import MemtrainError
from memtrain.hardware import HardwareModel, build_hardware, device_names, load_hardware
from memtrain.hardware.tiers import parse_nvme
from memtrain.units import GiB

ISSUE_PRESETS = ["h100-sxm-80g", "h200", "a100-80g", "a100-40g", "rtx-4090", "l4"]


@pytest.mark.parametrize("name", ISSUE_PRESETS)
def test_presets_build_a_gpu_tier(name):
    assert name in device_names()
    model = build_hardware(name, cpu="64GiB")
    assert model.capacity("gpu") == model.device.memory_bytes
    assert model.usable("gpu") < model.capacity("gpu")
    assert model.host_link_duplex >= max(model.host_to_device, model.device_to_host)


def test_h100_host_link_is_the_measured_one():
    model = build_hardware("h100-sxm-80g")
    assert model.host_to_device == model.device_to_host == 55e9
    assert model.host_link_duplex == 90e9
    assert model.capacity("cpu") == 128 * GiB  # default host memory


def test_host_tiers_from_arguments():
    model = build_hardware(
        "h100-sxm-80g", gpu_budget="70GiB", cpu="512GiB", cxl="256GiB", nvme="/mnt/nvme:2TB"
    )
    assert model.capacity("gpu") == 70 * GiB
    assert model.capacity("cxl") == 256 * GiB
    assert model.capacity("nvme") == 2 * 10**12
    assert model.tiers["nvme"].path == "/mnt/nvme"


def test_yaml_round_trip(tmp_path):
    model = build_hardware("a100-40g", cpu="100GiB", cxl="64GiB", nvme="/data:1TB")
    path = tmp_path / "hw.yaml"
    model.save_yaml(path)
    again = HardwareModel.load_yaml(path)
    assert again.to_dict() == model.to_dict()
    bigger = load_hardware(str(path), cpu="200GiB", nvme="/other:3TB")
    assert bigger.capacity("cpu") == 200 * GiB
    assert bigger.tiers["nvme"].path == "/other" and bigger.capacity("nvme") == 3 * 10**12


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"gpu_budget": "500GiB"}, "exceeds"),
        ({"gpu_budget": "0GiB"}, "positive"),
        ({"cpu": "lots"}, "cannot read size"),
        ({"nvme": "2TB"}, "PATH:SIZE"),
    ],
)
def test_bad_arguments_are_one_line_errors(kwargs, message):
    with pytest.raises(MemtrainError, match=message):
        build_hardware("h100-sxm-80g", **kwargs)


def test_bad_files(tmp_path):
    path = tmp_path / "hw.yaml"
    path.write_text("schema: something-else\n")
    with pytest.raises(MemtrainError, match="not a memtrain hardware file"):
        HardwareModel.load_yaml(path)
    data = build_hardware("l4").to_dict()
    data["tiers"]["gpu"]["read_bandwidth"] = 0
    import yaml

    path.write_text(yaml.safe_dump(data))
    with pytest.raises(MemtrainError, match="positive bandwidths"):
        HardwareModel.load_yaml(path)
    with pytest.raises(MemtrainError, match="cannot read hardware"):
        HardwareModel.load_yaml(tmp_path / "missing.yaml")
    with pytest.raises(MemtrainError, match="unknown hardware"):
        load_hardware("tpu-v9")


def test_parse_nvme_keeps_colons_in_paths():
    assert parse_nvme("/mnt/a:b:500GB") == ("/mnt/a:b", 500 * 10**9)
