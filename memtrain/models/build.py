"""Build random-weight causal LMs from configs, on the meta device or a real one."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from memtrain.dtypes import parse_dtype
from memtrain.errors import ConfigError, MemtrainError


def build_causal_lm(
    config,
    dtype: str | torch.dtype = "bf16",
    device: str | torch.device = "meta",
    attn_implementation: str = "auto",
    seed: int = 0,
) -> nn.Module:
    """Instantiate ``AutoModelForCausalLM.from_config`` with random weights.

    On ``meta`` nothing is allocated, so a 70B model costs a few megabytes of Python objects.
    ``attn_implementation="auto"`` takes PyTorch's fused attention (``sdpa``) where the
    architecture supports it and ``eager`` otherwise; the choice is left in
    ``model.config._attn_implementation`` for reports.
    """
    from transformers import AutoModelForCausalLM

    torch_dtype = parse_dtype(dtype)
    device = torch.device(device)
    choices = ["sdpa", "eager"] if attn_implementation == "auto" else [attn_implementation]
    for index, choice in enumerate(choices):
        config._attn_implementation = choice
        torch.manual_seed(seed)
        try:
            with device:
                return AutoModelForCausalLM.from_config(
                    config, dtype=torch_dtype, attn_implementation=choice
                )
        except ValueError as exc:
            if index + 1 < len(choices) and "does not support" in str(exc):
                continue
            message = str(exc).strip().splitlines()[0]
            raise ConfigError(f"cannot build {config.name_or_path!r}: {message}") from None
    raise AssertionError("unreachable")


@dataclass
class LayerSpec:
    """One profiling unit: a name, what kind of layer it is, and the modules that make it up."""

    name: str
    kind: str
    modules: list[nn.Module] = field(default_factory=list)


def _is_norm(name: str, module: nn.Module) -> bool:
    lowered = name.lower()
    return isinstance(module, nn.LayerNorm) or "norm" in lowered or lowered in {"ln_f"}


def causal_lm_layers(model: nn.Module) -> list[LayerSpec]:
    """Default granularity for a Hugging Face causal LM.

    Embeddings (token and learned position embeddings together), each transformer block, the
    final norm and the LM head. The loss, computed after the head, is added by the profiler.
    The parts are looked for in the base model and, where it wraps them in one more module (OPT's
    ``model.decoder``), inside that module.
    """
    base = getattr(model, "base_model", None)
    if base is None or base is model:
        raise MemtrainError(
            f"{type(model).__name__} is not a Hugging Face causal LM; pass layers= to the profiler"
        )
    found = _find_parts(base, depth=2)
    head = model.get_output_embeddings()
    if found is None or head is None:
        raise MemtrainError(
            f"cannot find embeddings, blocks and head in {type(model).__name__}; "
            "pass layers= to the profiler"
        )
    embeddings, blocks, norm = found
    layers = [LayerSpec("embed", "embedding", embeddings)]
    layers += [LayerSpec(f"block.{i}", "block", [b]) for i, b in enumerate(blocks)]
    if norm is not None:
        layers.append(LayerSpec("norm", "norm", [norm]))
    layers.append(LayerSpec("lm_head", "head", [head]))
    return layers


def params_by_layer(
    model: nn.Module, layers: Sequence[tuple[str, Sequence[nn.Module]]] | None = None
) -> Iterator[tuple[str, list[tuple[str, nn.Parameter]]]]:
    """Each layer's trainable parameters, with their names in ``model``: a parameter counts in
    the first layer that holds it (a tied one once), as the profiler counts it. ``layers``:
    ``(name, modules)`` pairs (default: :func:`causal_lm_layers`); works on meta models."""
    if layers is None:
        layers = [(spec.name, spec.modules) for spec in causal_lm_layers(model)]
    names = {id(p): n for n, p in model.named_parameters()}
    seen: set[int] = set()
    for layer, modules in layers:
        found = []
        for module in modules:
            for param in module.parameters():
                if id(param) in seen or not param.requires_grad:
                    continue
                seen.add(id(param))
                found.append((names.get(id(param), ""), param))
        yield layer, found


def _find_parts(container: nn.Module, depth: int):
    """(embeddings, block list, final norm or None) among ``container``'s children, or inside
    the one child that holds them, ``depth`` levels down at most; None when not found."""
    embeddings: list[nn.Module] = []
    blocks: nn.ModuleList | None = None
    norms_before: list[nn.Module] = []
    norm_after: nn.Module | None = None
    for name, child in container.named_children():
        if isinstance(child, nn.Embedding):
            embeddings.append(child)
        elif isinstance(child, nn.ModuleList) and len(child) and blocks is None:
            blocks = child
        elif _is_norm(name, child):
            if blocks is not None:
                norm_after = child
            elif "final" in name.lower():  # declared before the blocks, run after them (OPT)
                norms_before.append(child)
    if blocks is not None and embeddings:
        return embeddings, blocks, norm_after if norm_after is not None else _final(norms_before)
    if depth <= 0 or embeddings or blocks is not None:
        return None
    inner = [
        found
        for child in container.children()
        if (found := _find_parts(child, depth - 1)) is not None
    ]
    return inner[0] if len(inner) == 1 else None


def _final(norms: list[nn.Module]) -> nn.Module | None:
    return norms[-1] if norms else None


def meta_twin(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose parameters and buffers are on ``meta``: the same modules (custom
    blocks, adapters such as LoRA, frozen weights) at no memory cost, for a dry run of exactly
    what will train. Tied weights stay tied."""
    import copy

    memo: dict[int, object] = {}
    for tensor in [*model.parameters(), *model.buffers()]:
        if id(tensor) in memo:
            continue
        twin = torch.empty_like(tensor, device="meta")
        if isinstance(tensor, nn.Parameter):
            twin = nn.Parameter(twin, requires_grad=tensor.requires_grad)
        memo[id(tensor)] = twin
    return copy.deepcopy(model, memo)
