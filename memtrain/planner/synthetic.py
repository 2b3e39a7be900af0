"""An analytic Llama-style profile, for planner tests and solve-time benchmarks.

Sizes follow what a bf16 Llama block saves for backward (input, both norms' outputs, q/k/v, the
attention output and log-sum-exp, the residual, gate/up/activation/product of the MLP); times
come from FLOPs at the target device's achievable rate. It is not the profiler: it exists so
the planner can be exercised in milliseconds with known numbers.
"""

from __future__ import annotations

from memtrain.hardware.devices import get_device
from memtrain.profile.result import LayerProfile, ProfileResult, SavedTensor

BF16 = 2


def _tensor(
    tokens: int, width: int, op: str, *, elem: int = BF16, first: bool = False
) -> SavedTensor:
    return SavedTensor(
        shape=[1, tokens, width],
        dtype="bfloat16" if elem == 2 else "float32",
        nbytes=tokens * width * elem,
        token_dim=1,
        is_layer_input=first,
        op=op,
    )


def _layer(
    name: str,
    kind: str,
    saved: list[SavedTensor],
    params: int,
    flops: float,
    rate: float,
    *,
    io_bytes: int,
    out_bytes: int | None = None,
    fwd_transient: int = 0,
    bwd_transient: int = 0,
) -> LayerProfile:
    return LayerProfile(
        name=name,
        kind=kind,
        param_bytes=params * BF16,
        grad_bytes=params * BF16,
        optimizer_state_bytes=params * 2 * BF16 + (4 if params else 0),
        saved_bytes=sum(t.nbytes for t in saved),
        saved_tensors=saved,
        input_bytes=io_bytes,
        output_bytes=io_bytes if out_bytes is None else out_bytes,
        forward_transient_bytes=fwd_transient,
        backward_transient_bytes=bwd_transient,
        forward_flops=flops,
        backward_flops=2 * flops,
        forward_time_s=flops / rate,
        backward_time_s=2 * flops / rate,
        param_count=params,
    )


def synthetic_profile(
    *,
    layers: int = 16,
    hidden: int = 2048,
    intermediate: int = 8192,
    heads: int = 32,
    kv_heads: int = 8,
    vocab: int = 128256,
    seq: int = 4096,
    batch: int = 1,
    target: str = "h100-sxm-80g",
    distinct_blocks: bool = False,
) -> ProfileResult:
    """A profile of a Llama-style model of the given shape (bf16 weights, AdamW states).

    ``distinct_blocks`` perturbs each block's times slightly so no two blocks are identical
    (for tests of the solver without the identical-layer reduction).
    """
    rate = get_device(target).achievable_bf16_flops
    tokens = batch * seq
    h, f = hidden, intermediate
    kv = hidden // heads * kv_heads
    act = tokens * h * BF16
    result_layers: list[LayerProfile] = []
    embed_params = vocab * h
    result_layers.append(
        _layer(
            "model.embed_tokens",
            "embedding",
            [
                SavedTensor([batch, seq], "int64", tokens * 8, 1, True, "EmbeddingBackward0"),
            ],
            embed_params,
            0.0,
            rate,
            io_bytes=tokens * 8,
            out_bytes=act,
        )
    )
    block_params = 2 * h * h + 2 * h * kv + 3 * h * f + 2 * h
    attention_flops = 4 * batch * seq * seq * h / 2  # causal: half of QK^T and PV
    for i in range(layers):
        saved = [
            _tensor(tokens, h, "RmsNormBackward0", first=True),
            _tensor(tokens, h, "MmBackward0"),  # input norm output, read by q/k/v
            _tensor(tokens, h, "ScaledDotProductFlashAttentionBackward0"),  # q
            _tensor(tokens, kv, "ScaledDotProductFlashAttentionBackward0"),  # k
            _tensor(tokens, kv, "ScaledDotProductFlashAttentionBackward0"),  # v
            _tensor(tokens, h, "ScaledDotProductFlashAttentionBackward0"),  # attention output
            _tensor(tokens, heads, "ScaledDotProductFlashAttentionBackward0", elem=4),  # lse
            _tensor(tokens, h, "RmsNormBackward0"),  # residual after attention
            _tensor(tokens, h, "MmBackward0"),  # post-attention norm output
            _tensor(tokens, f, "SiluBackward0"),  # gate
            _tensor(tokens, f, "MulBackward0"),  # up
            _tensor(tokens, f, "MulBackward0"),  # silu(gate)
            _tensor(tokens, f, "MmBackward0"),  # silu(gate) * up, read by down
        ]
        flops = 2 * tokens * block_params + attention_flops
        if distinct_blocks:
            flops *= 1 + 0.01 * i
        result_layers.append(
            _layer(
                f"model.layers.{i}",
                "block",
                saved,
                block_params,
                flops,
                rate,
                io_bytes=act,
                fwd_transient=tokens * f * BF16,
                bwd_transient=tokens * (3 * f + 2 * h) * BF16,
            )
        )
    result_layers.append(
        _layer(
            "model.norm",
            "norm",
            [_tensor(tokens, h, "RmsNormBackward0", first=True)],
            h,
            5.0 * tokens * h,
            rate,
            io_bytes=act,
        )
    )
    logits = tokens * vocab * BF16
    result_layers.append(
        _layer(
            "lm_head",
            "head",
            [_tensor(tokens, h, "MmBackward0", first=True)],
            vocab * h,
            2.0 * tokens * h * vocab,
            rate,
            io_bytes=act,
            out_bytes=logits,
            bwd_transient=logits,
        )
    )
    result_layers.append(
        _layer(
            "loss",
            "loss",
            [_tensor(tokens, vocab, "LogSoftmaxBackward0", elem=4, first=True)],
            0,
            5.0 * tokens * vocab,
            rate,
            io_bytes=2 * logits,
            out_bytes=4,
            fwd_transient=2 * logits,
            bwd_transient=2 * logits,
        )
    )
    totals = {
        k: sum(getattr(layer, k) for layer in result_layers)
        for k in ("param_bytes", "grad_bytes", "optimizer_state_bytes", "saved_bytes")
    }
    largest = max(
        max(layer.forward_transient_bytes, layer.backward_transient_bytes)
        for layer in result_layers
    )
    return ProfileResult(
        model=f"synthetic-llama-{layers}x{hidden}",
        mode="dry-run",
        device="meta",
        target=target,
        batch=batch,
        seq=seq,
        dtype="bf16",
        optimizer="adamw",
        layers=result_layers,
        param_count=sum(layer.param_count for layer in result_layers),
        param_bytes=totals["param_bytes"],
        grad_bytes=totals["grad_bytes"],
        optimizer_state_bytes=totals["optimizer_state_bytes"],
        saved_bytes=totals["saved_bytes"],
        largest_transient_bytes=largest,
        predicted_peak_bytes=sum(totals.values()) + largest,
        simulated_peak_bytes=None,
        measured_peak_bytes=None,
        step_time_s=sum(layer.forward_time_s + layer.backward_time_s for layer in result_layers),
    )
