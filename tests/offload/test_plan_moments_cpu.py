"""The planner's GPU bytes at every moment against what the executor really holds, on the CPU.

``benchmarks/diag_offload_memory_cpu.py`` runs a small bf16 Llama under decisions of the kinds
the planner makes at long context and counts every live storage at each layer's forward and
backward. A block moment the plan underestimates is how a plan runs out of memory on the GPU
(a partially swapped block's backward once held a third of its bytes more than priced), so
every block moment must be covered by the prediction to within 5%, and the backward moments
must not be overestimated by more than 30% either (a useless plan wastes memory).
"""

from __future__ import annotations

import pytest

from tests.benchmark_scripts import load_benchmark

UNDER = 0.05  # a measured block moment may exceed its prediction by at most this share
OVER = 0.30  # a backward block moment may fall short of its prediction by at most this share


@pytest.fixture(scope="module")
def harness():
    return load_benchmark("diag_offload_memory_cpu")


@pytest.mark.parametrize("pattern", ["long-context", "whole-block", "swap-half"])
def test_block_moments_are_covered_by_the_plan(harness, pattern):
    result = harness.compare(pattern, seq=1024, chunks=4)
    blocks = [m for m in result["moments"] if " block." in m["moment"]]
    assert len(blocks) == 8  # forward and backward of 4 blocks, each measured
    for moment in blocks:
        measured, predicted = moment["measured"], moment["predicted"]
        assert measured is not None, moment["moment"]
        assert measured <= predicted * (1 + UNDER), moment
        if moment["moment"].startswith("backward"):
            assert measured >= predicted * (1 - OVER), moment
