"""Profile one training step, layer by layer: dry run on meta tensors or measured on a device.

Both modes run the model's real forward and backward under the same instruments (saved-tensor
hooks, layer hooks, an ATen-level op tracker), so they produce the same kind of result:

* **dry run** (parameters on ``meta``): nothing is allocated; live memory is simulated storage by
  storage, attention is routed to the fused kernel the target would use, and times are roofline
  estimates from FLOPs and bytes on a :class:`~memtrain.hardware.DeviceSpec`;
* **measured** (parameters on ``cpu`` or ``cuda``): one warm-up step creates optimizer state, then
  one instrumented step records real times (CUDA events on a GPU) and, on CUDA, the allocator's
  peaks.
"""

from __future__ import annotations

import contextlib
import fnmatch
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_flatten

from memtrain.errors import MemtrainError
from memtrain.hardware.devices import DeviceSpec, get_device
from memtrain.models.blocks import block_capabilities
from memtrain.models.build import LayerSpec
from memtrain.optim.factory import build_optimizer
from memtrain.optim.memory import (
    OptimizerSpec,
    measured_state_bytes,
    optimizer_step_transient,
    param_state_specs,
    parse_optimizer_spec,
    state_bytes_for,
)
from memtrain.profile.attention import CpuKernelOutputs, TargetAttention
from memtrain.profile.meta_ops import shape_only_meta_kernels
from memtrain.profile.params import assign_params, storage_key
from memtrain.profile.result import LayerProfile, ProfileResult, TimelinePoint
from memtrain.profile.saved import SavedTensorRecorder, infer_token_dims, to_saved_tensors
from memtrain.profile.scopes import Clock, CudaMemory, LayerScopes, TrackedMemory
from memtrain.profile.tracker import ALLOCATOR_BLOCK, OpTracker, round_block

Inputs = dict[str, Any] | tuple | torch.Tensor
LossFn = Callable[[Any, Any], torch.Tensor]


def default_loss(output: Any, inputs: Any) -> torch.Tensor:
    """The model's own loss (``output.loss``) or its output when that is a scalar."""
    loss = getattr(output, "loss", None)
    if loss is None and isinstance(output, dict):
        loss = output.get("loss")
    if loss is None and isinstance(output, torch.Tensor) and output.dim() == 0:
        loss = output
    if loss is None:
        raise MemtrainError(
            "the model's output has no loss; pass loss_fn=(output, inputs) -> scalar tensor"
        )
    return loss


def layers_from_patterns(model: nn.Module, patterns: Sequence[str]) -> list[LayerSpec]:
    """One layer per module whose qualified name matches a glob pattern, in model order."""
    layers = []
    for name, module in model.named_modules():
        if name and any(fnmatch.fnmatchcase(name, p) for p in patterns):
            if any(name.startswith(done.name + ".") for done in layers):
                continue  # already inside a chosen layer
            layers.append(LayerSpec(name, "module", [module]))
    if not layers:
        raise MemtrainError(f"no module name matches {list(patterns)}")
    return layers


def _run_model(model: nn.Module, inputs: Inputs) -> Any:
    if isinstance(inputs, dict):
        return model(**inputs)
    if isinstance(inputs, tuple):
        return model(*inputs)
    return model(inputs)


def _input_tensors(inputs: Inputs) -> list[torch.Tensor]:
    values = inputs.values() if isinstance(inputs, dict) else inputs
    if isinstance(values, torch.Tensor):
        values = [values]
    return [v for v in values if isinstance(v, torch.Tensor)]


def _output_bytes(output: Any, loss: torch.Tensor, saved: set[int], excluded: set[int]) -> int:
    """Bytes of the output's tensors that are neither saved for backward nor the loss."""
    if hasattr(output, "to_tuple"):
        output = output.to_tuple()
    flat, _ = tree_flatten(output)
    seen = set(saved) | set(excluded) | {storage_key(loss)}
    total = 0
    for tensor in flat:
        if isinstance(tensor, torch.Tensor) and storage_key(tensor) not in seen:
            seen.add(storage_key(tensor))
            total += tensor.untyped_storage().nbytes()
    return total


def build_torch_optimizer(
    params: list[nn.Parameter],
    spec: OptimizerSpec,
    device: torch.device,
    model: nn.Module | None = None,
):
    """The optimizer a measured run steps: torch's own, or memtrain.optim's for the others."""
    options = dict(spec.options)
    lr = options.pop("lr", 1e-4)
    if spec.name in ("adamw", "adam"):
        fused = options.pop("fused", device.type == "cuda")
        cls = torch.optim.AdamW if spec.name == "adamw" else torch.optim.Adam
        return cls(params, lr=lr, fused=fused, **options)
    if spec.name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=options.pop("momentum", 0.9), **options)
    if spec.name == "adafactor":
        return torch.optim.Adafactor(params, lr=lr if "lr" in spec.options else 1e-2, **options)
    # memtrain's low-rank optimizers choose which weights to project from the model itself.
    return build_optimizer(model if model is not None else params, spec, lr=lr)


class _NoMemory:
    def boundary(self) -> tuple[int, int]:
        return 0, 0


def _time_clean_step(model, inputs, loss_fn, layer_specs, optimizer, device, stats) -> float:
    """Run one more step with only layer hooks and a clock; overwrite ``stats`` times."""
    optimizer.zero_grad(set_to_none=True)
    clock = Clock(device)
    timer = LayerScopes(layer_specs, _NoMemory(), clock)
    try:
        timer.begin("forward")
        output = _run_model(model, inputs)
        loss = loss_fn(output, inputs)
        timer.begin("backward")
        loss.backward()
        timer.end()
        del output, loss
        start = clock.mark()
        optimizer.step()
        end = clock.mark()
    finally:
        timer.remove()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    timer.finish_times()
    for target, timed in zip(stats, timer.stats, strict=True):
        target.forward_time_s = timed.forward_time_s
        target.backward_time_s = timed.backward_time_s
    return clock.seconds(start, end)


def _attention_share(stats, dry: bool) -> float:
    """Forward seconds of a layer's attention: the estimate, or on a measured profile the
    measured forward time split in the estimate's proportion."""
    estimate = stats.attention_forward_estimate_s
    if dry or estimate <= 0:
        return estimate
    if stats.forward_estimate_s <= 0:
        return 0.0
    return stats.forward_time_s * min(1.0, estimate / stats.forward_estimate_s)


def profile_model(
    model: nn.Module,
    inputs: Inputs,
    *,
    seq: int,
    batch: int = 1,
    loss_fn: LossFn = default_loss,
    layers: Sequence[LayerSpec] | Sequence[str] | None = None,
    optimizer: str | OptimizerSpec = "adamw",
    target: str | DeviceSpec | None = None,
    name: str | None = None,
    dtype: str = "",
    perturbed_shapes: Callable[[], list[tuple[int, ...]] | None] | None = None,
    keep_output: bool = True,
) -> ProfileResult:
    """Profile one training step of ``model`` on ``inputs``.

    Parameters on ``meta`` make it a dry run (``target`` picks the device whose kernels and
    rates are modelled; default ``h100-sxm-80g``); on ``cpu``/``cuda`` it is measured.
    ``layers`` is the granularity: LayerSpecs, glob patterns over module names, or ``None`` for
    the default of a Hugging Face causal LM. ``perturbed_shapes`` returns the saved-tensor shapes
    of the same step at a slightly longer sequence, which makes token-dimension detection exact.
    ``keep_output`` holds the model's output (e.g. the logits) through backward, as a loop that
    writes ``out = model(**batch); out.loss.backward()`` does.
    """
    _check_positive(seq=seq, batch=batch)
    first = next(model.parameters(), None)
    if first is None:
        raise MemtrainError("the model has no parameters to train")
    device = first.device
    dry = device.type == "meta"
    if layers is None:
        from memtrain.models.build import causal_lm_layers

        layer_specs = causal_lm_layers(model)
    elif layers and isinstance(layers[0], str):
        layer_specs = layers_from_patterns(model, layers)  # type: ignore[arg-type]
    else:
        layer_specs = list(layers)  # type: ignore[arg-type]
    spec = parse_optimizer_spec(optimizer)
    if isinstance(target, DeviceSpec):
        device_spec = target
    else:
        default = "h100-sxm-80g" if dry else ("cpu" if device.type == "cpu" else "h100-sxm-80g")
        device_spec = get_device(target or default)
    semantics = "cpu" if (device_spec.name == "cpu" if dry else device.type == "cpu") else "cuda"

    other_index = len(layer_specs) + 1
    owned = assign_params(model, layer_specs, other_index)
    trainable = [o for o in owned if o.param.requires_grad]
    param_bytes = sum(o.nbytes for o in owned)
    input_tensors = _input_tensors(inputs)
    input_bytes = sum(round_block(t.untyped_storage().nbytes()) for t in input_tensors)
    excluded = _static_storages(model, input_tensors)

    model.train()
    torch_optimizer = None
    fused = False
    if dry:
        per_param_spec = param_state_specs(model, spec)
        state_per_param = {
            id(o.param): state_bytes_for(
                o.param.shape, o.param.dtype, per_param_spec.get(o.name, spec)
            )
            for o in trainable
        }
    else:
        torch_optimizer = build_torch_optimizer([o.param for o in trainable], spec, device, model)
        fused = bool(torch_optimizer.defaults.get("fused"))
        loss = loss_fn(_run_model(model, inputs), inputs)
        loss.backward()
        torch_optimizer.step()
        torch_optimizer.zero_grad(set_to_none=True)
        del loss
        state_per_param = measured_state_bytes(torch_optimizer)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    state_bytes = sum(state_per_param.get(id(o.param), 0) for o in trainable)
    if dry:
        fused = bool(spec.options.get("fused", True))

    block = ALLOCATOR_BLOCK if (dry and semantics == "cuda") or device.type == "cuda" else 1
    static = sum(round_block(o.nbytes, block) for o in owned) + state_bytes + input_bytes
    use_cuda_memory = device.type == "cuda"
    memory = CudaMemory(device) if use_cuda_memory else TrackedMemory(static)
    if use_cuda_memory:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    scopes = LayerScopes(layer_specs, memory, Clock(device))
    tracker = OpTracker(
        device_spec if dry else None,
        track_memory=not use_cuda_memory,
        on_op=scopes.charge,
        on_alloc=memory.observe if isinstance(memory, TrackedMemory) else None,
        block=block,
    )
    if isinstance(memory, TrackedMemory):
        memory.attach(tracker)
    recorder = SavedTensorRecorder(scopes, excluded, producer=tracker.producer)
    attention = TargetAttention(semantics) if dry else contextlib.nullcontext()
    quirks = CpuKernelOutputs() if dry and semantics == "cpu" else contextlib.nullcontext()
    shapes = shape_only_meta_kernels() if dry else contextlib.nullcontext()
    try:
        with recorder.hooks(), attention, quirks, shapes, tracker:
            scopes.begin("forward")
            output = _run_model(model, inputs)
            loss = loss_fn(output, inputs)
            retained_bytes = 0
            if keep_output:
                retained_bytes = _output_bytes(output, loss, recorder.seen_storages, excluded)
            else:
                del output
            scopes.begin("backward")
            loss.backward()
            scopes.end()
            del loss
            output = None
    finally:
        scopes.remove()
    grads_live = memory.boundary()[0]
    if dry:
        grad_per_param = {id(o.param): o.nbytes for o in trainable}
    else:
        grad_per_param = {}
        seen: set[int] = set()
        for o in trainable:
            grad = o.param.grad
            if grad is None or storage_key(grad) in seen:
                continue
            seen.add(storage_key(grad))
            grad_per_param[id(o.param)] = grad.untyped_storage().nbytes()
    optimizer_time = 0.0
    optimizer_transient = 0
    if dry:
        optimizer_transient = optimizer_step_transient(spec, param_bytes, fused)
        moved = 2 * param_bytes + param_bytes + 2 * state_bytes  # read p, g, s; write p, s
        optimizer_time = moved / device_spec.achievable_hbm_bandwidth
        scopes.timeline.append(("optimizer", "optimizer", grads_live + optimizer_transient))
        scopes.global_peak = max(scopes.global_peak, grads_live + optimizer_transient)
    else:
        clock = Clock(device)
        start = clock.mark()
        torch_optimizer.step()
        end = clock.mark()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        optimizer_time = clock.seconds(start, end)
        live, peak = memory.boundary()
        optimizer_transient = max(0, peak - grads_live)
        scopes.global_peak = max(scopes.global_peak, peak)
        scopes.timeline.append(("optimizer", "optimizer", peak))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    scopes.finish_times()
    if not dry:
        # The instruments above cost host time per op; time a clean step with layer hooks only.
        optimizer_time = _time_clean_step(
            model, inputs, loss_fn, layer_specs, torch_optimizer, device, scopes.stats
        )

    # -- assemble ---------------------------------------------------------------------------
    records = recorder.records
    shapes = [r.shape for r in records]
    perturbed = perturbed_shapes() if perturbed_shapes is not None else None
    token_dims = infer_token_dims(shapes, seq, batch, perturbed)
    saved = to_saved_tensors(records, token_dims)

    layer_profiles: list[LayerProfile] = []
    for index, stats in enumerate(scopes.stats):
        mine = [o for o in owned if o.layer == index]
        layer_saved = [s for s, r in zip(saved, records, strict=True) if r.layer == index]
        layer_grads = sum(grad_per_param.get(id(o.param), 0) for o in mine)
        if index >= len(layer_specs) and not mine and not layer_saved and not stats.forward_flops:
            continue  # an empty pseudo-layer
        modules = layer_specs[index].modules if index < len(layer_specs) else []
        capabilities = block_capabilities(modules)
        layer_profiles.append(
            LayerProfile(
                name=stats.name,
                kind=stats.kind,
                param_bytes=sum(o.nbytes for o in mine),
                grad_bytes=layer_grads,
                optimizer_state_bytes=sum(state_per_param.get(id(o.param), 0) for o in mine),
                saved_bytes=sum(s.nbytes for s in layer_saved),
                saved_tensors=layer_saved,
                input_bytes=stats.input_bytes,
                output_bytes=stats.output_bytes,
                forward_transient_bytes=max(0, stats.forward_transient),
                backward_transient_bytes=max(0, stats.backward_transient - layer_grads),
                forward_flops=stats.forward_flops,
                backward_flops=stats.backward_flops,
                forward_time_s=(
                    max(
                        stats.forward_estimate_s,
                        stats.forward_kernels * device_spec.host_forward_op_s,
                    )
                    if dry
                    else stats.forward_time_s
                ),
                backward_time_s=(
                    max(
                        stats.backward_estimate_s,
                        stats.backward_kernels * device_spec.host_backward_op_s,
                    )
                    if dry
                    else stats.backward_time_s
                ),
                param_count=sum(o.param.numel() for o in mine),
                attention_forward_time_s=_attention_share(stats, dry),
                tokenwise=capabilities.tokenwise,
                tiling=capabilities.tiling,
                query_chunked=capabilities.query_chunked(seq),
            )
        )
    total_saved = sum(layer.saved_bytes for layer in layer_profiles)
    total_grads = sum(grad_per_param.values())
    largest_transient = max(
        [optimizer_transient]
        + [max(p.forward_transient_bytes, p.backward_transient_bytes) for p in layer_profiles]
    )
    predicted = (
        param_bytes
        + total_grads
        + state_bytes
        + input_bytes
        + total_saved
        + retained_bytes
        + largest_transient
    )
    step_time = sum(p.forward_time_s + p.backward_time_s for p in layer_profiles) + optimizer_time
    notes = []
    if dry:
        notes.append(
            f"times are roofline estimates on {device_spec.name}; attention modelled as the "
            f"{semantics} fused kernel"
        )
    if perturbed is None or len(perturbed) != len(shapes):
        notes.append("token dimensions found by matching sizes to the sequence length")
    return ProfileResult(
        model=name or type(model).__name__,
        mode="dry-run" if dry else "measured",
        device=device.type,
        target=device_spec.name if dry else device.type,
        batch=batch,
        seq=seq,
        dtype=dtype or str(first.dtype).replace("torch.", ""),
        optimizer=str(spec),
        layers=layer_profiles,
        param_count=sum(o.param.numel() for o in owned),
        param_bytes=param_bytes,
        grad_bytes=total_grads,
        optimizer_state_bytes=state_bytes,
        saved_bytes=total_saved,
        largest_transient_bytes=largest_transient,
        predicted_peak_bytes=predicted,
        simulated_peak_bytes=None if use_cuda_memory else scopes.global_peak,
        measured_peak_bytes=scopes.global_peak if use_cuda_memory else None,
        step_time_s=step_time,
        timeline=[TimelinePoint(p, layer, b) for p, layer, b in scopes.timeline],
        notes=notes,
    )


def _static_storages(model: nn.Module, input_tensors: list[torch.Tensor]) -> set[int]:
    """Storages that are not activations: parameters, buffers and the batch itself."""
    keys = {storage_key(p) for p in model.parameters()}
    keys |= {storage_key(b) for b in model.buffers()}
    keys |= {storage_key(t) for t in input_tensors}
    return keys


def saved_shapes_only(model: nn.Module, inputs: Inputs, loss_fn: LossFn, semantics: str) -> list:
    """Shapes of the tensors one forward saves (for token-dimension detection on meta)."""
    shapes: list[tuple[int, ...]] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        shapes.append(tuple(t.shape))
        return t

    excluded = _static_storages(model, _input_tensors(inputs))

    def pack_filtered(t: torch.Tensor) -> torch.Tensor:
        if storage_key(t) in excluded:
            return t
        return pack(t)

    with (
        torch.autograd.graph.saved_tensors_hooks(pack_filtered, lambda t: t),
        TargetAttention(semantics),
    ):
        loss_fn(_run_model(model, inputs), inputs)
    return shapes


def _check_positive(**values: int) -> None:
    for key, value in values.items():
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise MemtrainError(f"{key} must be a positive integer, got {value!r}")


TOKEN_PROBE_EXTRA = 16


def profile_causal_lm(
    model: str = "llama-3.2-1b",
    seq: int = 4096,
    batch: int = 1,
    dtype: str = "bf16",
    optimizer: str | OptimizerSpec = "adamw",
    device: str = "meta",
    target: str | DeviceSpec | None = None,
    attn_implementation: str = "auto",
    seed: int = 0,
    layers: Sequence[str] | None = None,
    keep_output: bool = True,
) -> ProfileResult:
    """Profile a Hugging Face causal LM built from a preset name or a local ``config.json``.

    ``device="meta"`` is a dry run (seconds, no memory, even for 70B at 1M tokens); ``cpu`` or
    ``cuda`` build the model with random weights and measure a real step. ``layers`` takes glob
    patterns over module names for another granularity (e.g. ``["model.layers.*.mlp"]``).
    """
    from memtrain.dtypes import parse_dtype
    from memtrain.models import build_causal_lm, load_config

    _check_positive(seq=seq, batch=batch)
    parse_dtype(dtype)
    if device not in ("meta", "cpu", "cuda") and not device.startswith("cuda:"):
        raise MemtrainError(f"unknown device {device!r}; use meta (dry run), cpu or cuda")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise MemtrainError("--device cuda asked for, but no CUDA device is available here")
    config = load_config(model)
    max_positions = getattr(config, "n_positions", None)
    if max_positions is not None and seq > max_positions:
        raise MemtrainError(
            f"{config.name_or_path} has learned position embeddings for at most {max_positions} "
            f"tokens; got --seq {seq}"
        )
    spec = parse_optimizer_spec(optimizer)
    dry = device == "meta"
    target_name = target.name if isinstance(target, DeviceSpec) else target
    semantics = "cpu" if (target_name == "cpu" if dry else device == "cpu") else "cuda"

    def make_inputs(length: int, on: str) -> dict[str, torch.Tensor]:
        generator = torch.Generator().manual_seed(seed)
        ids = torch.randint(0, config.vocab_size, (batch, length), generator=generator)
        ids = ids.to(on)
        return {"input_ids": ids, "labels": ids}

    def perturbed_shapes() -> list[tuple[int, ...]]:
        length = seq + TOKEN_PROBE_EXTRA
        if max_positions is not None and length > max_positions:
            return None
        twin = build_causal_lm(config, dtype, "meta", net.config._attn_implementation, seed)
        twin.train()
        return saved_shapes_only(twin, make_inputs(length, "meta"), default_loss, semantics)

    net = build_causal_lm(config, dtype, device, attn_implementation, seed)
    result = profile_model(
        net,
        make_inputs(seq, device),
        seq=seq,
        batch=batch,
        optimizer=spec,
        target=target if dry else None,
        name=config.name_or_path,
        dtype=str(dtype),
        perturbed_shapes=perturbed_shapes,
        layers=layers,
        keep_output=keep_output,
    )
    result.notes.insert(0, f"attention implementation: {net.config._attn_implementation}")
    return result


def bytes_per_token(result: ProfileResult) -> float:
    """Saved activation bytes per token of the profiled step."""
    return result.saved_bytes / max(1, result.batch * result.seq)


__all__ = [
    "bytes_per_token",
    "default_loss",
    "layers_from_patterns",
    "profile_causal_lm",
    "profile_model",
]
