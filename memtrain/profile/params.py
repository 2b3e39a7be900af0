"""Parameters per layer: owned once (tied weights by identity or storage), with their bytes."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from memtrain.models.build import LayerSpec


@dataclass
class OwnedParam:
    name: str
    param: nn.Parameter
    layer: int  # index into the layer list; len(layers) + 1 means "other"

    @property
    def nbytes(self) -> int:
        return self.param.numel() * self.param.element_size()


def storage_key(tensor: torch.Tensor) -> int:
    """Identity of a tensor's storage; works on meta tensors, unlike ``data_ptr()``."""
    return tensor.untyped_storage()._cdata


def assign_params(model: nn.Module, layers: list[LayerSpec], other_index: int) -> list[OwnedParam]:
    """Give every distinct parameter to the first layer that holds it.

    Tied weights (the same ``Parameter``, or two parameters on one storage) are counted once,
    in the layer that comes first (the embeddings, for a tied LM head).
    """
    names: dict[int, str] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(param), name)  # a tied weight goes by its first name
    seen_ids: set[int] = set()
    seen_storages: set[int] = set()
    owned: list[OwnedParam] = []

    def take(param: nn.Parameter, layer: int) -> None:
        key = storage_key(param)
        if id(param) in seen_ids or key in seen_storages:
            return
        seen_ids.add(id(param))
        seen_storages.add(key)
        owned.append(OwnedParam(names.get(id(param), "?"), param, layer))

    for index, spec in enumerate(layers):
        for module in spec.modules:
            for param in module.parameters():
                take(param, index)
    for param in model.parameters():
        take(param, other_index)
    return owned
