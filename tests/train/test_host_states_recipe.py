"""The 16 GiB Llama-3.1-8B recipe: its dry run (the real 8B model on meta tensors) fits the GPU
cap with AdamW states on the host and block weights streamed, and the same recipe, shrunk
through overrides, trains on the CPU with the overlapped host step."""

from __future__ import annotations

import io
from pathlib import Path

import yaml
from rich.console import Console

from memtrain.train import load_recipe, run_recipe
from memtrain.train.dry_run import dry_run_plan

RECIPE = Path(__file__).resolve().parents[2] / "recipes" / "llama-8b-16gb-host-states.yaml"
GiB = 2**30


def test_dry_run_fits_16_gib_with_states_on_the_host_and_blocks_streamed(tmp_path):
    recipe = load_recipe(RECIPE, [f"dry_run.out={tmp_path / 'plan.yaml'}"])
    figures = dry_run_plan(recipe.dry_run, Console(file=io.StringIO()))
    plan = yaml.safe_load((tmp_path / "plan.yaml").read_text())
    gpu = plan["predicted"]["peak_bytes"]["gpu"]
    assert gpu <= 16 * GiB and gpu <= plan["hardware"]["capacity_bytes"]["gpu"]
    blocks = [layer for layer in plan["layers"] if layer["kind"] == "block"]
    streamed = [layer for layer in blocks if layer["params"] == "cpu"]
    assert len(streamed) >= len(blocks) // 2  # 8B bf16 weights alone are 15 GiB
    assert all(layer["optimizer"] == "cpu" for layer in streamed)
    assert plan["predicted"]["peak_bytes"]["cpu"] <= 200 * GiB
    assert figures["seq"] == 4096


def test_recipe_trains_a_tiny_llama_with_the_overlapped_host_step(tmp_path):
    tiny = (
        "{hidden_size: 64, intermediate_size: 128, num_hidden_layers: 2, "
        "num_attention_heads: 4, num_key_value_heads: 2, head_dim: 16, vocab_size: 256}"
    )
    recipe = load_recipe(
        RECIPE,
        [
            "dry_run=null",
            f"model.overrides={tiny}",
            "data.seq=64",
            "schedule.steps=3",
            "schedule.warmup=1",
            "schedule.grad_clip=0",
            "plan.gpu_budget_fraction=0.5",
            "train.device=cpu",
            "train.gpu_memory_limit=null",
            "train.threads=1",
            "train.overlap_host_step=true",
            f"train.out_dir={tmp_path / 'run'}",
        ],
    )
    summary = run_recipe(recipe, console=Console(file=io.StringIO()), progress=False)
    assert summary["train"]["steps_run"] == 3
    plan = yaml.safe_load((tmp_path / "run" / "plan.yaml").read_text())
    assert any(layer["optimizer"] == "cpu" for layer in plan["layers"])
