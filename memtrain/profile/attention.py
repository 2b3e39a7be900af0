"""Make attention on meta tensors save what it would save on the target device.

On the meta device PyTorch picks the "math" attention, which keeps the full S x S attention
matrix for backward; on a GPU (and on the CPU) fused kernels keep only the output and a
log-sum-exp per row. A dry run therefore routes ``scaled_dot_product_attention`` to the fused
op the target device would choose, so saved bytes and FLOPs match a real run.

The route also prepares the mask as SDPA does before a fused kernel: a boolean mask becomes an
additive one in the query's dtype (a new S x S buffer per call, which the kernel saves for
backward), and the memory-efficient kernel gets a bias padded to aligned rows.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

MATH, FLASH, EFFICIENT = 0, 1, 2
BIAS_ALIGNMENT = 8  # elements; the memory-efficient kernel's bias rows start on this boundary

_SDPA = F.scaled_dot_product_attention
# torch.nn.functional code that calls SDPA by its module-global name (nn.MultiheadAttention and
# so nn.Transformer*): a function mode is off while its handler runs, so such nested calls would
# reach the meta "math" kernel unless the name itself is routed for the call.
_CALLS_SDPA_INSIDE = (F.multi_head_attention_forward,)


def additive_mask(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """SDPA's own conversion of a boolean mask (``where(mask, 0, -inf)`` in the query's dtype).

    Every fused kernel gets (and saves) this new buffer, one per call, so a boolean mask shared
    by all layers still costs each layer a float copy; an additive mask passes through.
    """
    if mask is None or mask.dtype != torch.bool:
        return mask
    neg_inf = torch.scalar_tensor(float("-inf"), dtype=dtype, device=mask.device)
    return torch.where(mask, 0.0, neg_inf)


def _is_aligned(bias: torch.Tensor) -> bool:
    strides = bias.stride()
    return strides[-1] == 1 and all(s % BIAS_ALIGNMENT == 0 for s in strides[:-1])


def efficient_bias(mask: torch.Tensor, query: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """The bias SDPA hands the memory-efficient kernel: rows padded into a new buffer when they
    do not start on aligned addresses, then broadcast to (batch, heads, queries, keys)."""
    if not _is_aligned(mask):
        size = mask.shape[-1]
        pad = BIAS_ALIGNMENT - size % BIAS_ALIGNMENT
        mask = F.pad(mask, (0, pad))[..., :size]
    return mask.expand(*query.shape[:-1], key.shape[-2])


def cpu_backend(query, key, value, attn_mask, dropout_p, is_causal, enable_gqa) -> int:
    """Ask PyTorch's own CPU selector, on tiny real tensors with the same properties."""

    def tiny(t: torch.Tensor, seq: int = 4) -> torch.Tensor:
        shape = list(t.shape)
        shape[-2] = seq
        return torch.zeros([1] * (len(shape) - 3) + shape[-3:], dtype=t.dtype)

    mask = None
    if attn_mask is not None:
        mask = torch.zeros((1,) * (attn_mask.dim() - 2) + (4, 4), dtype=attn_mask.dtype)
    return int(
        torch._fused_sdp_choice(
            tiny(query), tiny(key), tiny(value), mask, dropout_p, is_causal, enable_gqa=enable_gqa
        )
    )


def cuda_backend(query, key, value, attn_mask, dropout_p, is_causal, enable_gqa) -> int:
    """PyTorch's CUDA preference on Hopper/Ampere: flash, then memory-efficient, then math."""
    head_dim = query.shape[-1]
    half = query.dtype in (torch.float16, torch.bfloat16)
    if half and attn_mask is None and head_dim <= 256 and head_dim % 8 == 0:
        return FLASH
    if head_dim % 8 == 0 and not enable_gqa:
        return EFFICIENT
    return MATH


class TargetAttention(TorchFunctionMode):
    """Route ``F.scaled_dot_product_attention`` to the fused kernel of ``target`` ("cpu"/"cuda")."""

    def __init__(self, target: str):
        super().__init__()
        self.target = target
        self.choices: list[int] = []
        self._cache: dict[tuple, int] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is _SDPA:
            return self._attention(*args, **kwargs)
        if func in _CALLS_SDPA_INSIDE:
            with _functional_sdpa_as(self._attention):
                return func(*args, **kwargs)
        return func(*args, **kwargs)

    def _attention(
        self,
        query,
        key,
        value,
        attn_mask=None,
        dropout_p=0.0,
        is_causal=False,
        scale=None,
        enable_gqa=False,
    ):
        chooser = cuda_backend if self.target == "cuda" else cpu_backend
        key_ = (
            query.dtype,
            query.shape[-1],
            key.shape[-3:-2],
            None if attn_mask is None else attn_mask.dtype,
            dropout_p > 0,
            is_causal,
            enable_gqa,
        )
        backend = self._cache.get(key_)
        if backend is None:
            with _disable_current_modes():  # the choice itself is not part of the step
                backend = chooser(query, key, value, attn_mask, dropout_p, is_causal, enable_gqa)
            self._cache[key_] = backend
        self.choices.append(backend)
        if backend != MATH:
            attn_mask = additive_mask(attn_mask, query.dtype)
        if backend == FLASH:
            # The CPU flash op keeps q, k, v, out and lse, as the CUDA flash kernel does (plus
            # two 8-byte RNG scalars there); both take grouped k/v heads as they are.
            out, _lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
                query, key, value, dropout_p, is_causal, attn_mask=attn_mask, scale=scale
            )
            return out
        if backend == EFFICIENT:
            if attn_mask is not None:
                attn_mask = efficient_bias(attn_mask, query, key)
            out = torch.ops.aten._scaled_dot_product_efficient_attention(
                query, key, value, attn_mask, True, dropout_p, is_causal, scale=scale
            )
            return out[0]
        return _SDPA(
            query,
            key,
            value,
            attn_mask=attn_mask,
            dropout_p=dropout_p,
            is_causal=is_causal,
            scale=scale,
            enable_gqa=enable_gqa,
        )


@contextlib.contextmanager
def _functional_sdpa_as(route: Callable[..., torch.Tensor]) -> Iterator[None]:
    """Point torch.nn.functional's global SDPA name at ``route`` for one call."""
    F.scaled_dot_product_attention = route
    try:
        yield
    finally:
        F.scaled_dot_product_attention = _SDPA


class CpuKernelOutputs(TorchDispatchMode):
    """Give meta ops the output dtypes the CPU kernels produce where the two differ.

    The CPU layer norm returns its mean and reciprocal std in the input's dtype for bf16/fp16
    inputs (CUDA and the meta kernel use float32); autograd saves both.
    """

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func is torch.ops.aten.native_layer_norm.default:
            dtype = args[0].dtype
            if dtype in (torch.bfloat16, torch.float16) and out[1].dtype != dtype:
                return out[0], out[1].to(dtype), out[2].to(dtype)
        return out
