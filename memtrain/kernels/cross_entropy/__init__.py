"""Fused linear + cross-entropy: the loss of a language-model head without the N x V logits.

``linear_cross_entropy(hidden, weight, labels)`` equals
``cross_entropy(hidden @ weight.T, labels)`` but never stores the logits. On CUDA two exact
implementations compute them block by block (forward: log-sum-exp; backward: recompute and
contract): "cublas" runs the four large products in cuBLAS with small Triton kernels for the
softmax parts in between (``blas.py``), "triton" fuses the logits into Triton matmul kernels and
also offers the gradient filter (``triton_*.py``). Elsewhere a chunked PyTorch path bounds the
logits to a few rows at a time.
"""

from __future__ import annotations

import math

import torch

from memtrain.errors import MemtrainError
from memtrain.kernels.cross_entropy.availability import triton_available
from memtrain.kernels.cross_entropy.chunked import (
    ChunkedLinearCrossEntropy,
    chunk_rows_for,
)
from memtrain.kernels.cross_entropy.reference import reference_linear_cross_entropy

__all__ = [
    "default_filter_eps",
    "linear_cross_entropy",
    "reference_linear_cross_entropy",
    "triton_available",
]

_REDUCTIONS = ("mean", "sum", "none")
_IMPLS = ("auto", "cublas", "triton", "torch")
_DTYPES = (torch.bfloat16, torch.float16, torch.float32, torch.float64)
_TRITON_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
# "auto" takes the cuBLAS path from this hidden size up, unless the Triton path's tensor-
# descriptor kernels run (Hopper or newer, bf16/fp16, 16-byte rows). With the pointer kernels, on
# an H100 (docs/benchmarks.md, 64 MiB workspace, exact): D=2048 x V=128256 29.8-30.1 ms vs Triton
# 30.9-31.5; D=2304 x V=256000 65.9-67.2 vs 65.8-66.6 at N=8192, 262-269 vs 273 at N=32768. With
# the descriptor kernels, on an H200: D=2048 28.7-28.9 ms vs cuBLAS 29.9-30.1; D=2304 64.6-65.0 vs
# 66.0-66.8 at N=8192, 268.5-269.6 vs 267.7-269.4 at N=32768; with the one-loop gradient kernel
# D=2048 27.7-27.8 vs 29.4-31.2, D=2304 62.8-63.8 vs 63.9-65.5 and 251-252 vs 262-263 at N=32768.
BLAS_MIN_DIM = 2048


def default_filter_eps(dtype: torch.dtype) -> float:
    """Softmax probability under which a gradient block may be skipped.

    A skipped block's entries are each below ``eps`` (relative to the row's gradient scale); at
    1/32 of the dtype's unit roundoff they sit far below what the dtype can resolve next to the
    target's entry of order one.
    """
    return torch.finfo(dtype).eps / 32


def _validate(
    hidden, weight, labels, bias, reduction, label_smoothing, z_loss, softcap, impl
) -> None:
    if not all(isinstance(t, torch.Tensor) for t in (hidden, weight, labels)):
        raise MemtrainError("hidden, weight and labels must be torch tensors")
    if reduction not in _REDUCTIONS:
        raise MemtrainError(f"reduction={reduction!r}; use one of {', '.join(_REDUCTIONS)}")
    if impl not in _IMPLS:
        raise MemtrainError(f"impl={impl!r}; use one of {', '.join(_IMPLS)}")
    if weight.dim() != 2 or hidden.dim() < 1 or hidden.shape[-1] != weight.shape[1]:
        raise MemtrainError(
            f"shapes do not fit: hidden {tuple(hidden.shape)} needs [..., D] and weight "
            f"{tuple(weight.shape)} needs [V, D] with the same D"
        )
    if labels.shape != hidden.shape[:-1]:
        raise MemtrainError(
            f"labels shape {tuple(labels.shape)} must equal hidden's leading shape "
            f"{tuple(hidden.shape[:-1])}"
        )
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise MemtrainError(f"labels must be an integer tensor, got {labels.dtype}")
    if hidden.dtype not in _DTYPES or weight.dtype != hidden.dtype:
        raise MemtrainError(
            f"hidden ({hidden.dtype}) and weight ({weight.dtype}) must share one dtype of "
            "bfloat16, float16, float32 (float64 on the torch path)"
        )
    if bias is not None and (bias.shape != (weight.shape[0],) or bias.dtype != weight.dtype):
        raise MemtrainError(f"bias must have shape ({weight.shape[0]},) and dtype {weight.dtype}")
    devices = {t.device for t in (hidden, weight, labels) + ((bias,) if bias is not None else ())}
    if len(devices) > 1:
        raise MemtrainError(f"all inputs must be on one device, got {sorted(map(str, devices))}")
    if not 0.0 <= label_smoothing < 1.0:
        raise MemtrainError(f"label_smoothing={label_smoothing}; use a value in [0, 1)")
    if not (isinstance(z_loss, (int, float)) and 0.0 <= z_loss < math.inf):
        raise MemtrainError(f"z_loss={z_loss}; use a finite number >= 0")
    if softcap is not None and not softcap > 0:
        raise MemtrainError(f"softcap={softcap}; use a positive number or None")


def _descriptor_kernels_run(hidden: torch.Tensor) -> bool:
    """Whether the Triton path gets its tensor-descriptor kernels for this input (CUDA)."""
    from memtrain.kernels.cross_entropy import triton_function
    from memtrain.kernels.cross_entropy.triton_tma import tma_shape_ok

    return tma_shape_ok(hidden.dtype, hidden.shape[-1]) and triton_function.tma_capable_device()


def _auto_impl(hidden: torch.Tensor, triton_runs: bool, filtering: bool) -> str:
    """The implementation "auto" stands for (see :func:`linear_cross_entropy`)."""
    device = hidden.device
    if device.type != "cuda":
        return "triton" if triton_runs else "torch"
    if triton_runs and _descriptor_kernels_run(hidden):
        return "triton"
    if not filtering and hidden.shape[-1] >= BLAS_MIN_DIM and hidden.dtype in _TRITON_DTYPES:
        from memtrain.kernels.cross_entropy.blas import blas_supported

        if blas_supported(device, hidden.dtype):
            return "cublas"
    return "triton" if triton_runs else "torch"


def _targets(labels: torch.Tensor, vocab: int, ignore_index: int, shift: bool) -> torch.Tensor:
    """Flat int32 targets with -1 for ignored rows; out-of-range labels are an input error."""
    if shift:
        if labels.dim() == 0 or labels.shape[-1] == 0:
            raise MemtrainError("shift=True needs labels with a sequence dimension")
        pad = torch.full_like(labels[..., :1], ignore_index)
        labels = torch.cat([labels[..., 1:], pad], dim=-1)
    flat = labels.reshape(-1)
    ignored = flat == ignore_index
    bad = ((flat < 0) | (flat >= vocab)) & ~ignored
    if flat.numel() and bool(bad.any()):
        value = int(flat[bad][0])
        raise MemtrainError(
            f"label {value} is outside the vocabulary [0, {vocab}) and is not "
            f"ignore_index={ignore_index}"
        )
    return torch.where(ignored, -1, flat).to(torch.int32).contiguous()


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    softcap: float | None = None,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    shift: bool = False,
    grad_filter: bool = False,
    grad_filter_eps: float | None = None,
    impl: str = "auto",
    workspace_bytes: int | None = None,
) -> torch.Tensor:
    """Cross-entropy of ``softcap(hidden @ weight.T + bias)`` against ``labels``, logits unstored.

    hidden: ``[..., D]``; weight: ``[V, D]``; labels: hidden's leading shape, integer classes or
    ``ignore_index``. ``softcap`` applies ``c * tanh(z / c)`` to the logits (Gemma 2).
    ``shift=True`` makes position ``t`` predict ``labels[..., t + 1]`` (causal LM training; the
    last position is ignored). ``reduction`` and ``label_smoothing`` follow
    ``torch.nn.functional.cross_entropy``; with ``"mean"`` and no valid label the loss is NaN.
    The loss is float32 (float64 for float64 inputs) whatever the input dtype, as the logits are
    accumulated in float32; rounding it to bf16 would cost up to 0.4% of its value.

    ``grad_filter=True`` lets the Triton backward skip blocks of the logits gradient in which
    no target lies and every softmax probability (times ``1 + 2 * z_loss * lse`` with the
    z-loss) is below ``grad_filter_eps`` (default :func:`default_filter_eps`): faster on peaked
    softmaxes, not exact. It is off by default; the torch path is always exact. Label smoothing
    works with it: its uniform share ``-label_smoothing / V`` of every logit's gradient is added
    in closed form (through the column sums of the weight, the row sums of the hidden states
    and the bias), so the filter only judges the rest, negligible in the same blocks as without
    smoothing. Smoothing with both the filter and ``softcap`` is refused (the softcap's
    derivative makes that share differ per logit).
    ``impl`` picks the implementation:

    - "cublas": the four large products (forward logits, recomputed logits, dH = G·W,
      dW = Gᵀ·H) in cuBLAS over a reusable workspace, the softmax parts in small Triton kernels;
      exact (no filter). On CUDA it needs PyTorch 2.8+ for bf16/fp16 (float32-output products);
      on the CPU it runs with emulated products and PyTorch elementwise ops (for testing).
    - "triton": logits computed inside Triton matmul kernels; the only one with
      ``grad_filter``. Needs CUDA with triton (or ``TRITON_INTERPRET=1`` for CPU tensors).
    - "torch": chunked PyTorch, any device and float64; slowest.
    - "auto" (default): on CUDA "triton" where its tensor-descriptor kernels run (Hopper or
      newer, bf16/fp16, rows of a multiple of 16 bytes); otherwise "cublas" for hidden sizes of
      2048 and up (where its faster products outweigh the logits it writes to memory) unless
      the gradient filter is on, else "triton"; under the Triton interpreter "triton";
      elsewhere "torch".

    ``workspace_bytes`` bounds the scratch memory of the "cublas" and "triton" paths (default
    64 MiB, 256 MiB for the filtered Triton path); smaller is slower (more, smaller products).
    The exact Triton path keeps its hidden-gradient accumulator outside the workspace when the
    workspace is small (14 MiB: 15.1 MiB extra, 4-8% slower than 64 MiB on an H200 at N=8192,
    V=256000), see docs/benchmarks.md.
    """
    _validate(hidden, weight, labels, bias, reduction, label_smoothing, z_loss, softcap, impl)
    if grad_filter and label_smoothing > 0.0 and softcap is not None:
        raise MemtrainError(
            "grad_filter=True cannot combine label_smoothing > 0 with softcap: the softcap's "
            "tanh derivative makes smoothing's label_smoothing / V share differ per logit, so "
            "it has no closed form and no block is negligible"
        )
    runnable = triton_available(hidden.device) and hidden.dtype in _TRITON_DTYPES
    filtering = grad_filter
    z_loss = float(z_loss)
    if impl == "auto":
        impl = _auto_impl(hidden, runnable, filtering)
    if impl == "triton" and not runnable:
        raise MemtrainError(
            f"impl='triton' cannot run {hidden.dtype} on {hidden.device}: it needs bf16/fp16/"
            "fp32 on a CUDA device with triton installed (or TRITON_INTERPRET=1 for CPU "
            "tensors); use impl='torch' or 'auto'"
        )
    if impl == "cublas":
        from memtrain.kernels.cross_entropy.blas import blas_supported

        if filtering:
            raise MemtrainError(
                "grad_filter=True skips gradient blocks only on impl='triton' (or 'auto'); "
                "impl='cublas' is exact"
            )
        if not blas_supported(hidden.device, hidden.dtype):
            raise MemtrainError(
                f"impl='cublas' cannot run {hidden.dtype} on {hidden.device}: this PyTorch "
                f"({torch.__version__}) has no float32-output bf16/fp16 products "
                "(torch.mm(..., out_dtype=torch.float32), PyTorch 2.8+); use impl='triton'"
            )
    vocab, dim = weight.shape
    targets = _targets(labels, vocab, ignore_index, shift)
    flat_hidden = hidden.reshape(-1, dim).contiguous()
    weight = weight.contiguous()
    softcap = float(softcap) if softcap is not None else None
    if flat_hidden.shape[0] == 0:  # an empty batch: nothing to launch (the kernels' grids
        impl = "torch"  # and chunk plans assume rows); the chunked path returns the same
    if impl == "cublas":
        from memtrain.kernels.cross_entropy.blas import (
            DEFAULT_BLAS_WORKSPACE_BYTES,
            BlasLinearCrossEntropy,
            plan_blas,
            shifted_backward,
        )

        plan = plan_blas(
            flat_hidden.shape[0], vocab, dim, hidden.dtype,
            workspace_bytes or DEFAULT_BLAS_WORKSPACE_BYTES,
            shifted=shifted_backward(bias, softcap),
        )  # fmt: skip
        losses = BlasLinearCrossEntropy.apply(
            flat_hidden, weight, bias, targets, softcap, float(label_smoothing), plan, z_loss
        )
    elif impl == "triton":
        from memtrain.kernels.cross_entropy.triton_function import (
            DEFAULT_FILTER_WORKSPACE_BYTES,
            DEFAULT_WORKSPACE_BYTES,
            TritonLinearCrossEntropy,
        )

        eps = None
        if filtering:
            eps = (
                grad_filter_eps if grad_filter_eps is not None else default_filter_eps(hidden.dtype)
            )
        losses = TritonLinearCrossEntropy.apply(
            flat_hidden, weight, bias, targets, softcap, float(label_smoothing), eps,
            workspace_bytes
            or (DEFAULT_WORKSPACE_BYTES if eps is None else DEFAULT_FILTER_WORKSPACE_BYTES),
            z_loss,
        )  # fmt: skip
    else:
        losses = ChunkedLinearCrossEntropy.apply(
            flat_hidden, weight, bias, targets, softcap, float(label_smoothing),
            chunk_rows_for(vocab), z_loss,
        )  # fmt: skip
    if reduction == "none":
        return losses.reshape(labels.shape)
    total = losses.sum()
    if reduction == "mean":
        total = total / (targets >= 0).sum()
    return total
