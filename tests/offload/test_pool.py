"""The host pool's allocator: blocks never overlap, stay inside the pool, and freeing all of them
leaves one free block of the whole capacity (no leak, no fragmentation left behind)."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from memtrain.errors import MemtrainError
from memtrain.offload.pool import ALIGNMENT, PAGE, HostPool


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.integers(min_value=1, max_value=8 * PAGE), min_size=1, max_size=40),
    st.randoms(use_true_random=False),
)
def test_blocks_never_overlap_and_all_frees_coalesce(sizes, rnd: random.Random):
    pool = HostPool(64 * PAGE, pin=False)
    try:
        _exercise(pool, sizes, rnd)
    finally:
        pool.close()


def _exercise(pool: HostPool, sizes: list[int], rnd: random.Random) -> None:
    live = []
    for size in sizes:
        try:
            block = pool.allocate(size)
        except MemtrainError:
            assert pool.capacity - pool.in_use < size + ALIGNMENT or pool.free_blocks > 1
            continue
        assert block.offset % ALIGNMENT == 0 and block.size >= size
        assert block.offset + block.size <= pool.capacity
        live.append(block)
        if live and rnd.random() < 0.4:
            pool.release(live.pop(rnd.randrange(len(live))))
        spans = sorted((b.offset, b.offset + b.size) for b in live)
        assert all(
            a_end <= b_start for (_, a_end), (b_start, _) in zip(spans, spans[1:], strict=False)
        )
        assert pool.in_use == sum(b.size for b in live)
    for block in live:
        pool.release(block)
    assert pool.in_use == 0 and pool.free_blocks == 1


def test_full_pool_says_what_to_do():
    pool = HostPool(PAGE, pin=False)
    try:
        pool.allocate(PAGE)
        with pytest.raises(MemtrainError, match="pool is full.*host_pool_bytes"):
            pool.allocate(1)
    finally:
        pool.close()
