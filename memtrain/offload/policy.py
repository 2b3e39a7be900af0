"""Per-layer execution policies, and the adapter from a planner ``Plan`` to them.

A :class:`LayerPolicy` says what happens to one layer's saved activations: the token share kept
on the GPU, swapped to each host tier or recomputed, whether the whole layer is recomputed, how
many sequence chunks its token-local work runs in, and where its parameters, gradients and
optimizer states live. Tests build policies directly; users pass a plan.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from memtrain.errors import ConfigError, MemtrainError
from memtrain.offload.modes import TOLERANCE, ActivationMode, resolve
from memtrain.profile.result import is_attention_op

HOST_TIERS = ("cpu", "cxl", "nvme")
PLACES = ("gpu", *HOST_TIERS)


@dataclass
class LayerPolicy:
    """What one layer does with its saved activations (shares of its token-dim bytes)."""

    keep: float = 1.0
    swap: dict[str, float] = field(default_factory=dict)  # host tier -> token share
    recompute: float = 0.0  # share of token-dim bytes recomputed (the plan's number)
    full_recompute: bool = False  # recompute everything that is not stored
    recompute_tokens: float | None = None  # token share whose token-local work is recomputed
    # (MEMO); None: equal to ``recompute``
    input_checkpoint: dict[str, float] = field(default_factory=dict)  # where a recomputed
    # layer's input is stored (gpu or a host tier -> share); empty: like keep/swap
    chunks: int = 1  # sequence chunks of token-local work (MLP)
    params: str = "gpu"
    grads: str = "gpu"
    optimizer: str = "gpu"

    def validate(self, name: str) -> None:
        shares = [self.keep, self.recompute, *self.swap.values(), *self.input_checkpoint.values()]
        if any(not math.isfinite(v) or v < -TOLERANCE or v > 1 + TOLERANCE for v in shares):
            raise ConfigError(f"layer {name}: every share must lie in [0, 1]")
        unknown = set(self.swap) - set(HOST_TIERS)
        if unknown:
            raise ConfigError(
                f"layer {name}: unknown swap tier {sorted(unknown)[0]!r}; use cpu, cxl or nvme"
            )
        unknown = set(self.input_checkpoint) - set(PLACES)
        if unknown:
            raise ConfigError(
                f"layer {name}: unknown checkpoint tier {sorted(unknown)[0]!r}; "
                "use gpu, cpu, cxl or nvme"
            )
        total = self.keep + self.recompute + sum(self.swap.values())
        if not self.full_recompute and abs(total - 1.0) > TOLERANCE:
            raise ConfigError(f"layer {name}: keep + swap + recompute is {total:.4f}, it must be 1")
        if self.chunks < 1 or int(self.chunks) != self.chunks:
            raise ConfigError(f"layer {name}: chunks must be a positive integer, got {self.chunks}")
        for what in ("params", "grads", "optimizer"):
            place = getattr(self, what)
            if place not in PLACES:
                raise ConfigError(f"layer {name}: {what} on {place!r}; use gpu, cpu, cxl or nvme")

    @property
    def token_fraction(self) -> float:
        """Share of tokens whose token-local work is recomputed."""
        if self.recompute_tokens is not None:
            return min(1.0, max(0.0, self.recompute_tokens))
        return 1.0 if self.full_recompute else min(1.0, self.recompute)

    @property
    def stores_more_than_input(self) -> bool:
        """A recomputed layer that still stores some of its saved tensors (e.g. the attention
        output a plan marks as always stored): executed token-wise, not by a checkpoint."""
        return self.full_recompute and self.keep + sum(self.swap.values()) > TOLERANCE

    @property
    def mode(self) -> str:
        """The plan's own mode by name (keep | swap | full_recompute | tokenwise), for reports;
        memtrain.offload.modes.resolve gives the mode that runs it on a layer."""
        return resolve(self).name

    def stored_shares(self) -> dict[str, float]:
        """Where the stored (not recomputed) tokens go, normalised to sum to 1."""
        raw = {"gpu": max(self.keep, 0.0)}
        raw.update({t: max(v, 0.0) for t, v in self.swap.items() if v > TOLERANCE})
        return _normalise(raw)

    def checkpoint_shares(self) -> dict[str, float]:
        """Where a recomputed layer's input lives."""
        if self.input_checkpoint and sum(self.input_checkpoint.values()) > TOLERANCE:
            return _normalise(dict(self.input_checkpoint))
        return self.stored_shares()

    def attention_shares(self) -> dict[str, float]:
        """Where token-wise recompute stores the attention output and log-sum-exp: with the
        stored tokens (so every tier gets exactly its planned bytes), or, where the policy
        stores nothing else, with the block input."""
        if self.keep + sum(self.swap.values()) > TOLERANCE:
            return self.stored_shares()
        return self.checkpoint_shares()

    def tiers(self) -> set[str]:
        """Host tiers the plan's own mode writes activations to."""
        return resolve(self).tiers()


def _normalise(shares: dict[str, float]) -> dict[str, float]:
    total = sum(shares.values())
    if total <= TOLERANCE:
        return {"gpu": 1.0}
    return {t: v / total for t, v in shares.items() if v / total > 1e-9}


@dataclass
class OffloadPolicy:
    """Policies for named layers plus what the plan says about the run.

    ``host_bytes`` is the planned number of activation bytes per host tier in one step; it sizes
    the pinned pools and the NVMe free-space check up front. ``seq`` and ``model``, when set,
    are checked against the model and the batch so a plan for another run is refused.
    """

    layers: dict[str, LayerPolicy]
    seq: int | None = None
    micro_batch: int | None = None
    model: str | None = None
    nvme_path: str | None = None
    cxl_node: int | None = None
    host_bytes: dict[str, int] = field(default_factory=dict)

    def validate(self) -> None:
        for name, policy in self.layers.items():
            policy.validate(name)
        if self.needs("nvme") and not self.nvme_path:
            raise ConfigError("the policy swaps to NVMe but names no path; set nvme_path")
        if self.needs("cxl") and self.cxl_node is None:
            raise ConfigError(
                "the policy swaps to CXL but names no NUMA node; pass cxl_node= (see "
                "/sys/devices/system/node)"
            )

    def needs(self, tier: str) -> bool:
        return any(tier in p.tiers() for p in self.layers.values())


def _shares(entry: Mapping[str, Any], key: str) -> dict[str, float]:
    value = entry.get(key) or {}
    if not isinstance(value, Mapping):
        raise ConfigError(f"plan layer {entry.get('name')!r}: {key} must be a mapping")
    return {str(t): float(v) for t, v in value.items() if float(v) > 0}


def layer_policy_from_entry(entry: Mapping[str, Any]) -> LayerPolicy:
    """One plan layer (``Plan.to_dict()['layers'][i]``) as a :class:`LayerPolicy`."""
    checkpoint = _shares(entry, "input_checkpoint")
    try:
        recompute = float(entry.get("recompute", 0.0))
        # The plan's recompute share counts bytes; the tokens whose input it stores for
        # recompute say which token share is recomputed (they differ where some bytes, such as
        # the attention output, are always stored).
        tokens = min(1.0, sum(checkpoint.values())) if checkpoint and recompute > 0 else None
        return LayerPolicy(
            keep=float(entry.get("keep", 1.0)),
            swap=_shares(entry, "swap"),
            recompute=recompute,
            full_recompute=bool(entry.get("full_recompute", False)),
            input_checkpoint=checkpoint,
            recompute_tokens=tokens,
            chunks=int(entry.get("chunks", 1)),
            params=str(entry.get("params", "gpu")),
            grads=str(entry.get("grads", "gpu")),
            optimizer=str(entry.get("optimizer", "gpu")),
        )
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"plan layer {entry.get('name')!r} is malformed ({exc})") from None


def planned_host_bytes(layers: list[Mapping[str, Any]]) -> dict[str, int]:
    """Activation bytes per host tier one step of the plan writes."""
    return _host_bytes(
        placement
        for entry in layers
        for placement in (
            (_shares(entry, "swap"), float(entry.get("token_saved_bytes", 0))),
            (_shares(entry, "input_checkpoint"), float(entry.get("input_checkpoint_bytes", 0))),
        )
    )


def _host_bytes(placements: Iterable[tuple[dict[str, float], float]]) -> dict[str, int]:
    """Bytes per host tier of ``(shares, bytes)`` placements."""
    out: dict[str, float] = {}
    for shares, nbytes in placements:
        for tier, share in shares.items():
            if tier != "gpu" and share > 0:
                out[tier] = out.get(tier, 0.0) + share * nbytes
    return {t: int(math.ceil(v)) for t, v in out.items() if v > 0}


def policy_from_plan(plan: Any, *, cxl_node: int | None = None) -> OffloadPolicy:
    """A ``Plan``, its dict, or a path to its YAML/JSON file, as an :class:`OffloadPolicy`."""
    if isinstance(plan, OffloadPolicy):
        return plan
    if isinstance(plan, str | Path):
        from memtrain.planner.plan import Plan

        plan = Plan.load(plan)
    if hasattr(plan, "to_dict"):
        plan = plan.to_dict()
    if not isinstance(plan, Mapping):
        raise MemtrainError(
            f"cannot apply a {type(plan).__name__}; pass a Plan, its dict, a plan file or an "
            "OffloadPolicy"
        )
    if plan.get("schema") not in (None, "memtrain.plan"):
        raise ConfigError("not a memtrain plan (schema is not 'memtrain.plan')")
    entries = plan.get("layers")
    if not isinstance(entries, list) or not entries:
        raise ConfigError("the plan has no layers; re-run memtrain plan")
    layers = {str(e["name"]): layer_policy_from_entry(e) for e in entries}
    hardware = plan.get("hardware") or {}
    return OffloadPolicy(
        layers=layers,
        seq=plan.get("seq"),
        micro_batch=plan.get("micro_batch"),
        model=plan.get("model"),
        nvme_path=hardware.get("nvme_path"),
        cxl_node=cxl_node if cxl_node is not None else hardware.get("cxl_node"),
        host_bytes=planned_host_bytes(entries),
    )


def executed_host_bytes(
    policy: OffloadPolicy, profile: Any, modes: Mapping[str, ActivationMode]
) -> dict[str, int]:
    """Host bytes per tier one step moves when this executor runs ``policy`` on the profiled
    model, each layer in its mode from ``modes`` (else the plan's own): sizes pools exactly
    where a plan's per-layer totals cannot (token-wise recompute stores the block input and the
    attention output of every recomputed token)."""
    placements = []
    for layer in profile.layers:
        entry = policy.layers.get(layer.name)
        if entry is not None:
            token = [t for t in layer.saved_tensors if t.token_dim is not None]
            attention = sum(t.nbytes for t in token if is_attention_op(t.op))
            mode = modes.get(layer.name) or resolve(entry)
            nbytes = (sum(t.nbytes for t in token), attention, layer.input_bytes)
            placements += mode.placements(*nbytes)
    return _host_bytes(placements)


def optimizer_host_allocation(
    policy: OffloadPolicy,
    layers: Mapping[str, Iterable[Any]],
    optimizer: str,
    overlap: bool = False,
) -> dict[str, int]:
    """Host bytes per tier memtrain.offload.optimizer.OffloadedOptimizer allocates for
    ``policy`` on a model made of ``layers`` (name -> modules, a meta-device model will do):
    per parameter whose layer's optimizer is off the GPU, a float32 master and a gradient buffer
    in the parameter's dtype on the CPU (``overlap``: no buffers, the ring of slots instead) and
    its states on the float32 master (by formula, memtrain.optim.memory) where the plan puts
    them, plus the largest host parameter's gradient staging (its float32 widening for the
    step; the ring: memtrain.planner.hostmem.grad_staging_bytes); NVMe states also pass through
    host memory for the step, a few adjacent layers at a time (the largest window of
    memtrain.planner.hostmem.nvme_state_window). Each parameter counts in the first layer that
    holds it, as the executor places it."""
    import torch

    from memtrain.optim.memory import parse_optimizer_spec, state_bytes_for
    from memtrain.planner.hostmem import grad_staging_bytes, nvme_state_peak, optimizer_host_bytes

    spec = parse_optimizer_spec(optimizer)
    seen: set[int] = set()
    out: dict[str, float] = {}
    on_nvme: list[float] = []  # per layer, in the model's order: its states on NVMe
    widened = ring = 0.0  # the largest host parameter's float32 widening, and the ring
    for name, modules in layers.items():
        entry = policy.layers.get(name)
        on_nvme.append(0.0)
        for module in modules:
            for param in module.parameters():
                if id(param) in seen or not param.requires_grad:
                    continue
                seen.add(id(param))
                if entry is None or (entry.optimizer == "gpu" and entry.grads == "gpu"):
                    continue
                place = entry.optimizer if entry.optimizer != "gpu" else "cpu"
                mode = {"params": entry.params, "grads": "cpu", "optimizer": place}
                states = state_bytes_for(param.shape, torch.float32, spec)
                nbytes = param.numel() * param.element_size()
                if place == "nvme":
                    on_nvme[-1] += states
                for tier, value in optimizer_host_bytes(
                    mode, states, param.numel(), nbytes, overlap
                ).items():
                    out[tier] = out.get(tier, 0.0) + value
                alone = grad_staging_bytes(nbytes, param.element_size(), False)
                widened = max(widened, alone)
                ring = max(ring, grad_staging_bytes(nbytes, param.element_size(), overlap) - alone)
    if widened or ring:
        out["cpu"] = out.get("cpu", 0.0) + widened + ring
    if any(on_nvme):
        out["cpu"] = out.get("cpu", 0.0) + nvme_state_peak(on_nvme)
    return {t: int(v) for t, v in out.items() if v > 0}


def host_allocation(
    policy: OffloadPolicy,
    profile: Any,
    modes: Mapping[str, ActivationMode],
    layers: Mapping[str, Iterable[Any]] | None = None,
    optimizer: str | None = None,
    overlap: bool = False,
) -> dict[str, dict[str, int]]:
    """What the executor allocates on each host tier for ``policy``: the activation pool as
    memtrain.offload.apply sizes it (``pool``, from :func:`executed_host_bytes`), the host
    optimizer's buffers and states (``optimizer``, with ``layers`` and ``optimizer``: by
    formula per parameter; ``overlap``: an overlapped host step's ring instead of gradient
    buffers), and their ``total``. The plan's predicted host peak is this total
    (memtrain.planner.hostmem)."""
    from memtrain.planner.hostmem import POOLED_TIERS, pool_bytes

    activations = executed_host_bytes(policy, profile, modes)
    states = (
        optimizer_host_allocation(policy, layers, optimizer or profile.optimizer, overlap)
        if layers is not None
        else {}
    )
    out: dict[str, dict[str, int]] = {}
    for tier in sorted(set(activations) | set(states)):
        planned = activations.get(tier, 0)
        pool = pool_bytes(planned) if tier in POOLED_TIERS else planned
        row = {"activations": planned, "pool": pool, "optimizer": states.get(tier, 0)}
        row["total"] = row["pool"] + row["optimizer"]
        out[tier] = row
    return out
