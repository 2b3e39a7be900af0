"""Optimizer states on NVMe streamed through host memory a layer at a time: the next layer's
states are read while one steps and the previous one's written back, so at most three adjacent
layers' states are in host memory at once; the updates are bit for bit those of states kept in
host memory (and of torch's AdamW), overlapped or not, across a resume."""

from __future__ import annotations

import copy

import pytest
import torch

from memtrain.errors import MemtrainError
from memtrain.offload import LayerPolicy, OffloadPolicy, apply
from memtrain.offload.optimizer import OffloadedOptimizer, offload_optimizer
from tests.offload.conftest import batch, make_model

LAYERS = 6
STEPS = 3
OPTIONS = {"lr": 1e-2, "weight_decay": 0.1, "fused": True}


def _params(seed: int = 0) -> tuple[list[torch.nn.Parameter], dict, list[torch.Tensor]]:
    """Two tensors per layer and the layer of each, with targets to pull them towards."""
    generator = torch.Generator().manual_seed(seed)
    params, layers = [], {}
    for j in range(LAYERS):
        for shape in ((48, 32), (32,)):
            param = torch.nn.Parameter(torch.randn(shape, generator=generator))
            params.append(param)
            layers[param] = f"block.{j}"
    targets = [torch.randn(p.shape, generator=generator) for p in params]
    return params, layers, targets


def _backward(params, targets, step: int) -> None:
    loss = sum(((p - t * (1 + step)) ** 2).sum() for p, t in zip(params, targets, strict=True))
    loss.backward()


def _run(place, tmp_path, steps=STEPS, overlap=False, params=None, hook=None):
    if params is None:
        params, layers, targets = _params()
    else:
        params, layers, targets = params
    optimizer = OffloadedOptimizer(
        dict.fromkeys(params, place),
        torch.optim.AdamW,
        nvme_path=str(tmp_path),
        overlap=overlap,
        layers=layers,
        **OPTIONS,
    )
    if hook is not None:
        hook(optimizer)
    for step in range(steps):
        _backward(params, targets, step)
        optimizer.step()
        optimizer.zero_grad()
    return optimizer, [p.detach().clone() for p in params]


def _state_bytes(layer_params) -> int:
    return sum(2 * p.numel() * 4 for p in layer_params)  # exp_avg, exp_avg_sq in float32


def test_streamed_states_match_host_states_and_torch_adamw(tmp_path):
    cpu, want = _run("cpu", tmp_path)
    nvme, got = _run("nvme", tmp_path)
    params, _, targets = _params()
    reference = torch.optim.AdamW(params, **OPTIONS)
    for step in range(STEPS):
        _backward(params, targets, step)
        reference.step()
        reference.zero_grad()
    for a, b, c in zip(want, got, params, strict=True):
        assert torch.equal(a, b)
        assert torch.equal(b, c.detach())
    assert len(nvme.layer_groups) == LAYERS
    assert len(nvme.state_files()) == 2 * 2 * LAYERS
    saved, kept = nvme.state_dict()["host"]["state"], cpu.state_dict()["host"]["state"]
    for index, states in kept.items():
        for key, value in states.items():
            assert torch.equal(saved[index][key], value), (index, key)
    # between steps no state tensor is in host memory
    assert all(v.numel() <= 1 for s in nvme.host_optimizer.state.values() for v in s.values())
    nvme.close()
    cpu.close()
    assert not list(tmp_path.glob("memtrain-optim-*"))


@pytest.mark.parametrize("overlap", [False, True], ids=["after-backward", "overlapped"])
def test_at_most_three_layers_of_states_in_host_memory(tmp_path, overlap):
    params, layers, targets = _params()
    per_layer = _state_bytes(params[:2])
    total = LAYERS * per_layer
    installed = []

    def watch(optimizer):
        host = optimizer.host_optimizer
        step = host.step

        def counting(*args, **kwargs):
            installed.append(
                sum(
                    v.numel() * v.element_size()
                    for s in host.state.values()
                    for v in s.values()
                    if v.numel() > 1
                )
            )
            return step(*args, **kwargs)

        host.step = counting

    optimizer, _ = _run(
        "nvme", tmp_path, overlap=overlap, params=(params, layers, targets), hook=watch
    )
    nvme = optimizer.nvme
    # before: every layer's states were read into host memory for the step (``total``)
    assert nvme.peak_groups <= 3
    assert per_layer <= nvme.peak_bytes <= 3 * per_layer < total
    assert max(installed) <= 3 * per_layer
    nvme.reset_peak()
    assert nvme.resident_bytes == 0
    optimizer.close()


def test_overlapped_streamed_step_equals_the_step_after_backward(tmp_path):
    _, want = _run("nvme", tmp_path)
    _, got = _run("nvme", tmp_path, overlap=True)
    _, host = _run("cpu", tmp_path, overlap=True)
    for a, b, c in zip(want, got, host, strict=True):
        assert torch.equal(a, b)
        assert torch.equal(a, c)


def test_overlapped_streamed_step_on_a_model_matches_host_states(tmp_path):
    """Through apply(): the plan's layers group the states; gradients arrive in backward."""
    ids = batch("llama")
    results = []
    for place, overlap in (("cpu", False), ("nvme", True), ("nvme", False)):
        model = make_model("llama")
        policy = OffloadPolicy(
            {f"block.{i}": LayerPolicy(optimizer=place, grads="cpu") for i in range(2)},
            nvme_path=str(tmp_path),
        )
        with apply(model, policy) as handle:
            optimizer = offload_optimizer(handle, torch.optim.AdamW, overlap=overlap, **OPTIONS)
            for _ in range(STEPS):
                model(input_ids=ids, labels=ids).loss.backward()
                optimizer.step()
                optimizer.zero_grad()
            if place == "nvme":
                assert len(optimizer.layer_groups) == 2
                assert optimizer.nvme.peak_groups <= 2
        results.append({n: p.detach().clone() for n, p in model.named_parameters()})
    for name, value in results[0].items():
        assert torch.equal(value, results[1][name]), name
        assert torch.equal(value, results[2][name]), name
    assert not list(tmp_path.glob("memtrain-optim-*"))


@pytest.mark.parametrize("overlap", [False, True], ids=["after-backward", "overlapped"])
def test_truncated_state_file_is_one_line_naming_it(tmp_path, overlap):
    optimizer, _ = _run("nvme", tmp_path, steps=1, overlap=overlap)
    damaged = optimizer.state_files()[3]
    with open(damaged, "r+b") as handle:
        handle.truncate(10)
    params = [m for m in optimizer.host_params]
    targets = [torch.zeros_like(p) for p in params]
    _backward(params, targets, 1)
    with pytest.raises(MemtrainError) as info:
        optimizer.step()
    message = str(info.value)
    assert "\n" not in message
    assert str(damaged) in message and "truncated" in message
    optimizer.close()


def test_resume_from_streamed_states_is_bit_identical(tmp_path):
    params, layers, targets = _params()
    optimizer, _ = _run("nvme", tmp_path, steps=2, params=(params, layers, targets))
    saved = copy.deepcopy(optimizer.state_dict())
    host, _ = _run("cpu", tmp_path, steps=2)
    for index, states in host.state_dict()["host"]["state"].items():
        for key, value in states.items():
            assert torch.equal(saved["host"]["state"][index][key], value)
    _backward(params, targets, 2)
    optimizer.step()
    want = [p.detach().clone() for p in params]
    optimizer.close()

    fresh, fresh_layers, _ = _params(seed=1)  # other weights: the checkpoint restores them
    resumed = OffloadedOptimizer(
        dict.fromkeys(fresh, "nvme"),
        torch.optim.AdamW,
        nvme_path=str(tmp_path),
        layers=fresh_layers,
        **OPTIONS,
    )
    resumed.load_state_dict(saved)
    assert all(v.numel() <= 1 for s in resumed.host_optimizer.state.values() for v in s.values())
    _backward(fresh, targets, 2)
    resumed.step()
    for a, b in zip(want, fresh, strict=True):
        assert torch.equal(a, b.detach())
    resumed.close()
    host.close()
