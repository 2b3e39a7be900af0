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

import sys
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from memtrain.errors import MemtrainError
from memtrain.models.blocks import TOKENWISE_BLOCKS, tokenwise_problem

SUPPORTED = TOKENWISE_BLOCKS


def chunk_ranges(start: int, end: int, chunks: int) -> list[tuple[int, int]]:
    """``chunks`` nearly equal ``[a, b)`` ranges covering ``[start, end)`` (fewer if short)."""
    length = end - start
    if length <= 0:
        return []
    chunks = max(1, min(chunks, length))
    bounds = [start + (length * i) // chunks for i in range(chunks + 1)]
    return [(a, b) for a, b in zip(bounds, bounds[1:], strict=False) if b > a]


class FlashAttention:
    """The fused causal attention kernel and its backward, called directly so that the output
    and log-sum-exp are all backward needs (no attention recompute).

    On a GPU it uses the kernel stock SDPA prefers where it works for these shapes: cuDNN's
    fused attention (about 1.45x faster than flash attention 2 on an H100, see
    docs/benchmarks.md), checked once against flash attention on a small probe; flash otherwise.
    """

    def __init__(self, scale: float) -> None:
        self.scale = scale
        self.backend: str | None = None  # "cudnn" | "flash", decided on the first CUDA call

    # -- the two CUDA kernels ----------------------------------------------------------------
    def cudnn_forward(self, q, k, v):
        result = torch.ops.aten._scaled_dot_product_cudnn_attention(
            q, k, v, None, True, 0.0, True, False, scale=self.scale
        )
        return result[0], result[1], ("cudnn", *result[2:8])

    def flash_forward(self, q, k, v):
        result = torch.ops.aten._scaled_dot_product_flash_attention(
            q, k, v, 0.0, True, False, scale=self.scale
        )
        return result[0], result[1], ("flash", *result[2:8])

    def cuda_backward(self, grad_out, q, k, v, out, lse, extra):
        kind, cum_q, cum_k, max_q, max_k, seed, offset = extra
        if kind == "cudnn":
            return torch.ops.aten._scaled_dot_product_cudnn_attention_backward(
                grad_out, q, k, v, out, lse, seed, offset, None, cum_q, cum_k, max_q, max_k,
                0.0, True, scale=self.scale,
            )  # fmt: skip
        return torch.ops.aten._scaled_dot_product_flash_attention_backward(
            grad_out, q, k, v, out, lse, cum_q, cum_k, max_q, max_k, 0.0, True, seed, offset,
            scale=self.scale,
        )  # fmt: skip

    def _probe(self, q, k, v) -> str:
        """cuDNN if its forward and backward run on these head shapes and agree with flash."""
        tokens = 256
        gen = torch.Generator(device=q.device).manual_seed(0)

        def make(like):
            shape = (1, like.shape[1], tokens, like.shape[3])
            return torch.randn(shape, generator=gen, device=q.device, dtype=q.dtype)

        pq, pk, pv = make(q), make(k), make(v)
        grad = make(q)
        try:
            results = []
            for forward in (self.cudnn_forward, self.flash_forward):
                out, lse, extra = forward(pq, pk, pv)
                grads = self.cuda_backward(grad, pq, pk, pv, out, lse, extra)[:3]
                results.append((out, *grads))
        except (RuntimeError, TypeError):
            return "flash"
        for a, b in zip(*results, strict=True):
            if a.shape != b.shape:
                return "flash"
            scale = b.float().abs().max().clamp_min(1e-6)
            if ((a.float() - b.float()).abs().max() / scale).item() > 0.05:
                return "flash"
        return "cudnn"

    # -- what the block calls -----------------------------------------------------------------
    def forward(self, q, k, v) -> tuple[torch.Tensor, torch.Tensor, tuple]:
        if q.device.type == "cuda":
            if q.dtype not in (torch.float16, torch.bfloat16):
                raise MemtrainError(
                    "token-wise recompute on a GPU needs a bf16 or fp16 model (flash attention)"
                )
            if self.backend is None:
                self.backend = self._probe(q, k, v)
            if self.backend == "cudnn":
                return self.cudnn_forward(q, k, v)
            return self.flash_forward(q, k, v)
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, 0.0, True, scale=self.scale
        )
        return out, lse, ()

    def backward(self, grad_out, q, k, v, out, lse, extra: tuple):
        if q.device.type == "cuda":
            return self.cuda_backward(grad_out, q, k, v, out, lse, extra)
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            grad_out, q, k, v, out, lse, 0.0, True, scale=self.scale
        )


class LlamaBlockParts:
    """The pieces of one decoder layer, called as token-local functions of token ranges."""

    def __init__(self, layer: nn.Module, name: str) -> None:
        problem = tokenwise_problem(layer, name)  # the block's type and parts
        if problem:
            raise MemtrainError(problem)
        attn = layer.self_attn
        window = getattr(getattr(attn, "config", None), "sliding_window", None)
        use_window = getattr(getattr(attn, "config", None), "use_sliding_window", True)
        self.window = window if use_window else None
        self.layer = layer
        self.attn = attn
        self.name = name
        self.head_dim = attn.head_dim
        self.groups = attn.num_key_value_groups
        self.flash = FlashAttention(attn.scaling)
        # Fused kernels take fewer k/v heads than q heads directly (grouped-query attention);
        # where one does not, k and v are repeated per group. Decided on the first call.
        self.native_gqa: bool | None = None if self.groups > 1 else True
        module = sys.modules[type(attn).__module__]
        self.rope: Callable = module.apply_rotary_pos_emb

    def qkv(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        batch, tokens, _ = h.shape
        x = self.layer.input_layernorm(h)
        shape = (batch, tokens, -1, self.head_dim)
        q = self.attn.q_proj(x).view(shape).transpose(1, 2)
        k = self.attn.k_proj(x).view(shape).transpose(1, 2)
        v = self.attn.v_proj(x).view(shape).transpose(1, 2)
        q, k = self.rope(q, k, cos, sin)
        return q, k, v

    def post(self, h: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        h2 = h + self.attn.o_proj(a)
        return h2 + self.layer.mlp(self.layer.post_attention_layernorm(h2))

    def expand(self, kv: torch.Tensor) -> torch.Tensor:
        return kv if self.groups == 1 else kv.repeat_interleave(self.groups, dim=1)

    def attention(self, q, k, v) -> tuple[torch.Tensor, torch.Tensor, tuple]:
        if self.native_gqa is None:
            try:
                result = self.flash.forward(q, k, v)
            except RuntimeError:
                self.native_gqa = False
            else:
                self.native_gqa = True
                return result
        if self.native_gqa:
            return self.flash.forward(q, k, v)
        return self.flash.forward(q, self.expand(k), self.expand(v))

    def attention_backward(self, grad_out, q, k, v, out, lse, extra):
        if self.native_gqa:
            return self.flash.backward(grad_out, q, k, v, out, lse, extra)[:3]
        dq, dk, dv = self.flash.backward(
            grad_out, q, self.expand(k), self.expand(v), out, lse, extra
        )[:3]
        return dq, self.reduce(dk), self.reduce(dv)

    def reduce(self, grad: torch.Tensor) -> torch.Tensor:
        if self.groups == 1:
            return grad
        b, heads, s, d = grad.shape
        return grad.view(b, heads // self.groups, self.groups, s, d).sum(dim=2)


class _StoredAttention(torch.autograd.Function):
    """Causal attention over stored-token q/k/v plus recomputed-token q/k/v.

    Saves the stored tokens' q, k, v, the block input of the recomputed tokens (to regenerate
    their q, k, v in backward), the attention output and the log-sum-exp.
    """

    @staticmethod
    def forward(ctx, q_s, k_s, v_s, q_r, k_r, v_r, h_r, cos, sin, parts, layout):
        q, k, v = _join(q_s, q_r), _join(k_s, k_r), _join(v_s, v_r)
        out, lse, extra = parts.attention(q, k, v)
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
        parts: LlamaBlockParts = ctx.parts
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
        )


def _region_qkv(parts: LlamaBlockParts, h_r, cos, sin, start: int, end: int, ns: int):
    return parts.qkv(h_r[:, start - ns : end - ns], cos[:, start:end], sin[:, start:end])


def _join(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """Concatenate along tokens without a copy when one side is empty."""
    if first.shape[2] == 0:
        return second
    if second.shape[2] == 0:
        return first
    return torch.cat([first, second], dim=2)


def _regenerate(parts: LlamaBlockParts, h_r, cos, sin, ns: int, chunks: int) -> tuple:
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
    parts: LlamaBlockParts,
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
        if mask is not None and not (
            isinstance(mask, torch.Tensor) and mask.dtype == torch.bool and _is_causal(mask)
        ):
            raise MemtrainError(
                f"layer {parts.name}: token-wise recompute supports causal attention without "
                "padding masks; pass unpadded batches"
            )
        seq = hidden_states.shape[1]
        if parts.window is not None and parts.window < seq:
            raise MemtrainError(
                f"layer {parts.name}: sliding-window attention ({parts.window} < {seq} tokens) is "
                "not supported by token-wise recompute; plan whole-layer recompute"
            )
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

        with lengths(sizes):
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
                    q_s, k_s, v_s, q_r, k_r, v_r, h_r, cos, sin, parts, (chunks, ns)
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


def _region_post(parts: LlamaBlockParts, h_r, a, start: int, end: int, ns: int):
    return parts.post(h_r[:, start - ns : end - ns], a[:, start:end])


def _is_causal(mask: torch.Tensor) -> bool:
    """Whether a boolean mask (True = attend) is exactly the causal mask for every row."""
    if mask.dim() < 2 or mask.shape[-1] != mask.shape[-2]:
        return False
    size = mask.shape[-1]
    causal = torch.ones(size, size, dtype=torch.bool, device=mask.device).tril()
    return bool((mask == causal).all())
