"""64-bit pointer offsets in the loss kernels: ``row * D`` and ``row * V`` pass 2^31 on large
problems (N=131,072 on a 256,000 vocabulary), where int32 arithmetic would wrap.

On the CPU: the offset helper under Triton's interpreter at values past 2^31 (plain int32
arithmetic, the control, wraps there), and every row-strided offset in the kernels' source goes
through the helper or an int64 cast. On a GPU: real inputs of more than 2^31 elements.
"""

from __future__ import annotations

import re

import pytest
import torch

triton = pytest.importorskip("triton")

from memtrain.kernels import linear_cross_entropy  # noqa: E402
from memtrain.kernels.cross_entropy import (  # noqa: E402
    blas_kernels,
    triton_bwd,
    triton_fwd,
    triton_sparse,
    triton_tiles,
    triton_tma,
)
from tests.kernels.interpret_worker import run_interpreted  # noqa: E402

KERNEL_MODULES = (triton_fwd, triton_bwd, triton_sparse, triton_tma, triton_tiles, blas_kernels)
# A product with one of these (row strides, row counts of the per-row tables, widths of the
# cell table) is an offset that can pass 2^31. The block-mark tables (``flag_cols``,
# ``stride_flags``, ``stride_order_*``) hold one entry per block of a workspace chunk: small.
LARGE = re.compile(r"\*\s*(stride(_h|_w|_dz|_src|_dst|_acc|_out)?|n_rows|cell_cols|keep_cols)\b")


def test_offset_helper_is_64_bit_past_2_31():
    result = run_interpreted("offsets")
    assert result["largest"] > 2**31
    assert result["wide"] == 0, result
    assert result["int32"] != 0, "the int32 control did not wrap: the probe shows nothing"


def _jit_sources():
    for module in KERNEL_MODULES:
        for name, obj in vars(module).items():
            if isinstance(obj, triton.runtime.JITFunction):
                yield f"{module.__name__}.{name}", obj.src


def test_every_large_offset_is_int64_in_the_kernel_source():
    seen = 0
    for name, src in _jit_sources():
        for line in src.splitlines():
            code = line.split("#")[0]
            if not LARGE.search(code):
                continue
            seen += 1
            wide = "tl.int64" in code or "grid_offsets" in code
            helper = name.endswith(".grid_offsets")
            assert wide or helper, f"{name}: 32-bit offset in {line.strip()!r}"
    assert seen >= 3  # the pattern finds the offsets it is meant to find


def _gpu_bytes_free() -> int:
    return torch.cuda.mem_get_info()[0] if torch.cuda.is_available() else 0


@pytest.mark.skipif(_gpu_bytes_free() < 40 * 2**30, reason="needs a CUDA GPU with 40 GiB free")
@pytest.mark.parametrize("impl", ["triton", "cublas"])
@pytest.mark.parametrize("case", ["hidden", "weight"])
def test_more_than_2_31_elements_on_the_gpu(impl, case):
    """hidden (N x D) or weight (V x D) of more than 2^31 bf16 elements; rows past the 2^31st
    element are compared with the chunked torch path (torch's own 64-bit indexing)."""
    dim = 4096
    big = 2**31 // dim + 512
    n, vocab = (big, 512) if case == "hidden" else (256, big)
    g = torch.Generator(device="cuda").manual_seed(0)
    hidden = torch.randn(n, dim, device="cuda", dtype=torch.bfloat16, generator=g)
    weight = torch.randn(vocab, dim, device="cuda", dtype=torch.bfloat16, generator=g) / 64
    labels = torch.randint(0, vocab, (n,), device="cuda", generator=g)
    labels[-1] = vocab - 1  # a target in the last rows of the weight
    results = []
    for which in (impl, "torch"):
        h = hidden.clone().requires_grad_(case == "hidden")
        w = weight.clone().requires_grad_(case == "weight")
        loss = linear_cross_entropy(h, w, labels, impl=which, reduction="none")
        loss.sum().backward()
        grad = h.grad if case == "hidden" else w.grad
        results.append((loss[-1024:].float(), grad[-1024:].float()))
        del h, w, loss, grad
        torch.cuda.empty_cache()
    (loss, grad), (ref_loss, ref_grad) = results
    assert torch.isfinite(grad).all()
    assert ((loss - ref_loss).norm() / ref_loss.norm()).item() < 5e-3
    assert ((grad - ref_grad).norm() / ref_grad.norm()).item() < 2e-2
