"""Turn a profile into the per-layer numbers the planner's cost model is written in.

Saved activations of a layer split three ways:
``anchor`` — token-dim bytes that must be stored (kept or swapped) because recomputing the layer
starts from them: the layer input, plus tensors of ops the caller marks as not recomputable;
``recomputable`` — the other token-dim bytes: a token fraction of them can be kept, swapped to a
host tier, or recomputed in backward at that fraction of the layer's forward time;
``fixed`` — saved bytes without a token dimension (always kept; small);
``checkpoint`` — the layer input, when autograd does not save it: recomputing a token share
needs that share of the input stored somewhere (kept or swapped), as checkpointing does.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

from memtrain.dtypes import dtype_bytes
from memtrain.errors import MemtrainError
from memtrain.kernels.cross_entropy.blas import DEFAULT_BLAS_WORKSPACE_BYTES
from memtrain.planner.hostmem import host_state_estimate
from memtrain.profile.result import LayerProfile, ProfileResult, SavedTensor, is_attention_op

TILEABLE_KINDS = ("block", "norm")  # decoder blocks; a final norm run in chunks
LOSS_KINDS = ("head", "loss")


@dataclass(frozen=True)
class LayerCosts:
    """One layer in the planner's terms (bytes, seconds)."""

    name: str
    kind: str
    anchor_bytes: float
    recomputable_bytes: float
    fixed_bytes: float
    checkpoint_bytes: float  # the layer input, stored for recompute when autograd does not save it
    tileable_fraction: float  # share of token-dim saved bytes and transients a chunk divides
    forward_transient: float
    backward_transient: float
    output_bytes: float  # the incoming gradient during backward has this size
    forward_time: float
    backward_time: float
    recompute_time: float  # forward time less the ops whose outputs are stored (attention)
    param_bytes: float
    grad_bytes: float
    state_bytes: float
    # Part of the backward transient that sequence chunks do not divide: attention's backward
    # holds full-length per-head gradients (dq, dk, dv, d_out) and a float32 dq accumulator.
    untiled_backward_transient: float = 0.0
    # The anchor is only the stored attention output (the input is a checkpoint): the layer may
    # instead drop it and recompute attention too (whole-layer checkpointing).
    droppable_anchor: bool = False
    # The executor runs a share of the tokens recomputed (token-wise recompute) for this layer;
    # where it does not, a block's recompute share is 0 or 1 (whole-layer recompute).
    tokenwise: bool = True
    # Attention's backward in query chunks (memtrain.offload.memo): the queries are tileable,
    # but they are whole in forward (this many bytes beyond their chunk), and the stored
    # tokens' query gradient is whole in backward (this many bytes times the stored share).
    query_bytes: float = 0.0
    # Host optimizer (memtrain.planner.hostmem): the layer's parameter count (float32 masters and
    # gradient buffers) and its optimizer states on float32 masters.
    param_count: float = 0.0
    host_state_bytes: float = 0.0
    # The layer's largest parameter in bytes (its gradient's host staging, hostmem
    # .grad_staging_bytes); 0: unknown, the layer's parameter bytes bound it.
    largest_param_bytes: float = 0.0

    @property
    def token_bytes(self) -> float:
        return self.anchor_bytes + self.recomputable_bytes

    @property
    def tileable(self) -> bool:
        return self.kind in TILEABLE_KINDS and self.tileable_fraction > 0

    def signature(self) -> tuple:
        """Everything but the name: layers with equal signatures are interchangeable."""
        return tuple(v for k, v in self.__dict__.items() if k != "name")


@dataclass(frozen=True)
class PlanProblem:
    """The layers in execution order plus what the step processes."""

    layers: list[LayerCosts]
    tokens: int  # batch * seq per micro-batch
    fused_loss: bool
    model: str = ""
    optimizer: str = ""
    micro_batch: int = 1
    seq: int = 0
    # The host optimizer steps each layer as its gradients arrive, during the rest of backward
    # (memtrain.offload.optimizer, overlap=True): only what backward cannot hide is a tail.
    overlap_host_step: bool = False
    # Host-placed states step float32 master copies (memtrain's host optimizer, DeepSpeed's
    # ZeRO-Offload); False: the parameters themselves in their dtype, with states on that dtype
    # (FSDP2's CPU offload), so a layer's host states are its ``state_bytes``.
    host_masters: bool = True

    def runs(self) -> list[tuple[int, int]]:
        """Maximal runs ``[start, end)`` of consecutive layers with equal signatures."""
        runs: list[tuple[int, int]] = []
        start = 0
        for index in range(1, len(self.layers) + 1):
            if index == len(self.layers) or (
                self.layers[index].signature() != self.layers[start].signature()
            ):
                runs.append((start, index))
                start = index
        return runs


def _per_head(tensor: SavedTensor) -> bool:
    """Attention's own tensors: its outputs, and the [batch, heads, tokens, dim] q, k, v it
    reads (all tokens at once, so sequence chunks of token-local work do not divide them)."""
    return is_attention_op(tensor.op) or (len(tensor.shape) == 4 and tensor.token_dim == 2)


def _matches(op: str, patterns: Sequence[str]) -> bool:
    lowered = op.lower()
    return any(p.lower() in lowered for p in patterns)


def layer_costs(
    layer: LayerProfile,
    always_store_ops: Sequence[str] = (),
    *,
    dtype_bytes: int = 2,
    host_state_bytes: float | None = None,
    largest_param_bytes: float = 0.0,
) -> LayerCosts:
    """Split one profiled layer's saved bytes into anchor / recomputable / fixed.

    ``dtype_bytes``: the parameters' element size, for a profile without parameter counts;
    ``host_state_bytes``: the layer's optimizer states on float32 masters (None: estimated from
    its states on the parameters' dtype, memtrain.planner.hostmem.host_state_estimate).
    """
    anchor = recomputable = fixed = attention = attention_out = attention_output = 0.0
    stores_attention = False
    input_saved = any(t.is_layer_input for t in layer.saved_tensors)
    # Work outside every layer (the profiler's "other": rotary tables, masks) has no layer hooks
    # an executor could use, so its saved bytes stay where they are.
    movable = layer.kind != "other"
    # Token-wise recompute (memtrain.offload.modes.TokenwiseRecompute) stores the attention
    # output and log-sum-exp of every token, recomputed or not: for a block it can run, those
    # bytes are an anchor (stored, or dropped with the whole layer checkpointed), never a token
    # share that is recomputed. Pricing them as recomputable under-counts the host bytes the
    # executor places by the attention output of every recomputed token.
    tokenwise_block = layer.kind in TILEABLE_KINDS and layer.tokenwise
    for tensor in layer.saved_tensors:
        if tensor.token_dim is None or not movable:
            fixed += tensor.nbytes
        elif (
            tensor.is_layer_input
            or _matches(tensor.op, always_store_ops)
            or (tokenwise_block and is_attention_op(tensor.op))
        ):
            anchor += tensor.nbytes
            stores_attention = stores_attention or is_attention_op(tensor.op)
        else:
            recomputable += tensor.nbytes
        if tensor.token_dim is not None and _per_head(tensor):
            attention += tensor.nbytes
            if is_attention_op(tensor.op):
                attention_out += tensor.nbytes
                attention_output = max(attention_output, float(tensor.nbytes))
    # A profile may report saved bytes it could not attribute to tensors; keep them fixed.
    listed = anchor + recomputable + fixed
    if layer.saved_bytes > listed:
        fixed += layer.saved_bytes - listed
    token = anchor + recomputable
    count = layer.param_count or layer.param_bytes / max(1, dtype_bytes)
    tileable = 0.0
    untiled_backward = 0.0
    query = 0.0
    # Sequence chunks only where the executor tiles the layer (memtrain.models.blocks).
    if layer.kind in TILEABLE_KINDS and token > 0 and layer.tiling:
        tileable = max(0.0, (token - attention) / token)
        untiled_backward = min(float(layer.backward_transient_bytes), attention + 2 * attention_out)
        if layer.kind == "norm":  # memtrain.offload.tiled: the input gradient is whole
            untiled_backward = min(float(layer.backward_transient_bytes), float(layer.input_bytes))
        if layer.query_chunked and tokenwise_block and attention_output > 0:
            # Backward in query chunks: queries (the size of attention's output) are rebuilt a
            # chunk at a time; whole are the output, log-sum-exp, keys and values. Beyond
            # them backward holds the output's gradient, then either float32 key/value
            # gradient sums with the finished chunks' input gradients (at most the larger
            # of the two), or, once keys and values are gone, the input gradient's chunks
            # and their join. Before attention, the post-attention chunks write their
            # gradients into a whole block-input and attention-output gradient (keys and
            # values not yet rebuilt).
            query = attention_output
            keys_values = max(0.0, attention - attention_out - query)
            widen = 4.0 / max(1, dtype_bytes)
            input_grad = float(layer.input_bytes)
            tileable = max(0.0, (token - (attention - query)) / token)
            untiled_backward = min(
                float(layer.backward_transient_bytes),
                max(
                    attention_out + max(widen * keys_values, 2 * input_grad - keys_values),
                    input_grad + attention_out - keys_values,
                ),
            )
    return LayerCosts(
        name=layer.name,
        kind=layer.kind,
        anchor_bytes=anchor,
        recomputable_bytes=recomputable,
        fixed_bytes=fixed,
        checkpoint_bytes=0.0 if input_saved or recomputable == 0 else float(layer.input_bytes),
        tileable_fraction=tileable,
        forward_transient=float(layer.forward_transient_bytes),
        backward_transient=float(layer.backward_transient_bytes),
        output_bytes=float(layer.output_bytes),
        forward_time=float(layer.forward_time_s),
        recompute_time=float(
            layer.forward_time_s
            - (min(layer.attention_forward_time_s, layer.forward_time_s) if stores_attention else 0)
        ),
        backward_time=float(layer.backward_time_s),
        untiled_backward_transient=untiled_backward,
        droppable_anchor=(
            stores_attention
            and layer.kind in TILEABLE_KINDS
            and not input_saved
            and recomputable > 0
        ),
        param_bytes=float(layer.param_bytes),
        grad_bytes=float(layer.grad_bytes),
        state_bytes=float(layer.optimizer_state_bytes),
        tokenwise=layer.tokenwise,
        query_bytes=query,
        param_count=float(count),
        largest_param_bytes=float(largest_param_bytes),
        host_state_bytes=float(
            host_state_estimate(layer.optimizer_state_bytes, layer.param_bytes, count)
            if host_state_bytes is None
            else host_state_bytes
        ),
    )


def has_logits(profile: ProfileResult) -> bool:
    """Whether the profile has a head or loss layer a fused linear cross-entropy could replace."""
    return any(layer.kind in LOSS_KINDS for layer in profile.layers)


def apply_fused_loss(profile: ProfileResult) -> ProfileResult:
    """The profile as it would be with a fused linear cross-entropy loss.

    The fused kernel computes the loss from the head's input block by block and never stores
    logits: the head keeps only its input (the final hidden states), the loss keeps one float32
    log-sum-exp per token; in backward it writes the hidden states' gradient beside a bounded
    workspace. Times stay as profiled
    (the fused kernel recomputes logit blocks in backward at about the cost of the unfused one).
    """
    if not has_logits(profile):
        raise MemtrainError(
            "fused loss needs a profile with a 'head' or 'loss' layer; this profile has neither "
            "(plan with --fused-loss off)"
        )
    tokens = profile.batch * profile.seq
    lse_bytes = 4 * tokens
    layers = []
    loss_kinds = {layer.kind for layer in profile.layers}
    lse_owner = "loss" if "loss" in loss_kinds else "head"
    # Its backward writes the gradient of the hidden states (the head's input) at once, beside
    # the kernel's bounded workspace; the next layer back counts it only as its own incoming
    # gradient.
    # (the workspace never exceeds the logits themselves in float32)
    head = next((layer for layer in profile.layers if layer.kind == "head"), None)
    backward_bytes = 0
    if head is not None:
        backward_bytes = head.input_bytes + min(DEFAULT_BLAS_WORKSPACE_BYTES, 2 * head.output_bytes)
    for layer in profile.layers:
        if layer.kind not in LOSS_KINDS:
            layers.append(layer)
            continue
        kept = [
            t
            for t in layer.saved_tensors
            if t.token_dim is None or (layer.kind == "head" and t.is_layer_input)
        ]
        if layer.kind == lse_owner:
            kept.append(
                SavedTensor(
                    shape=[tokens],
                    dtype="float32",
                    nbytes=lse_bytes,
                    token_dim=0,
                    is_layer_input=False,
                    op="fused_linear_cross_entropy",
                )
            )
        saved = sum(t.nbytes for t in kept)
        layers.append(
            replace(
                layer,
                saved_tensors=kept,
                saved_bytes=saved,
                output_bytes=lse_bytes if layer.kind == "head" else layer.output_bytes,
                input_bytes=layer.input_bytes if layer.kind == "head" else lse_bytes,
                forward_transient_bytes=min(layer.forward_transient_bytes, 2 * lse_bytes),
                backward_transient_bytes=(
                    backward_bytes
                    if layer.kind == lse_owner
                    else min(layer.backward_transient_bytes, 2 * lse_bytes)
                ),
            )
        )
    return replace(profile, layers=layers)


def build_problem(
    profile: ProfileResult,
    *,
    fused_loss: bool,
    always_store_ops: Sequence[str] = (),
    host_state_bytes: Mapping[str, float] | None = None,
    largest_param_bytes: Mapping[str, float] | None = None,
) -> PlanProblem:
    """The planner's view of ``profile`` with the loss fused or not. ``host_state_bytes``:
    per layer name, its optimizer states on float32 masters (exact, from the model; missing
    layers are estimated); ``largest_param_bytes``: per layer name, its largest parameter's
    bytes (missing layers: bounded by all of theirs)."""
    if not profile.layers:
        raise MemtrainError("the profile has no layers; re-run memtrain profile")
    source = apply_fused_loss(profile) if fused_loss else profile
    try:
        itemsize = dtype_bytes(profile.dtype)
    except Exception:  # an unknown dtype name: parameter counts are in the profile anyway
        itemsize = 2
    states = dict(host_state_bytes or {})
    largest = dict(largest_param_bytes or {})
    return PlanProblem(
        layers=[
            layer_costs(
                layer,
                always_store_ops,
                dtype_bytes=itemsize,
                host_state_bytes=states.get(layer.name),
                largest_param_bytes=largest.get(layer.name, 0.0),
            )
            for layer in source.layers
        ],
        tokens=profile.batch * profile.seq,
        fused_loss=fused_loss,
        model=profile.model,
        optimizer=profile.optimizer,
        micro_batch=profile.batch,
        seq=profile.seq,
    )
