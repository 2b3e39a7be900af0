"""Plans for an optimizer stepping inside backward: the profile transform, the step-transient
formulas against measured steps, and live gradients of a real CPU run against the plan."""

from __future__ import annotations

import json
from dataclasses import fields

import pytest
import torch

from memtrain.errors import MemtrainError
from memtrain.models import build_causal_lm, load_config
from memtrain.models.build import causal_lm_layers
from memtrain.optim import GaLoreAdamW, build_optimizer, register_step_in_backward
from memtrain.optim import step_in_backward as sib_module
from memtrain.optim.memory import (
    galore_transient,
    model_step_bytes,
    param_step_bytes,
    step_transient_bytes,
)
from memtrain.planner import Plan, PlanOptions, make_plan, minimum_gpu_budget
from memtrain.planner.problem import apply_fused_loss, build_problem
from memtrain.planner.step_in_backward import (
    PROFILE_ONLY_TEMPORARIES,
    apply_step_in_backward,
    check_step_in_backward,
    step_in_backward_problem,
)
from memtrain.profile import profile_causal_lm
from memtrain.profile.tracker import OpTracker
from tests.planner.helpers import GB, TINY_LLAMA, machine, write_tiny_llama

SEQ = 32
OPTIMIZER = "galore:rank=8,update_proj_gap=2"


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    return write_tiny_llama(tmp_path_factory.mktemp("sib"))


@pytest.fixture(scope="module")
def profile(tiny_path):
    """Measured on the CPU, float32."""
    return profile_causal_lm(tiny_path, seq=SEQ, dtype="fp32", optimizer=OPTIMIZER, device="cpu")


@pytest.fixture(scope="module")
def step_bytes(tiny_path):
    meta = build_causal_lm(load_config(tiny_path), "fp32", "meta")
    out, notes = model_step_bytes(meta, OPTIMIZER)
    assert notes == []
    return out


def test_transform_is_exact_on_the_profile(profile, step_bytes):
    after = apply_step_in_backward(profile, step_bytes)
    assert after.grad_bytes == 0
    for before, layer in zip(profile.layers, after.layers, strict=True):
        assert layer.grad_bytes == 0
        assert layer.output_bytes == before.output_bytes + step_bytes.get(layer.name, 0)
        for f in fields(before):
            if f.name not in ("grad_bytes", "output_bytes"):
                assert getattr(layer, f.name) == getattr(before, f.name), f.name
    # only layers with parameters grow; the loss has none
    assert step_bytes.get("loss", 0) == 0 and "loss" not in step_bytes
    assert all(step_bytes[layer.name] > 0 for layer in profile.layers if layer.grad_bytes)


def test_step_bytes_are_the_largest_parameter_step(tiny_path, step_bytes):
    meta = build_causal_lm(load_config(tiny_path), "fp32", "meta")
    layers = {spec.name: spec.modules for spec in causal_lm_layers(meta)}
    block = [p for m in layers["block.0"] for p in m.parameters()]
    # the MLP weights (160 x 64) are the block's largest projected weights
    mlp = meta.model.layers[0].mlp.gate_proj.weight
    grad = mlp.numel() * 4
    assert step_bytes["block.0"] == max(
        param_step_bytes(p.shape, p.dtype, OPTIMIZER if p.dim() == 2 else "galore:projected=false")
        for p in block
    )
    assert step_bytes["block.0"] >= grad + galore_transient(
        tuple(mlp.shape), mlp.dtype, {"rank": 8}
    )
    # embedding and head are dense (GaLore's default targets): gradient + one denominator
    head = meta.lm_head.weight
    assert step_bytes["lm_head"] == 2 * head.numel() * 4


def test_profile_only_fallback_is_the_whole_layer(profile):
    after = apply_step_in_backward(profile)
    for before, layer in zip(profile.layers, after.layers, strict=True):
        assert (
            layer.output_bytes
            == before.output_bytes + (1 + PROFILE_ONLY_TEMPORARIES) * before.grad_bytes
        )
    with pytest.raises(MemtrainError, match="layers the profile lacks"):
        apply_step_in_backward(profile, {"block.99": 1})


def test_problem_keeps_the_head_step_after_the_fused_loss(profile, step_bytes):
    problem = step_in_backward_problem(profile, fused_loss=True, step_bytes=step_bytes)
    assert problem.fused_loss
    head = next(layer for layer in problem.layers if layer.name == "lm_head")
    fused_head = apply_fused_loss(profile).layer("lm_head")
    assert head.output_bytes == fused_head.output_bytes + step_bytes["lm_head"]
    assert all(layer.grad_bytes == 0 for layer in problem.layers)


def _plan(profile, gpu, **options):
    return make_plan(profile, machine(gpu), PlanOptions(fused_loss=True, **options))


def test_step_in_backward_predicts_no_more_than_stepping_after(profile, step_bytes):
    roomy = 100 * GB  # everything kept: the peaks are what each step needs
    after = _plan(profile, roomy, allow_state_offload=False)  # as prepare() plans for GaLore
    inside = _plan(profile, roomy, step_in_backward=True, step_bytes=step_bytes)
    assert inside.predicted["peak_bytes"]["gpu"] <= after.predicted["peak_bytes"]["gpu"]
    resident_after = after.predicted["gpu_resident_bytes"]
    resident_inside = inside.predicted["gpu_resident_bytes"]
    layers = profile.layers
    assert resident_after["grads"] == sum(layer.grad_bytes for layer in layers) > 0
    assert resident_inside["grads"] == 0
    params = sum(layer.param_bytes for layer in layers)
    assert resident_inside["params"] == resident_after["params"] == params
    states = sum(layer.optimizer_state_bytes for layer in layers)
    assert resident_inside["optimizer"] == resident_after["optimizer"] == states
    options = PlanOptions(fused_loss=True)
    need_after = minimum_gpu_budget(
        build_problem(profile, fused_loss=True), machine(roomy), options
    )
    need_inside = minimum_gpu_budget(
        step_in_backward_problem(profile, fused_loss=True, step_bytes=step_bytes),
        machine(roomy),
        options,
    )
    assert need_inside <= need_after


def test_states_stay_on_the_gpu_and_the_plan_says_so(profile, step_bytes):
    inside = _plan(profile, 100 * GB, step_in_backward=True, step_bytes=step_bytes)
    tight = minimum_gpu_budget(
        step_in_backward_problem(profile, fused_loss=True, step_bytes=step_bytes),
        machine(100 * GB),
        PlanOptions(step_in_backward=True),
    )
    squeezed = _plan(profile, tight * 1.2, step_in_backward=True, step_bytes=step_bytes)
    for plan in (inside, squeezed):
        assert all(layer.optimizer == layer.grads == "gpu" for layer in plan.layers)
        data = plan.to_dict()
        assert data["step_in_backward"] is True
        assert Plan.from_dict(json.loads(json.dumps(data))).step_in_backward
        check_step_in_backward(plan)
    assert squeezed.predicted["peak_bytes"]["gpu"] < inside.predicted["peak_bytes"]["gpu"]
    # state offload allowed, without stepping inside backward the planner may use it
    after = _plan(profile, 100 * GB)
    assert "step_in_backward" not in after.to_dict()
    assert not Plan.from_dict(after.to_dict()).step_in_backward


def test_plans_with_offloaded_states_are_refused(profile, step_bytes):
    data = _plan(profile, 100 * GB, step_in_backward=True, step_bytes=step_bytes).to_dict()
    data["layers"][1] = {**data["layers"][1], "grads": "cpu", "optimizer": "cpu"}
    with pytest.raises(MemtrainError, match="inside backward"):
        check_step_in_backward(Plan.from_dict(data))


def _measured_transient(param: torch.nn.Parameter, optimizer, steps: int = 3) -> int:
    """Peak bytes allocated while stepping ``param`` alone, above what persists (new states)."""
    worst = 0
    for _ in range(steps):
        param.grad = torch.randn(param.shape, dtype=param.dtype)
        tracker = OpTracker(None, True, lambda *a: None, block=1)
        with tracker:
            sib_module._step_one(optimizer, param, 0)  # the first parameter group
        worst = max(worst, tracker.peak_bytes - tracker.live_bytes)
    return worst


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("shape", [(96, 40), (40, 96), (200, 24)])
def test_galore_transient_bounds_the_measured_step(shape, dtype):
    """Cold start (first step), between refreshes (second) and warm refresh (third)."""
    for rank, oversample, method in (
        (4, 0, "iter"),
        (16, 0, "iter"),
        (4, 4, "iter"),
        (8, 0, "svd"),
    ):
        options = {"rank": rank, "update_proj_gap": 2, "proj_oversample": oversample}
        options["proj_method"] = method
        param = torch.nn.Parameter(torch.randn(shape, dtype=dtype))
        optimizer = GaLoreAdamW([{"params": [param], **options}], lr=1e-3)
        measured = _measured_transient(param, optimizer)
        predicted = galore_transient(shape, dtype, options)
        assert measured <= predicted, (rank, oversample, method)
        assert predicted <= 2.5 * measured, (rank, oversample, method)


@pytest.mark.parametrize(
    "name, make, spec",
    [
        ("galore dense", lambda p: GaLoreAdamW([{"params": [p]}], lr=1e-3), "galore:projected=0"),
        ("adamw", lambda p: torch.optim.AdamW([p], lr=1e-3), "adamw"),
        ("adamw foreach", lambda p: torch.optim.AdamW([p], lr=1e-3, foreach=True), "adamw"),
        ("sgd", lambda p: torch.optim.SGD([p], lr=1e-3, momentum=0.9), "sgd"),
        (
            "sgd nesterov",
            lambda p: torch.optim.SGD([p], lr=1e-3, momentum=0.9, nesterov=True),
            "sgd",
        ),
    ],
)
def test_dense_transients_bound_the_measured_step(name, make, spec):
    for dtype in (torch.bfloat16, torch.float32):
        param = torch.nn.Parameter(torch.randn(70, 30, dtype=dtype))
        predicted, known = step_transient_bytes(param.shape, dtype, spec)
        assert known
        assert _measured_transient(param, make(param)) <= predicted, name


def test_unknown_optimizers_are_priced_conservatively_with_a_note(tiny_path):
    meta = build_causal_lm(load_config(tiny_path), "fp32", "meta")
    out, notes = model_step_bytes(meta, "adafactor")
    assert notes and "no step-transient formula" in notes[0]
    head = meta.lm_head.weight
    assert out["lm_head"] == head.numel() * 4 * (1 + 4)


def test_live_gradients_of_a_real_run_never_exceed_the_plan(tiny_path, profile, step_bytes):
    """A tiny Llama steps GaLore inside backward on the CPU for a few steps. Every time a
    gradient is complete: the live parameter gradients (sum of ``p.grad``) stay within the
    step bytes of the layer being stepped, and that parameter's gradient plus what its step
    allocates stays within them too."""
    torch.manual_seed(0)
    model = build_causal_lm(load_config(tiny_path), "fp32", "cpu")
    layer_of = {}
    for spec in causal_lm_layers(model):
        for module in spec.modules:
            for p in module.parameters():
                layer_of.setdefault(id(p), spec.name)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(model, OPTIMIZER, lr=1e-3)
    plan = make_plan(
        profile,
        machine(100 * GB),
        PlanOptions(fused_loss=False, step_in_backward=True, step_bytes=step_bytes),
    )
    assert plan.predicted["gpu_resident_bytes"]["grads"] == 0
    live_peak = {}

    def count(param: torch.Tensor) -> None:  # runs before the step hook: the gradient is live
        live = sum(p.grad.numel() * p.grad.element_size() for p in params if p.grad is not None)
        name = layer_of[id(param)]
        live_peak[name] = max(live_peak.get(name, 0), live)

    counters = [p.register_post_accumulate_grad_hook(count) for p in params]
    handle = register_step_in_backward(model, optimizer)
    step_peak: dict[str, int] = {}
    plain_step = sib_module._step_one

    def measured_step(opt, param, index):
        grad = param.grad.numel() * param.grad.element_size()
        tracker = OpTracker(None, True, lambda *a: None, block=1)
        with tracker:
            plain_step(opt, param, index)
        name = layer_of[id(param)]
        used = grad + tracker.peak_bytes - tracker.live_bytes
        step_peak[name] = max(step_peak.get(name, 0), used)

    sib_module._step_one = measured_step
    try:
        ids = torch.randint(0, TINY_LLAMA["vocab_size"], (1, SEQ))
        for _ in range(3):  # refresh, plain step, refresh
            model(input_ids=ids, labels=ids).loss.backward()
            assert all(p.grad is None for p in params)
    finally:
        sib_module._step_one = plain_step
        handle.remove()
        for c in counters:
            c.remove()
    assert set(live_peak) == set(step_bytes)
    for name, limit in step_bytes.items():
        assert live_peak[name] <= limit, name
        assert step_peak[name] <= limit, name
    # stepping after backward, every gradient is live at once: more than any layer's step
    total = sum(p.numel() * p.element_size() for p in params)
    assert total == sum(layer.grad_bytes for layer in profile.layers)
    assert max(live_peak.values()) < total
