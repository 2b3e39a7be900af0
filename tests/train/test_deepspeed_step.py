"""A plan's generated DeepSpeed config trains: ZeRO-2 and ZeRO-3 steps on the CPU.

DeepSpeed runs with its CPU accelerator (``DS_ACCELERATOR=cpu``) and the gloo backend in a
subprocess of its own, so its global state never touches the rest of the suite. Skips when
DeepSpeed is not installed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from memtrain.cli import main

pytest.importorskip("deepspeed")

SCRIPT = textwrap.dedent(
    """
    import json, os, sys, torch
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[2], RANK="0",
                      WORLD_SIZE="1", LOCAL_RANK="0")
    import deepspeed
    config = json.load(open(sys.argv[1]))
    config["train_batch_size"] = config["train_micro_batch_size_per_gpu"]
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
    before = [p.detach().clone() for p in model.parameters()]
    deepspeed.init_distributed(dist_backend="gloo")
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(),
                                      config=config)
    x = torch.randn(config["train_batch_size"], 16)
    losses = []
    for _ in range(3):
        loss = engine(x).pow(2).mean()
        engine.backward(loss)
        engine.step()
        losses.append(float(loss))
    print(json.dumps({"stage": engine.zero_optimization_stage(), "losses": losses}))
    """
)


def _plan(tmp_path: Path, states: dict) -> Path:
    """A real plan of a tiny Llama, with every layer's state placement set to ``states``."""
    from memtrain.hardware import build_hardware
    from memtrain.planner import make_plan
    from memtrain.profile import profile_causal_lm
    from tests.profile.conftest import write_config

    profile = profile_causal_lm(str(write_config(tmp_path, "llama")), seq=16, batch=2)
    plan = make_plan(profile, build_hardware("h100-sxm-80g")).to_dict()
    for layer in plan["layers"]:
        layer.update({"params": "gpu", "grads": "gpu", "optimizer": "gpu", **states})
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(plan))
    return path


@pytest.mark.parametrize(
    "states, stage",
    [
        ({"grads": "cpu", "optimizer": "cpu"}, 2),
        ({"params": "cpu", "grads": "cpu", "optimizer": "cpu"}, 3),
    ],
)
def test_generated_config_trains(tmp_path, capsys, states, stage):
    config = tmp_path / "ds.json"
    code = main(
        [
            "export-deepspeed",
            str(_plan(tmp_path, states)),
            "--dtype",
            "fp32",
            "--lr",
            "0.01",
            "--out",
            str(config),
        ]
    )
    assert code == 0
    assert json.loads(config.read_text())["zero_optimization"]["stage"] == stage
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(config), str(29400 + stage)],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "DS_ACCELERATOR": "cpu"},
    )
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["stage"] == stage
    assert report["losses"][-1] < report["losses"][0]
