"""Compute-rate calibration: the measurements run on the CPU, and a calibrated YAML's rates are
what dry runs price time with (not the preset of the same name)."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from memtrain.hardware import HardwareModel
from memtrain.hardware.calibrate import measured_device
from memtrain.hardware.compute_rates import attention_flops, measure_compute_rates
from memtrain.hardware.devices import get_device
from memtrain.hardware.request import HardwareRequest
from memtrain.hardware.tiers import load_hardware
from memtrain.planner.pipeline import PlanRequest, plan_model


def test_rates_measure_on_the_cpu():
    rates = measure_compute_rates(torch.device("cpu"), small=True)
    assert rates.matmul > 1e6 and rates.attention > 1e5 and rates.copy > 1e6
    assert 0 < rates.attention_efficiency < 10


def test_attention_flops_follow_the_profilers_count():
    # forward 2 products over the causal half, backward 5: 7 * b * h * s^2 * d in all
    assert attention_flops(2, 4, 128, 64) == 7 * 2 * 4 * 128**2 * 64


def test_measured_device_replaces_the_presets_rates():
    preset = get_device("h100-sxm-80g")
    spec = measured_device(preset, torch.device("cpu"))
    assert spec.name == preset.name
    assert spec.achievable_bf16_flops != preset.achievable_bf16_flops
    assert spec.attention_efficiency != preset.attention_efficiency
    assert spec.achievable_hbm_bandwidth != preset.achievable_hbm_bandwidth


@pytest.mark.parametrize("factor", [0.5])
def test_a_calibrated_yaml_prices_the_dry_run(tmp_path, factor):
    preset = load_hardware("h100-sxm-80g")
    slower = replace(
        preset,
        device=replace(
            preset.device,
            achievable_bf16_flops=preset.device.achievable_bf16_flops * factor,
            achievable_hbm_bandwidth=preset.device.achievable_hbm_bandwidth * factor,
        ),
    )
    path = tmp_path / "calibrated.yaml"
    slower.save_yaml(path)
    assert HardwareModel.load_yaml(path).device == slower.device

    def step_time(hardware: str) -> float:
        request = PlanRequest(seq=16384, hardware=HardwareRequest(hardware=hardware, cpu="8GiB"))
        planned = plan_model("llama-3.2-1b", request)
        return sum(layer.forward_time_s for layer in planned.profile.layers)

    base, calibrated = step_time("h100-sxm-80g"), step_time(str(path))
    # every op at half the rate; the per-kernel host floor (launch, Python) stays
    assert 1.5 < calibrated / base <= 1 / factor + 1e-9
