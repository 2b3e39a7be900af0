"""The attention kernels token-wise recompute calls directly: forward returns the output and
the log-sum-exp, backward takes them back, so attention is never recomputed.

``FlashAttention``: the fused kernels (cuDNN or flash on a GPU, flash-for-CPU on the CPU) for
causal attention, with a sliding window on the GPU. ``ChunkedAttention``: exact attention in
query chunks in plain torch for what the fused kernels cannot do (score softcapping, a sliding
window on the CPU, padding masks); its working set is one chunk of scores.

Tensors are (batch, heads, tokens, dim); k and v may have fewer heads than q (grouped-query
attention) where a kernel takes that.
"""

from __future__ import annotations

import math

import torch

CHUNK_SCORE_BYTES = 128 * 2**20  # float32 scores one ChunkedAttention chunk holds
PREFIX_BLOCK_ROWS = 4  # keys before a query chunk go to the kernel this many chunk lengths at a
# time, so no key/value gradient part exceeds that many chunks' worth


class FlashAttention:
    """The fused causal attention kernel and its backward.

    On a GPU it uses the kernel stock SDPA prefers where it works for these shapes: cuDNN's
    fused attention (about 1.45x faster than flash attention 2 on an H100, see
    docs/benchmarks.md), checked once against flash attention on a small probe; flash otherwise,
    and flash with its window for sliding-window layers.
    """

    def __init__(self, scale: float, window: int | None = None) -> None:
        self.scale = scale
        self.window = window
        self.backend: str | None = None  # "cudnn" | "flash", decided on the first CUDA call

    # -- the CUDA kernels ---------------------------------------------------------------------
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

    def window_forward(self, q, k, v):
        """Flash attention's own sliding window: (batch, tokens, heads, dim) in and out."""
        tokens = q.shape[2]
        out, lse, rng, unused, _ = torch.ops.aten._flash_attention_forward(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), None, None, tokens, tokens,
            0.0, True, False, scale=self.scale, window_size_left=self.window - 1,
            window_size_right=0,
        )  # fmt: skip
        return out.transpose(1, 2), lse, ("window", rng, unused)

    def cuda_backward(self, grad_out, q, k, v, out, lse, extra):
        kind = extra[0]
        if kind == "window":
            tokens = q.shape[2]
            grads = torch.ops.aten._flash_attention_backward(
                grad_out.transpose(1, 2), q.transpose(1, 2), k.transpose(1, 2),
                v.transpose(1, 2), out.transpose(1, 2), lse, None, None, tokens, tokens, 0.0,
                True, extra[1], extra[2], scale=self.scale, window_size_left=self.window - 1,
                window_size_right=0,
            )  # fmt: skip
            return tuple(g.transpose(1, 2) for g in grads)
        _, cum_q, cum_k, max_q, max_k, seed, offset = extra
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
        """cuDNN if its forward and backward, whole and as a query chunk's part, run on these
        head shapes and agree with flash."""
        tokens = 256
        gen = torch.Generator(device=q.device).manual_seed(0)

        def make(like):
            shape = (1, like.shape[1], tokens, like.shape[3])
            return torch.randn(shape, generator=gen, device=q.device, dtype=q.dtype)

        pq, pk, pv = make(q), make(k), make(v)
        grad = make(q)
        half = tokens // 2
        try:
            results = []
            for forward in (self.cudnn_forward, self.flash_forward):
                out, lse, extra = forward(pq, pk, pv)
                grads = self.cuda_backward(grad, pq, pk, pv, out, lse, extra)[:3]
                # the query-chunked backward's prefix part: later queries, earlier keys, no mask
                later = slice(half, tokens)
                part = self.part_backward(
                    grad[:, :, later], pq[:, :, later], pk[:, :, :half], pv[:, :, :half],
                    out[:, :, later], lse[:, :, later].contiguous(), False, extra,
                )  # fmt: skip
                results.append((out, *grads, *part))
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
            if self.window is not None and self.window < q.shape[2]:
                self.backend = "flash"
                return self.window_forward(q, k, v)
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

    def rows_run(self, extra: tuple) -> bool:
        """Whether :meth:`backward_rows` can take the place of :meth:`backward` for attention
        run with ``extra`` (not for flash attention's own sliding window)."""
        return not extra or extra[0] in ("cudnn", "flash")

    def part_backward(self, grad_out, q, k, v, out, lse, causal: bool, extra: tuple):
        """Gradients of queries ``q`` against one run of keys, given the whole attention's
        output and log-sum-exp for those queries (the kernels derive each probability from
        them, so every key part's gradients are exact on their own)."""
        if q.device.type != "cuda":
            return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
                grad_out, q, k, v, out, lse, 0.0, causal, scale=self.scale
            )[:3]
        kind, cum_q, cum_k, _, _, seed, offset = extra
        rows, keys = q.shape[2], k.shape[2]
        if kind == "cudnn":
            return torch.ops.aten._scaled_dot_product_cudnn_attention_backward(
                grad_out, q, k, v, out, lse, seed, offset, None, cum_q, cum_k, rows, keys,
                0.0, causal, scale=self.scale,
            )[:3]  # fmt: skip
        return torch.ops.aten._scaled_dot_product_flash_attention_backward(
            grad_out, q, k, v, out, lse, cum_q, cum_k, rows, keys, 0.0, causal, seed, offset,
            scale=self.scale,
        )[:3]  # fmt: skip

    def backward_rows(
        self, grad_out, q, k, v, out, lse, start: int, extra: tuple, take, groups: int = 1
    ):
        """Gradients of the queries at positions ``[start, start + rows)`` (``q``, ``grad_out``,
        ``out`` and ``lse`` are theirs; ``k`` and ``v`` every key): returns ``dq`` and hands
        each part of the key and value gradients to ``take(first, dk, dv)`` (keys from
        ``first``) as it is made. The causal square of the queries' own positions is one kernel
        call, the fully visible keys before them blocks of a few chunk lengths. ``groups`` > 1:
        the kernels take as many key heads as query heads, so each part's keys are repeated per
        group (never the whole sequence's) and its gradients summed back."""
        end = start + q.shape[2]
        lse = lse.contiguous()

        def part(first, last, causal):
            keys, values = (
                _repeat(k[:, :, first:last], groups),
                _repeat(v[:, :, first:last], groups),
            )
            dq, dk, dv = self.part_backward(grad_out, q, keys, values, out, lse, causal, extra)
            take(first, _group_sum(dk, groups), _group_sum(dv, groups))
            return dq

        dq = part(start, end, True)
        if start == 0:
            return dq
        wide = torch.promote_types(dq.dtype, torch.float32)
        dq = dq.to(wide)
        block = PREFIX_BLOCK_ROWS * q.shape[2]
        for first in range(0, start, block):
            dq.add_(part(first, min(start, first + block), False).to(wide))
        return dq.to(q.dtype)

    @staticmethod
    def runs(q: torch.Tensor, window: int | None, softcap: float | None) -> bool:
        """Whether the fused kernels compute this attention for queries ``q``: no softcap, a
        window only on the GPU, and there half precision with heads of at most 256."""
        if softcap is not None:
            return False
        if q.device.type != "cuda":
            return window is None
        return q.dtype in (torch.float16, torch.bfloat16) and q.shape[-1] <= 256


def _repeat(kv: torch.Tensor, groups: int) -> torch.Tensor:
    return kv if groups == 1 else kv.repeat_interleave(groups, dim=1)


def _group_sum(grad: torch.Tensor, groups: int) -> torch.Tensor:
    if groups == 1:
        return grad
    batch, heads, tokens, dim = grad.shape
    return grad.view(batch, heads // groups, groups, tokens, dim).sum(dim=2)


class ChunkedAttention:
    """Exact causal attention in query chunks: optional sliding window, score softcap and an
    explicit boolean mask (True = attend) broadcast to (batch, heads, tokens, tokens).

    Scores are float32; the log-sum-exp is saved so backward rebuilds each chunk's
    probabilities without a second softmax pass. k and v keep their own (fewer) heads: queries
    are grouped per key head."""

    backend = "chunked"

    def __init__(
        self,
        scale: float,
        window: int | None = None,
        softcap: float | None = None,
        mask: torch.Tensor | None = None,
    ) -> None:
        self.scale = scale
        self.window = window
        self.softcap = softcap
        self.mask = mask

    def _chunk(self, q: torch.Tensor) -> int:
        batch, heads, tokens, _ = q.shape
        return max(16, CHUNK_SCORE_BYTES // max(1, batch * heads * tokens * 4))

    def _keys(self, start: int, end: int) -> tuple[int, int]:
        first = 0 if self.window is None or self.mask is not None else start - self.window + 1
        return max(0, first), end

    def _scores(self, qc, k, start, end, first, last):
        """Softcapped, masked float32 scores of queries [start, end) against keys [first,
        last), and tanh of the capped scores (for backward) or None."""
        batch, kv_heads = k.shape[:2]
        s = torch.matmul(qc, k[:, :, first:last].float().transpose(-1, -2).unsqueeze(2))
        s = s * self.scale
        capped = None
        if self.softcap is not None:
            capped = torch.tanh(s / self.softcap)
            s = capped * self.softcap
        rows = torch.arange(start, end, device=qc.device).view(-1, 1)
        cols = torch.arange(first, last, device=qc.device).view(1, -1)
        allowed = cols <= rows
        if self.window is not None:
            allowed = allowed & (cols > rows - self.window)
        if self.mask is not None:
            mask = self.mask[..., start:end, first:last]
            mask = mask.expand(batch, -1, -1, -1)
            if mask.shape[1] == 1:
                mask = mask.unsqueeze(2)
            else:
                mask = mask.reshape(batch, kv_heads, -1, *mask.shape[-2:])
            allowed = allowed & mask
        return s.masked_fill(~allowed, -math.inf), capped

    def _grouped(self, x: torch.Tensor, kv_heads: int) -> torch.Tensor:
        batch, heads, tokens, dim = x.shape
        return x.float().reshape(batch, kv_heads, heads // kv_heads, tokens, dim)

    def forward(self, q, k, v) -> tuple[torch.Tensor, torch.Tensor, tuple]:
        batch, heads, tokens, dim = q.shape
        kv_heads = k.shape[1]
        out = torch.empty_like(q)
        lse = torch.empty(batch, heads, tokens, device=q.device, dtype=torch.float32)
        step = self._chunk(q)
        for start in range(0, tokens, step):
            end = min(tokens, start + step)
            first, last = self._keys(start, end)
            qc = self._grouped(q[:, :, start:end], kv_heads)
            s, _ = self._scores(qc, k, start, end, first, last)
            m = torch.logsumexp(s, dim=-1)
            safe = torch.where(torch.isinf(m), torch.zeros_like(m), m)
            p = torch.exp(s - safe.unsqueeze(-1))
            o = torch.matmul(p, v[:, :, first:last].float().unsqueeze(2))
            out[:, :, start:end] = o.reshape(batch, heads, end - start, dim).to(q.dtype)
            lse[:, :, start:end] = safe.reshape(batch, heads, end - start)
        return out, lse, ()

    def backward(self, grad_out, q, k, v, out, lse, extra: tuple):
        dk = torch.zeros(k.shape, device=k.device, dtype=torch.float32)
        dv = torch.zeros(v.shape, device=v.device, dtype=torch.float32)
        dq = self._rows(grad_out, q, k, v, out, lse, 0, dk, dv)
        return dq, dk.to(k.dtype), dv.to(v.dtype)

    def rows_run(self, extra: tuple) -> bool:
        return True

    def backward_rows(self, grad_out, q, k, v, out, lse, start: int, extra: tuple, take):
        """As :meth:`FlashAttention.backward_rows`: one float32 part from the first key any
        of these queries sees."""
        end = start + q.shape[2]
        first = self._keys(start, end)[0]
        dk = torch.zeros((*k.shape[:2], end - first, k.shape[3]), device=k.device)
        dv = torch.zeros((*v.shape[:2], end - first, v.shape[3]), device=v.device)
        dq = self._rows(grad_out, q, k, v, out, lse, start, dk, dv, offset=first)
        take(first, dk, dv)
        return dq

    def _rows(self, grad_out, q, k, v, out, lse, origin: int, dk, dv, offset: int = 0):
        """dq of the queries at ``[origin, origin + rows)``; their dk and dv are added into
        float32 ``dk`` and ``dv``, whose first token is key ``offset``."""
        batch, heads, rows, dim = q.shape
        kv_heads = k.shape[1]
        groups = heads // kv_heads
        dq = torch.empty_like(q)
        step = self._chunk(q)
        for low in range(0, rows, step):
            high = min(rows, low + step)
            start, end = origin + low, origin + high
            first, last = self._keys(start, end)
            qc = self._grouped(q[:, :, low:high], kv_heads)
            s, capped = self._scores(qc, k, start, end, first, last)
            lse_c = lse[:, :, low:high].reshape(batch, kv_heads, groups, high - low, 1)
            p = torch.exp(s - lse_c)
            go = self._grouped(grad_out[:, :, low:high], kv_heads)
            oc = self._grouped(out[:, :, low:high], kv_heads)
            keys = slice(first - offset, last - offset)
            dv[:, :, keys] += torch.matmul(p.transpose(-1, -2), go).sum(dim=2)
            dp = torch.matmul(go, v[:, :, first:last].float().transpose(-1, -2).unsqueeze(2))
            ds = p * (dp - (go * oc).sum(dim=-1, keepdim=True))
            if capped is not None:
                ds = ds * (1 - capped * capped)
            ds = ds * self.scale
            dqc = torch.matmul(ds, k[:, :, first:last].float().unsqueeze(2))
            dq[:, :, low:high] = dqc.reshape(batch, heads, high - low, dim).to(q.dtype)
            dk[:, :, keys] += torch.matmul(ds.transpose(-1, -2), qc).sum(dim=2)
        return dq
