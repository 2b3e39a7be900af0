"""DeepSpeed configs generated from plans: structure, stages, refusals; validated by DeepSpeed
itself where it is installed."""

from __future__ import annotations

import pytest

from memtrain.errors import MemtrainError
from memtrain.offload import LayerPolicy, OffloadPolicy
from memtrain.offload.deepspeed import deepspeed_config


def _policy(**states) -> OffloadPolicy:
    return OffloadPolicy(
        {f"block.{i}": LayerPolicy(**states) for i in range(3)},
        micro_batch=2,
        nvme_path="/mnt/nvme",
    )


def test_states_on_gpu_is_plain_zero_1():
    config = deepspeed_config(_policy())
    assert config["zero_optimization"]["stage"] == 1
    assert "offload_optimizer" not in config["zero_optimization"]
    assert config["train_micro_batch_size_per_gpu"] == 2
    assert config["bf16"] == {"enabled": True}


def test_optimizer_on_cpu_is_zero_offload():
    zero = deepspeed_config(_policy(grads="cpu", optimizer="cpu"))["zero_optimization"]
    assert zero["stage"] == 2
    assert zero["offload_optimizer"] == {"device": "cpu", "pin_memory": True}
    assert "offload_param" not in zero


def test_nvme_is_zero_infinity():
    config = deepspeed_config(_policy(params="nvme", grads="cpu", optimizer="nvme"))
    zero = config["zero_optimization"]
    assert zero["stage"] == 3
    assert zero["offload_optimizer"] == {
        "device": "nvme",
        "pin_memory": True,
        "nvme_path": "/mnt/nvme",
    }
    assert zero["offload_param"]["device"] == "nvme"
    assert config["aio"]["block_size"] == 1 << 20


def test_mixed_placements_are_refused_unless_asked():
    policy = _policy(grads="cpu", optimizer="cpu")
    policy.layers["block.0"] = LayerPolicy()
    with pytest.raises(MemtrainError, match="offloads all layers alike"):
        deepspeed_config(policy)
    zero = deepspeed_config(policy, mixed="offload-all")["zero_optimization"]
    assert zero["offload_optimizer"]["device"] == "cpu"


def test_cxl_and_missing_nvme_path_are_refused():
    with pytest.raises(MemtrainError, match="CXL"):
        deepspeed_config(_policy(grads="cpu", optimizer="cxl"))
    policy = _policy(grads="cpu", optimizer="nvme")
    policy.nvme_path = None
    with pytest.raises(MemtrainError, match="names no path"):
        deepspeed_config(policy)


@pytest.mark.parametrize(
    ("states", "stage", "optimizer", "params"),
    [
        ({}, 1, "none", "none"),
        ({"grads": "cpu", "optimizer": "cpu"}, 2, "cpu", "none"),
        ({"params": "nvme", "grads": "cpu", "optimizer": "nvme"}, 3, "nvme", "nvme"),
    ],
)
def test_deepspeed_parses_the_config(monkeypatch, states, stage, optimizer, params):
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    pytest.importorskip("deepspeed")
    from deepspeed.runtime.config import DeepSpeedConfig

    config = deepspeed_config(_policy(**states))
    config["train_batch_size"] = 2
    parsed = DeepSpeedConfig(config)
    assert parsed.zero_optimization_stage == stage
    zero = parsed.zero_config

    def device(offload):
        return "none" if offload is None else str(getattr(offload.device, "value", offload.device))

    assert device(zero.offload_optimizer) == optimizer
    assert device(zero.offload_param) == params
    if optimizer == "nvme":
        assert parsed.aio_config["block_size"] == 1 << 20
