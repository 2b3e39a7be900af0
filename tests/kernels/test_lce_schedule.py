"""The exact backward's chunk schedules (``triton_schedule``), driven by a plain torch "kernel".

The logits gradient is a fixed random matrix G, written chunk by chunk into the workspace the
schedule hands out; the schedules must return G @ W, G.T @ H and G's column sums however they
order the chunks, wherever they keep the accumulator (the vocabulary order keeps it in the
gradients' own storage). Errors are relative to a
float64 product of the same rounded G.
"""

from __future__ import annotations

import pytest
import torch

from memtrain.kernels.cross_entropy import triton_schedule as ts
from memtrain.kernels.cross_entropy.triton_bwd import accumulate_mm


def _problem(n, v, d, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, d, generator=g).to(dtype)
    weight = torch.randn(v, d, generator=g).to(dtype)
    logits_grad = (torch.randn(n, v, generator=g) / v).to(dtype)
    return hidden, weight, logits_grad


def _run(plan, hidden, weight, logits_grad, needs=(True, True, True), inv_scale=None):
    calls = []

    def launch(rows, cols, dz):
        (r0, r1), (c0, c1) = rows, cols
        assert dz.shape[0] >= r1 - r0 and dz.shape[1] >= c1 - c0, (dz.shape, rows, cols)
        dz.fill_(float("nan"))  # whatever the schedule reads outside the chunk shows up
        dz[: r1 - r0, : c1 - c0] = logits_grad[r0:r1, c0:c1]
        calls.append((rows, cols))

    need_h, need_w, need_b = needs
    grads = (
        torch.full_like(hidden, float("nan")) if need_h else None,
        torch.full_like(weight, float("nan")) if need_w else None,
        torch.zeros(weight.shape[0], dtype=torch.float32) if need_b else None,
    )
    ts.run_exact(plan, hidden, weight, launch, accumulate_mm, grads, inv_scale)
    return grads, calls


def _rel(a, b):
    return ((a.double() - b).norm() / b.norm()).item()


def _expected(hidden, weight, logits_grad):
    g = logits_grad.double()
    return g @ weight.double(), g.t() @ hidden.double(), g.sum(0)


# Rounding of each output once (bf16: 2^-9 relative per element) plus the dW additions across
# row tiles (one rounding each): well under 1e-2; float32 in place: float32 sums only.
TOL = {torch.bfloat16: 1e-2, torch.float16: 2e-3, torch.float32: 1e-5}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize(
    "shape,rows,cols",
    [
        ((40, 3000, 24), 16, 64),  # accumulator: 16 rows in dH's storage, 24 in dW's tail
        ((37, 2000, 20), 8, 96),  # uneven last tile and chunk
        ((9, 700, 8), 16, 32),  # one tile larger than N: all rows in the tail
    ],
)
def test_vocab_order_matches_products(dtype, shape, rows, cols):
    hidden, weight, logits_grad = _problem(*shape, dtype)
    plan = ts.ChunkPlan("vocab", rows, cols)
    assert ts.vocab_order_fits(shape[0], shape[1], rows, cols, (True, True), dtype.itemsize >= 4)
    (dh, dw, db), calls = _run(plan, hidden, weight, logits_grad)
    want_h, want_w, want_b = _expected(hidden, weight, logits_grad)
    tol = TOL[dtype]
    assert _rel(dh, want_h) < tol and _rel(dw, want_w) < tol and _rel(db, want_b) < 1e-5
    n_first, start = ts.tail_start(shape[0], shape[1], rows, cols)
    tiles = -(-shape[0] // rows)
    main_chunks = -(-shape[1] // cols)
    tail_chunks = -(-(shape[1] - start) // cols) if dtype != torch.float32 else 0
    # Every chunk once, then the tail's chunks again for dW.
    assert len(calls) == tiles * (main_chunks + tail_chunks)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_row_order_matches_products(dtype):
    hidden, weight, logits_grad = _problem(45, 300, 24, dtype, seed=1)
    (dh, dw, db), calls = _run(ts.ChunkPlan("rows", 16, 64), hidden, weight, logits_grad)
    want_h, want_w, want_b = _expected(hidden, weight, logits_grad)
    assert _rel(dh, want_h) < TOL[dtype] and _rel(dw, want_w) < TOL[dtype]
    assert _rel(db, want_b) < 1e-5
    assert len(calls) == 3 * 5


@pytest.mark.parametrize("needs", [(True, False, False), (False, True, True)])
@pytest.mark.parametrize("order", ["rows", "vocab"])
def test_one_gradient_only(needs, order):
    hidden, weight, logits_grad = _problem(40, 3000, 24, torch.bfloat16, seed=2)
    fits = ts.vocab_order_fits(40, 3000, 16, 64, needs[:2], False)
    assert fits == (needs[1] or not needs[0])
    if order == "vocab" and not fits:
        pytest.skip("the vocabulary order needs the weight gradient's storage for dH")
    (dh, dw, db), _ = _run(ts.ChunkPlan(order, 16, 64), hidden, weight, logits_grad, needs)
    want_h, want_w, want_b = _expected(hidden, weight, logits_grad)
    if needs[0]:
        assert _rel(dh, want_h) < 1e-2 and dw is None
    else:
        assert _rel(dw, want_w) < 1e-2 and _rel(db, want_b) < 1e-5 and dh is None


def test_fp16_scale_is_undone_once():
    hidden, weight, logits_grad = _problem(40, 3000, 24, torch.float16, seed=3)
    scale = 2.0**6
    (dh, dw, db), _ = _run(
        ts.ChunkPlan("vocab", 16, 64), hidden, weight, (logits_grad.float() * scale).half(),
        inv_scale=torch.tensor(1.0 / scale),
    )  # fmt: skip
    want_h, _, _ = _expected(hidden, weight, logits_grad)
    assert _rel(dh, want_h) < 2e-3  # the weight gradient's scale is undone by the caller


def test_frozen_weight_falls_back_to_row_order():
    # Without a weight gradient there is no storage for the accumulator's second half.
    assert not ts.vocab_order_fits(8192, 256000, 2048, 2048, (True, False), False)
    plan = ts.plan_exact(8192, 256000, 2304, 2, 16 << 20, 256, (True, False))
    assert plan.order == "rows"


@pytest.mark.parametrize("budget_mib", [4, 16, 64, 256])
@pytest.mark.parametrize(
    "n,v,d", [(8192, 256000, 2304), (32768, 256000, 2304), (8192, 128256, 2048)]
)
def test_plan_stays_within_the_workspace(budget_mib, n, v, d):
    budget = budget_mib << 20
    plan = ts.plan_exact(n, v, d, 2, budget, 256, (True, True))
    assert plan.workspace_bytes(d, 2, in_place=False) <= budget
    # Small workspaces: the vocabulary order (its accumulator costs no workspace); large ones:
    # row blocks at least as long as its tiles, and no tail to recompute.
    row_order_rows = ts._fit(n, budget // 2 // (4 * d), 256)
    if row_order_rows < ts.VOCAB_ORDER_ROWS:
        assert plan.order == "vocab"
        n_first, start = ts.tail_start(n, v, plan.rows, plan.cols)
        assert (v - start) <= ts.MAX_TAIL_SHARE * v and n_first <= n // 2
    else:
        assert plan.order == "rows" and plan.rows == row_order_rows


def test_small_vocabulary_uses_row_order():
    # 2N float32 rows of dH would take most of a small vocabulary's dW storage.
    plan = ts.plan_exact(32768, 32000, 4096, 2, 16 << 20, 256, (True, True))
    assert plan.order == "rows"
    assert plan.workspace_bytes(4096, 2, in_place=False) <= 16 << 20
