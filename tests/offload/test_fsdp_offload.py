"""FSDP2 sharding as a plan says (memtrain.offload.shard_as_planned): blocks whose model states
the plan puts on the host get FSDP2's CPU offload, and training is unchanged by it (2 gloo ranks
on the CPU, where host and device are one memory: the offloaded path runs, the numbers must be
the same bit for bit). Placements FSDP2 cannot run are refused in one line."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from memtrain.errors import MemtrainError
from memtrain.offload.fsdp import host_blocks

GPU = {"params": "gpu", "grads": "gpu", "optimizer": "gpu"}
HOST = {"params": "cpu", "grads": "cpu", "optimizer": "cpu"}


def _plan(**placed: dict[str, str]) -> dict:
    names = ["embed", "block.0", "block.1", "norm", "lm_head"]
    return {"layers": [{"name": n, **placed.get(n.replace(".", ""), GPU)} for n in names]}


def test_only_whole_blocks_on_the_cpu_are_run():
    assert host_blocks(_plan()) == []
    assert host_blocks(_plan(block1=HOST)) == ["block.1"]
    split = {"params": "gpu", "grads": "cpu", "optimizer": "cpu"}  # memtrain's host step
    with pytest.raises(MemtrainError, match="moves a block's three to the CPU together") as err:
        host_blocks(_plan(block0=split))
    assert len(str(err.value).splitlines()) == 1
    with pytest.raises(MemtrainError, match="optimizer states on nvme"):
        host_blocks(_plan(block0={**HOST, "optimizer": "nvme"}))


def _model():
    from tests.optim.reference import tiny_llama

    return tiny_llama(vocab_size=311, hidden_size=64, intermediate_size=160, head_dim=16)


def _worker(rank: int, world: int, init: str, out: str) -> None:
    import torch.distributed as dist

    from memtrain.offload.fsdp import shard_as_planned
    from memtrain.optim import build_optimizer
    from memtrain.optim.memory import parse_optimizer_spec
    from memtrain.optim.sharded import full, step_sharded

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
    gen = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, 311, (2, 24), generator=gen) for _ in range(3)]
    results = {}
    try:
        for label, plan in (("gpu", _plan()), ("host", _plan(block1=HOST))):
            model = _model()
            offloaded = shard_as_planned(model, plan)
            policies = [
                type(block._get_fsdp_state()._fsdp_param_group.offload_policy).__name__
                for block in model.model.layers
            ]
            spec = parse_optimizer_spec("galore:rank=8,update_proj_gap=2")
            optimizer = build_optimizer(model, spec, lr=1e-2)
            for ids in batches:
                model(input_ids=ids, labels=ids).loss.backward()
                step_sharded(optimizer, spec.name)
                optimizer.zero_grad(set_to_none=True)
            weights = {k: full(v).detach().clone() for k, v in model.state_dict().items()}
            results[label] = {"offloaded": offloaded, "policies": policies, "weights": weights}
        if rank == 0:
            torch.save(results, os.path.join(out, "results.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_offloaded_blocks_train_exactly_as_resident_ones(tmp_path: Path):
    import torch.multiprocessing as mp

    pytest.importorskip("transformers")
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    results = torch.load(tmp_path / "results.pt", weights_only=False)
    assert results["gpu"]["offloaded"] == [] and results["host"]["offloaded"] == ["block.1"]
    assert results["gpu"]["policies"] == ["OffloadPolicy", "OffloadPolicy"]
    assert results["host"]["policies"] == ["OffloadPolicy", "CPUOffloadPolicy"]
    resident, offloaded = results["gpu"]["weights"], results["host"]["weights"]
    moved = max(float((resident[k] - _model().state_dict()[k]).abs().max()) for k in resident)
    assert moved > 1e-3  # the steps did move the weights
    for key in resident:
        assert torch.equal(resident[key], offloaded[key]), key


def test_adam_on_host_shards_takes_the_fused_kernel_unless_the_spec_picks_one():
    from memtrain.optim.memory import parse_optimizer_spec
    from memtrain.train.fsdp_step import host_step_spec

    def options(text: str, on_host: bool = True) -> dict:
        return host_step_spec(parse_optimizer_spec(text), on_host).options

    assert options("adamw") == {"fused": True}
    assert options("adam:eps=1e-6")["fused"] is True
    assert options("adamw", on_host=False) == {}
    assert options("adamw:foreach=false") == {"foreach": False}
    assert "fused" not in options("galore:rank=8")


@pytest.mark.parametrize("max_norm", [0.5, 100.0])
def test_clipping_scales_only_over_the_limit_and_equals_torch(max_norm):
    from memtrain.train.fsdp_step import clip_when_needed

    gen = torch.Generator().manual_seed(0)
    ours = [torch.nn.Parameter(torch.randn(30, 7, generator=gen)) for _ in range(3)]
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    for a, b in zip(ours, theirs, strict=True):
        a.grad = torch.randn(a.shape, generator=gen)
        b.grad = a.grad.clone()
    before = [p.grad for p in ours]
    norm = clip_when_needed(ours, max_norm)
    expected = torch.nn.utils.clip_grad_norm_(theirs, max_norm)
    assert norm == pytest.approx(float(expected), rel=1e-6)
    for a, b in zip(ours, theirs, strict=True):
        assert torch.equal(a.grad, b.grad)
    assert all(a is b for a, b in zip(before, [p.grad for p in ours], strict=True))
