"""The 24 GB Llama-3.1-8B GaLore recipe, shrunk to a tiny Llama on the CPU through overrides:
GaLore on every weight, steps inside backward, fused loss, plan; and train.gpu_memory_limit."""

from __future__ import annotations

import io
from dataclasses import asdict, replace
from pathlib import Path

import pytest
import torch
import yaml
from rich.console import Console

from memtrain.errors import ConfigError, MemtrainError
from memtrain.models import build_causal_lm, load_config
from memtrain.train import load_recipe, run_recipe
from memtrain.train.prepare import prepare
from memtrain.train.recipe import PlanSection
from memtrain.train.runner import gpu_memory_limit

RECIPE = Path(__file__).resolve().parents[2] / "recipes" / "llama-8b-galore-24gb.yaml"
TINY = (
    "{hidden_size: 64, intermediate_size: 128, num_hidden_layers: 2, num_attention_heads: 4, "
    "num_key_value_heads: 2, head_dim: 16, vocab_size: 256}"
)


def _overrides(out_dir: Path) -> list[str]:
    return [
        "dry_run=null",  # the 8B dry run is the CLI check; here only the training path
        f"model.overrides={TINY}",
        "data.seq=64",
        "optimizer.options.rank=8",
        "optimizer.options.update_proj_gap=2",
        "schedule.steps=3",
        "schedule.warmup=1",
        "train.device=cpu",
        "train.threads=1",
        "train.log_every=1",
        "train.checkpoint_every=0",
        f"train.out_dir={out_dir}",
    ]


def test_recipe_settings_run_on_a_tiny_llama(tmp_path):
    shipped = load_recipe(RECIPE)
    assert shipped.train.step_in_backward and shipped.plan.fused_loss
    assert shipped.optimizer.name == "galore" and shipped.schedule.grad_clip == 0
    recipe = load_recipe(RECIPE, _overrides(tmp_path / "run"))
    for section in ("optimizer", "plan"):  # the shipped settings, at tiny sizes
        kept = {k: v for k, v in asdict(getattr(shipped, section)).items() if k != "options"}
        assert {k: getattr(getattr(recipe, section), k) for k in kept} == kept
    assert recipe.optimizer.options["targets"] == shipped.optimizer.options["targets"]
    text = io.StringIO()
    summary = run_recipe(recipe, console=Console(file=text, width=200), progress=False)

    train = summary["train"]
    assert train["steps_run"] == 3
    memory = train["memory"]
    assert memory["step_in_backward"] is True
    assert memory["predicted_gpu_peak_bytes"] > 0
    assert memory["measured_gpu_peak_bytes"] is None  # no device allocator on the CPU
    assert memory["gpu_memory_limit_bytes"] == 24 * 10**9
    assert memory["gpu_memory_limit_enforced"] is False
    printed = text.getvalue()
    assert "predicted GPU peak (plan)" in printed and "measured GPU peak" in printed
    assert "n/a on cpu" in printed and "(not enforced)" in printed
    assert "is not enforced on cpu" in printed  # the prepared report's note

    plan = yaml.safe_load((tmp_path / "run" / "plan.yaml").read_text())
    assert plan["step_in_backward"] is True and plan["fused_loss"] is True
    assert all(layer[k] == "gpu" for layer in plan["layers"] for k in ("grads", "optimizer"))
    # the plan's resident bytes: weights and states, no gradients
    config = load_config("llama-3.1-8b")
    for key, value in yaml.safe_load("x: " + TINY)["x"].items():
        setattr(config, key, value)
    meta = build_causal_lm(config, "bf16", "meta")
    weights = sum(p.numel() * p.element_size() for p in meta.parameters())
    resident = plan["predicted"]["gpu_resident_bytes"]
    assert resident["grads"] == 0
    assert resident["params"] == weights
    assert 0 < resident["optimizer"] < 2 * weights  # GaLore: below Adam's two moments


def test_gpu_memory_limit_caps_the_plan_and_is_noted_on_cpu():
    plan = PlanSection(gpu_budget=None, enabled=True, hardware="h100-sxm-80g")
    out = gpu_memory_limit("24GiB", plan, torch.device("cpu"))
    assert out["bytes"] == 24 * 2**30 and out["plan_gpu_budget"] == 24 * 2**30
    assert not out["enforced"]
    assert any("not enforced on cpu" in note for note in out["notes"])
    rtx = PlanSection(gpu_budget=None, enabled=True, hardware="rtx-4090")
    assert gpu_memory_limit("24GB", rtx, torch.device("cpu"))["plan_gpu_budget"] is None
    assert gpu_memory_limit(None, rtx, torch.device("cpu"))["bytes"] is None
    with pytest.raises(ConfigError, match="more than train.gpu_memory_limit"):
        gpu_memory_limit("20GB", replace(rtx, gpu_budget="22GB"), torch.device("cpu"))


def test_step_in_backward_refuses_states_off_the_gpu():
    config = load_config("llama-3.1-8b")
    model = build_causal_lm(config, "bf16", "meta")
    with pytest.raises(MemtrainError, match="state_offload=False"):
        prepare(model, seq=64, optimizer="adamw", step_in_backward=True, state_offload=True)
