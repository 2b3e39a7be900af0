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
from memtrain.offload.chunk_replay import (
    WeightGradSums,
    autocast_state,
    replayed_autocast,
    token_chunks,
)
from memtrain.offload.router import active_collector, whole_router_outputs


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
        # the model collects router outputs (an auxiliary loss): post-attention work keeps
        # autograd in forward; decided in the forward, kept for its recompute in backward
        self.routers_collected = False
        self.fused_failed = False  # the fused kernels refused this layer's shapes
        self.fused_ran = False
        # Under Ulysses sequence parallelism (memtrain.offload.sequence_exchange): attention
        # runs on all tokens of this rank's heads, between all-to-alls
        self.exchange = None

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

    def rows_run(self, extra) -> bool:
        """Whether attention run with ``extra`` takes its backward in query chunks."""
        engine, inner = extra
        return engine.rows_run(inner)

    def attention_backward_rows(self, grad_out, q, k, v, out, lse, start: int, extra, take):
        """Gradients of the queries from position ``start``: returns ``dq``, hands key/value
        gradient parts to ``take`` (see :meth:`FlashAttention.backward_rows`), key heads
        reduced."""
        engine, inner = extra
        if engine is not self.flash or self.native_gqa:
            return engine.backward_rows(grad_out, q, k, v, out, lse, start, inner, take)
        return engine.backward_rows(
            grad_out, q, k, v, out, lse, start, inner, take, groups=self.groups
        )

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
    """Causal attention over stored-token q/k/v and recomputed tokens' block input.

    The recomputed tokens' q, k and v are made here without autograd and never saved: the
    Function saves the stored tokens' q, k, v, the recomputed tokens' block input, the attention
    output and the log-sum-exp. Backward regenerates k and v, then takes the queries in
    sequence chunks from the last: each chunk's attention gradient against every key it sees
    (float32 key and value gradients accumulate), and once a recomputed chunk's own keys have
    all their gradient (no earlier query sees them) its pre-attention work is rebuilt and
    differentiated, giving its block-input gradient and its share of the weights' gradients.
    A whole query set's q, dq and the kernel's own whole-sequence buffers never exist. The
    weights come in as inputs, so each gets one gradient per step (its hooks fire once).
    Flash attention's own sliding window runs the whole-sequence kernel instead.
    """

    @staticmethod
    def forward(ctx, q_s, k_s, v_s, h_r, cos, sin, parts, layout, mask, *params):
        chunks, ns = layout
        q_r, k_r, v_r = _regenerate(parts, h_r, cos, sin, ns, chunks)
        q, k, v = _join(q_s, q_r), _join(k_s, k_r), _join(v_s, v_r)
        del q_r, k_r, v_r
        exchange = parts.exchange
        if exchange is not None:  # all tokens of this rank's heads
            if mask is not None:
                raise MemtrainError(
                    f"layer {parts.name}: token-wise recompute under sequence parallelism runs "
                    "causal attention only; this batch has an attention mask beyond it"
                )
            q, k, v = exchange.to_heads(q), exchange.to_heads(k), exchange.to_heads(v)
        out, lse, extra = parts.attention(q, k, v, mask)
        if exchange is not None:
            out = exchange.to_tokens(out)
        batch, heads, tokens, dim = out.shape
        a = out.transpose(1, 2).reshape(batch, tokens, heads * dim)
        ctx.parts = parts
        ctx.chunks, ctx.ns = layout
        ctx.extra = extra
        ctx.out_shape = (batch, tokens, heads, dim)
        ctx.out_strided = out.stride() == a.view(batch, tokens, heads, dim).transpose(1, 2).stride()
        ctx.autocast = autocast_state(h_r.device.type)
        ctx.params = params  # leaves, kept by reference (a saved-tensor scope would move them)
        ctx.save_for_backward(q_s, k_s, v_s, h_r, cos, sin, a, lse)
        return a

    @staticmethod
    def backward(ctx, grad_a):
        q_s, k_s, v_s, h_r, cos, sin, a, lse = ctx.saved_tensors
        parts: BlockParts = ctx.parts
        ns, chunks = ctx.ns, ctx.chunks
        weights = WeightGradSums(ctx.params, ctx.needs_input_grad[9:])
        batch, tokens, heads, dim = ctx.out_shape
        out = a.view(batch, tokens, heads, dim).transpose(1, 2)
        grad_out = grad_a.reshape(batch, tokens, heads, dim).transpose(1, 2)
        exchange = parts.exchange
        if exchange is not None:  # the kernel's layout: all tokens of this rank's heads
            out, grad_out = exchange.to_heads(out), exchange.to_heads(grad_out)
        # query rows in sequence order interleave with the rebuild of this rank's tokens: not
        # where the rows hold every rank's tokens
        rows_run = parts.rows_run(ctx.extra) and exchange is None
        if not ctx.out_strided and not rows_run:  # the kernel's own layout (rows: per chunk)
            out = out.contiguous()
        rebuild = _Rebuild(parts, h_r, cos, sin, ns, weights, ctx.needs_input_grad[3], ctx.autocast)
        with rebuild.autocast(), torch.no_grad():
            keep = (1, 2) if rows_run else (0, 1, 2)
            regenerated = _regenerate(parts, h_r, cos, sin, ns, chunks, keep)
        k, v = _join(k_s, regenerated[-2]), _join(v_s, regenerated[-1])
        if len(keep) == 2:
            dq_s, dk_s, dv_s = _backward_in_rows(
                parts, ctx.extra, grad_out, q_s, k, v, out, lse, ns, chunks, rebuild,
                ctx.out_strided,
            )  # fmt: skip
        else:  # the whole-sequence kernel, then each recomputed chunk's pre-attention work
            q = _join(q_s, regenerated[0])
            del regenerated
            if exchange is not None:
                q, k, v = exchange.to_heads(q), exchange.to_heads(k), exchange.to_heads(v)
            dq, dk, dv = parts.attention_backward(grad_out, q, k, v, out, lse, ctx.extra)
            del q
            if exchange is not None:  # back to this rank's tokens, every head
                dq, dk, dv = exchange.to_tokens(dq), exchange.to_tokens(dk), exchange.to_tokens(dv)
            for start, end in reversed(chunk_ranges(ns, tokens, chunks)):
                span = slice(start, end)
                pending = rebuild.open(start, end)
                rebuild.close(pending, dq[:, :, span], dk[:, :, span], dv[:, :, span])
            dq_s, dk_s, dv_s = dq[:, :, :ns], dk[:, :, :ns], dv[:, :, :ns]
        del k, v, grad_out, out, lse, a, grad_a
        return (dq_s, dk_s, dv_s, rebuild.grad_input(), None, None, None, None, None,
                *weights.result())  # fmt: skip


class _Rebuild:
    """Differentiates recomputed chunks' pre-attention work in backward: each chunk's q, k and
    v are rebuilt from its block input under the forward's autocast state and differentiated
    against their gradients into the block-input gradient and float32 weight gradients."""

    def __init__(self, parts, h_r, cos, sin, ns, weights, input_grad: bool, autocast) -> None:
        if (cos.requires_grad or sin.requires_grad) and h_r.shape[1] > 0:
            raise MemtrainError(
                f"layer {parts.name}: token-wise recompute needs rotary tables without gradients"
            )
        self.parts, self.h_r, self.cos, self.sin, self.ns = parts, h_r, cos, sin, ns
        self.weights: WeightGradSums = weights
        self.wants_input = input_grad
        self.input_grads: dict[int, torch.Tensor] = {}  # chunk start -> its input gradient
        self.autocast_state = autocast

    def autocast(self):
        return replayed_autocast(self.autocast_state)

    def open(self, start: int, end: int):
        """Rebuild tokens ``[start, end)``'s q, k and v with autograd: ``(h, (q, k, v))``,
        or None when nothing asks for a gradient."""
        lo, hi = start - self.ns, end - self.ns
        h = self.h_r[:, lo:hi].detach().requires_grad_(self.wants_input)
        if not self.wants_input and not self.weights.wanted:
            return None
        with torch.enable_grad(), self.autocast():
            qkv = self.parts.qkv(h, self.cos[:, start:end], self.sin[:, start:end])
        return start, h, qkv

    def close(self, pending, dq, dk, dv) -> None:
        """Differentiate a rebuilt chunk against its q, k and v gradients (any dtype)."""
        if pending is None:
            return
        start, h, qkv = pending
        wanted = self.weights.wanted
        inputs = ([h] if self.wants_input else []) + wanted
        pairs = [
            (t, g.to(t.dtype)) for t, g in zip(qkv, (dq, dk, dv), strict=True) if t.requires_grad
        ]
        if not pairs:  # nothing before attention trains or needs a gradient here
            if self.wants_input:
                self.input_grads[start] = torch.zeros_like(h)
            return
        grads = torch.autograd.grad(
            [t for t, _ in pairs], inputs, [g for _, g in pairs], allow_unused=True
        )
        if self.wants_input:
            self.input_grads[start] = torch.zeros_like(h) if grads[0] is None else grads[0]
            grads = grads[1:]
        self.weights.add(grads)

    def grad_input(self) -> torch.Tensor | None:
        """The recomputed tokens' block-input gradient, the chunks' joined in order."""
        if not self.wants_input:
            return None
        pieces = [self.input_grads.pop(start) for start in sorted(self.input_grads)]
        if not pieces:
            return torch.zeros_like(self.h_r)
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=1)


def _backward_in_rows(parts, extra, grad_out, q_s, k, v, out, lse, ns, chunks, rebuild, strided):
    """Query chunks from the last: attention gradients row block by row block into float32
    key/value gradients, kept per key chunk and handed on (then freed) as soon as no earlier
    query sees them, each recomputed chunk differentiated then."""
    tokens = out.shape[2]
    ranges = chunk_ranges(0, ns, chunks) + chunk_ranges(ns, tokens, chunks)
    sums = {
        start: [k.new_zeros((*k.shape[:2], end - start, k.shape[3]), dtype=torch.float32)
                for _ in range(2)]
        for start, end in ranges
    }  # fmt: skip
    dq_s = torch.empty_like(q_s)
    stored_kv = []
    for start, end in reversed(ranges):
        pending = None
        if start >= ns:
            pending = rebuild.open(start, end)
            if pending is not None:
                q = pending[2][0].detach()
            else:
                with torch.no_grad(), rebuild.autocast():
                    q = _region_qkv(parts, rebuild.h_r, rebuild.cos, rebuild.sin, start, end, ns)
                    q = q[0]
        else:
            q = q_s[:, :, start:end]
        rows = slice(start, end)
        out_rows = out[:, :, rows] if strided else out[:, :, rows].contiguous()
        dq = parts.attention_backward_rows(
            grad_out[:, :, rows], q, k, v, out_rows, lse[:, :, rows], start, extra,
            lambda first, dk, dv: _add_into(sums, ranges, first, dk, dv),
        )  # fmt: skip
        dk, dv = sums.pop(start)
        if start >= ns:
            rebuild.close(pending, dq, dk, dv)
        else:
            dq_s[:, :, rows] = dq
            stored_kv.append((dk.to(k.dtype), dv.to(v.dtype)))
        del dk, dv, dq, q, pending
    if not stored_kv:
        empty = k[:, :, :0]
        return dq_s, empty, v[:, :, :0]
    stored_kv.reverse()
    return (
        dq_s,
        torch.cat([d for d, _ in stored_kv], dim=2),
        torch.cat([d for _, d in stored_kv], dim=2),
    )


def _add_into(sums, ranges, first: int, dk, dv) -> None:
    """Add key/value gradients for keys ``[first, first + len)`` into the per-chunk sums."""
    last = first + dk.shape[2]
    for start, end in ranges:
        if start not in sums or end <= first or start >= last:
            continue
        lo, hi = max(start, first), min(end, last)
        sums[start][0][:, :, lo - start : hi - start] += dk[:, :, lo - first : hi - first]
        sums[start][1][:, :, lo - start : hi - start] += dv[:, :, lo - first : hi - first]


def _region_qkv(parts: BlockParts, h_r, cos, sin, start: int, end: int, ns: int):
    return parts.qkv(h_r[:, start - ns : end - ns], cos[:, start:end], sin[:, start:end])


def _join(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """Concatenate along tokens without a copy when one side is empty."""
    if first.shape[2] == 0:
        return second
    if second.shape[2] == 0:
        return first
    return torch.cat([first, second], dim=2)


def _regenerate(parts: BlockParts, h_r, cos, sin, ns: int, chunks: int, keep=(0, 1, 2)) -> tuple:
    """q, k, v (those ``keep`` names by index) of the recomputed tokens, chunk by chunk into
    preallocated tensors."""
    ranges = chunk_ranges(ns, ns + h_r.shape[1], chunks)
    if not ranges:
        return tuple(h_r.new_empty((h_r.shape[0], 1, 0, parts.head_dim)) for _ in keep)
    if len(ranges) == 1:
        pieces = _region_qkv(parts, h_r, cos, sin, ranges[0][0], ranges[0][1], ns)
        return tuple(pieces[i] for i in keep)
    outs = None
    for start, end in ranges:
        pieces = _region_qkv(parts, h_r, cos, sin, start, end, ns)
        pieces = [pieces[i] for i in keep]
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
            h_r = h if ns == 0 else h[:, ns:]  # a slice's gradient would be a full-size copy
            with scope(role):
                with scope(stored):
                    q_s, k_s, v_s = _gather(pre_s)
                if q_s is None:
                    spec = parts.spec
                    q_s = h.new_empty((h.shape[0], spec.heads, 0, spec.head_dim))
                    k_s = h.new_empty((h.shape[0], spec.kv_heads, 0, spec.head_dim))
                    v_s = k_s
                else:
                    stored_keys.update(t.untyped_storage()._cdata for t in (q_s, k_s, v_s))
                del pre_s
                params = tuple(p for p in parts.layer.parameters() if p.requires_grad)
                a = _StoredAttention.apply(
                    q_s, k_s, v_s, h_r, cos, sin, parts, (chunks, ns), mask, *params
                )
                del q_s, k_s, v_s
                outs = []
                with scope(stored):
                    for start, end in ranges_s:
                        outs.append(parts.post(h[:, start:end], a[:, start:end]))
                if torch._C._current_graph_task_id() == -1:  # a forward, not a recompute
                    parts.routers_collected = _collects_routers()
                if ranges_r and not parts.routers_collected:
                    a_r = a if ns == 0 else a[:, ns:]
                    local = [(start - ns, end - ns) for start, end in ranges_r]
                    outs.append(token_chunks(parts.post, local, [h_r, a_r], params))
                else:  # router outputs are being collected: they need autograd in forward
                    for start, end in ranges_r:
                        outs.append(
                            checkpoint(
                                _region_post, parts, h_r, a, start, end, ns, use_reentrant=False
                            )
                        )
        return torch.cat(outs, dim=1) if len(outs) > 1 else outs[0]

    return forward


def _collects_routers() -> bool:
    """Whether Hugging Face's output capturing collects router outputs in this forward."""
    collected = active_collector()
    return bool(collected) and any("router" in str(key) for key in collected)


def _region_post(parts: BlockParts, h_r, a, start: int, end: int, ns: int):
    return parts.post(h_r[:, start - ns : end - ns], a[:, start:end])
