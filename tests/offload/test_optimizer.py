"""Optimizer states on the host (CPU, CXL node, NVMe) with the step on the CPU: the same
parameters, bit for bit, as the plain optimizer; state files do not pile up."""

from __future__ import annotations

import pytest
import torch

from memtrain.errors import MemtrainError
from memtrain.offload import LayerPolicy, OffloadPolicy, apply
from memtrain.offload.numa import numa_nodes
from memtrain.offload.optimizer import offload_optimizer
from tests.offload.conftest import batch, make_model

STEPS = 3


def _reference(ids, accumulate=1):
    model = make_model("llama")
    # fused: the kernel the host step uses (torch's fused CPU AdamW), so the runs match bit for bit
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1, fused=True)
    losses = []
    for _ in range(STEPS):
        for _ in range(accumulate):
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            losses.append(loss.detach())
        optimizer.step()
        optimizer.zero_grad()
    return losses, {n: p.detach().clone() for n, p in model.named_parameters()}


def _policy(place: str, tmp_path) -> OffloadPolicy:
    blocks = {f"block.{i}": LayerPolicy(optimizer=place, grads="cpu") for i in range(2)}
    return OffloadPolicy(
        {**blocks, "embed": LayerPolicy()},
        nvme_path=str(tmp_path),
        cxl_node=0 if place == "cxl" else None,
    )


@pytest.mark.parametrize("place", ["cpu", "cxl", "nvme"])
@pytest.mark.parametrize("accumulate", [1, 2])
def test_host_optimizer_matches_plain_adamw(place, accumulate, tmp_path):
    if place == "cxl" and 0 not in numa_nodes():
        pytest.skip("no NUMA sysfs here")
    ids = batch("llama")
    ref_losses, ref_params = _reference(ids, accumulate)
    model = make_model("llama")
    with apply(model, _policy(place, tmp_path)) as handle:
        optimizer = offload_optimizer(
            handle, torch.optim.AdamW, lr=1e-2, weight_decay=0.1, fused=True
        )
        assert len(optimizer.host_params) == 2 * 9  # 9 tensors per Llama block
        losses, files = [], []
        for _ in range(STEPS):
            for _ in range(accumulate):
                loss = model(input_ids=ids, labels=ids).loss
                loss.backward()
                losses.append(loss.detach())
            # gradients of host-placed parameters have left the device already
            assert all(p.grad is None for p in optimizer.host_params)
            optimizer.step()
            optimizer.zero_grad()
            files.append(len(optimizer.state_files()))
        if place == "cxl":
            assert optimizer.cxl_pool is not None and optimizer.cxl_pool.numa_node == 0
    for a, b in zip(ref_losses, losses, strict=True):
        assert torch.equal(a, b)
    for name, param in model.named_parameters():
        assert torch.equal(param.detach(), ref_params[name]), name
    if place == "nvme":
        assert files == [2 * 2 * 9] * STEPS  # exp_avg and exp_avg_sq per host parameter
    assert not list(tmp_path.glob("memtrain-optim-*"))


def test_plan_with_host_states_needs_the_offloaded_optimizer(tmp_path):
    model = make_model("llama")
    ids = batch("llama")
    with apply(model, _policy("cpu", tmp_path)):
        model(input_ids=ids, labels=ids).loss.backward()
        with pytest.raises(MemtrainError, match="offload_optimizer"):
            model(input_ids=ids, labels=ids)


def test_clip_grad_norm_covers_host_gradients(tmp_path):
    ids = batch("llama")
    reference = make_model("llama")
    reference(input_ids=ids, labels=ids).loss.backward()
    expected = torch.nn.utils.clip_grad_norm_(reference.parameters(), 1e-3)
    model = make_model("llama")
    with apply(model, _policy("cpu", tmp_path)) as handle:
        optimizer = offload_optimizer(handle, torch.optim.SGD, lr=0.1)
        model(input_ids=ids, labels=ids).loss.backward()
        total = optimizer.clip_grad_norm_(1e-3)
    assert total.item() == pytest.approx(expected.item(), rel=1e-5)


def test_the_host_step_uses_torchs_fused_cpu_kernel_where_there_is_one():
    from memtrain.offload.optimizer import host_options

    assert host_options(torch.optim.AdamW, {"lr": 1e-3, "fused": True}) == {
        "lr": 1e-3,
        "fused": True,
    }
    assert host_options(torch.optim.AdamW, {"lr": 1e-3})["fused"] is True
    assert "fused" not in host_options(torch.optim.AdamW, {"lr": 1e-3, "fused": False})

    class NoFused(torch.optim.SGD):
        def __init__(self, params, lr, fused=None):
            if fused:
                raise RuntimeError("no fused kernel")
            super().__init__(params, lr=lr)

    assert "fused" not in host_options(NoFused, {"lr": 0.1})


def test_fused_host_adamw_equals_the_reference_step():
    """The fused kernel computes AdamW as torch's for-each one does (float32 rounding apart)."""
    from memtrain.offload.optimizer import host_options

    torch.manual_seed(0)
    start = [torch.randn(257), torch.randn(16, 33)]
    grads = [[torch.randn_like(t) for t in start] for _ in range(3)]
    results = []
    for options in (host_options(torch.optim.AdamW, {"lr": 1e-2}), {"lr": 1e-2, "foreach": True}):
        params = [torch.nn.Parameter(t.clone()) for t in start]
        optimizer = torch.optim.AdamW(params, **options)
        for step in grads:
            for p, g in zip(params, step, strict=True):
                p.grad = g.clone()
            optimizer.step()
        results.append([p.detach() for p in params])
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def _overlap_run(overlap: bool, optimizer_cls, steps=3, **options):
    model = make_model("llama")
    policy = OffloadPolicy(
        {f"block.{i}": LayerPolicy(optimizer="cpu", grads="cpu") for i in range(2)}
    )
    ids = batch("llama")
    losses = []
    with apply(model, policy) as handle:
        optimizer = offload_optimizer(handle, optimizer_cls, overlap=overlap, **options)
        for _ in range(steps):
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses.append(loss.detach())
        state = optimizer.state_dict()
        optimizer.close()
    return losses, {n: p.detach().clone() for n, p in model.named_parameters()}, state


@pytest.mark.parametrize(
    ("optimizer_cls", "options"),
    [
        (torch.optim.AdamW, {"lr": 1e-2, "weight_decay": 0.1}),
        (torch.optim.SGD, {"lr": 0.05, "momentum": 0.9}),
    ],
    ids=["adamw", "sgd"],
)
def test_overlapped_host_step_equals_the_step_after_backward(optimizer_cls, options):
    """Each host parameter steps in the worker as its gradient arrives: the same updates, bit
    for bit, as the host step after backward, and the same optimizer state."""
    want_losses, want, want_state = _overlap_run(False, optimizer_cls, **options)
    got_losses, got, got_state = _overlap_run(True, optimizer_cls, **options)
    for a, b in zip(want_losses, got_losses, strict=True):
        assert torch.equal(a, b)
    for name in want:
        assert torch.equal(want[name], got[name]), name
    for a, b in zip(want_state["masters"], got_state["masters"], strict=True):
        assert torch.equal(a, b)


def test_overlapped_host_step_refuses_accumulation_and_clipping():
    from memtrain.errors import MemtrainError

    model = make_model("llama")
    policy = OffloadPolicy({"block.0": LayerPolicy(optimizer="cpu", grads="cpu")})
    ids = batch("llama")
    with apply(model, policy) as handle:
        optimizer = offload_optimizer(handle, torch.optim.SGD, overlap=True, lr=0.1)
        model(input_ids=ids, labels=ids).loss.backward()
        with pytest.raises(MemtrainError, match="clipping"):
            optimizer.clip_grad_norm_(1.0)
        with pytest.raises(MemtrainError, match="one backward per optimizer step"):
            model(input_ids=ids, labels=ids).loss.backward()
        optimizer.close()
