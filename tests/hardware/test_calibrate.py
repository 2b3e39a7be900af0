"""Calibration on a CPU machine: sysfs parsing, available memory, disk rates, the YAML it writes."""

from __future__ import annotations

import pytest

from memtrain.errors import MemtrainError
from memtrain.hardware import HardwareModel
from memtrain.hardware.calibrate import available_memory, calibrate, disk_rates, numa_nodes
from memtrain.units import MiB


def _fake_sysfs(root, nodes):
    for node, (cpulist, total_kb, free_kb) in nodes.items():
        d = root / f"node{node}"
        d.mkdir(parents=True)
        (d / "cpulist").write_text(cpulist + "\n")
        (d / "meminfo").write_text(
            f"Node {node} MemTotal:       {total_kb} kB\n"
            f"Node {node} MemFree:        {free_kb} kB\n"
            f"Node {node} MemUsed:        {total_kb - free_kb} kB\n"
        )
    (root / "online").write_text("0-1\n")


def test_numa_nodes_find_cpu_less_memory(tmp_path):
    _fake_sysfs(tmp_path, {0: ("0-3,8", 1000, 600), 1: ("", 4000, 3900)})
    nodes = numa_nodes(tmp_path)
    assert [n.node for n in nodes] == [0, 1]
    assert nodes[0].cpus == (0, 1, 2, 3, 8) and not nodes[0].cpu_less
    assert nodes[1].cpu_less and nodes[1].mem_free == 3900 * 1024


def test_calibrate_turns_a_cpu_less_node_into_a_cxl_tier(tmp_path):
    _fake_sysfs(tmp_path, {0: ("0-1", 10**6, 5 * 10**5), 1: ("", 4 * 10**6, 3 * 10**6)})
    model = calibrate(node_root=tmp_path, cpu="8GiB", measure_optimizer=False)
    assert model.capacity("cxl") == 3 * 10**6 * 1024
    assert model.tiers["cxl"].numa_node == 1
    assert any("CXL" in note for note in model.notes)


def test_this_machine(tmp_path):
    assert available_memory() > 0
    rates = disk_rates(tmp_path, 4 * MiB, block=1 * MiB)
    assert rates.read > 0 and rates.write > 0
    model = calibrate(nvme_path=str(tmp_path), test_bytes="4MiB", measure_optimizer=True)
    assert model.capacity("nvme") > 0 and model.tiers["nvme"].read_bandwidth > 0
    assert model.cpu_optimizer_bandwidth > 0
    out = tmp_path / "hw.yaml"
    model.save_yaml(out)
    assert HardwareModel.load_yaml(out).to_dict() == model.to_dict()


def test_nvme_path_must_be_a_folder(tmp_path):
    with pytest.raises(MemtrainError, match="not a directory"):
        disk_rates(tmp_path / "missing")
