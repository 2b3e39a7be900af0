"""Token-wise recompute for Llama-family decoder layers (Llama, Qwen2, Mistral).

The MEMO scheme: the block input and the attention output (with its log-sum-exp) are stored
(kept or swapped), so attention is never recomputed; for a share of the tokens the token-local
work (norms, projections, rotary embedding, MLP) is recomputed in backward from them, while the
other tokens keep all their saved tensors (kept or swapped like any other layer's).

The layer runs as: token-local pre-attention work per token range (stored tokens under ordinary
autograd, recomputed tokens under a non-reentrant checkpoint), one fused attention call whose
backward regenerates the recomputed tokens' q, k and v from the stored block input, and the
token-local post-attention work per range again. Every range can be cut into sequence chunks
so the transient working set of a layer does not grow with the sequence.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from memtrain.errors import MemtrainError
from memtrain.models.adapters import adapt
from memtrain.models.blocks import tokenwise_problem
from memtrain.offload.attention import ChunkedAttention, FlashAttention
from memtrain.offload.router import whole_router_outputs


def chunk_ranges(start: int, end: int, chunks: int) -> list[tuple[int, int]]:
    """``chunks`` nearly equal ``[a, b)`` ranges covering ``[start, end)`` (fewer if short)."""
    length = end - start
    if length <= 0:
        return []
    chunks = max(1, min(chunks, length))
    bounds = [start + (length * i) // chunks for i in range(chunks + 1)]
    return [(a, b) for a, b in zip(bounds, bounds[1:], strict=False) if b > a]


class BlockParts:
    """The pieces of one decoder layer, called as token-local functions of token ranges, and
    the attention kernel between them (its block adapter says which pieces and which kernel)."""

    def __init__(self, layer: nn.Module, name: str) -> None:
        problem = tokenwise_problem(layer, name)  # the block's type and parts
        if problem:
            raise MemtrainError(problem)
        self.adapter = adapt(layer)
        self.layer = layer
        self.name = name
        spec = self.adapter.spec
        self.spec = spec
        self.head_dim = spec.head_dim
        self.groups = spec.groups
        self.flash = FlashAttention(spec.scale, spec.window)
        # Fused kernels take fewer k/v heads than q heads directly (grouped-query attention);
        # where one does not, k and v are repeated per group. Decided on the first call.
        self.native_gqa: bool | None = None if self.groups > 1 else True
        self._mask_seen: tuple | None = None  # (the mask, weakly; its version) last checked
        self._mask_kept: torch.Tensor | None = None
        self.used: str | None = None
        self.fused_failed = False  # the fused kernels refused this layer's shapes
        self.fused_ran = False

    def qkv(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        return self.adapter.qkv(h, cos, sin)

    def post(self, h: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        return self.adapter.post(h, a)

    # -- masks -----------------------------------------------------------------------------
    def explicit_mask(self, mask: torch.Tensor | None, tokens: int) -> torch.Tensor | None:
        """The boolean mask attention must apply beyond causality and the layer's window (None
        when ``mask`` is exactly that pattern, as for unpadded batches)."""
        if mask is None:
            return None
        if self._mask_seen is not None:
            seen, version = self._mask_seen
            if seen() is mask and version == mask._version:
                return self._mask_kept
        allowed = _allowed(mask, tokens)
        kept = None if _is_pattern(allowed, tokens, self.spec.window) else allowed
        self._mask_seen, self._mask_kept = (weakref.ref(mask), mask._version), kept
        return kept

    # -- attention -------------------------------------------------------------------------
    def attention(self, q, k, v, mask=None) -> tuple[torch.Tensor, torch.Tensor, tuple]:
        spec = self.spec
        if (
            mask is None
            and not self.fused_failed
            and FlashAttention.runs(q, spec.window, spec.softcap)
        ):
            try:
                return self._fused(q, k, v)
            except torch.OutOfMemoryError:
                raise
            except RuntimeError:
                if self.fused_ran:  # the kernels ran these shapes before: a real error
                    raise
                self.fused_failed = True  # they refuse this layer's shapes: exact chunks
        engine = ChunkedAttention(spec.scale, spec.window, spec.softcap, mask)
        self.used = engine.backend
        out, lse, extra = engine.forward(q, k, v)
        return out, lse, (engine, extra)

    def _fused(self, q, k, v) -> tuple[torch.Tensor, torch.Tensor, tuple]:
        if self.native_gqa is None:
            try:
                out, lse, extra = self.flash.forward(q, k, v)
            except torch.OutOfMemoryError:
                raise
            except RuntimeError:
                out, lse, extra = self.flash.forward(q, self.expand(k), self.expand(v))
                self.native_gqa = False
            else:
                self.native_gqa = True
        elif self.native_gqa:
            out, lse, extra = self.flash.forward(q, k, v)
        else:
            out, lse, extra = self.flash.forward(q, self.expand(k), self.expand(v))
        self.used = self.flash.backend
        self.fused_ran = True
        return out, lse, (self.flash, extra)

    def attention_backward(self, grad_out, q, k, v, out, lse, extra):
        engine, extra = extra
        if engine is not self.flash or self.native_gqa:
            return engine.backward(grad_out, q, k, v, out, lse, extra)[:3]
        dq, dk, dv = engine.backward(grad_out, q, self.expand(k), self.expand(v), out, lse, extra)[
            :3
        ]
        return dq, self.reduce(dk), self.reduce(dv)

    @property
    def backend(self) -> str | None:
        """The kernel the last attention call ran (None: on the CPU's flash kernel, or none)."""
        return self.used

    def expand(self, kv: torch.Tensor) -> torch.Tensor:
        return kv if self.groups == 1 else kv.repeat_interleave(self.groups, dim=1)

    def reduce(self, grad: torch.Tensor) -> torch.Tensor:
        if self.groups == 1:
            return grad
        b, heads, s, d = grad.shape
        return grad.view(b, heads // self.groups, self.groups, s, d).sum(dim=2)


def _allowed(mask: torch.Tensor, tokens: int) -> torch.Tensor:
    """A Hugging Face attention mask as booleans (True = attend), broadcastable to (batch,
    heads, tokens, tokens): 4-D boolean or additive float masks, or 2-D padding masks."""
    if mask.dim() == 2:  # (batch, tokens) padding mask: keys only
        return mask.bool()[:, None, None, :].expand(-1, 1, tokens, -1)
    if mask.dtype == torch.bool:
        return mask
    return mask > torch.finfo(mask.dtype).min / 2


def _is_pattern(allowed: torch.Tensor, tokens: int, window: int | None, rows: int = 1024) -> bool:
    """Whether ``allowed`` is the causal (sliding-window) pattern for every batch row; checked in
    row blocks so no second tokens x tokens tensor is built."""
    if allowed.dim() != 4 or allowed.shape[-1] != tokens or allowed.shape[-2] != tokens:
        return False
    cols = torch.arange(tokens, device=allowed.device).view(1, -1)
    for start in range(0, tokens, rows):
        end = min(tokens, start + rows)
        r = torch.arange(start, end, device=allowed.device).view(-1, 1)
        expected = cols <= r
        if window is not None:
            expected = expected & (cols > r - window)
        if not bool((allowed[..., start:end, :] == expected).all()):
            return False
    return True


class _StoredAttention(torch.autograd.Function):
    """Causal attention over stored-token q/k/v plus recomputed-token q/k/v.

    Saves the stored tokens' q, k, v, the block input of the recomputed tokens (to regenerate
    their q, k, v in backward), the attention output and the log-sum-exp.
    """

    @staticmethod
    def forward(ctx, q_s, k_s, v_s, q_r, k_r, v_r, h_r, cos, sin, parts, layout, mask):
        q, k, v = _join(q_s, q_r), _join(k_s, k_r), _join(v_s, v_r)
        out, lse, extra = parts.attention(q, k, v, mask)
        batch, heads, tokens, dim = out.shape
        a = out.transpose(1, 2).reshape(batch, tokens, heads * dim)
        ctx.parts = parts
        ctx.chunks, ctx.ns = layout
        ctx.extra = extra
        ctx.out_shape = (batch, tokens, heads, dim)
        ctx.out_strided = out.stride() == a.view(batch, tokens, heads, dim).transpose(1, 2).stride()
        ctx.save_for_backward(q_s, k_s, v_s, h_r, cos, sin, a, lse)
        return a

    @staticmethod
    def backward(ctx, grad_a):
        q_s, k_s, v_s, h_r, cos, sin, a, lse = ctx.saved_tensors
        parts: BlockParts = ctx.parts
        ns = ctx.ns
        with torch.no_grad():
            q_r, k_r, v_r = _regenerate(parts, h_r, cos, sin, ns, ctx.chunks)
        q, k, v = _join(q_s, q_r), _join(k_s, k_r), _join(v_s, v_r)
        del q_r, k_r, v_r
        batch, tokens, heads, dim = ctx.out_shape
        out = a.view(batch, tokens, heads, dim).transpose(1, 2)
        grad_out = grad_a.reshape(batch, tokens, heads, dim).transpose(1, 2)
        if not ctx.out_strided:
            out = out.contiguous()
        dq, dk, dv = parts.attention_backward(grad_out, q, k, v, out, lse, ctx.extra)
        return (
            dq[:, :, :ns],
            dk[:, :, :ns],
            dv[:, :, :ns],
            dq[:, :, ns:],
            dk[:, :, ns:],
            dv[:, :, ns:],
            None,
            None,
            None,
            None,
            None,
            None,
        )


def _region_qkv(parts: BlockParts, h_r, cos, sin, start: int, end: int, ns: int):
    return parts.qkv(h_r[:, start - ns : end - ns], cos[:, start:end], sin[:, start:end])


def _join(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """Concatenate along tokens without a copy when one side is empty."""
    if first.shape[2] == 0:
        return second
    if second.shape[2] == 0:
        return first
    return torch.cat([first, second], dim=2)


def _regenerate(parts: BlockParts, h_r, cos, sin, ns: int, chunks: int) -> tuple:
    """q, k, v of the recomputed tokens, chunk by chunk into preallocated tensors."""
    ranges = chunk_ranges(ns, ns + h_r.shape[1], chunks)
    if len(ranges) <= 1:
        if not ranges:
            return tuple(h_r.new_empty((h_r.shape[0], 1, 0, parts.head_dim)) for _ in range(3))
        return _region_qkv(parts, h_r, cos, sin, ranges[0][0], ranges[0][1], ns)
    outs = None
    for start, end in ranges:
        pieces = _region_qkv(parts, h_r, cos, sin, start, end, ns)
        if outs is None:
            outs = [p.new_empty((p.shape[0], p.shape[1], h_r.shape[1], p.shape[3])) for p in pieces]
        for out, piece in zip(outs, pieces, strict=True):
            out[:, :, start - ns : end - ns].copy_(piece)
    return tuple(outs)


def _gather(pre: list) -> tuple:
    if not pre:
        return None, None, None
    return tuple(torch.cat([p[i] for p in pre], dim=2) for i in range(3))


def tokenwise_forward(
    parts: BlockParts,
    stored_fraction: float,
    chunks: int,
    scope: Callable[[Callable[[torch.Tensor], str]], Any],
    lengths: Callable[[list[int]], Any],
):
    """A replacement ``forward`` for the decoder layer.

    ``scope(role)`` opens a saved-tensor scope where ``role(tensor)`` names what a saved tensor
    is: ``input`` (block input and rotary tables, stored for the recomputed tokens), ``stored``
    (everything the stored tokens save) or ``attention`` (attention output and log-sum-exp).
    """

    def stored(_: torch.Tensor) -> str:
        return "stored"

    def forward(hidden_states, *args, **kwargs):
        mask = kwargs.get("attention_mask", args[0] if args else None)
        embeddings = kwargs.get("position_embeddings")
        if embeddings is None:
            raise MemtrainError(
                f"layer {parts.name}: token-wise recompute needs position_embeddings from the model"
            )
        seq = hidden_states.shape[1]
        mask = parts.explicit_mask(mask if isinstance(mask, torch.Tensor) else None, seq)
        cos, sin = embeddings
        h = hidden_states
        ns = min(seq, max(0, round(stored_fraction * seq)))
        ranges_s = chunk_ranges(0, ns, chunks)
        ranges_r = chunk_ranges(ns, seq, chunks)
        sizes = sorted({b - a for a, b in ranges_s + ranges_r} | {ns, seq - ns} - {0})
        input_keys = {t.untyped_storage()._cdata for t in (h, cos, sin)}
        stored_keys: set[int] = set()

        def role(tensor: torch.Tensor) -> str:
            key = tensor.untyped_storage()._cdata
            if key in input_keys:
                return "input"
            return "stored" if key in stored_keys else "attention"

        with lengths(sizes), whole_router_outputs(h.shape[0]):
            with scope(stored):
                pre_s = [parts.qkv(h[:, a:b], cos[:, a:b], sin[:, a:b]) for a, b in ranges_s]
            h_r = h[:, ns:]
            with scope(role):
                # full h_r / cos / sin objects go in, so every save of them is one stored copy
                pre_r = [
                    checkpoint(_region_qkv, parts, h_r, cos, sin, a, b, ns, use_reentrant=False)
                    for a, b in ranges_r
                ]
                with scope(stored):
                    q_s, k_s, v_s = _gather(pre_s)
                q_r, k_r, v_r = _gather(pre_r)
                if q_s is None:
                    q_s, k_s, v_s = q_r[:, :, :0], k_r[:, :, :0], v_r[:, :, :0]
                else:
                    stored_keys.update(t.untyped_storage()._cdata for t in (q_s, k_s, v_s))
                if q_r is None:
                    q_r, k_r, v_r = q_s[:, :, :0], k_s[:, :, :0], v_s[:, :, :0]
                del pre_s, pre_r
                a = _StoredAttention.apply(
                    q_s, k_s, v_s, q_r, k_r, v_r, h_r, cos, sin, parts, (chunks, ns), mask
                )
                del q_s, k_s, v_s, q_r, k_r, v_r
                outs = []
                with scope(stored):
                    for start, end in ranges_s:
                        outs.append(parts.post(h[:, start:end], a[:, start:end]))
                for start, end in ranges_r:
                    outs.append(
                        checkpoint(_region_post, parts, h_r, a, start, end, ns, use_reentrant=False)
                    )
        return torch.cat(outs, dim=1) if len(outs) > 1 else outs[0]

    return forward


def _region_post(parts: BlockParts, h_r, a, start: int, end: int, ns: int):
    return parts.post(h_r[:, start - ns : end - ns], a[:, start:end])
