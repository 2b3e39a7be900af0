"""Plan one GPU of a multi-GPU run: DeepSpeed ZeRO sharding and Ulysses sequence parallelism.

The planner places the bytes of one GPU. With ``N`` GPUs, each rank holds only part of the
step: :func:`per_rank_profile` turns the profile of the whole step into the profile one rank
sees, and :func:`plan_per_rank` plans that rank (every rank of a uniform run does the same).

ZeRO over the ``N`` ranks (``world_size``): stage 1 shards optimizer states, stage 2 also
gradients, stage 3 also parameters; each rank keeps ``1/N`` of those bytes. Stage 3 gathers a
layer's full parameters for its forward and again for its backward, and every stage from 2 up
holds a layer's full gradients until they are reduce-scattered: those communication buffers are
reserved on the GPU for the whole step (:func:`comm_buffer_bytes`). With ``master_weights``
(the default under ZeRO, as DeepSpeed's bf16/fp16 optimizers run) the optimizer keeps an fp32
copy of the weights and fp32 states, sharded like the states.

Sequence parallelism of degree ``K`` (Ulysses, as ``deepspeed.runtime.sequence_parallel``):
each rank holds ``seq / K`` tokens of every activation; attention exchanges q, k, v and its
output all-to-all so that each rank computes every token for ``heads / K`` heads. Token-dim saved
bytes, layer inputs and outputs and transients divide by ``K``, and so do FLOPs and times (the
attention FLOPs too: its heads are split). Each attention layer adds four all-to-alls in
forward (q, k, v, output) and four in backward (their gradients) at the interconnect bandwidth.

Time model of the collectives (bus bandwidth ``B`` per GPU, from the device preset): an
all-to-all over ``K`` ranks sends ``(K-1)/K`` of its bytes and sits on the critical path; a ring
all-gather or reduce-scatter of ``P`` bytes over ``N`` ranks moves ``P (N-1)/N`` (an all-reduce
twice that); ZeRO's gathers and gradient
reductions overlap the layer's compute (prefetch, bucketed reduction): a layer takes
``all-to-all + max(compute, collective)``. Stage 1/2 all-gather the updated parameters after the
optimizer step; that is added to the first layer's backward, the last work before the step.

Host tiers and their rates are per rank: give each rank its share of the node's host memory.
The CPU optimizer bandwidth is shared by the ranks of one node and divided among them.

This models memory and time per rank. ``memtrain run`` plans every rank this way and runs
the plan inside it: ``launcher.kind=fsdp`` (FSDP2, ``engine="fsdp"``) and
``launcher.kind=deepspeed`` with ``launcher.zero_stage`` (ZeRO, and with
``launcher.sequence_parallel`` DeepSpeed's Ulysses, :mod:`memtrain.train.sequence_parallel`,
the rank's shard of each sequence planned as a sequence of that length);
``memtrain export-deepspeed`` writes the ZeRO config a plan assumes.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from typing import Any

from memtrain.dtypes import DTYPES, dtype_bytes
from memtrain.errors import ConfigError, MemtrainError
from memtrain.hardware.devices import get_device
from memtrain.hardware.tiers import HardwareModel
from memtrain.profile.result import LayerProfile, ProfileResult, SavedTensor, is_attention_op

PER_RANK_NOTE = "per-rank profile:"


def _ceil_div(value: float, by: int) -> int:
    return -(-int(value) // by)


ENGINES = ("zero", "fsdp")  # how model states are sharded (Parallelism.engine)


# Where FSDP2 can keep a unit's states: all on its GPU, or all on the host (CPUOffloadPolicy).
FSDP_STATE_MODES = ("gpu", "all:cpu")


@dataclass(frozen=True)
class Parallelism:
    """How a training step is split over GPUs.

    ``world_size`` ranks in all; ``zero_stage`` 0 (plain data parallel) to 3; ``sequence_parallel``
    ranks share each sequence (it must divide ``world_size``; the other factor is data parallel).
    ``gpus_per_node`` ranks share one host (its CPU optimizer bandwidth).
    ``interconnect_bandwidth`` (bytes/s per GPU for collectives) overrides the device preset's.
    ``master_weights``: fp32 master weights and fp32 optimizer states, as DeepSpeed keeps them
    (its fp32 partition is a copy of fp32 weights too); ``None`` turns them on with ZeRO
    (stage >= 1).
    ``engine``: ``"zero"`` (DeepSpeed's flat partitions: every byte of state divided by the
    ranks) or ``"fsdp"`` (FSDP2 splits each weight's rows; what each rank keeps of an
    optimizer's states follows :mod:`memtrain.optim.sharded_memory`).
    """

    world_size: int = 1
    zero_stage: int = 0
    sequence_parallel: int = 1
    gpus_per_node: int = 8
    interconnect_bandwidth: float | None = None
    master_weights: bool | None = None
    engine: str = "zero"

    def __post_init__(self) -> None:
        if self.engine not in ENGINES:
            raise ConfigError(f"engine must be one of {', '.join(ENGINES)}, got {self.engine!r}")
        if self.engine == "fsdp" and (self.zero_stage != 3 or self.sequence_parallel != 1):
            raise ConfigError(
                "the fsdp engine shards parameters, gradients and optimizer states (ZeRO stage "
                "3) with no sequence parallelism; use the zero engine (DeepSpeed) for "
                f"zero_stage={self.zero_stage}, sequence_parallel={self.sequence_parallel}"
            )
        for name in ("world_size", "zero_stage", "sequence_parallel", "gpus_per_node"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ConfigError(f"{name} must be an integer, got {value!r}")
        if self.world_size < 1:
            raise ConfigError(f"world_size must be at least 1, got {self.world_size}")
        if self.zero_stage not in (0, 1, 2, 3):
            raise ConfigError(f"zero_stage must be 0, 1, 2 or 3, got {self.zero_stage}")
        if self.sequence_parallel < 1:
            raise ConfigError(
                f"sequence_parallel must be at least 1 (1 = off), got {self.sequence_parallel}"
            )
        if self.world_size % self.sequence_parallel:
            raise ConfigError(
                f"sequence parallel degree {self.sequence_parallel} must divide the world size "
                f"{self.world_size} (the rest of the ranks are data parallel)"
            )
        if self.gpus_per_node < 1:
            raise ConfigError(f"gpus_per_node must be at least 1, got {self.gpus_per_node}")
        if self.interconnect_bandwidth is not None and not self.interconnect_bandwidth > 0:
            raise ConfigError("the interconnect bandwidth must be positive")

    @property
    def data_parallel(self) -> int:
        return self.world_size // self.sequence_parallel

    @property
    def uses_master_weights(self) -> bool:
        return self.zero_stage >= 1 if self.master_weights is None else self.master_weights

    @classmethod
    def of_engine(
        cls, engine: str, zero_stage: int = 0, master_weights: bool | None = None, **split: Any
    ) -> Parallelism:
        """The split ``engine`` runs: ``fsdp`` shards everything (stage 3 when no stage is
        given) and keeps weights in their own dtype (no fp32 master copy unless asked)."""
        if engine == "fsdp":
            zero_stage = zero_stage or 3
            master_weights = False if master_weights is None else master_weights
        return cls(zero_stage=zero_stage, master_weights=master_weights, engine=engine, **split)

    def engine_options(self, options: Any) -> Any:
        """``options`` (a PlanOptions) for what this engine executes.

        FSDP2's CPU offload (``CPUOffloadPolicy`` on a block's ``fully_shard``) moves a block's
        parameters, gradients and optimizer states together, and its optimizer steps those
        shards in their own dtype on the CPU (no float32 master copy). DeepSpeed runs every
        placement; where it keeps fp32 master weights, the per-rank states already hold them
        (:func:`per_rank_profile`), so its host step adds no second copy."""
        from memtrain.planner.costmodel import STREAMED_KINDS

        if self.engine != "fsdp":
            if self.uses_master_weights:
                return replace(options, host_masters=False)
            return options
        return replace(
            options,
            allow_param_offload=options.allow_state_offload,
            state_modes=FSDP_STATE_MODES,
            host_masters=False,
            streamed_kinds=STREAMED_KINDS,  # FSDP2's units: one per decoder block
        )

    @property
    def is_single(self) -> bool:
        """One GPU, no ZeRO: nothing that changes the profile."""
        return self.world_size == 1 and self.zero_stage == 0 and not self.uses_master_weights

    def describe(self) -> str:
        text = f"{self.world_size} GPU(s), ZeRO stage {self.zero_stage}"
        if self.engine == "fsdp":
            text = f"{self.world_size} GPU(s), FSDP2 row shards"
        if self.sequence_parallel > 1:
            text += f", sequence parallel {self.sequence_parallel}"
        if self.data_parallel > 1:
            text += f", data parallel {self.data_parallel}"
        return text

    def bandwidth(self, device: str | None) -> float:
        """Collective bandwidth: the override, else the device preset's, else the default."""
        if self.interconnect_bandwidth is not None:
            return float(self.interconnect_bandwidth)
        try:
            return float(get_device(device or "").interconnect_bandwidth)
        except MemtrainError:
            from memtrain.hardware.devices import DeviceSpec

            return float(DeviceSpec.__dataclass_fields__["interconnect_bandwidth"].default)

    def check(self, seq: int, attention: AttentionShape | None = None) -> None:
        """Refuse a split the model or the sequence cannot take, in one line each."""
        sp = self.sequence_parallel
        if sp == 1:
            return
        if seq % sp:
            raise ConfigError(
                f"the sequence ({seq} tokens) is not divisible by the sequence parallel degree "
                f"{sp}; pick a sequence length that is a multiple of {sp}"
            )
        if attention is None:
            return
        if attention.heads % sp:
            raise ConfigError(
                f"{attention.heads} attention heads are not divisible by the sequence parallel "
                f"degree {sp} (Ulysses gives each rank heads/{sp}); use a degree that divides "
                f"{attention.heads}"
            )
        kv = attention.kv_heads
        if kv % sp and sp % kv:
            raise ConfigError(
                f"{kv} key/value heads and sequence parallel degree {sp}: one must divide the "
                f"other (Ulysses splits kv heads, or replicates them when there are fewer)"
            )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class AttentionShape:
    """Heads of a model's attention: what sequence parallelism splits and exchanges."""

    heads: int
    kv_heads: int
    head_dim: int


def attention_shape(model: str) -> AttentionShape | None:
    """Heads of a preset or ``config.json`` (None when the model cannot be read)."""
    try:
        from memtrain.models import load_config

        config = load_config(model)
    except (MemtrainError, ImportError, OSError):
        return None
    heads = getattr(config, "num_attention_heads", None)
    if not heads:
        return None
    kv = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return AttentionShape(int(heads), int(kv), int(head_dim))


def is_per_rank(profile: ProfileResult) -> bool:
    return any(note.startswith(PER_RANK_NOTE) for note in profile.notes)


def _has_attention(layer: LayerProfile) -> bool:
    if layer.attention_forward_time_s > 0:
        return True
    return any(is_attention_op(t.op) for t in layer.saved_tensors if t.token_dim is not None)


def _dtype_bytes(dtype: str) -> int:
    """Bytes per element of the profiled dtype (2 where the profile names none we know)."""
    return dtype_bytes(dtype) if str(dtype).lower() in DTYPES else 2


def all_to_all_bytes(
    layer: LayerProfile,
    profile: ProfileResult,
    parallelism: Parallelism,
    attention: AttentionShape | None,
) -> float:
    """Bytes one rank sends in one direction (forward, or backward) of an attention layer's
    Ulysses exchange: q, k, v (kv heads replicated up to the degree when fewer) and the output,
    each ``(K-1)/K`` of the rank's share. Without the model's heads: four activations of the
    layer's output size."""
    sp = parallelism.sequence_parallel
    if sp == 1 or not _has_attention(layer):
        return 0.0
    share = (sp - 1) / sp
    if attention is None:
        return 4 * layer.output_bytes / sp * share
    tokens = profile.batch * profile.seq / sp
    kv = max(attention.kv_heads, sp)  # fewer kv heads than ranks: replicated before the exchange
    elements = tokens * attention.head_dim * (2 * attention.heads + 2 * kv)
    return elements * _dtype_bytes(profile.dtype) * share


def comm_buffer_bytes(profile: ProfileResult, parallelism: Parallelism) -> int:
    """GPU bytes ZeRO's communication holds at any moment of forward and backward, per rank.

    Stage 3: the gathered full parameters of one layer and of the next one (prefetched), and
    one layer's full gradients before their reduce-scatter. Stage 2: that gradient bucket.
    Stage 0/1 reduce gradients in place. Computed from the whole-step profile (full layers).

    The ``fsdp`` engine (FSDP2 units: each decoder block, and the root with the embeddings,
    final norm and head): the root's parameters stay gathered from its forward to the end of
    backward, a block's around its forward and backward with the next one prefetched, and one
    block's full gradients wait for their reduce-scatter. FSDP2 allocates these copies at any
    world size, one rank included (0.49 GiB measured for Llama-3.2-1B's root on one H100).
    """
    if parallelism.engine == "fsdp":
        blocks = [layer for layer in profile.layers if layer.kind == "block"]
        root = sum(layer.param_bytes for layer in profile.layers if layer.kind != "block")
        largest_params = max((layer.param_bytes for layer in blocks), default=0)
        largest_grads = max((layer.grad_bytes for layer in blocks), default=0)
        return int(root + 2 * largest_params + largest_grads)
    if parallelism.world_size == 1 or parallelism.zero_stage < 2:
        return 0
    largest_params = max((layer.param_bytes for layer in profile.layers), default=0)
    largest_grads = max((layer.grad_bytes for layer in profile.layers), default=0)
    if parallelism.zero_stage == 3:
        return int(2 * largest_params + largest_grads)
    return int(largest_grads)


def largest_layer_params(profile: ProfileResult) -> int:
    """Elements of the largest layer's parameters (the natural ZeRO bucket size)."""
    elem = _dtype_bytes(profile.dtype)
    return max((int(layer.param_bytes) // elem for layer in profile.layers), default=0)


def per_rank_profile(
    profile: ProfileResult,
    parallelism: Parallelism,
    attention: AttentionShape | None = None,
    state_bytes: Mapping[str, int] | None = None,
) -> ProfileResult:
    """``profile`` (one whole training step) as one of ``parallelism.world_size`` ranks sees it.

    Bytes: parameters, gradients and optimizer states divided by the world size from ZeRO
    stage 3, 2 and 1 up (rounded up), after fp32 master weights are added where
    ``parallelism`` asks for them; token-dim saved tensors, layer inputs and outputs and
    transients divided by the sequence-parallel degree. Times: divided by that degree, plus the
    Ulysses all-to-alls and ZeRO collectives (see the module notes). ``seq`` becomes the tokens
    one rank holds, so the plan's tokens/s are per GPU. The timeline and simulated peak are
    dropped (the planner does not read them); the notes say what the profile now is.

    ``attention`` (heads) is read from ``profile.model`` when not given; it sizes the all-to-all
    and is checked against the degree. ``state_bytes``: per layer, the optimizer-state bytes
    one rank keeps, where the engine does not divide them evenly (FSDP2's row shards); they
    replace the ZeRO division for the layers they name.
    """
    if is_per_rank(profile):
        raise MemtrainError(
            "this profile is already one rank's view; give the whole-step profile "
            "(memtrain profile without parallelism)"
        )
    if parallelism.is_single:
        return profile
    sp, n, stage = parallelism.sequence_parallel, parallelism.world_size, parallelism.zero_stage
    if attention is None and sp > 1:
        attention = attention_shape(profile.model)
    parallelism.check(profile.seq, attention)
    bandwidth = parallelism.bandwidth(profile.target)
    elem = _dtype_bytes(profile.dtype)
    # DeepSpeed's ZeRO keeps an fp32 copy of each rank's partition, a clone even of fp32 weights
    master = parallelism.uses_master_weights
    share = (n - 1) / n
    replicate_kv = attention is not None and sp > 1 and attention.kv_heads < sp

    layers: list[LayerProfile] = []
    for layer in profile.layers:
        params, grads, states = layer.param_bytes, layer.grad_bytes, layer.optimizer_state_bytes
        if master and grads > 0:
            # fp32 moments in place of narrower ones, plus an fp32 copy of the weights.
            states = states * 4 // elem + params * 4 // elem
        if state_bytes is not None and layer.name in state_bytes:
            states = int(state_bytes[layer.name])
        elif stage >= 1:
            states = _ceil_div(states, n)
        if stage >= 2:
            grads = _ceil_div(grads, n)
        if stage >= 3:
            params = _ceil_div(params, n)

        saved: list[SavedTensor] = []
        fixed = token_before = token_after = 0
        for tensor in layer.saved_tensors:
            if tensor.token_dim is None or sp == 1:
                saved.append(tensor)
                fixed += tensor.nbytes if tensor.token_dim is None else 0
                token_before += tensor.nbytes if tensor.token_dim is not None else 0
                token_after += tensor.nbytes if tensor.token_dim is not None else 0
                continue
            shape = list(tensor.shape)
            if 0 <= tensor.token_dim < len(shape):
                shape[tensor.token_dim] = -(-shape[tensor.token_dim] // sp)
            nbytes = _ceil_div(tensor.nbytes, sp)
            saved.append(replace(tensor, shape=shape, nbytes=nbytes))
            token_before += tensor.nbytes
            token_after += nbytes
        unlisted = max(0, layer.saved_bytes - fixed - token_before)
        saved_bytes = fixed + token_after + _ceil_div(unlisted, sp)
        if replicate_kv and _has_attention(layer):
            # Fewer kv heads than ranks: each rank holds one whole kv head for k and v (all
            # tokens), more than its 1/K share of them.
            tokens = profile.batch * profile.seq
            full = tokens * attention.head_dim * elem
            extra = int(2 * (full - full * attention.kv_heads / sp))
            saved.append(
                SavedTensor(
                    shape=[profile.batch, 2, profile.seq, attention.head_dim],
                    dtype=profile.dtype,
                    nbytes=extra,
                    token_dim=2,
                    is_layer_input=False,
                    op="ulysses_kv_replication",
                )
            )
            saved_bytes += extra

        a2a = all_to_all_bytes(layer, profile, parallelism, attention) / bandwidth
        gather = share * layer.param_bytes / bandwidth if stage == 3 else 0.0
        if n == 1:
            reduce = 0.0
        elif stage >= 2:
            reduce = share * layer.grad_bytes / bandwidth  # reduce-scatter
        else:
            reduce = 2 * share * layer.grad_bytes / bandwidth  # all-reduce
        forward = a2a + max(layer.forward_time_s / sp, gather)
        backward = a2a + max(layer.backward_time_s / sp, gather + reduce)
        attention_time = layer.attention_forward_time_s / sp + a2a
        layers.append(
            replace(
                layer,
                param_bytes=int(params),
                grad_bytes=int(grads),
                optimizer_state_bytes=int(states),
                saved_bytes=int(saved_bytes),
                saved_tensors=saved,
                input_bytes=_ceil_div(layer.input_bytes, sp),
                output_bytes=_ceil_div(layer.output_bytes, sp),
                forward_transient_bytes=_ceil_div(layer.forward_transient_bytes, sp),
                backward_transient_bytes=_ceil_div(layer.backward_transient_bytes, sp),
                forward_flops=layer.forward_flops / sp,
                backward_flops=layer.backward_flops / sp,
                forward_time_s=forward,
                backward_time_s=backward,
                attention_forward_time_s=min(attention_time, forward),
            )
        )
    # Stage 1/2: every rank all-gathers the updated parameters after the optimizer step.
    if n > 1 and stage in (1, 2) and layers:
        post = share * profile.param_bytes / bandwidth
        layers[0] = replace(layers[0], backward_time_s=layers[0].backward_time_s + post)

    comm = comm_buffer_bytes(profile, parallelism)
    totals = {
        "param_bytes": sum(layer.param_bytes for layer in layers),
        "grad_bytes": sum(layer.grad_bytes for layer in layers),
        "optimizer_state_bytes": sum(layer.optimizer_state_bytes for layer in layers),
        "saved_bytes": sum(layer.saved_bytes for layer in layers),
    }
    transient = max(
        (max(x.forward_transient_bytes, x.backward_transient_bytes) for x in layers), default=0
    )
    layer_time = sum(x.forward_time_s + x.backward_time_s for x in profile.layers)
    optimizer_time = max(0.0, profile.step_time_s - layer_time)
    if profile.optimizer_state_bytes:
        optimizer_time *= totals["optimizer_state_bytes"] / profile.optimizer_state_bytes
    tokens_note = (
        f"{profile.seq // sp:,} of {profile.seq:,} tokens per rank"
        if sp > 1
        else f"{profile.seq:,} tokens per rank"
    )
    notes = [
        *profile.notes,
        f"{PER_RANK_NOTE} one rank of {parallelism.describe()}; {tokens_note}; "
        f"parameters {'sharded' if stage >= 3 else 'replicated'}, gradients "
        f"{'sharded' if stage >= 2 else 'replicated'}, optimizer states "
        f"{'sharded' if stage >= 1 else 'replicated'}"
        + ("; fp32 master weights and states" if master else "")
        + f"; collectives at {bandwidth / 1e9:.0f} GB/s",
    ]
    if comm:
        notes.append(
            f"ZeRO communication buffers: {comm / 2**30:.2f} GiB per rank (in the predicted "
            "peak, not in the layers)"
        )
    if attention is None and sp > 1:
        notes.append("model heads unknown: all-to-all sized as four activations per attention")
    return replace(
        profile,
        seq=profile.seq // sp,
        layers=layers,
        largest_transient_bytes=int(transient),
        predicted_peak_bytes=int(sum(totals.values()) + transient + comm),
        simulated_peak_bytes=None,
        measured_peak_bytes=None,
        step_time_s=sum(x.forward_time_s + x.backward_time_s for x in layers) + optimizer_time,
        timeline=[],
        notes=notes,
        **{k: int(v) for k, v in totals.items()},
    )


def per_rank_hardware(
    hardware: HardwareModel, parallelism: Parallelism, comm_bytes: int = 0
) -> HardwareModel:
    """``hardware`` as one rank may use it: ZeRO's communication buffers reserved on the GPU
    (live through forward and backward, so never planned for activations) and the node's CPU
    optimizer bandwidth shared by its ranks. Host tier capacities are taken as per rank."""
    if parallelism.world_size == 1 and not comm_bytes:
        return hardware
    ranks_on_node = min(parallelism.world_size, parallelism.gpus_per_node)
    return replace(
        hardware,
        gpu_reserved_bytes=int(hardware.gpu_reserved_bytes + comm_bytes),
        cpu_optimizer_bandwidth=hardware.cpu_optimizer_bandwidth / ranks_on_node,
        notes=[
            *hardware.notes,
            f"one rank of {parallelism.world_size}: {comm_bytes / 2**30:.2f} GiB reserved for "
            f"ZeRO communication buffers; CPU optimizer bandwidth shared by {ranks_on_node} "
            "ranks; host tiers are this rank's share",
        ],
    )


def plan_per_rank(
    candidates: list[tuple[str, ProfileResult]],
    hardware: HardwareModel,
    parallelism: Parallelism,
    options: Any = None,
    attention: AttentionShape | None = None,
    state_bytes: Mapping[str, Mapping[str, int]] | None = None,
):
    """Plan one rank: each whole-step candidate profile turned per rank, the hardware shared
    as :func:`per_rank_hardware` says, the fastest candidate kept (``best_of``). The plan's
    ``parallelism`` records the split, the communication buffers and the per-GPU peak.
    ``state_bytes``: per optimizer of the candidates, per layer, one rank's state bytes (see
    :func:`per_rank_profile`)."""
    from memtrain.planner.plan import best_of

    if not candidates:
        raise MemtrainError("nothing to plan: give at least one profile")
    states = state_bytes or {}
    per_rank = [
        (label, per_rank_profile(p, parallelism, attention, states.get(p.optimizer)))
        for label, p in candidates
    ]
    comm = max(comm_buffer_bytes(p, parallelism) for _, p in candidates)
    plan, rows = best_of(per_rank, per_rank_hardware(hardware, parallelism, comm), options)
    if parallelism.is_single:
        return plan, rows
    full_seq = plan.seq * parallelism.sequence_parallel
    whole = next(p for _, p in candidates if p.batch == plan.micro_batch)
    gpu_peak = plan.predicted["peak_bytes"].get("gpu", 0)
    plan.parallelism = {
        **parallelism.to_dict(),
        "master_weights": parallelism.uses_master_weights,
        "interconnect_bandwidth": parallelism.bandwidth(whole.target),
        "data_parallel": parallelism.data_parallel,
        "per_gpu": True,
        "seq": full_seq,
        "seq_per_rank": plan.seq,
        "global_tokens_per_step": full_seq * plan.micro_batch * parallelism.data_parallel,
        "cluster_tokens_per_s": plan.predicted["tokens_per_s"] * parallelism.world_size,
        "comm_buffer_bytes": comm,
        "largest_layer_params": largest_layer_params(whole),
        "gpu_peak_bytes": int(gpu_peak + comm),
    }
    if parallelism.engine == "fsdp":
        runs = "memtrain run with launcher.kind=fsdp executes this per-rank plan"
    else:
        runs = (
            "memtrain run with launcher.kind=deepspeed and launcher.zero_stage plans each rank "
            "with its ZeRO partition (under launcher.sequence_parallel, for its shard of each "
            "sequence); memtrain export-deepspeed writes the ZeRO config"
        )
    plan.notes.append(
        f"per GPU: one rank of {parallelism.describe()}; peaks, bytes and tokens/s are per GPU "
        f"(predicted GPU peak with ZeRO buffers {(gpu_peak + comm) / 2**30:.1f} GiB); {runs}"
    )
    return plan, rows
