"""``memtrain.apply(model, plan)``: install a plan on an unmodified model, and remove it again.

Per layer, forward pre/post hooks open and close a saved-tensor-hook scope, and the layer's
mode (memtrain.offload.modes: keep, swap, whole-layer, tiled or token-wise recompute) wraps its
forwards. Everything is undone by :meth:`OffloadHandle.remove`; the model's code is unchanged.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from memtrain.errors import MemtrainError
from memtrain.offload.memo import BlockParts
from memtrain.offload.modes import ActivationMode, resolve
from memtrain.offload.nvme import NvmeStore
from memtrain.offload.params import ParameterStreamer
from memtrain.offload.policy import OffloadPolicy, executed_host_bytes, policy_from_plan
from memtrain.offload.pool import HostPool
from memtrain.offload.swap import LayerState, SwapEngine, in_backward
from memtrain.planner.hostmem import pool_bytes


def _resolve_layers(
    model: nn.Module, layers: Mapping[str, nn.Module | Sequence[nn.Module]] | None
) -> dict[str, list[nn.Module]]:
    if layers is not None:
        return {
            name: [mods] if isinstance(mods, nn.Module) else list(mods)
            for name, mods in layers.items()
        }
    from memtrain.models.build import causal_lm_layers

    return {spec.name: list(spec.modules) for spec in causal_lm_layers(model)}


LOSS = "loss"  # the profiler's name for the model's forward after its last layer (the loss)
HEAD = "lm_head"
TAIL = "lm_head+loss"  # with a fused loss, the head's input and the loss are saved together


OTHER = "other"  # the profiler's name for work outside every layer (rotary tables, masks)


def _check_names(policy: OffloadPolicy, names: set[str], from_plan: bool) -> None:
    outside = policy.layers.get(OTHER)
    if OTHER not in names and outside is not None:
        moved = outside.keep < 1 - 1e-6 or outside.full_recompute
        if moved:
            raise MemtrainError(
                "the plan swaps or recomputes activations of work outside every layer "
                "('other'), which no layer hook can reach; re-plan with that work kept"
            )
        names = names | {OTHER}  # nothing to execute: everything stays where it is
    names = names | {LOSS}
    unknown = sorted(set(policy.layers) - names)
    if unknown:
        raise MemtrainError(
            f"the plan names layers this model lacks ({', '.join(unknown[:3])}"
            f"{', ...' if len(unknown) > 3 else ''}); it was made for another model, re-plan"
        )
    missing = sorted(names - set(policy.layers) - {LOSS, OTHER})
    if from_plan and missing:
        raise MemtrainError(
            f"the plan has no decision for layers {', '.join(missing[:3])}"
            f"{', ...' if len(missing) > 3 else ''}; it was made for another model, re-plan"
        )


def _check_profile(profile: Any, layers: dict[str, list[nn.Module]]) -> None:
    """Refuse a profile (and so the plan made from it) for another model: every layer's
    parameter count, each parameter counted in the first layer that holds it, must match."""
    by_name = {layer.name: layer for layer in profile.layers}
    seen: set[int] = set()
    for name, modules in layers.items():
        count = 0
        for module in modules:
            for param in module.parameters():
                if id(param) not in seen:
                    seen.add(id(param))
                    count += param.numel()
        layer = by_name.get(name)
        if layer is not None and layer.param_count and layer.param_count != count:
            raise MemtrainError(
                f"the profile is for another model: layer {name} has {count} parameters here "
                f"and {layer.param_count} in the profile of {profile.model!r}; profile and plan "
                "this model"
            )


def _batch_shape(args: tuple, kwargs: dict) -> tuple[int, int] | None:
    for value in (kwargs.get("input_ids"), kwargs.get("inputs_embeds"), *args[:1]):
        if isinstance(value, torch.Tensor) and value.dim() >= 2:
            return int(value.shape[0]), int(value.shape[1])
    return None


class OffloadHandle:
    """An installed plan. ``remove()`` (or leaving the ``with`` block) restores the model."""

    def __init__(
        self,
        model: nn.Module,
        policy: OffloadPolicy,
        layers: dict[str, list[nn.Module]],
        *,
        host_pool_bytes: Mapping[str, int] | None = None,
        nvme_bytes: int | None = None,
        profile: Any = None,
        engine_moves_states: bool = False,
    ) -> None:
        self.model = model
        self.policy = policy
        self.layers = layers
        self.removed = False
        self._hooks: list[Any] = []
        self._forwards: list[tuple[nn.Module, Any, bool]] = []  # module, old forward, had one
        self._states: dict[str, LayerState] = {}
        self._attention_parts: list[BlockParts] = []  # token-wise layers' attention calls
        # memtrain.kernels.patch_causal_lm_loss leaves this attribute on the model
        self.fused_loss = hasattr(model, "_memtrain_stock_forward")
        # Another engine (FSDP2's CPU offload) moves parameters, gradients and states where the
        # plan puts them: this handle runs the activation decisions only.
        self.optimizer_attached = engine_moves_states
        self._cleanups: list[Any] = []
        self.steps = 0
        params = list(model.parameters())
        self.device = params[0].device if params else torch.device("cpu")
        streamed = [] if engine_moves_states else self._check_param_offload()
        self._modes: dict[str, ActivationMode] = {  # how each layer is executed
            name: resolve(policy.layers[name], modules, name)
            for name, modules in layers.items()
            if name in policy.layers and not (self.fused_loss and name == HEAD)
        }  # a fused loss bypasses the head: its decision goes to the tail
        self.expected_host_bytes = dict(policy.host_bytes)
        if profile is not None:
            self.expected_host_bytes = executed_host_bytes(policy, profile, self._modes)
        pools = self._make_pools(dict(host_pool_bytes or {}))
        need = self.expected_host_bytes.get("nvme", 0) if nvme_bytes is None else nvme_bytes
        try:
            nvme = (
                NvmeStore(policy.nvme_path, need_bytes=int(need)) if policy.needs("nvme") else None
            )
        except MemtrainError:
            for pool in pools.values():
                pool.close()
            raise
        self.engine = SwapEngine(self.device, pools, nvme)
        self.params: ParameterStreamer | None = None
        try:
            if streamed:
                kept = {
                    p
                    for name, modules in layers.items()
                    if (policy.layers.get(name) is None or policy.layers[name].params == "gpu")
                    for m in modules
                    for p in m.parameters()
                }
                self.params = ParameterStreamer(streamed, self.device, keep_on_device=kept)
                self.params.install(in_backward)
            self._install()
        except BaseException:
            self.remove()
            raise

    # -- setup -------------------------------------------------------------------------

    def _check_param_offload(self) -> list[tuple[str, list[nn.Module]]]:
        """The layers whose parameters stream from host memory (memtrain.offload.params), in
        forward order; a placement this executor cannot run is a one-line error."""
        streamed = []
        for name, modules in self.layers.items():
            layer = self.policy.layers.get(name)
            if layer is None or layer.params == "gpu":
                continue
            if layer.params != "cpu":
                raise MemtrainError(
                    f"layer {name}: the plan puts parameters on {layer.params}; this executor "
                    "streams them from host memory (cpu) only: re-plan, or train through "
                    "DeepSpeed ZeRO-3 with memtrain.offload.deepspeed_config(plan)"
                )
            if layer.optimizer == "gpu" and layer.grads == "gpu":
                raise MemtrainError(
                    f"layer {name}: the plan streams its parameters from the host but keeps "
                    "its gradients and optimizer states on the GPU; re-plan with them off it"
                )
            streamed.append((name, modules))
        several = torch.distributed.is_available() and torch.distributed.is_initialized()
        if streamed and several and torch.distributed.get_world_size() > 1:
            raise MemtrainError(
                "this executor streams parameters from host memory in one process only; with "
                "several, shard them with DeepSpeed ZeRO-3 (memtrain.offload.deepspeed_config)"
            )
        return streamed

    @property
    def needs_optimizer_offload(self) -> bool:
        return any(p.optimizer != "gpu" or p.grads != "gpu" for p in self.policy.layers.values())

    def _make_pools(self, sizes: dict[str, int]) -> dict[str, HostPool]:
        pools: dict[str, HostPool] = {}
        try:
            for tier in ("cpu", "cxl"):
                if not self.policy.needs(tier):
                    continue
                size = sizes.get(tier)
                if size is None:
                    planned = self.expected_host_bytes.get(tier)
                    if not planned:
                        raise MemtrainError(
                            f"the policy swaps to {tier} but gives no size for its pool; pass "
                            f"host_pool_bytes={{'{tier}': ...}} or apply a plan"
                        )
                    size = pool_bytes(planned)  # as the planner predicts it
                node = self.policy.cxl_node if tier == "cxl" else None
                pools[tier] = HostPool(size, name=tier, numa_node=node)
        except BaseException:
            for pool in pools.values():
                pool.close()
            raise
        return pools

    def _install(self) -> None:
        self._hooks += [
            self.model.register_forward_pre_hook(self._model_pre, with_kwargs=True),
            self.model.register_forward_hook(self._model_post, always_call=True),
        ]
        for name, mode in self._modes.items():
            modules = self.layers[name]
            state = self._states[name] = LayerState(name, mode.shares())
            mode.install(self, name, modules, state)
            for module in modules:
                if mode.moves:
                    self._hooks.append(module.register_forward_pre_hook(self._layer_pre(state)))
                self._hooks.append(
                    module.register_forward_hook(self._layer_post(state), always_call=True)
                )
        self._install_loss_scope()  # after the last layer's own hooks, so scopes nest

    def _install_loss_scope(self) -> None:
        """The loss runs in the model's forward after the last layer: its scope opens when the
        last layer returns and closes when the model's forward does.

        With a fused linear cross-entropy (``patch_causal_lm_loss``) the head never runs as a
        module: the fused loss saves the head's input and the log-sum-exp after the final norm,
        so the head's and the loss's decisions apply to that tail together.
        """
        names = [LOSS]
        last_layers = list(self.layers)
        if self.fused_loss and HEAD in self.layers:
            names = [HEAD, LOSS]
            last_layers.remove(HEAD)
        modes = [resolve(self.policy.layers[n]) for n in names if n in self.policy.layers]
        active = [mode for mode in modes if mode.moves]
        if not active or not last_layers:
            return
        if any(mode.wraps_forward for mode in active):
            raise MemtrainError(
                f"the plan recomputes or tiles {' and '.join(names)}; this executor can keep or "
                "swap the loss's saved tensors only"
            )
        state = LayerState(TAIL if len(names) > 1 else LOSS, active[0].shares())
        self._states[state.name] = state
        self._modes[state.name] = active[0]
        for name in names:
            self._modes.setdefault(name, active[0])
        opener = self._layer_pre(state)
        for module in self.layers[last_layers[-1]]:
            self._hooks.append(
                module.register_forward_hook(lambda m, a, o: opener(m, a), always_call=True)
            )

    @property
    def attention_parts(self) -> list[BlockParts]:
        """The parts of the layers whose mode calls the attention kernels itself (token-wise or
        tiled recompute) instead of the model's attention function."""
        return list(self._attention_parts)

    def block_parts(self, module: nn.Module, name: str) -> BlockParts:
        """A Llama-family block's parts, whose attention kernel :meth:`stats` reports."""
        parts = BlockParts(module, name)
        self._attention_parts.append(parts)
        return parts

    def replace_forward(self, module: nn.Module, forward) -> None:
        """Replace ``module.forward`` until :meth:`remove`."""
        had = "forward" in module.__dict__
        self._forwards.append((module, module.__dict__.get("forward"), had))
        module.forward = forward

    # -- hooks ---------------------------------------------------------------------------

    def _model_pre(self, module, args, kwargs):
        if not torch.is_grad_enabled() or in_backward():
            return None
        shape = _batch_shape(args, kwargs)
        if shape is None:
            raise MemtrainError("cannot find input_ids or inputs_embeds in the model's inputs")
        batch, seq = shape
        if self.policy.seq is not None and seq != self.policy.seq:
            raise MemtrainError(
                f"the plan is for sequences of {self.policy.seq} tokens but this batch has "
                f"{seq}; re-plan for {seq} or pad/cut the batch"
            )
        if self.policy.micro_batch is not None and batch != self.policy.micro_batch:
            raise MemtrainError(
                f"the plan is for micro-batches of {self.policy.micro_batch} but this one has "
                f"{batch}; re-plan or change the batch size"
            )
        if self.steps >= 1 and self.needs_optimizer_offload and not self.optimizer_attached:
            raise MemtrainError(
                "the plan keeps optimizer states off the GPU but no offloaded optimizer is "
                "attached; build it with memtrain.offload.offload_optimizer(handle, ...)"
            )
        self.engine.start_step(seq, batch, list(self.model.parameters()))
        self.steps += 1
        if "use_cache" not in kwargs and getattr(getattr(module, "config", None), "use_cache", 0):
            # A key/value cache would keep every layer's k and v alive on the GPU after they
            # were swapped out; a training step has no use for it.
            return args, {**kwargs, "use_cache": False}
        return None

    def _model_post(self, module, args, output):
        for name in (LOSS, TAIL):
            state = self._states.get(name)
            if state is not None and state.scopes:
                state.scopes.pop().__exit__(None, None, None)
        self.engine.finish_forward()
        unwinding = sys.exc_info()[0] is not None  # forward raised: say nothing more
        if torch.is_grad_enabled() and not in_backward() and not unwinding:
            skipped = [
                name
                for name, state in self._states.items()
                if state.step != self.engine.step and self._modes[name].moves
            ]
            if skipped:
                raise MemtrainError(
                    f"layers {', '.join(skipped[:3])} never ran in this forward, so their planned "
                    "decisions were not executed (a patched forward, e.g. a fused loss, bypasses "
                    "them); plan them as keep"
                )
        return None

    def _layer_pre(self, state: LayerState):
        engine = self.engine

        def hook(module, args):
            if not torch.is_grad_enabled() or in_backward():
                return None
            engine.enter_layer(state)
            scope = engine.hooks(state)
            scope.__enter__()
            state.scopes.append(scope)
            return None

        return hook

    def _layer_post(self, state: LayerState):
        engine = self.engine

        def hook(module, args, output):
            if state.scopes:
                state.scopes.pop().__exit__(None, None, None)
                engine.finish_layer(state)
            elif torch.is_grad_enabled() and not in_backward():
                engine.finish_layer(state)  # a kept layer: the one before it copied meanwhile
            return None

        return hook

    # -- results and removal -------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        """Bytes each layer put in each place in the last step, and pool/NVMe usage."""
        return {
            "modes": {name: mode.name for name, mode in self._modes.items()},
            "expected_host_bytes": dict(self.expected_host_bytes),
            "layers": {name: dict(state.stats) for name, state in self._states.items()},
            "totals": dict(self.engine.totals),
            "pools": {
                tier: {
                    "capacity": pool.capacity,
                    "in_use": pool.in_use,
                    "high_water": pool.high_water,
                    "pinned": pool.pinned,
                }
                for tier, pool in self.engine.pools.items()
            },
            "nvme_files": len(self.engine.nvme.files()) if self.engine.nvme else 0,
            "streamed_params": self.params.stats() if self.params is not None else None,
            # fused attention kernel of token-wise layers (cudnn | flash on CUDA; None: unused)
            "attention_kernels": sorted({p.backend for p in self._attention_parts if p.backend}),
        }

    def attach_cleanup(self, callback) -> None:
        """Run ``callback`` when the plan is removed (offloaded optimizers use it)."""
        self._cleanups.append(callback)

    def remove(self) -> None:
        """Take every hook and wrapper off the model and free the pools and swap files."""
        if self.removed:
            return
        self.removed = True
        for callback in getattr(self, "_cleanups", []):
            callback()
        for handle in self._hooks:
            handle.remove()
        for module, old, had in reversed(self._forwards):
            if had:
                module.forward = old
            else:
                del module.forward
        self._hooks, self._forwards = [], []
        if getattr(self, "params", None) is not None:
            self.params.remove()
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.close()
            for pool in engine.pools.values():
                pool.close()
            if engine.nvme is not None:
                engine.nvme.close()

    def __enter__(self) -> OffloadHandle:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def apply(
    model: nn.Module,
    plan: Any,
    *,
    layers: Mapping[str, nn.Module | Sequence[nn.Module]] | None = None,
    cxl_node: int | None = None,
    host_pool_bytes: Mapping[str, int] | None = None,
    nvme_bytes: int | None = None,
    profile: Any = None,
    engine_moves_states: bool = False,
) -> OffloadHandle:
    """Install ``plan`` (a ``Plan``, its dict, a plan file, or an :class:`OffloadPolicy`).

    ``layers`` maps layer names to modules (default: embed, block.<i>, norm, lm_head of a
    Hugging Face causal LM). Host pools are sized from ``host_pool_bytes``, else from
    ``profile`` (the profiler's result for this model and batch: exact for this executor), else
    from the plan's per-layer shares. ``engine_moves_states``: the engine the model trains
    under places parameters, gradients and optimizer states as the plan says (FSDP2's CPU
    offload), so no parameter is streamed here. Returns a handle; ``handle.remove()`` restores
    the model.
    """
    from_plan = not isinstance(plan, OffloadPolicy)
    policy = policy_from_plan(plan, cxl_node=cxl_node)
    if cxl_node is not None:
        policy.cxl_node = cxl_node
    policy.validate()
    resolved = _resolve_layers(model, layers)
    _check_names(policy, set(resolved), from_plan)
    if isinstance(profile, str):
        from memtrain.profile.result import ProfileResult

        profile = ProfileResult.from_json(profile)
    if profile is not None:
        _check_profile(profile, resolved)
        if policy.seq is not None and profile.seq != policy.seq:
            raise MemtrainError(
                f"the profile is for {profile.seq} tokens and the plan for {policy.seq}; "
                "pass the profile the plan was made from"
            )
    return OffloadHandle(
        model,
        policy,
        resolved,
        host_pool_bytes=host_pool_bytes,
        nvme_bytes=nvme_bytes,
        profile=profile,
        engine_moves_states=engine_moves_states,
    )


@contextlib.contextmanager
def offloaded(model: nn.Module, plan: Any, **options: Any) -> Iterator[OffloadHandle]:
    """``with offloaded(model, plan) as handle:`` — the plan is removed on exit."""
    handle = apply(model, plan, **options)
    try:
        yield handle
    finally:
        handle.remove()


__all__ = ["OffloadHandle", "apply", "offloaded"]
