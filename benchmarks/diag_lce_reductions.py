"""Does cuBLAS's reduced-precision reduction change the fused loss's gradients? (one GPU)

Runs the cuBLAS and Triton paths of ``linear_cross_entropy`` on thin and ordinary shapes in
bf16, once as shipped (reduced-precision reductions off around the products, see
``memtrain/kernels/cross_entropy/reductions.py``) and once with PyTorch's default switches left
on, and prints each gradient's relative error against float64.

Reproduce:  python benchmarks/diag_lce_reductions.py
"""

from __future__ import annotations

import contextlib
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from memtrain.kernels.cross_entropy import blas, linear_cross_entropy, triton_function  # noqa: E402
from memtrain.kernels.cross_entropy.reference import reference_linear_cross_entropy  # noqa: E402


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()


def errors(impl: str, n: int, d: int, v: int, seed: int) -> list[float]:
    g = torch.Generator(device="cuda").manual_seed(seed)
    h = torch.randn(n, d, device="cuda", generator=g)
    w = torch.randn(v, d, device="cuda", generator=g) / math.sqrt(d) * 4
    y = torch.randint(0, v, (n,), device="cuda", generator=g)
    h = h.bfloat16().requires_grad_()
    w = w.bfloat16().requires_grad_()
    out = linear_cross_entropy(h, w, y, impl=impl)
    hr, wr = (t.detach().double().requires_grad_() for t in (h, w))
    ref = reference_linear_cross_entropy(hr, wr, y)
    grads = torch.autograd.grad(out, [h, w])
    ref_grads = torch.autograd.grad(ref, [hr, wr])
    return [rel(a, b) for a, b in zip(grads, ref_grads, strict=True)]


def main() -> int:
    if not torch.cuda.is_available():
        print("needs a CUDA GPU")
        return 1
    print(torch.cuda.get_device_name(), torch.__version__)
    shipped = blas.full_precision_reductions
    for label, ctx in (("reductions off (shipped)", shipped), ("PyTorch default", None)):
        if ctx is None:
            blas.full_precision_reductions = contextlib.nullcontext
            triton_function.full_precision_reductions = contextlib.nullcontext
        for impl in ("cublas", "triton"):
            for n, d, v in ((1, 64, 1000), (3, 64, 1000), (257, 96, 3001), (4097, 256, 32000)):
                worst = max(max(errors(impl, n, d, v, seed)) for seed in range(5))
                print(
                    f"{label:26s} {impl:6s} N={n:<5} D={d:<4} V={v:<6} worst dH/dW err {worst:.1e}"
                )
    blas.full_precision_reductions = shipped
    triton_function.full_precision_reductions = shipped
    return 0


if __name__ == "__main__":
    sys.exit(main())
