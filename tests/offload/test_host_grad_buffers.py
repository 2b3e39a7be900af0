"""Host gradient buffers in the parameters' dtype (memtrain.offload.optimizer).

A bf16 gradient widened to float32 is exactly what a float32 buffer received, so one backward
per step gives the same parameters, masters and states, bit for bit, as float32 buffers
(``grad_buffer_dtype=torch.float32``: the behaviour before), with half the host bytes.
Accumulation over two backwards matches a GPU-resident bf16 gradient (autograd's own
accumulation in the parameter dtype). The overlapped step receives gradients in a ring of
slots sized for the largest parameter instead of a whole-model buffer, bit for bit the same.
"""

from __future__ import annotations

import copy

import pytest
import torch

from memtrain.offload import LayerPolicy, OffloadPolicy, apply
from memtrain.offload.optimizer import OffloadedOptimizer, offload_optimizer
from memtrain.planner.hostmem import GRAD_RING_SLOTS
from tests.offload.conftest import batch, make_model

STEPS = 3
OPTIONS = {"lr": 1e-2, "weight_decay": 0.1}


def _policy(place: str = "cpu", tmp_path=None) -> OffloadPolicy:
    blocks = {f"block.{i}": LayerPolicy(optimizer=place, grads="cpu") for i in range(2)}
    return OffloadPolicy(
        {**blocks, "embed": LayerPolicy()}, nvme_path=str(tmp_path) if tmp_path else None
    )


def _run(dtype="bf16", steps=STEPS, accumulate=1, clip=None, place="cpu", tmp_path=None, **kwargs):
    model = make_model("llama", dtype)
    ids = batch("llama")
    with apply(model, _policy(place, tmp_path)) as handle:
        optimizer = offload_optimizer(handle, torch.optim.AdamW, **OPTIONS, **kwargs)
        losses = []
        for _ in range(steps):
            for _ in range(accumulate):
                loss = model(input_ids=ids, labels=ids).loss
                loss.backward()
                losses.append(loss.detach())
            if clip is not None:
                optimizer.clip_grad_norm_(clip)
            optimizer.step()
            optimizer.zero_grad()
        state = optimizer.state_dict()
        info = {
            "buffers": optimizer.grad_buffer_bytes(),
            "dtypes": {b.dtype for b in optimizer._grads},
            "largest": max(p.numel() for p in optimizer.host_params),
            "transient": optimizer.peak_transient_bytes,
        }
        optimizer.close()
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    return losses, params, state, info


def _assert_same(want, got):
    want_losses, want_params, want_state, _ = want
    got_losses, got_params, got_state, _ = got
    for a, b in zip(want_losses, got_losses, strict=True):
        assert torch.equal(a, b)
    for name in want_params:
        assert torch.equal(want_params[name], got_params[name]), name
    for a, b in zip(want_state["masters"], got_state["masters"], strict=True):
        assert torch.equal(a, b)
    want_host, got_host = want_state["host"]["state"], got_state["host"]["state"]
    assert want_host.keys() == got_host.keys()
    for key in want_host:
        for name, value in want_host[key].items():
            assert torch.equal(value, got_host[key][name]), (key, name)


@pytest.mark.parametrize("clip", [None, 1e-3], ids=["plain", "clipped"])
def test_bf16_buffers_step_bit_identically_to_float32_buffers(clip):
    """One backward per step: bf16 buffers give today's float32-buffer results bit for bit
    (global clipping too: the scale is applied to the widened gradient in float32)."""
    before = _run(clip=clip, grad_buffer_dtype=torch.float32)
    after = _run(clip=clip)
    _assert_same(before, after)
    assert before[3]["dtypes"] == {torch.float32}
    assert after[3]["dtypes"] == {torch.bfloat16}
    assert after[3]["buffers"] * 2 == before[3]["buffers"]  # half the host bytes
    assert after[3]["transient"] == 4 * after[3]["largest"]  # one parameter widened at a time
    assert before[3]["transient"] == 0


def test_float32_parameters_keep_float32_buffers():
    _, _, _, info = _run(dtype="fp32", steps=1)
    assert info["dtypes"] == {torch.float32}


def test_bf16_accumulation_matches_gpu_resident_bf16_gradients():
    """Two backwards before a step: the buffer holds what autograd accumulates in a bf16
    ``.grad`` (both widened, added, rounded once), not a float32 sum."""
    ids = batch("llama")
    twin = make_model("llama", "bf16")
    twin.train()
    for _ in range(2):
        twin(input_ids=ids, labels=ids).loss.backward()
    want = {n: p.grad.clone() for n, p in twin.named_parameters()}

    model = make_model("llama", "bf16")
    with apply(model, _policy()) as handle:
        optimizer = offload_optimizer(handle, torch.optim.AdamW, **OPTIONS)
        names = {id(p): n for n, p in model.named_parameters()}
        for _ in range(2):
            model(input_ids=ids, labels=ids).loss.backward()
        assert optimizer._grads
        for param, buffer in zip(optimizer.host_params, optimizer._grads, strict=True):
            assert buffer.dtype == torch.bfloat16
            assert torch.equal(buffer, want[names[id(param)]]), names[id(param)]
        # the update is the step on the widened accumulated gradient
        masters = [m.detach().clone() for m in optimizer.masters]
        reference = [torch.nn.Parameter(m) for m in masters]
        for ref, buffer in zip(reference, optimizer._grads, strict=True):
            ref.grad = buffer.float()
        torch.optim.AdamW(reference, **OPTIONS, fused=True).step()
        optimizer.step()
        for ref, master in zip(reference, optimizer.masters, strict=True):
            assert torch.equal(ref.detach(), master)
        optimizer.close()


def test_float32_buffers_accumulate_in_float32():
    """The explicit option keeps float32 accumulation (the behaviour before)."""
    ids = batch("llama")
    model = make_model("llama", "bf16")
    with apply(model, _policy()) as handle:
        optimizer = offload_optimizer(
            handle, torch.optim.AdamW, grad_buffer_dtype=torch.float32, **OPTIONS
        )
        grads = []
        hook_grads: list[list[torch.Tensor]] = [[] for _ in optimizer.host_params]
        for i, p in enumerate(optimizer.host_params):
            # a tensor hook sees each incoming gradient before it is accumulated
            p.register_hook(lambda g, i=i: hook_grads[i].append(g.detach().clone()))
        for _ in range(2):
            model(input_ids=ids, labels=ids).loss.backward()
        for buffer, seen in zip(optimizer._grads, hook_grads, strict=True):
            assert buffer.dtype == torch.float32
            assert torch.equal(buffer, seen[0].float() + seen[1].float())
            grads.append(buffer)
        optimizer.close()
    assert grads


def test_resume_with_bf16_buffers_is_bit_identical():
    """Gradients are not checkpointed: state_dict/load_state_dict resume bit for bit."""
    ids = batch("llama")

    def steps(model, optimizer, n):
        for _ in range(n):
            model(input_ids=ids, labels=ids).loss.backward()
            optimizer.step()
            optimizer.zero_grad()

    model = make_model("llama", "bf16")
    with apply(model, _policy()) as handle:
        optimizer = offload_optimizer(handle, torch.optim.AdamW, **OPTIONS)
        steps(model, optimizer, 2)
        saved = copy.deepcopy(optimizer.state_dict())  # state_dict holds live tensors
        weights = {n: p.detach().clone() for n, p in model.named_parameters()}
        steps(model, optimizer, 2)
        want = {n: p.detach().clone() for n, p in model.named_parameters()}
        optimizer.close()
    assert set(saved) == {"device", "host", "masters"}

    model = make_model("llama", "bf16")
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(weights[n])
    with apply(model, _policy()) as handle:
        optimizer = offload_optimizer(handle, torch.optim.AdamW, **OPTIONS)
        optimizer.load_state_dict(saved)
        steps(model, optimizer, 2)
        got = {n: p.detach().clone() for n, p in model.named_parameters()}
        optimizer.close()
    for name in want:
        assert torch.equal(want[name], got[name]), name


@pytest.mark.parametrize("place", ["cpu", "nvme"])
def test_overlapped_ring_is_bit_identical_and_holds_a_few_slots(place, tmp_path):
    """Overlapped: gradients land in GRAD_RING_SLOTS slots sized for the largest parameter
    (reused as parameters step), the same results bit for bit as the step after backward."""
    for sub in "ab":
        (tmp_path / sub).mkdir()
    want = _run(place=place, tmp_path=tmp_path / "a")
    got = _run(place=place, tmp_path=tmp_path / "b", overlap=True)
    _assert_same(want, got)
    largest = got[3]["largest"]
    assert got[3]["buffers"] == GRAD_RING_SLOTS * 2 * largest  # bf16 slots
    assert got[3]["buffers"] < want[3]["buffers"]
    assert got[3]["transient"] == 4 * largest


def test_the_ring_waits_for_the_oldest_slot():
    """More gradients than slots in one backward: each slot is reused only after the step that
    read it, whatever the order the worker takes."""
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(64, 64).bfloat16()) for _ in range(11)]
    twins = [torch.nn.Parameter(p.detach().clone()) for p in params]
    results = []
    for overlap, group in ((False, twins), (True, params)):
        optimizer = OffloadedOptimizer(
            dict.fromkeys(group, "cpu"), torch.optim.AdamW, overlap=overlap, **OPTIONS
        )
        for _ in range(2):
            loss = sum((p.float() * (i + 1)).square().sum() for i, p in enumerate(group))
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        results.append([p.detach().clone() for p in group])
        if overlap:
            assert len(optimizer._ring) == GRAD_RING_SLOTS
        optimizer.close()
    for a, b in zip(*results, strict=True):
        assert torch.equal(a, b)
