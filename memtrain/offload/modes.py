"""Executor modes: how one layer's saved activations are handled, one class per mode.

As torchtitan's activation-checkpointing policies, a mode knows which layers it can run
(``supports``), where it stores what it saves (``placements``) and how it installs itself on a
layer; a new mode is a new class, not another branch. :func:`resolve` is the one place a plan
entry becomes a mode; :func:`supported_modes` tells a planner what a module can run.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from functools import partial
from typing import Any, ClassVar

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from memtrain.errors import MemtrainError
from memtrain.models.adapters import is_norm_module, token_local_module
from memtrain.models.blocks import tiling_problem, tokenwise_modules_problem
from memtrain.offload.memo import chunk_ranges, tokenwise_forward
from memtrain.offload.router import whole_router_outputs
from memtrain.offload.swap import LayerState, SwapEngine, in_backward
from memtrain.offload.tiled import token_chunked

TOLERANCE = 1e-3  # shares up to this count as nothing
Placements = list[tuple[dict[str, float], float]]  # (shares, bytes) a mode stores


class ActivationMode:
    """Stores the layer's saved tensors where the policy's keep and swap shares say; token-local
    work runs in ``policy.chunks`` sequence chunks through the layer's ``.mlp``."""

    name: ClassVar[str]
    moves: ClassVar[bool] = True  # saved tensors leave the GPU or are recomputed: the layer
    # runs in a saved-tensor scope, and must run for its decision to be executed

    def __init__(self, policy: Any) -> None:
        self.policy = policy  # a LayerPolicy

    @classmethod
    def problem(cls, modules: Sequence[nn.Module], chunks: int = 1, name: str = "") -> str | None:
        """Why this mode cannot run layer ``name``, made of ``modules``, in ``chunks`` sequence
        chunks (None: it can)."""
        return tiling_problem(modules, chunks, name)

    @classmethod
    def supports(cls, modules: Sequence[nn.Module], chunks: int = 1) -> bool:
        return cls.problem(modules, chunks) is None

    @property
    def wraps_forward(self) -> bool:
        """Whether the mode replaces a forward (the loss has none of its own to replace)."""
        return self.policy.chunks > 1

    def shares(self) -> dict[str, float]:
        """Where the layer's saved-tensor scope puts the tensors it stores."""
        return self.policy.stored_shares()

    def placements(self, token_bytes=0.0, attention_bytes=0.0, input_bytes=0.0) -> Placements:
        """What one step stores where, for a layer saving ``token_bytes`` along the token
        dimension (``attention_bytes`` of them attention's) with ``input_bytes`` of input."""
        return [(self.shares(), token_bytes)]

    def tiers(self) -> set[str]:
        """Host tiers this mode writes activations to."""
        return {t for s, _ in self.placements() for t, v in s.items() if t != "gpu" and v > 0}

    def install(self, handle: Any, name: str, modules: list[nn.Module], state: LayerState):
        """Wrap what the layer runs; its hooks are the handle's."""
        if self.policy.chunks > 1:
            _tile_mlp(handle, modules, self.policy.chunks)


class Keep(ActivationMode):
    """Everything stays on the GPU as autograd saves it."""

    name = "keep"
    moves = False  # no saved-tensor scope; a kept layer that never runs loses nothing


class Swap(ActivationMode):
    """Token shares of every saved tensor go to host tiers and come back for backward."""

    name = "swap"


class FullRecompute(ActivationMode):
    """Whole-layer recompute: a non-reentrant checkpoint around each module stores only the
    layer input; tiled MLP chunks are checkpoints of their own, so recompute rebuilds one chunk's
    saved tensors at a time."""

    name = "full_recompute"
    wraps_forward = True

    def shares(self) -> dict[str, float]:
        return self.policy.checkpoint_shares()

    def placements(self, token_bytes=0.0, attention_bytes=0.0, input_bytes=0.0) -> Placements:
        return [(self.shares(), input_bytes)]

    def install(self, handle: Any, name: str, modules: list[nn.Module], state: LayerState):
        if self.policy.chunks > 1:
            _tile_mlp(handle, modules, self.policy.chunks, checkpoint_each=True)
        for module in modules:
            if self.policy.chunks > 1 and is_norm_module(module):
                continue  # chunked with its input saved: a checkpoint of its own
            handle.replace_forward(module, _checkpointed(module.forward))


class TiledRecompute(FullRecompute):
    """Whole-layer recompute of a Llama-family block in sequence chunks: it runs token-wise with
    every token recomputed under one checkpoint that stores only the block input, each chunk of
    token-local work a checkpoint of its own. Backward then holds one chunk's saved tensors at a
    time plus attention's, as the planner prices a tiled block; a checkpoint around the stock
    forward would rebuild every chunk's saved tensors at once."""

    @classmethod
    def problem(cls, modules: Sequence[nn.Module], chunks: int = 1, name: str = "") -> str | None:
        if chunks < 2:
            return f"layer {name}: tiled recompute needs more than one chunk"
        return TokenwiseRecompute.problem(modules, chunks, name)

    def install(self, handle: Any, name: str, modules: list[nn.Module], state: LayerState):
        parts = handle.block_parts(modules[0], name)
        whole = tokenwise_forward(parts, 0.0, self.policy.chunks, _unscoped, _unscoped)
        handle.replace_forward(modules[0], _checkpointed(modules[0].forward, training=whole))


class TokenwiseRecompute(ActivationMode):
    """Token-wise (MEMO) recompute of a Llama-family block: the block input and the attention
    output are stored, the token-local work of ``policy.token_fraction`` of the tokens is
    recomputed in backward (see memtrain.offload.memo)."""

    name = "tokenwise"
    wraps_forward = True

    @classmethod
    def problem(cls, modules: Sequence[nn.Module], chunks: int = 1, name: str = "") -> str | None:
        return tokenwise_modules_problem(modules, name)  # the block's type and parts

    def placements(self, token_bytes=0.0, attention_bytes=0.0, input_bytes=0.0) -> Placements:
        policy, rho = self.policy, self.policy.token_fraction
        return [
            (policy.stored_shares(), (1 - rho) * (token_bytes - attention_bytes)),
            (policy.checkpoint_shares(), rho * input_bytes),
            (policy.attention_shares(), attention_bytes),
        ]

    def install(self, handle: Any, name: str, modules: list[nn.Module], state: LayerState):
        parts, policy = handle.block_parts(modules[0], name), self.policy
        roles = {
            "input": policy.checkpoint_shares(),
            "stored": policy.stored_shares(),
            "attention": policy.attention_shares(),
        }
        engine = handle.engine

        def scope(role):
            return engine.hooks(state, lambda tensor: roles[role(tensor)])

        forward = tokenwise_forward(
            parts, 1.0 - policy.token_fraction, policy.chunks, scope, engine.token_lengths_added
        )
        handle.replace_forward(modules[0], _training(modules[0].forward, forward))


MODES = (Keep, Swap, FullRecompute, TiledRecompute, TokenwiseRecompute)


def supported_modes(
    module: nn.Module | Sequence[nn.Module], chunks: int = 1
) -> list[type[ActivationMode]]:
    """The modes that can run a layer made of ``module`` (or modules) in ``chunks`` chunks."""
    modules = [module] if isinstance(module, nn.Module) else list(module)
    return [mode for mode in MODES if mode.supports(modules, chunks)]


def resolve(
    policy: Any, modules: Sequence[nn.Module] | None = None, name: str = ""
) -> ActivationMode:
    """The mode that executes ``policy`` (a LayerPolicy): the one place a plan entry becomes a
    mode. Without ``modules`` it is the plan's own choice. With them, a whole-layer recompute of a
    Llama-family block that still stores more than its input (the attention output) runs
    token-wise, one in chunks runs tiled, and a mode that cannot run them is an error."""
    if policy.full_recompute:
        mode = FullRecompute(policy)
        tokenwise = modules is None or TokenwiseRecompute.supports(modules)
        if policy.stores_more_than_input and tokenwise:
            # only token-wise recompute stores more than the input: the plan's own choice too,
            # so the host tiers it writes are known without the modules
            mode = TokenwiseRecompute(policy)
        elif modules is not None and tokenwise and TiledRecompute.supports(modules, policy.chunks):
            mode = TiledRecompute(policy)
    elif policy.recompute > TOLERANCE:
        mode = TokenwiseRecompute(policy)
    elif any(v > TOLERANCE for v in policy.swap.values()):
        mode = Swap(policy)
    else:
        mode = Keep(policy)
    problem = None if modules is None else mode.problem(modules, policy.chunks, name)
    if problem:
        raise MemtrainError(problem)
    return mode


def _tile_mlp(handle: Any, modules: list[nn.Module], chunks: int, checkpoint_each=False) -> None:
    for mlp in filter(None, map(token_local_module, modules)):
        handle.replace_forward(mlp, _chunked(mlp.forward, chunks, handle.engine, checkpoint_each))
    for norm in filter(is_norm_module, modules):
        handle.replace_forward(norm, token_chunked(norm.forward, norm, chunks))


def _training(forward, training):
    """``training`` in a training forward; ``forward`` without grad and in recompute."""

    def wrapper(*args, **kwargs):
        if not torch.is_grad_enabled() or in_backward():
            return forward(*args, **kwargs)
        return training(*args, **kwargs)

    return wrapper


def _checkpointed(forward, training=None):
    """Whole-layer recompute: a non-reentrant checkpoint around the layer's own forward, or
    around ``training`` (another forward for the training step; ``forward`` runs elsewhere)."""
    return _training(forward, partial(checkpoint, training or forward, use_reentrant=False))


def _chunked(forward, chunks: int, engine: SwapEngine, checkpoint_each: bool = False):
    """Run a token-local module over sequence chunks (dim 1) and concatenate.

    ``checkpoint_each``: every chunk is a checkpoint of its own, for modules inside a
    whole-layer checkpoint, whose recompute would otherwise rebuild all chunks' saved tensors
    at once (tiling the forward alone).
    """

    def run(part, *args, **kwargs):
        if checkpoint_each and torch.is_grad_enabled():
            return checkpoint(forward, part, *args, use_reentrant=False, **kwargs)
        return forward(part, *args, **kwargs)

    def wrapper(x, *args, **kwargs):
        if x.dim() < 2 or x.shape[1] < 2:
            return forward(x, *args, **kwargs)
        ranges = chunk_ranges(0, x.shape[1], chunks)
        sizes = sorted({b - a for a, b in ranges})
        with engine.token_lengths_added(sizes), whole_router_outputs(x.shape[0]):
            outs = [run(x[:, a:b], *args, **kwargs) for a, b in ranges]
        return torch.cat(outs, dim=1)

    return wrapper


def _unscoped(*_: Any) -> contextlib.AbstractContextManager:
    """No saved-tensor scope: inside a whole-layer checkpoint the checkpoint owns them."""
    return contextlib.nullcontext()
