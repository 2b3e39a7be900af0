"""Planning one GPU of a multi-GPU run: ZeRO sharding, Ulysses sequence parallelism, the CLI,
the 8-GPU 1M-token recipe and the DeepSpeed config of a multi-GPU plan."""

from __future__ import annotations

import io
import json
from dataclasses import replace
from pathlib import Path

import pytest
from rich.console import Console

from memtrain.cli import main
from memtrain.errors import ConfigError, MemtrainError
from memtrain.hardware import load_hardware
from memtrain.offload import deepspeed_config
from memtrain.planner import Plan
from memtrain.planner.distributed import (
    AttentionShape,
    Parallelism,
    all_to_all_bytes,
    attention_shape,
    comm_buffer_bytes,
    per_rank_hardware,
    per_rank_profile,
    plan_per_rank,
)
from memtrain.profile import profile_causal_lm
from memtrain.train import load_recipe, run_recipe
from memtrain.train.recipe import validate
from tests.planner.helpers import write_tiny_llama

RECIPE = Path(__file__).resolve().parents[2] / "recipes" / "llama-7b-1m-8gpu.yaml"
SEQ = 256


def ceil_div(value: int, by: int) -> int:
    return -(-value // by)


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory) -> str:
    return write_tiny_llama(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def whole(tiny_path):
    """The single-GPU (whole-step) dry-run profile of a tiny Llama."""
    return profile_causal_lm(tiny_path, seq=SEQ, dtype="bf16", target="h100-sxm-80g")


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_zero_stages_divide_state_bytes_exactly(whole, stage):
    parallelism = Parallelism(world_size=4, zero_stage=stage, master_weights=False)
    rank = per_rank_profile(whole, parallelism)
    for full, part in zip(whole.layers, rank.layers, strict=True):
        assert part.optimizer_state_bytes == (
            ceil_div(full.optimizer_state_bytes, 4) if stage >= 1 else full.optimizer_state_bytes
        )
        assert part.grad_bytes == (ceil_div(full.grad_bytes, 4) if stage >= 2 else full.grad_bytes)
        assert part.param_bytes == (
            ceil_div(full.param_bytes, 4) if stage >= 3 else full.param_bytes
        )
        assert part.saved_tensors == full.saved_tensors  # no sequence parallelism: same tokens
        assert part.saved_bytes == full.saved_bytes
    assert rank.seq == SEQ
    assert rank.param_bytes == sum(layer.param_bytes for layer in rank.layers)
    assert rank.optimizer_state_bytes == sum(x.optimizer_state_bytes for x in rank.layers)
    assert rank.timeline == [] and rank.simulated_peak_bytes is None
    assert any("one rank of 4 GPU(s)" in note for note in rank.notes)
    expected_comm = {0: 0, 1: 0}.get(stage)
    if expected_comm is None:
        grads = max(x.grad_bytes for x in whole.layers)
        params = max(x.param_bytes for x in whole.layers)
        expected_comm = grads if stage == 2 else 2 * params + grads
    assert comm_buffer_bytes(whole, parallelism) == expected_comm


def test_master_weights_are_fp32_and_sharded(whole):
    rank = per_rank_profile(whole, Parallelism(world_size=4, zero_stage=1))
    for full, part in zip(whole.layers, rank.layers, strict=True):
        if full.grad_bytes:
            # bf16 moments become fp32 (x2) and an fp32 weight copy (2 x bf16 bytes) joins them.
            expected = ceil_div(2 * full.optimizer_state_bytes + 2 * full.param_bytes, 4)
            assert part.optimizer_state_bytes == expected
        assert part.param_bytes == full.param_bytes and part.grad_bytes == full.grad_bytes


def test_single_gpu_is_the_identity(whole):
    assert per_rank_profile(whole, Parallelism()) is whole


def test_sequence_parallel_divides_token_bytes_and_times(whole, tiny_path):
    parallelism = Parallelism(world_size=2, sequence_parallel=2, master_weights=False)
    attention = attention_shape(tiny_path)
    assert attention == AttentionShape(heads=4, kv_heads=2, head_dim=16)
    rank = per_rank_profile(whole, parallelism, attention)
    assert rank.seq == SEQ // 2
    bandwidth = parallelism.bandwidth(whole.target)
    assert bandwidth == 300e9  # the H100 preset's interconnect
    for full, part in zip(whole.layers, rank.layers, strict=True):
        assert part.param_bytes == full.param_bytes  # ZeRO stage 0: states replicated
        for a, b in zip(full.saved_tensors, part.saved_tensors, strict=True):
            if a.token_dim is None:
                assert b == a
            else:
                assert b.nbytes == ceil_div(a.nbytes, 2)
                assert b.shape[a.token_dim] == ceil_div(a.shape[a.token_dim], 2)
        assert part.token_scaled_saved_bytes == sum(
            ceil_div(t.nbytes, 2) for t in full.saved_tensors if t.token_dim is not None
        )
        assert part.input_bytes == ceil_div(full.input_bytes, 2)
        assert part.output_bytes == ceil_div(full.output_bytes, 2)
        assert part.forward_transient_bytes == ceil_div(full.forward_transient_bytes, 2)
        assert part.backward_transient_bytes == ceil_div(full.backward_transient_bytes, 2)
        assert part.forward_flops == pytest.approx(full.forward_flops / 2)
        a2a = all_to_all_bytes(full, whole, parallelism, attention) / bandwidth
        if full.kind == "block":
            # q (4 heads), k, v (2 heads each) and the output (4 heads) of 128 tokens, half sent.
            assert a2a * bandwidth == pytest.approx(128 * 16 * (2 * 4 + 2 * 2) * 2 / 2)
            assert part.attention_forward_time_s == pytest.approx(
                full.attention_forward_time_s / 2 + a2a
            )
        else:
            assert a2a == 0
        assert part.forward_time_s == pytest.approx(full.forward_time_s / 2 + a2a)
        all_reduce = 2 * 0.5 * full.grad_bytes / bandwidth
        assert part.backward_time_s == pytest.approx(
            a2a + max(full.backward_time_s / 2, all_reduce)
        )


def test_fewer_kv_heads_than_ranks_are_replicated(whole, tiny_path):
    parallelism = Parallelism(world_size=4, sequence_parallel=4)
    rank = per_rank_profile(whole, parallelism, attention_shape(tiny_path))
    blocks = [layer for layer in rank.layers if layer.kind == "block"]
    for layer in blocks:
        extra = [t for t in layer.saved_tensors if t.op == "ulysses_kv_replication"]
        # k and v: one whole head of every token per rank instead of 2/4 of a head.
        assert [t.nbytes for t in extra] == [2 * (SEQ * 16 * 2) // 2]
    assert not any(
        t.op == "ulysses_kv_replication"
        for layer in rank.layers
        if layer.kind != "block"
        for t in layer.saved_tensors
    )


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"world_size": 8, "sequence_parallel": 3}, "must divide the world size 8"),
        ({"world_size": 0}, "world_size must be at least 1"),
        ({"zero_stage": 4}, "zero_stage must be 0, 1, 2 or 3"),
        ({"sequence_parallel": 0}, "sequence_parallel must be at least 1"),
        ({"world_size": 2.0}, "world_size must be an integer"),
        ({"interconnect_bandwidth": 0}, "must be positive"),
        ({"engine": "megatron"}, "engine must be one of zero, fsdp"),
        ({"world_size": 2, "zero_stage": 2, "engine": "fsdp"}, "the fsdp engine shards"),
        ({"world_size": 2, "zero_stage": 3, "sequence_parallel": 2, "engine": "fsdp"}, "fsdp"),
    ],
)
def test_bad_parallelism_is_refused(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        Parallelism(**kwargs)


def test_model_and_sequence_checks(whole, tiny_path):
    parallelism = Parallelism(world_size=8, sequence_parallel=8)
    with pytest.raises(ConfigError, match="not divisible by the sequence parallel degree 8"):
        parallelism.check(seq=1001)
    with pytest.raises(ConfigError, match="4 attention heads are not divisible"):
        per_rank_profile(whole, parallelism, attention_shape(tiny_path))
    with pytest.raises(ConfigError, match="3 key/value heads"):
        Parallelism(world_size=2, sequence_parallel=2).check(256, AttentionShape(12, 3, 64))
    Parallelism(world_size=8, sequence_parallel=8).check(256, AttentionShape(32, 4, 128))
    rank = per_rank_profile(whole, Parallelism(world_size=2, zero_stage=3))
    with pytest.raises(MemtrainError, match="already one rank's view"):
        per_rank_profile(rank, Parallelism(world_size=2, zero_stage=3))


def test_unknown_heads_size_the_exchange_by_activations(whole):
    """A profile whose model cannot be read (here: named after its config's folder) still
    plans: the all-to-all is four activations of the layer's output size."""
    parallelism = Parallelism(world_size=2, sequence_parallel=2)
    rank = per_rank_profile(whole, parallelism)
    assert any("model heads unknown" in note for note in rank.notes)
    block = whole.layers[1]
    assert all_to_all_bytes(block, whole, parallelism, None) == 4 * block.output_bytes / 2 / 2


def test_plan_per_rank_reserves_zero_buffers(whole):
    parallelism = Parallelism(world_size=4, zero_stage=3, sequence_parallel=2)
    hardware = load_hardware("h100-sxm-80g", gpu_budget="2GiB", cpu="4GiB")
    comm = comm_buffer_bytes(whole, parallelism)
    shared = per_rank_hardware(hardware, parallelism, comm)
    assert shared.gpu_reserved_bytes == hardware.gpu_reserved_bytes + comm
    assert shared.cpu_optimizer_bandwidth == pytest.approx(hardware.cpu_optimizer_bandwidth / 4)
    plan, _ = plan_per_rank([("tiny", whole)], hardware, parallelism)
    split = plan.parallelism
    assert split["world_size"] == 4 and split["zero_stage"] == 3
    assert split["sequence_parallel"] == 2 and split["data_parallel"] == 2
    assert split["seq"] == SEQ and split["seq_per_rank"] == plan.seq == SEQ // 2
    assert split["comm_buffer_bytes"] == comm
    assert split["gpu_peak_bytes"] == plan.predicted["peak_bytes"]["gpu"] + comm
    assert split["global_tokens_per_step"] == SEQ * 2
    assert plan.hardware["usable_bytes"]["gpu"] == int(shared.usable("gpu"))
    again = Plan.from_dict(json.loads(json.dumps(plan.to_dict())))
    assert again.parallelism == json.loads(json.dumps(split))


def test_plan_cli_flags_json(tiny_path, capsys):
    code = main(
        ["plan", "--model", tiny_path, "--seq", str(SEQ), "--world-size", "4"]
        + ["--zero-stage", "2", "--sequence-parallel", "2", "--chunks", "1", "--json"]
    )
    assert code == 0
    data = json.loads(capsys.readouterr().out)
    split = data["parallelism"]
    assert (split["world_size"], split["zero_stage"], split["sequence_parallel"]) == (4, 2, 2)
    assert split["per_gpu"] and data["seq"] == SEQ // 2 and split["seq"] == SEQ
    assert split["master_weights"] is True
    assert any("per GPU" in note for note in data["notes"])
    # Tables say they are per GPU and name the world size.
    assert main(["plan", "--model", tiny_path, "--seq", str(SEQ), "--world-size", "2"]) == 0
    assert "per GPU: one rank of 2" in capsys.readouterr().out
    code = main(["plan", "--model", tiny_path, "--world-size", "4", "--sequence-parallel", "3"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "must divide the world size" in err


def _plan_file(tmp_path, whole, parallelism, **hardware) -> Path:
    hw = load_hardware("h100-sxm-80g", **hardware)
    plan, _ = plan_per_rank([("tiny", whole)], hw, parallelism)
    path = tmp_path / "plan.yaml"
    plan.save(path)
    return path


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_export_deepspeed_keeps_the_planned_stage(tmp_path, whole, stage, capsys):
    path = _plan_file(
        tmp_path, whole, Parallelism(world_size=8, zero_stage=stage, sequence_parallel=2)
    )
    config = deepspeed_config(path, gradient_accumulation_steps=3)
    zero = config["zero_optimization"]
    assert zero["stage"] == stage
    assert config["train_micro_batch_size_per_gpu"] == 1
    assert config["train_batch_size"] == 1 * 3 * 4  # four data-parallel groups of two ranks
    assert config["sequence_parallel_size"] == 2
    bucket = Plan.load(path).parallelism["largest_layer_params"]
    assert bucket == max(layer.param_bytes for layer in whole.layers) // 2
    assert zero.get("reduce_bucket_size") == (bucket if stage >= 2 else None)
    assert zero.get("stage3_prefetch_bucket_size") == (bucket if stage == 3 else None)
    assert main(["export-deepspeed", str(path)]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["zero_optimization"]["stage"] == stage
    assert "multi-GPU plan" in captured.err


def test_export_deepspeed_single_gpu_plan_unchanged(tmp_path, whole):
    from memtrain.planner import make_plan

    plan = make_plan(whole, load_hardware("h100-sxm-80g"))
    config = deepspeed_config(plan)
    assert config["zero_optimization"]["stage"] == 1
    assert "train_batch_size" not in config and "sequence_parallel_size" not in config


def test_export_deepspeed_offload_raises_the_stage(tmp_path, whole):
    plan, _ = plan_per_rank(
        [("tiny", whole)],
        load_hardware("h100-sxm-80g"),
        Parallelism(world_size=2, zero_stage=1),
    )
    for layer in plan.layers:
        if layer.params == "gpu" and layer.optimizer == "gpu":
            layer.grads = layer.optimizer = "cpu"
    config = deepspeed_config(plan)
    assert config["zero_optimization"]["stage"] == 2
    assert config["zero_optimization"]["offload_optimizer"]["device"] == "cpu"


def test_recipe_dry_run_keys():
    recipe = validate({"dry_run": {"model": "gpt2", "only": True, "world_size": 2}})
    assert recipe.dry_run.world_size == 2 and recipe.dry_run.zero_stage == 0
    assert recipe.dry_run.sequence_parallel == 1
    with pytest.raises(ConfigError, match="exactly one of preset"):
        validate({"dry_run": {"model": "gpt2"}})  # training needs a model unless dry-run only
    with pytest.raises(ConfigError, match="dry_run.world_size must be positive"):
        validate({"dry_run": {"model": "gpt2", "only": True, "world_size": 0}})
    fsdp = validate({"dry_run": {"model": "gpt2", "only": True, "world_size": 2, "engine": "fsdp"}})
    assert fsdp.dry_run.engine == "fsdp"
    with pytest.raises(ConfigError, match="dry_run.engine"):
        validate({"dry_run": {"model": "gpt2", "only": True, "engine": "megatron"}})


def test_llama2_7b_preset():
    shape = attention_shape("llama-2-7b")
    assert shape == AttentionShape(heads=32, kv_heads=32, head_dim=128)
    result = profile_causal_lm("llama-2-7b", seq=256, dtype="bf16", device="meta")
    assert result.param_count == pytest.approx(6.74e9, rel=0.01)


def test_7b_1m_tokens_8_gpus_recipe(tmp_path):
    """The shipped recipe: Llama-2-7B, 1,048,576 tokens, 8 H100 80GB, ZeRO-3 + 8-way Ulysses
    fits each GPU; the run stops after the dry run and the plan exports a ZeRO-3 config."""
    out = tmp_path / "plan.yaml"
    recipe = load_recipe(RECIPE, [f"dry_run.out={out}"])
    text = io.StringIO()
    summary = run_recipe(recipe, console=Console(file=text, width=200), progress=False)
    assert "train" not in summary
    dry = summary["dry_run"]
    assert dry["per_gpu"] and dry["predicted"]["feasible"]
    split = dry["parallelism"]
    assert split["world_size"] == 8 and split["zero_stage"] == 3
    assert split["seq"] == 1048576 and split["seq_per_rank"] == 131072
    assert split["gpu_peak_bytes"] < 80e9  # live bytes plus ZeRO buffers on each H100 80GB
    assert dry["predicted"]["peak_bytes"]["gpu"] <= dry["predicted"]["usable_bytes"]["gpu"]
    printed = text.getvalue()
    assert "per GPU of 8" in printed and "needs 8 GPUs" in printed
    config = deepspeed_config(out)
    assert config["zero_optimization"]["stage"] == 3
    assert config["sequence_parallel_size"] == 8 and config["train_batch_size"] == 1


def test_per_rank_profile_leaves_the_profile_alone(whole):
    before = whole.to_dict()
    parallelism = Parallelism(world_size=2, zero_stage=3, sequence_parallel=2)
    a = per_rank_profile(whole, parallelism)
    b = per_rank_profile(replace(whole), parallelism)
    assert whole.to_dict() == before
    assert a.to_dict() == b.to_dict()


def test_fsdp_engine_plans_each_ranks_rows_of_the_states(tiny_path, capsys):
    """The fsdp engine's per-rank plan holds what an FSDP2 rank measures (tests/optim/
    test_sharded.py checks the formula against the ranks): GaLore's projections are whole on
    every rank, so a rank keeps more than ZeRO's even division; AdamW's moments split by rows."""
    from memtrain.models import build_causal_lm, load_config
    from memtrain.optim.sharded_memory import layer_rank_state_bytes
    from memtrain.planner.pipeline import PlanRequest, plan_model

    meta = build_causal_lm(load_config(tiny_path), "bf16", "meta")
    for optimizer in ("galore:rank=8", "adamw"):
        profile = profile_causal_lm(tiny_path, seq=SEQ, dtype="bf16", optimizer=optimizer)
        fsdp = Parallelism(world_size=4, zero_stage=3, master_weights=False, engine="fsdp")
        rows = layer_rank_state_bytes(meta, optimizer, 4)
        rank = per_rank_profile(profile, fsdp, None, rows)
        even = per_rank_profile(profile, replace(fsdp, engine="zero"))
        assert [x.optimizer_state_bytes for x in rank.layers] == [
            rows.get(x.name, 0)
            for x in rank.layers  # the loss has no weights
        ]
        if optimizer == "adamw":
            assert rank.optimizer_state_bytes == pytest.approx(even.optimizer_state_bytes, rel=0.02)
        else:
            assert rank.optimizer_state_bytes > 1.2 * even.optimizer_state_bytes
    # The CLI plans it: ZeRO stage 3 and no fp32 master weights implied; the states fit on the
    # GPU, so they stay there.
    code = main(
        ["plan", "--model", tiny_path, "--seq", str(SEQ), "--world-size", "4", "--engine", "fsdp"]
        + ["--optimizer", "galore:rank=8", "--gpu-budget", "1GiB", "--cpu", "1GiB", "--json"]
    )
    assert code == 0
    data = json.loads(capsys.readouterr().out)
    split = data["parallelism"]
    assert split["engine"] == "fsdp" and split["zero_stage"] == 3
    assert split["master_weights"] is False
    assert all(layer["optimizer"] == layer["params"] == "gpu" for layer in data["layers"])
    assert any("launcher.kind=fsdp executes this per-rank plan" in n for n in data["notes"])
    planned = plan_model(
        tiny_path,
        PlanRequest(seq=SEQ, optimizers=("galore:rank=8",), dtype="bf16", parallelism=fsdp),
    )
    assert planned.plan.parallelism["engine"] == "fsdp"


def test_fsdp_buffers_hold_the_root_and_two_blocks_at_any_world_size(whole):
    """FSDP2 keeps the root unit's parameters gathered through the step, two blocks' (current and
    prefetched) and one block's full gradients, whatever the world size: one rank included."""
    blocks = [layer for layer in whole.layers if layer.kind == "block"]
    root = sum(layer.param_bytes for layer in whole.layers if layer.kind != "block")
    expected = root + 2 * blocks[0].param_bytes + blocks[0].grad_bytes
    for world in (1, 4):
        fsdp = Parallelism(world_size=world, zero_stage=3, master_weights=False, engine="fsdp")
        assert comm_buffer_bytes(whole, fsdp) == expected
    assert comm_buffer_bytes(whole, Parallelism(zero_stage=3, master_weights=False)) == 0


def test_fsdp_engine_offloads_whole_blocks_and_counts_no_master_copy():
    """A rank whose GPU cannot hold every block's states puts whole blocks on the host, as
    FSDP2's CPUOffloadPolicy runs them: parameters, gradients and optimizer states together, the
    host holding the rank's rows of each in the model's dtype (no float32 masters). DeepSpeed
    (the zero engine) keeps fp32 masters of a 16-bit model, and its per-rank states already
    hold them: its host counts them once."""
    from memtrain.hardware.request import HardwareRequest
    from memtrain.models import build_causal_lm, load_config
    from memtrain.optim.sharded_memory import layer_rank_state_bytes
    from memtrain.planner.pipeline import PlanRequest, plan_model

    def plan_for(engine: str):
        split = Parallelism.of_engine(engine, world_size=2, zero_stage=3)
        request = PlanRequest(
            seq=2048,
            optimizers=("adamw",),
            dtype="bf16",
            parallelism=split,
            hardware=HardwareRequest("h100-sxm-80g", "6GiB", "64GiB"),
        )
        planned = plan_model("llama-3.2-1b", request)
        rows = None
        if engine == "fsdp":  # each rank's rows of the states (memtrain.optim.sharded_memory)
            meta = build_causal_lm(load_config("llama-3.2-1b"), "bf16", "meta")
            rows = layer_rank_state_bytes(meta, "adamw", 2)
        rank = per_rank_profile(planned.profile, split, None, rows)
        layers = {layer.name: layer for layer in rank.layers}
        return planned.plan, layers

    plan, layers = plan_for("fsdp")
    placed = {(x.params, x.grads, x.optimizer) for x in plan.layers}
    assert placed == {("gpu",) * 3, ("cpu",) * 3}
    host = [x.name for x in plan.layers if x.optimizer == "cpu"]
    assert host and all(name.startswith("block.") for name in host)
    assert plan.predicted["host_resident_bytes"] == {
        "params": sum(layers[n].param_bytes for n in host),
        "grads": sum(layers[n].grad_bytes for n in host),
        "optimizer": sum(layers[n].optimizer_state_bytes for n in host),  # bf16 moments
    }
    assert plan.predicted["peak_bytes"]["cpu"] >= sum(
        plan.predicted["host_resident_bytes"].values()
    )

    plan, layers = plan_for("zero")
    host = [x.name for x in plan.layers if x.optimizer == "cpu"]
    assert host
    # fp32 master and moments: 12 bytes a parameter, once
    states = sum(layers[n].optimizer_state_bytes for n in host)
    assert states == pytest.approx(6 * sum(layers[n].param_bytes for n in host), rel=1e-6)
    assert plan.predicted["host_resident_bytes"]["optimizer"] == states
