"""Count the activations autograd keeps for backward, layer by layer.

A ``saved_tensors_hooks`` pack hook sees every tensor autograd saves. Storages are identified by
their storage object (``untyped_storage()._cdata``), never by ``data_ptr()`` (all meta tensors
have pointer 0), so a storage saved twice or through a view counts once, and parameters (and
other tensors named as static, such as the batch) are not activations.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field

import torch

from memtrain.profile.result import SavedTensor
from memtrain.profile.scopes import LayerScopes


@dataclass
class SavedRecord:
    layer: int
    shape: tuple[int, ...]
    dtype: torch.dtype
    nbytes: int
    is_layer_input: bool
    op: str


@dataclass
class SavedTensorRecorder:
    """Pack-hook state for one step."""

    scopes: LayerScopes
    excluded_storages: set[int]
    producer: callable = lambda tensor: ""
    records: list[SavedRecord] = field(default_factory=list)
    _seen: set[int] = field(default_factory=set)

    def pack(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.scopes.phase != "forward":
            return tensor
        storage = tensor.untyped_storage()
        key = storage._cdata
        if key in self.excluded_storages:
            return tensor
        nbytes = 0
        if key not in self._seen:
            self._seen.add(key)
            # Forget the id when the storage dies: a later storage may reuse it.
            weakref.finalize(storage, self._seen.discard, key)
            nbytes = storage.nbytes()
        layer = self.scopes.current
        self.records.append(
            SavedRecord(
                layer=layer,
                shape=tuple(tensor.shape),
                dtype=tensor.dtype,
                nbytes=nbytes,
                is_layer_input=key == self.scopes.stats[layer].input_storage,
                op=self.producer(tensor),
            )
        )
        return tensor

    @staticmethod
    def unpack(tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    @property
    def seen_storages(self) -> set[int]:
        return self._seen

    def hooks(self):
        return torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack)


def infer_token_dims(
    shapes: list[tuple[int, ...]],
    seq: int,
    batch: int,
    perturbed: list[tuple[int, ...]] | None = None,
) -> list[int | None]:
    """Which dimension of each saved tensor grows with the sequence.

    With ``perturbed`` (the same step's shapes at a slightly longer sequence) the answer is exact:
    the first dimension whose size changed. Otherwise a dimension of size ``seq`` (or
    ``batch * seq`` for flattened tokens) is taken, the first one when several match; failing
    that, the rows of a 1-D or 2-D tensor with a small multiple of the tokens (a mixture of
    experts' routed copies: tokens x experts per token).
    """
    if perturbed is not None and len(perturbed) == len(shapes):
        result: list[int | None] = []
        for a, b in zip(shapes, perturbed, strict=True):
            changed = [i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y]
            result.append(changed[0] if changed and len(a) == len(b) else None)
        return result
    result = []
    for shape in shapes:
        dim = next((i for i, size in enumerate(shape) if size == seq), None)
        if dim is None and batch > 1:
            dim = next((i for i, size in enumerate(shape) if size == batch * seq), None)
        if dim is None and 1 <= len(shape) <= 2 and _routed_rows(shape[0], batch * seq):
            dim = 0
        result.append(dim)
    return result


ROUTED_COPIES = range(2, 17)  # experts per token a mixture of experts sends each token to


def _routed_rows(rows: int, tokens: int) -> bool:
    return tokens > 0 and rows % tokens == 0 and rows // tokens in ROUTED_COPIES


def to_saved_tensors(records: list[SavedRecord], token_dims: list[int | None]) -> list[SavedTensor]:
    return [
        SavedTensor(
            shape=list(r.shape),
            dtype=str(r.dtype).replace("torch.", ""),
            nbytes=r.nbytes,
            token_dim=dim,
            is_layer_input=r.is_layer_input,
            op=r.op,
        )
        for r, dim in zip(records, token_dims, strict=True)
    ]
