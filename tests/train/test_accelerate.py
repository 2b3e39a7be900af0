"""memtrain.prepare() under `accelerate launch`: two CPU processes (DDP over gloo) train a tiny
Llama under a plan with examples/accelerate_train.py; and prepare() takes a wrapped model."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "accelerate_train.py"


def _port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_example_trains_in_two_processes_under_accelerate_launch(tmp_path):
    pytest.importorskip("accelerate")
    steps = 8
    # No accelerate config file: every setting is a flag (HF_HOME hides a user's default one).
    # `--cpu` alone starts one process unless mpirun is set up; `--multi_gpu` is accelerate's
    # torchrun launcher, and the script's Accelerator(cpu=True) makes it DDP over gloo.
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_port", str(_port()),
        str(EXAMPLE), "--cpu", "--tiny", "--steps", str(steps), "--out", str(tmp_path / "out"),
    ]  # fmt: skip
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    reports = [json.loads((tmp_path / "out" / f"rank{r}.json").read_text()) for r in (0, 1)]
    for rank, report in enumerate(reports):
        assert report["rank"] == rank and report["world_size"] == 2
        assert report["distributed_type"].endswith("MULTI_CPU")
        assert report["wrapped"] == "DistributedDataParallel"
        assert report["optimizer"] == "GaLoreAdamW" and report["plan_moves"]
        assert len(report["local_losses"]) == steps
    a, b = reports
    # Each process read its own batches, so their own losses differ; the averaged loss and the
    # weights (DDP averages gradients) are the same on both, and the loss went down.
    assert a["first_tokens"] != b["first_tokens"]
    assert a["local_losses"] != b["local_losses"]
    assert a["mean_losses"] == b["mean_losses"]
    assert a["param_checksum"] == b["param_checksum"]
    assert a["mean_losses"][-1] < a["mean_losses"][0]


def test_prepare_accepts_a_wrapped_model():
    import memtrain
    from tests.train.test_hf_trainer import _model

    model = _model()
    wrapped = torch.nn.DataParallel(model)  # stands for DDP / accelerator.prepare's wrapper
    prepared = memtrain.prepare(
        wrapped, seq=16, batch=1, optimizer="adamw", gpu_budget_fraction=0.7
    )
    try:
        assert prepared.model is model
        assert hasattr(model, "_memtrain_stock_forward")  # the fused loss is on the inner model
        ids = torch.randint(0, 256, (1, 16))
        loss = wrapped(input_ids=ids, labels=ids).loss
        loss.backward()
        prepared.optimizer.step()
    finally:
        prepared.remove()
    assert not hasattr(model, "_memtrain_stock_forward")
