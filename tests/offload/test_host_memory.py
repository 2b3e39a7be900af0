"""The planner's predicted host peak against what the executor allocates on the host.

One source of truth (memtrain.planner.hostmem): the activation pools as memtrain.offload.apply
sizes them, the host optimizer's float32 masters, gradient buffers in the parameters' dtype (or
an overlapped step's ring of slots), the largest parameter's float32 widening, and states. A small Llama
runs on the CPU under a plan that swaps and recomputes token-wise with host optimizer states,
and every host byte the executor allocated is counted; the 8B plans at 131k tokens are checked
dry (meta model) against the executor's sizing.
"""

from __future__ import annotations

import mmap

import pytest
import torch

from memtrain.errors import MemtrainError
from memtrain.hardware.tiers import load_hardware
from memtrain.kernels import patch_causal_lm_loss
from memtrain.models import build_causal_lm
from memtrain.models.build import causal_lm_layers
from memtrain.offload import apply
from memtrain.offload.modes import TokenwiseRecompute
from memtrain.offload.optimizer import offload_optimizer
from memtrain.planner import hostmem
from memtrain.planner.evaluate import LayerDecision, evaluate, keep_all
from memtrain.planner.plan import _layer_entry
from memtrain.planner.problem import build_problem
from tests.offload.conftest import dry_profile
from tests.tiny_models import tiny_config

TOLERANCE = 0.05
GiB = 2**30
CONFIG = tiny_config("llama", intermediate_size=256, num_hidden_layers=4)
SEQ = 256

# blocks: stored tokens swapped, the rest recomputed token-wise from an input on the host, the
# attention output of every token on the host; optimizer states of two blocks on the host
BLOCKS = [
    {"anchor": {"cpu": 1.0}, "rest": {"cpu": 0.3, "rec": 0.7}, "checkpoint": {"cpu": 0.7},
     "states": "opt:cpu"},
    {"anchor": {"gpu": 0.5, "cpu": 0.5}, "rest": {"gpu": 0.2, "cpu": 0.4, "rec": 0.4},
     "checkpoint": {"cpu": 0.4}, "states": "opt:cpu"},
    {"anchor": {"cpu": 1.0}, "rest": {"rec": 1.0}, "checkpoint": {"cpu": 1.0}},
    {"anchor": {"gpu": 1.0}, "rest": {"gpu": 0.5, "cpu": 0.5}},
]  # fmt: skip


def _profile():
    return dry_profile(CONFIG, SEQ, "adamw")


def _largest(config):
    """Each layer's largest parameter, as memtrain.planner.pipeline gives the planner."""
    from memtrain.planner.pipeline import _largest_param_bytes

    return _largest_param_bytes(build_causal_lm(config, "bf16", "meta"), None)


def _installed(config, profile, problem, decisions, nvme_path: str | None = None):
    """The plan of ``decisions`` as a plan dict, and a bf16 CPU model with it installed (fused
    loss on): (plan, model, handle)."""
    plan = {
        "schema": "memtrain.plan",
        "seq": SEQ,
        "micro_batch": 1,
        "layers": [
            _layer_entry(layer, decision, 1).to_dict()
            for layer, decision in zip(problem.layers, decisions, strict=True)
        ],
    }
    if nvme_path is not None:
        plan["hardware"] = {"nvme_path": nvme_path}
    model = build_causal_lm(config, "bf16", "cpu", seed=0)
    model.train()
    patch_causal_lm_loss(model)
    return plan, model, apply(model, plan, profile=profile)


def test_the_executor_sizes_pools_as_the_planner_predicts(monkeypatch):
    """apply() maps each pool at hostmem.pool_bytes of its planned bytes: the number the
    planner charges."""
    from memtrain.offload import LayerPolicy, OffloadPolicy, apply
    from tests.offload.conftest import make_model

    policy = OffloadPolicy(
        {"block.0": LayerPolicy(keep=0.5, swap={"cpu": 0.5})}, host_bytes={"cpu": 123_457}
    )
    with apply(make_model("llama"), policy) as handle:
        assert handle.stats()["pools"]["cpu"]["capacity"] == hostmem.pool_bytes(123_457)


@pytest.mark.parametrize("overlap", [False, True], ids=["buffers", "overlapped-ring"])
def test_cpu_run_allocates_the_predicted_host_bytes(overlap):
    """Host gradients in the parameters' dtype (bf16 buffers, or the overlapped step's ring of
    slots for the largest parameter) plus the largest one's float32 widening for its step:
    the executor's host bytes are the planner's prediction and its allocation mirror's."""
    from dataclasses import replace

    from memtrain.offload.policy import optimizer_host_allocation, policy_from_plan

    config, profile = _profile()
    problem = build_problem(profile, fused_loss=True, largest_param_bytes=_largest(config))
    problem = replace(problem, overlap_host_step=overlap)
    blocks = iter(LayerDecision(**d) for d in BLOCKS)
    decisions = [next(blocks) if layer.kind == "block" else keep_all() for layer in problem.layers]
    evaluation = evaluate(problem, load_hardware("h100-sxm-80g", cpu="1TiB"), decisions)
    plan, model, handle = _installed(config, profile, problem, decisions)
    try:
        tokenwise = [n for n, m in handle._modes.items() if isinstance(m, TokenwiseRecompute)]
        assert len(tokenwise) >= 2
        optimizer = offload_optimizer(handle, torch.optim.AdamW, overlap=overlap, lr=1e-3)
        ids = torch.randint(
            2, config.vocab_size, (1, SEQ), generator=torch.Generator().manual_seed(0)
        )
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        pools = sum(pool.capacity for pool in handle.engine.pools.values())
        high_water = max(pool.high_water for pool in handle.engine.pools.values())
        host = optimizer.host_optimizer
        states = sum(
            v.numel() * v.element_size()
            for s in host.state.values()
            for v in s.values()
            if isinstance(v, torch.Tensor)
        )
        masters = sum(m.numel() * m.element_size() for m in optimizer.masters)
        grads = optimizer.grad_buffer_bytes() + optimizer.peak_transient_bytes
        largest = max(p.numel() for p in optimizer.host_params)
        mirror = optimizer_host_allocation(
            policy_from_plan(plan), handle.layers, profile.optimizer, overlap
        )
    finally:
        handle.remove()
    allocated = pools + masters + grads + states
    predicted = evaluation.peaks["cpu"]
    assert 0 < high_water <= pools
    assert masters > 0 and states > 0
    if overlap:  # the ring: GRAD_RING_SLOTS bf16 slots for the largest parameter, no buffers
        assert grads == (hostmem.GRAD_RING_SLOTS * 2 + 4) * largest
    else:  # a bf16 buffer per parameter: half the masters' bytes
        assert grads == masters // 2 + 4 * largest
    assert abs(allocated - predicted) <= TOLERANCE * predicted, (allocated, predicted)
    assert allocated <= predicted * (1 + 1e-3), (allocated, predicted)
    assert mirror["cpu"] == pytest.approx(masters + grads + states, rel=1e-3)


@pytest.mark.parametrize("cpu", ["56GiB", "84GiB", "128GiB"])
def test_8b_at_131k_host_allocation_is_the_prediction(cpu):
    from memtrain import HardwareRequest, PlanRequest, plan_model
    from memtrain.models import load_config
    from memtrain.offload.modes import resolve
    from memtrain.offload.policy import host_allocation, policy_from_plan
    from memtrain.planner import PlanOptions

    request = PlanRequest(
        seq=131072,
        hardware=HardwareRequest("h100-sxm-80g", cpu=cpu),
        options=PlanOptions(allow_param_offload=False),
    )
    planned = plan_model("llama-3.1-8b", request)
    policy = policy_from_plan(planned.plan)
    model = build_causal_lm(load_config("llama-3.1-8b"), "bf16", "meta")
    layers = {s.name: list(s.modules) for s in causal_lm_layers(model)}
    modes = {n: resolve(p, layers.get(n), n) for n, p in policy.layers.items() if n in layers}
    allocation = host_allocation(policy, planned.profile, modes, layers, planned.profile.optimizer)
    total = allocation["cpu"]["total"]
    predicted = planned.plan.predicted["peak_bytes"]["cpu"]
    budget = planned.plan.hardware["capacity_bytes"]["cpu"]
    assert abs(total - predicted) <= TOLERANCE * predicted, (cpu, total / GiB, predicted / GiB)
    assert total <= budget


def test_pool_that_cannot_be_mapped_is_one_line(monkeypatch):
    from memtrain.offload import pool as pool_module

    def fail(*_args, **_kwargs):
        raise OSError(12, "Cannot allocate memory")

    monkeypatch.setattr(pool_module.mmap, "mmap", fail)
    with pytest.raises(MemtrainError) as info:
        pool_module.HostPool(3 * GiB, name="cpu")
    message = str(info.value)
    assert "\n" not in message
    assert "cpu pool" in message and "GiB" in message
    assert "MemAvailable" in message and "locked-memory limit" in message
    assert "Cannot allocate memory" in message
    assert mmap.PAGESIZE > 0


def test_nvme_state_window_of_adjacent_layers():
    """NVMe states pass through host memory a few adjacent layers at a time: never all."""
    assert list(hostmem.nvme_state_window(0, 5)) == [0, 1]
    assert list(hostmem.nvme_state_window(2, 5)) == [1, 2, 3]
    assert list(hostmem.nvme_state_window(4, 5)) == [3, 4]
    assert hostmem.nvme_state_peak([0.0, 5.0, 5.0, 5.0, 5.0, 0.0]) == 15.0
    assert hostmem.nvme_state_peak([5.0, 0.0, 0.0, 5.0]) == 5.0  # never side by side
    assert hostmem.nvme_state_peak([]) == 0.0
    placed = hostmem.optimizer_host_bytes(
        {"params": "gpu", "grads": "cpu", "optimizer": "nvme"}, 800.0, 100, 200
    )
    # float32 masters and bf16 gradient buffers; states in files
    assert placed == {"cpu": 600.0, "nvme": 800.0}


def test_cpu_run_with_nvme_states_allocates_the_predicted_host_bytes(tmp_path):
    """States of every block on NVMe: the predicted CPU peak holds three adjacent blocks'
    states (not all of them), and the executor's host bytes at its peak are that."""
    from memtrain.offload.policy import optimizer_host_allocation, policy_from_plan

    config, profile = _profile()
    problem = build_problem(profile, fused_loss=True, largest_param_bytes=_largest(config))
    blocks = iter(LayerDecision(**{**d, "states": "opt:nvme"}) for d in BLOCKS)
    decisions = [next(blocks) if layer.kind == "block" else keep_all() for layer in problem.layers]
    hardware = load_hardware("h100-sxm-80g", cpu="1TiB", nvme=f"{tmp_path}:1TiB")
    evaluation = evaluate(problem, hardware, decisions)
    plan, model, handle = _installed(config, profile, problem, decisions, nvme_path=str(tmp_path))
    try:
        optimizer = offload_optimizer(handle, torch.optim.AdamW, lr=1e-3)
        assert optimizer.place == "nvme" and len(optimizer.layer_groups) == 4
        ids = torch.randint(
            2, config.vocab_size, (1, SEQ), generator=torch.Generator().manual_seed(0)
        )
        peaks = []
        for _ in range(2):  # the first step creates the states, the second reads them back
            optimizer.nvme.reset_peak()
            model(input_ids=ids, labels=ids).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            peaks.append(optimizer.nvme.peak_bytes)
        pools = sum(pool.capacity for pool in handle.engine.pools.values())
        masters = sum(m.numel() * m.element_size() for m in optimizer.masters)
        masters += optimizer.grad_buffer_bytes() + optimizer.peak_transient_bytes
        on_disk = sum(f.stat().st_size for f in optimizer.state_files())
        mirror = optimizer_host_allocation(policy_from_plan(plan), handle.layers, profile.optimizer)
    finally:
        handle.remove()
    per_block = on_disk / 4
    window = 3 * per_block  # what the planner charges: three adjacent blocks
    # how many are resident at once depends on how fast the writes behind finish
    assert per_block < max(peaks) <= window
    bound = pools + masters + window
    before = pools + masters + on_disk  # every state read into host memory for the step
    predicted = evaluation.peaks["cpu"]
    assert predicted < before - 0.8 * per_block  # less the step's widened gradient
    assert abs(bound - predicted) <= TOLERANCE * predicted, (bound, predicted)
    assert pools + masters + max(peaks) <= predicted * (1 + 1e-3)
    assert mirror["cpu"] == pytest.approx(masters + window, rel=1e-3)
    assert mirror["nvme"] == pytest.approx(on_disk, rel=1e-3)
