"""Runs the Triton kernels of linear_cross_entropy in Triton's CPU interpreter.

Started in a subprocess by ``test_lce_triton_interpreter.py`` with ``TRITON_INTERPRET=1`` (the
variable must be set before Triton is imported, so it cannot share the test process). Prints one
JSON object: case name -> relative errors against a float64 reference and the allowed tolerance.
With the argument ``preskip`` (``test_lce_skip_bound.py``) it runs the filtered backward with
and without the forward's bound instead (see :func:`preskip_main`); with ``smoothing``
(``test_lce_filter_smoothing.py``) the same with label smoothing (:func:`smoothing_main`);
with ``offsets`` (``test_lce_offsets.py``) it checks the kernels' 64-bit offsets (see
:func:`offsets_main`).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def run_interpreted(*args: str) -> dict:
    """This worker in a fresh process with ``TRITON_INTERPRET=1`` (Triton reads it at import):
    its JSON results, for the test modules to assert on."""
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run(
        [sys.executable, "-m", "tests.kernels.interpret_worker", *args],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)


# name -> tolerance on ||out - ref|| / ||ref||
CASES = {
    "fp32_odd_small": 2e-5,
    "fp32_odd_reductions_sum": 2e-5,
    "fp32_odd_reductions_none": 2e-5,
    "fp32_d_below_block": 2e-5,
    "fp32_softcap": 2e-5,
    "fp32_smoothing_bias": 2e-5,
    "fp32_shift_3d": 2e-5,
    "fp32_ignored_rows_sum": 2e-5,
    "fp32_many_chunks": 2e-5,
    "bf16_many_chunks_softcap": 2e-2,
    "fp16_large_vocab_scaled": 1e-2,
    "fp32_filter_tiny_eps_is_exact": 2e-5,
    "fp32_filter_matches_block_dropping": 2e-5,
    # The z-loss (c * lse^2) alone and with label smoothing, softcap and bias, on every kernel.
    "fp32_zloss_many_chunks": 2e-5,
    "fp32_zloss_smoothing_softcap_bias_none": 2e-5,
    "bf16_zloss_smoothing_softcap": 2e-2,
    "fp32_filter_zloss_tiny_eps_is_exact": 2e-5,
    "fp32_filter_zloss_matches_block_dropping": 2e-5,
    "fp32_filter_bias_tiny_eps_is_exact": 2e-5,
    "matches_torch_path_bf16": 2e-2,
    # The vocabulary order (accumulator in the gradients' storage, tail recomputed for dW).
    "vocab_order_bf16_tail": 2e-2,
    "vocab_order_fp16_softcap_bias": 1e-2,
    "vocab_order_fp32_smoothing": 2e-5,
    "vocab_order_fp16_zloss_smoothing_softcap": 1e-2,
    # The tensor-descriptor (TMA) kernels, forward and backward.
    "tma_bf16_vocab_order": 2e-2,
    "tma_fp16_softcap_bias_smoothing": 1e-2,
    "tma_bf16_many_chunks_sum": 2e-2,
    "tma_bf16_persistent_descriptor_store": 2e-2,
    "tma_fp16_persistent_flattened_vocab_order": 1e-2,
    "tma_bf16_flat_loop_softcap_bias": 2e-2,
    "tma_bf16_zloss_smoothing_softcap_bias": 2e-2,
    # impl="cublas": emulated products, Triton elementwise kernels in the interpreter
    "cublas_fp32_none": 2e-5,
    "cublas_fp32_softcap_smoothing_bias": 2e-5,
    "cublas_bf16_shifted_mean": 2e-2,
    "cublas_fp16_softcap_sum": 1e-2,
    "cublas_kernels_match_torch_ops_fp32": 1e-5,
    "cublas_after_triton_forward_bf16_smoothing": 2e-2,
    "cublas_fp32_zloss_smoothing_softcap_bias": 2e-5,
    "cublas_bf16_shifted_zloss_smoothing": 2e-2,
}

# Filtered backward with and without the pre-skip: name -> (tolerance against float64, least
# share of blocks the bound must skip).
PRESKIP_CASES = {
    "fp32_peaked_softcap_bias": (2e-5, 0.5),
    "fp32_peaked_rows_without_gradient": (2e-5, 0.5),
    "fp32_random_mid_eps": (2e-5, 0.0),
    "fp32_peaked_fwd_wide_bwd_tall": (2e-5, 0.5),
    "bf16_peaked_fwd_tall_bwd_wide_bias": (2e-2, 0.5),
    "bf16_peaked_softcap_cells": (2e-2, 0.5),
    "fp16_peaked_sum": (1e-2, 0.5),
    "fp32_peaked_zloss_softcap_bias": (2e-5, 0.5),
}

# The filtered backward with label smoothing (its uniform term in closed form): name ->
# (tolerance against float64, least share of blocks the filter must skip).
SMOOTHING_CASES = {
    "fp32_peaked_ls01_mean": (2e-5, 0.3),
    "fp32_peaked_ls03_bias_sum": (2e-5, 0.3),
    "fp32_peaked_ls01_zloss_bias_none": (2e-5, 0.3),
    "fp32_peaked_ls03_zloss_ignore_index_mean": (2e-5, 0.3),
    "fp32_random_mid_eps_ls03_zloss_sum": (2e-5, 0.05),
    "fp32_tiny_eps_ls01_bias_zloss": (2e-5, 0.0),
    "bf16_peaked_ls01_bias_mean": (2e-2, 0.3),
    "fp16_peaked_ls03_zloss_bias_sum": (1e-2, 0.3),
}


@contextlib.contextmanager
def _set(module, name: str, value):
    """``module.name = value`` for the duration of the block."""
    saved = getattr(module, name)
    setattr(module, name, value)
    try:
        yield
    finally:
        setattr(module, name, saved)


def _rel(a, b):
    a, b = a.double(), b.double()
    scale = b.norm().item()
    return (a - b).norm().item() / (scale if scale > 0 else 1.0)


def _inputs(torch, n, v, d, dtype, seed, ignore_frac=0.15, lead=None):
    g = torch.Generator().manual_seed(seed)
    shape = lead or (n,)
    hidden = torch.randn(*shape, d, generator=g).to(dtype)
    weight = (torch.randn(v, d, generator=g) * 3 / math.sqrt(d)).to(dtype)
    labels = torch.randint(0, v, shape, generator=g)
    labels[torch.rand(shape, generator=g) < ignore_frac] = -100
    labels.view(-1)[0] = 1
    return hidden, weight, labels


def _compare(
    torch, lce, ref_fn, hidden, weight, labels, bias=None, ref_override=None, impl="triton", **opts
):
    leaves = [t.clone().requires_grad_() for t in (hidden, weight, bias) if t is not None]
    ref_leaves = [t.detach().double().requires_grad_() for t in leaves]
    b = leaves[2] if bias is not None else None
    rb = ref_leaves[2] if bias is not None else None
    out = lce(leaves[0], leaves[1], labels, bias=b, impl=impl, **opts)
    upstream = torch.randn(
        out.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1234)
    )
    grads = torch.autograd.grad(out, leaves, upstream.to(out.dtype))
    if ref_override is not None:
        ref, ref_grads = ref_override(ref_leaves, upstream)
    else:
        ref_opts = {k: v for k, v in opts.items() if not k.startswith(("grad_filter", "work"))}
        ref = ref_fn(ref_leaves[0], ref_leaves[1], labels, bias=rb, **ref_opts)
        ref_grads = torch.autograd.grad(ref, ref_leaves, upstream)
    errors = {"loss": _rel(out.detach(), ref.detach())}
    for name, got, want in zip(
        ("grad_hidden", "grad_weight", "grad_bias"), grads, ref_grads, strict=False
    ):
        errors[name] = _rel(got, want) if torch.isfinite(got).all() else float("inf")
    return errors


def _blocks(torch, probs, labels, block_m, block_v):
    """(row slice, column start, holds a target, max probability) per block, valid rows only."""
    valid = labels != -100
    n, v = probs.shape
    for r in range(0, n, block_m):
        rows = slice(r, r + block_m)
        vrows = valid[rows]
        for c in range(0, v, block_v):
            block_p = probs[rows, c : c + block_v][vrows]
            hit = bool(((labels[rows] >= c) & (labels[rows] < c + block_v) & vrows).any())
            top = block_p.max().item() if block_p.numel() else 0.0
            yield rows, c, hit, top


def _block_dropping_reference(
    torch, hidden, weight, labels, block_m, block_v, z_loss=0.0, smoothing=0.0
):
    """An eps that drops some target-free blocks and keeps others, and float64 gradients with
    the filter's rule applied by hand (reduction='sum'). With the z-loss the rule compares each
    probability times ``|1 + 2c * lse|`` (its share of the logits gradient) with eps. Label
    smoothing's uniform term ``-smoothing / V`` is never dropped (the filter leaves it out of
    the blocks and adds it in closed form)."""
    logits64 = hidden.double() @ weight.double().t()
    probs = torch.softmax(logits64, -1)
    probs = probs * (1.0 + 2.0 * z_loss * torch.logsumexp(logits64, -1, keepdim=True)).abs()
    tops = sorted(top for _, _, hit, top in _blocks(torch, probs, labels, block_m, block_v)
                  if not hit)  # fmt: skip
    mid = len(tops) // 2
    assert len(tops) >= 2 and tops[mid - 1] < tops[mid], tops
    eps = (tops[mid - 1] + tops[mid]) / 2

    def run(ref_leaves, upstream):
        h, w = ref_leaves
        z = h @ w.t()
        lse = torch.logsumexp(z, -1)
        valid = labels != -100
        safe = labels.clamp(min=0)
        ce = lse - z.gather(1, safe[:, None]).squeeze(1)
        smooth = lse - z.mean(-1)
        row = (1.0 - smoothing) * ce + smoothing * smooth + z_loss * lse**2
        loss = (row * valid).sum()
        dz = torch.softmax(z, -1).detach() * (1.0 + 2.0 * z_loss * lse.detach())[:, None]
        dz[torch.arange(len(labels)), safe] -= 1.0 - smoothing
        scale = (valid.double() * upstream)[:, None]
        dz *= scale
        for rows, c, hit, top in _blocks(torch, probs, labels, block_m, block_v):
            if not hit and top < eps:
                dz[rows, c : c + block_v] = 0.0
        dz -= scale * (smoothing / z.shape[1])
        return loss, (dz @ w.detach(), dz.t() @ h.detach())

    return eps, run


def _cublas_cases(torch, lce, ref_fn, run):
    """The cuBLAS path with 16-row/column granules and an 8 KiB workspace: 2 row blocks x 3
    vocabulary chunks of 40 x 150 (fp32), partial last ones, so every kernel mask is crossed."""
    from memtrain.kernels.cross_entropy import blas

    blas.GRANULE = 16
    f32, bf16, f16 = torch.float32, torch.bfloat16, torch.float16
    ws = {"impl": "cublas", "workspace_bytes": 8192}

    def case(name, *args, **kwargs):
        run[name] = _compare(torch, lce, ref_fn, *args, **ws, **kwargs)

    case("cublas_fp32_none", *_inputs(torch, 40, 150, 16, f32, 21), reduction="none")
    h, w, y = _inputs(torch, 40, 150, 16, f32, 22)
    case(
        "cublas_fp32_softcap_smoothing_bias", h, w, y, bias=torch.randn(150), softcap=3.0,
        label_smoothing=0.1,
    )  # fmt: skip
    case("cublas_bf16_shifted_mean", *_inputs(torch, 40, 150, 16, bf16, 23))
    case("cublas_fp16_softcap_sum", *_inputs(torch, 40, 150, 16, f16, 24), softcap=4.0,
         reduction="sum")  # fmt: skip

    blas.FORWARD = "triton"
    case("cublas_after_triton_forward_bf16_smoothing", *_inputs(torch, 40, 150, 16, bf16, 26),
         label_smoothing=0.1)  # fmt: skip
    blas.FORWARD = "cublas"
    h, w, y = _inputs(torch, 40, 150, 16, f32, 27)
    case(
        "cublas_fp32_zloss_smoothing_softcap_bias", h, w, y, bias=torch.randn(150), softcap=3.0,
        label_smoothing=0.1, z_loss=0.05, reduction="none",
    )  # fmt: skip
    case("cublas_bf16_shifted_zloss_smoothing", *_inputs(torch, 40, 150, 16, bf16, 28),
         label_smoothing=0.1, z_loss=1e-2)  # fmt: skip

    h, w, y = _inputs(torch, 40, 150, 16, f32, 25)
    b = torch.randn(150)
    results = []
    for elementwise in ("triton", "torch"):
        blas.ELEMENTWISE = elementwise
        leaves = [t.clone().requires_grad_() for t in (h, w, b)]
        out = lce(*leaves[:2], y, bias=leaves[2], softcap=5.0, label_smoothing=0.05, **ws)
        out.backward()
        results.append([out.detach()] + [t.grad for t in leaves])
    blas.ELEMENTWISE = "auto"
    names = ("loss", "grad_hidden", "grad_weight", "grad_bias")
    run["cublas_kernels_match_torch_ops_fp32"] = {
        name: _rel(a, b) for name, a, b in zip(names, *results, strict=True)
    }


def _peaked(torch, n, v, d, dtype, seed, scale, ignore_frac=0.15, label_range=None):
    """hidden = scale * W[target] + noise with unit rows of W: each row's softmax is peaked on
    its target, with a log-sum-exp near ``scale`` (as a trained head's, at large D). Targets
    are drawn from ``[0, label_range)`` (default the vocabulary): a narrow range leaves most
    vocabulary blocks target-free on a small vocabulary."""
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(v, d, generator=g)
    weight /= weight.norm(dim=1, keepdim=True)
    labels = torch.randint(0, label_range or v, (n,), generator=g)
    hidden = scale * weight[labels] + 0.3 * torch.randn(n, d, generator=g)
    labels[torch.rand(n, generator=g) < ignore_frac] = -100
    labels[0] = 1
    return hidden.to(dtype), weight.to(dtype), labels


def _with_configs(triton_function, cfgs):
    """Make ``cfgs`` the launch settings the Triton path picks from (it takes the first on
    small problems); None restores the default."""
    if not hasattr(triton_function, "_default_candidates"):
        triton_function._default_candidates = triton_function.candidate_configs
    default = triton_function._default_candidates
    triton_function.candidate_configs = (
        default if cfgs is None else (lambda dtype, tma=False, variants=True: cfgs)
    )


def _preskip_compare(torch, lce, ref_fn, hidden, weight, labels, bias=None, upstream=None,
                     blocks=None, ref_override=None, **opts):  # fmt: skip
    """The filtered gradients with the forward's bound on and off.

    Returns the largest absolute differences between the two runs, the relative errors of the
    pre-skip run against float64, and both runs' block counts. ``blocks`` = (candidate
    (BLOCK_M, BLOCK_V) shapes of the forward, same of the backward) replaces the interpreter's
    one shape; the first is run, the others set the grid of the forward's cell maxima.
    """
    from memtrain.kernels.cross_entropy import triton_bwd, triton_function

    base = triton_function.candidate_configs(hidden.dtype)[0]
    cfgs = [
        None if shapes is None else [dict(base, BLOCK_M=m, BLOCK_V=v) for m, v in shapes]
        for shapes in (blocks or (None, None))
    ]
    leaves_in = [t for t in (hidden, weight, bias) if t is not None]
    runs = {}
    for preskip in (True, False):
        triton_bwd.PRESKIP = preskip
        triton_bwd.FILTER_STATS = {}
        leaves = [t.clone().requires_grad_() for t in leaves_in]
        b = leaves[2] if bias is not None else None
        _with_configs(triton_function, cfgs[0])
        out = lce(leaves[0], leaves[1], labels, bias=b, impl="triton", grad_filter=True, **opts)
        if upstream is None:
            upstream = torch.randn(
                out.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1234)
            )
        _with_configs(triton_function, cfgs[1])
        grads = torch.autograd.grad(out, leaves, upstream.to(out.dtype))
        _with_configs(triton_function, None)
        runs[preskip] = ([out.detach(), *grads], dict(triton_bwd.FILTER_STATS))
    triton_bwd.PRESKIP, triton_bwd.FILTER_STATS = True, None

    names = ("loss", "grad_hidden", "grad_weight", "grad_bias")
    diff = {
        name: (a.double() - b.double()).abs().max().item() if a.numel() else 0.0
        for name, a, b in zip(names, runs[True][0], runs[False][0], strict=False)
    }
    ref_leaves = [t.detach().double().requires_grad_() for t in leaves_in]
    if ref_override is not None:
        ref, ref_grads = ref_override(ref_leaves, upstream)
    else:
        rb = ref_leaves[2] if bias is not None else None
        ref_opts = {k: v for k, v in opts.items() if not k.startswith(("grad_filter", "work"))}
        ref = ref_fn(ref_leaves[0], ref_leaves[1], labels, bias=rb, **ref_opts)
        ref_grads = torch.autograd.grad(ref, ref_leaves, upstream)
    errors = {
        name: _rel(got, want)
        for name, got, want in zip(names, runs[True][0], [ref, *ref_grads], strict=False)
    }
    return {"diff": diff, "errors": errors, "stats_on": runs[True][1], "stats_off": runs[False][1]}


def preskip_main() -> int:
    """Peaked and random inputs on odd shapes (N, V not multiples of the blocks, ignored rows,
    several chunks), with forward and backward tiles of the same and of different shapes."""
    import torch

    from memtrain.kernels import linear_cross_entropy as lce
    from memtrain.kernels import reference_linear_cross_entropy as ref_fn
    from memtrain.kernels.cross_entropy.triton_function import candidate_configs

    torch.manual_seed(0)
    cfg = candidate_configs(torch.float32)[0]
    f32, bf16, f16 = torch.float32, torch.bfloat16, torch.float16
    many = {"workspace_bytes": 1}
    run = {}

    def case(name, *args, **kwargs):
        run[name] = _preskip_compare(torch, lce, ref_fn, *args, **kwargs)

    # Vocabularies of ~60 blocks: most blocks of 16 rows hold no target.
    h, w, y = _peaked(torch, 40, 1999, 32, f32, 31, scale=60.0)
    bias = torch.randn(1999) * 0.5
    case("fp32_peaked_softcap_bias", h, w, y, bias=bias, softcap=100.0, **many)
    h, w, y = _peaked(torch, 75, 990, 32, f32, 32, scale=60.0)
    y[16:32] = -100  # a whole block of ignored rows
    upstream = torch.randn(75, dtype=torch.float64)
    upstream[40:60] = 0.0  # valid targets, no gradient: these rows do not count either
    case("fp32_peaked_rows_without_gradient", h, w, y, upstream=upstream, reduction="none")
    # Flat softmaxes, an eps that makes the kernel's own check skip some target-free blocks
    # (after recomputing them: the bound is too loose here), against the rule applied by hand.
    h, w, y = _inputs(torch, 45, 600, 24, f32, 33)
    eps, dropping = _block_dropping_reference(torch, h, w, y, cfg["BLOCK_M"], cfg["BLOCK_V"])
    case(
        "fp32_random_mid_eps", h, w, y, grad_filter_eps=eps, reduction="sum",
        ref_override=dropping, **many,
    )  # fmt: skip
    h, w, y = _peaked(torch, 40, 2011, 32, f32, 34, scale=60.0)
    case("fp32_peaked_fwd_wide_bwd_tall", h, w, y, blocks=([(16, 64)], [(32, 16)]), **many)
    h, w, y = _peaked(torch, 40, 2000, 32, bf16, 35, scale=40.0)
    case(
        "bf16_peaked_fwd_tall_bwd_wide_bias", h, w, y, bias=torch.randn(2000).to(bf16),
        softcap=50.0, blocks=([(32, 16)], [(16, 64)]), **many,
    )  # fmt: skip
    h, w, y = _peaked(torch, 67, 1993, 32, bf16, 36, scale=40.0)
    # Forward tiles of 32 x 64 hold 2 x 2 cells of 16 x 32 (the other candidate's shape).
    blocks = ([(32, 64), (16, 32)], [(16, 64), (32, 32)])
    case("bf16_peaked_softcap_cells", h, w, y, softcap=50.0, blocks=blocks, **many)
    h, w, y = _peaked(torch, 40, 2000, 32, f16, 37, scale=40.0)
    case("fp16_peaked_sum", h, w, y, reduction="sum")
    h, w, y = _peaked(torch, 40, 1999, 32, f32, 38, scale=60.0)
    case(
        "fp32_peaked_zloss_softcap_bias", h, w, y, bias=torch.randn(1999) * 0.5, softcap=100.0,
        z_loss=1e-2, **many,
    )  # fmt: skip
    out = {}
    for name, (tol, share) in PRESKIP_CASES.items():
        out[name] = dict(run[name], tol=tol, min_share=share)
    json.dump(out, sys.stdout)
    return 0


def smoothing_main() -> int:
    """The filtered backward with label smoothing against float64 (torch's own smoothed
    cross-entropy, or the filter's rule applied by hand), with the forward's bound on and off:
    bias, ignored rows (also under another ``ignore_index``), z-loss, all three reductions and
    the three dtypes, several row blocks and vocabulary chunks."""
    import torch

    from memtrain.kernels import linear_cross_entropy as lce
    from memtrain.kernels import reference_linear_cross_entropy as ref_fn
    from memtrain.kernels.cross_entropy.triton_function import candidate_configs

    torch.manual_seed(0)
    cfg = candidate_configs(torch.float32)[0]
    f32, bf16, f16 = torch.float32, torch.bfloat16, torch.float16
    many = {"workspace_bytes": 1}
    run = {}

    def case(name, *args, **kwargs):
        run[name] = _preskip_compare(torch, lce, ref_fn, *args, **kwargs)

    def peaked(dtype, seed, scale=60.0):  # 3 row blocks x 19 vocabulary blocks, targets in 2
        return _peaked(torch, 40, 600, 16, dtype, seed, scale=scale, label_range=64)

    case("fp32_peaked_ls01_mean", *peaked(f32, 51), label_smoothing=0.1, **many)
    case(
        "fp32_peaked_ls03_bias_sum", *peaked(f32, 52), bias=torch.randn(600) * 0.5,
        label_smoothing=0.3, reduction="sum",
    )  # fmt: skip
    h, w, y = peaked(f32, 53)
    upstream = torch.randn(40, dtype=torch.float64)
    upstream[20:30] = 0.0  # valid targets without gradient
    case(
        "fp32_peaked_ls01_zloss_bias_none", h, w, y, bias=torch.randn(600) * 0.5,
        label_smoothing=0.1, z_loss=1e-2, reduction="none", upstream=upstream, **many,
    )  # fmt: skip
    h, w, y = peaked(f32, 54)
    y[y == -100] = 600 + 7  # another ignore_index, outside the vocabulary
    case(
        "fp32_peaked_ls03_zloss_ignore_index_mean", h, w, y, ignore_index=607,
        label_smoothing=0.3, z_loss=1e-2,
    )  # fmt: skip
    # Flat softmaxes, an eps that makes the filter drop target-free blocks whose probabilities
    # are not negligible: the smoothing term must still reach every logit.
    h, w, y = _inputs(torch, 45, 300, 16, f32, 55)
    eps, dropping = _block_dropping_reference(
        torch, h, w, y, cfg["BLOCK_M"], cfg["BLOCK_V"], z_loss=0.2, smoothing=0.3
    )
    case(
        "fp32_random_mid_eps_ls03_zloss_sum", h, w, y, grad_filter_eps=eps, reduction="sum",
        label_smoothing=0.3, z_loss=0.2, ref_override=dropping, **many,
    )  # fmt: skip
    h, w, y = _inputs(torch, 35, 100, 16, f32, 56)
    case(
        "fp32_tiny_eps_ls01_bias_zloss", h, w, y, bias=torch.randn(100), grad_filter_eps=1e-30,
        label_smoothing=0.1, z_loss=0.05, **many,
    )  # fmt: skip
    h, w, y = peaked(bf16, 57, scale=40.0)
    case(
        "bf16_peaked_ls01_bias_mean", h, w, y, bias=torch.randn(600).to(bf16),
        label_smoothing=0.1, **many,
    )  # fmt: skip
    h, w, y = peaked(f16, 58, scale=40.0)
    case(
        "fp16_peaked_ls03_zloss_bias_sum", h, w, y, bias=torch.randn(600).to(f16),
        label_smoothing=0.3, z_loss=1e-2, reduction="sum",
    )  # fmt: skip
    out = {}
    for name, (tol, share) in SMOOTHING_CASES.items():
        out[name] = dict(run[name], tol=tol, min_share=share)
    json.dump(out, sys.stdout)
    return 0


def offsets_main() -> int:
    """Row-strided offsets past 2^31 from a tiny launch: rows from 70,000 at a stride of
    40,000 (both int32 arguments) reach 2.8e9. Prints the largest error of the kernels' helper
    and of plain int32 arithmetic against exact integers."""
    import torch

    from tests.kernels.offset_probe import offsets_probe_kernel

    block, row_start, stride = 16, 70_000, 40_000
    rows = torch.arange(row_start, row_start + block, dtype=torch.int64)
    want = rows[:, None] * stride + torch.arange(block)[None, :]
    out = {}
    for wide in (True, False):
        got = torch.zeros((block, block), dtype=torch.int64)
        offsets_probe_kernel[(1,)](got, row_start, stride, WIDE=wide, BLOCK=block)
        out["wide" if wide else "int32"] = int((got - want).abs().max())
    out["largest"] = int(want.max())
    json.dump(out, sys.stdout)
    return 0


def main() -> int:
    os.environ["TRITON_INTERPRET"] = "1"
    import torch

    from memtrain.kernels import linear_cross_entropy as lce
    from memtrain.kernels import reference_linear_cross_entropy as ref_fn
    from memtrain.kernels.cross_entropy.triton_function import candidate_configs

    torch.manual_seed(0)
    cfg = candidate_configs(torch.float32)[0]
    f32, bf16, f16 = torch.float32, torch.bfloat16, torch.float16
    run = {}

    def case(name, *args, **kwargs):
        run[name] = _compare(torch, lce, ref_fn, *args, **kwargs)

    case("fp32_odd_small", *_inputs(torch, 37, 101, 24, f32, 1))
    case("fp32_odd_reductions_sum", *_inputs(torch, 45, 77, 20, f32, 2), reduction="sum")
    case("fp32_odd_reductions_none", *_inputs(torch, 45, 77, 20, f32, 3), reduction="none")
    case("fp32_d_below_block", *_inputs(torch, 5, 33, 3, f32, 4))
    case("fp32_softcap", *_inputs(torch, 40, 90, 24, f32, 5), softcap=1.5)
    h, w, y = _inputs(torch, 40, 90, 24, f32, 6)
    bias = torch.randn(90)
    case("fp32_smoothing_bias", h, w, y, bias=bias, label_smoothing=0.2, softcap=30.0)
    case("fp32_shift_3d", *_inputs(torch, 0, 50, 16, f32, 7, lead=(3, 13)), shift=True)
    h, w, y = _inputs(torch, 30, 64, 16, f32, 8, ignore_frac=0.7)
    y[:16] = -100  # a whole block of ignored rows
    case("fp32_ignored_rows_sum", h, w, y, reduction="sum")
    many = {"workspace_bytes": 1}  # smallest chunks: several row blocks and vocabulary chunks
    case("fp32_many_chunks", *_inputs(torch, 70, 150, 24, f32, 9), **many)
    case("bf16_many_chunks_softcap", *_inputs(torch, 70, 150, 40, bf16, 10), softcap=5.0, **many)
    case("fp16_large_vocab_scaled", *_inputs(torch, 64, 3000, 32, f16, 11))
    h, w, y = _inputs(torch, 50, 120, 24, f32, 12)
    case("fp32_filter_tiny_eps_is_exact", h, w, y, grad_filter=True, grad_filter_eps=1e-30)
    h, w, y = _inputs(torch, 70, 600, 24, f32, 13)
    eps, dropping = _block_dropping_reference(torch, h, w, y, cfg["BLOCK_M"], cfg["BLOCK_V"])
    case(
        "fp32_filter_matches_block_dropping", h, w, y, reduction="sum", grad_filter=True,
        grad_filter_eps=eps, ref_override=dropping, **many,
    )  # fmt: skip
    case("fp32_zloss_many_chunks", *_inputs(torch, 70, 150, 24, f32, 40), z_loss=0.05, **many)
    h, w, y = _inputs(torch, 45, 77, 20, f32, 41)
    case(
        "fp32_zloss_smoothing_softcap_bias_none", h, w, y, bias=torch.randn(77), softcap=4.0,
        label_smoothing=0.15, z_loss=0.1, reduction="none",
    )  # fmt: skip
    h, w, y = _inputs(torch, 70, 150, 40, bf16, 42)
    case(
        "bf16_zloss_smoothing_softcap", h, w, y, softcap=5.0, label_smoothing=0.1, z_loss=1e-2,
        **many,
    )  # fmt: skip
    h, w, y = _inputs(torch, 50, 120, 24, f32, 43)
    case(
        "fp32_filter_zloss_tiny_eps_is_exact", h, w, y, bias=torch.randn(120), softcap=6.0,
        z_loss=0.05, grad_filter=True, grad_filter_eps=1e-30, **many,
    )  # fmt: skip
    h, w, y = _inputs(torch, 70, 600, 24, f32, 44)
    eps, dropping = _block_dropping_reference(
        torch, h, w, y, cfg["BLOCK_M"], cfg["BLOCK_V"], z_loss=0.2
    )
    case(
        "fp32_filter_zloss_matches_block_dropping", h, w, y, reduction="sum", grad_filter=True,
        grad_filter_eps=eps, z_loss=0.2, ref_override=dropping, **many,
    )  # fmt: skip

    h, w, y = _inputs(torch, 50, 120, 24, f32, 16)
    case(
        "fp32_filter_bias_tiny_eps_is_exact", h, w, y, bias=torch.randn(120), grad_filter=True,
        grad_filter_eps=1e-30, **many,
    )  # fmt: skip

    from memtrain.kernels.cross_entropy import triton_function, triton_schedule

    def set_case(name, *args, plan=None, tma=None, **kwargs):
        """A case under a forced chunk plan and/or the descriptor kernels (``tma``: their
        backward variant flags, {} for the plain one)."""
        with _set(triton_schedule, "CHUNK_PLAN", plan):
            with _set(triton_function, "INTERPRET_TMA", False if tma is None else tma):
                case(name, *args, **kwargs)

    h, w, y = _inputs(torch, 40, 3000, 32, bf16, 17)
    set_case("vocab_order_bf16_tail", h, w, y, plan=(16, 64))
    h, w, y = _inputs(torch, 37, 2000, 24, f16, 18)
    set_case(
        "vocab_order_fp16_softcap_bias", h, w, y, plan=(32, 96), bias=torch.randn(2000).to(f16),
        softcap=20.0, reduction="sum",
    )  # fmt: skip
    h, w, y = _inputs(torch, 33, 900, 24, f32, 19)
    set_case("vocab_order_fp32_smoothing", h, w, y, plan=(16, 32), label_smoothing=0.1)
    h, w, y = _inputs(torch, 37, 2000, 24, f16, 45)
    set_case(
        "vocab_order_fp16_zloss_smoothing_softcap", h, w, y, plan=(32, 96), softcap=20.0,
        label_smoothing=0.1, z_loss=1e-2,
    )  # fmt: skip

    h, w, y = _inputs(torch, 40, 3000, 32, bf16, 20)
    set_case("tma_bf16_vocab_order", h, w, y, plan=(16, 64), tma={})
    h, w, y = _inputs(torch, 37, 1001, 24, f16, 21)
    set_case(
        "tma_fp16_softcap_bias_smoothing", h, w, y, tma={}, bias=torch.randn(1001).to(f16),
        softcap=20.0, label_smoothing=0.1,
    )  # fmt: skip
    h, w, y = _inputs(torch, 70, 150, 40, bf16, 22)
    set_case("tma_bf16_many_chunks_sum", h, w, y, tma={}, reduction="sum", **many)
    # Persistent programs (3 of them, several tiles each), the dZ tile through a descriptor.
    h, w, y = _inputs(torch, 45, 500, 32, bf16, 23)
    variant = {"persistent": True, "tma_store": True, "programs": 3}
    set_case("tma_bf16_persistent_descriptor_store", h, w, y, tma=variant, **many)
    h, w, y = _inputs(torch, 40, 3000, 32, f16, 24)
    variant = {"persistent": True, "flatten": True, "programs": 5}
    set_case(
        "tma_fp16_persistent_flattened_vocab_order", h, w, y, plan=(32, 96), tma=variant,
        softcap=30.0,
    )  # fmt: skip
    # One loop over (tile, hidden step): 4 programs, uneven tile counts, a partial last tile.
    h, w, y = _inputs(torch, 45, 700, 40, bf16, 25)
    variant = {"flat": True, "programs": 4}
    set_case(
        "tma_bf16_flat_loop_softcap_bias", h, w, y, plan=(32, 96), tma=variant,
        bias=torch.randn(700).to(bf16), softcap=25.0,
    )  # fmt: skip

    h, w, y = _inputs(torch, 37, 1001, 24, bf16, 46)
    variant = {"flat": True, "programs": 4}
    set_case(
        "tma_bf16_zloss_smoothing_softcap_bias", h, w, y, plan=(32, 96), tma=variant,
        bias=torch.randn(1001).to(bf16), softcap=25.0, label_smoothing=0.1, z_loss=1e-2,
    )  # fmt: skip

    # The interpreted Triton path and the chunked torch path agree with each other.
    h, w, y = _inputs(torch, 33, 200, 32, bf16, 15)
    hs = [h.clone().requires_grad_() for _ in range(2)]
    outs = [lce(hs[0], w, y, impl="triton"), lce(hs[1], w, y, impl="torch")]
    for out in outs:
        out.backward()
    run["matches_torch_path_bf16"] = {
        "loss": _rel(outs[0].detach(), outs[1].detach()),
        "grad_hidden": _rel(hs[0].grad, hs[1].grad),
    }
    _cublas_cases(torch, lce, ref_fn, run)
    json.dump({name: {"errors": run[name], "tol": tol} for name, tol in CASES.items()}, sys.stdout)
    return 0


def uninitialised_main() -> int:
    """The Triton and torch paths with every fresh float buffer (``empty``, ``empty_like``,
    ``new_empty``) filled with NaN: a kernel that reads memory it never wrote shows it at once,
    where recycled device memory would show it only sometimes."""
    import torch

    from memtrain.kernels import linear_cross_entropy as lce

    def poisoned(make):
        def wrapper(*args, **kwargs):
            out = make(*args, **kwargs)
            if out.is_floating_point():
                out.fill_(float("nan"))
            return out

        return wrapper

    torch.empty, torch.empty_like = poisoned(torch.empty), poisoned(torch.empty_like)
    torch.Tensor.new_empty = poisoned(torch.Tensor.new_empty)
    results = {}
    for name, dtype, (n, v, d) in (
        ("bf16_padded_vocab", torch.bfloat16, (33, 200, 32)),
        ("fp32_padded_vocab", torch.float32, (29, 203, 24)),
    ):
        h, w, y = _inputs(torch, n, v, d, dtype, 15)
        hs = [h.clone().requires_grad_() for _ in range(2)]
        outs = [lce(hs[0], w, y, impl="triton"), lce(hs[1], w, y, impl="torch")]
        for out in outs:
            out.backward()
        results[name] = {
            "finite": bool(torch.isfinite(hs[0].grad).all() and torch.isfinite(outs[0]).all()),
            "grad_hidden": _rel(hs[0].grad, hs[1].grad),
        }
    json.dump(results, sys.stdout)
    return 0


if __name__ == "__main__":
    os.environ["TRITON_INTERPRET"] = "1"
    modes = {
        "preskip": preskip_main,
        "smoothing": smoothing_main,
        "offsets": offsets_main,
        "uninitialised": uninitialised_main,
    }
    sys.exit(modes[sys.argv[1]]() if sys.argv[1:] else main())
