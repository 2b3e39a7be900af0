"""Pure moves of bytes (keep, swap to each tier, whole-layer recompute, mixed): losses and
gradients over several steps are bit-for-bit those of the unmodified model."""

from __future__ import annotations

import pytest

from memtrain.errors import MemtrainError
from memtrain.offload import LayerPolicy, OffloadPolicy, apply
from memtrain.offload.numa import numa_nodes
from tests.offload.conftest import assert_identical, batch, make_model, train

POOL = {"cpu": 8 << 20, "cxl": 8 << 20}
LAYERS = ("embed", "block.0", "block.1", "norm", "lm_head")


def _policy(per_layer: dict[str, LayerPolicy], tmp_path, **kw) -> OffloadPolicy:
    return OffloadPolicy(per_layer, nvme_path=str(tmp_path), **kw)


def _cxl_node() -> int:
    """Node 0 stands in for a CXL node where mbind works (it does on any Linux NUMA sysfs)."""
    if 0 not in numa_nodes():
        pytest.skip("no NUMA sysfs on this machine")
    return 0


MODES = {
    "keep": lambda: LayerPolicy(),
    "swap_cpu_all": lambda: LayerPolicy(keep=0.0, swap={"cpu": 1.0}),
    "swap_nvme_all": lambda: LayerPolicy(keep=0.0, swap={"nvme": 1.0}),
    "swap_cxl_all": lambda: LayerPolicy(keep=0.0, swap={"cxl": 1.0}),
    "swap_split": lambda: LayerPolicy(keep=0.3, swap={"cpu": 0.3, "cxl": 0.2, "nvme": 0.2}),
    "full_recompute_gpu_input": lambda: LayerPolicy(keep=0.0, full_recompute=True),
    "full_recompute_input_on_host": lambda: LayerPolicy(
        keep=0.0, full_recompute=True, input_checkpoint={"cpu": 0.5, "nvme": 0.5}
    ),
}


@pytest.mark.parametrize("mode", sorted(MODES))
def test_every_layer_one_mode_is_exact(mode, llama_reference, tmp_path):
    policy = MODES[mode]()
    cxl = _cxl_node() if "cxl" in policy.tiers() else None
    model = make_model("llama")
    handle = apply(
        model,
        _policy({name: MODES[mode]() for name in LAYERS}, tmp_path, cxl_node=cxl),
        host_pool_bytes=POOL,
    )
    with handle:
        trace = train(model, batch("llama"))
        stats = handle.stats()
    assert_identical(llama_reference, trace)
    moved = sum(v for k, v in stats["totals"].items() if k != "gpu")
    if policy.tiers():
        assert moved > 0
        for tier in policy.tiers():
            assert stats["totals"][tier] > 0, tier
    else:
        assert moved == 0


def test_mixed_per_layer_is_exact(llama_reference, tmp_path):
    model = make_model("llama")
    policy = _policy(
        {
            "embed": LayerPolicy(keep=0.5, swap={"cpu": 0.5}),
            "block.0": LayerPolicy(keep=0.0, full_recompute=True, input_checkpoint={"cpu": 1.0}),
            "block.1": LayerPolicy(keep=0.25, swap={"nvme": 0.75}),
            "norm": LayerPolicy(keep=0.0, swap={"cpu": 1.0}),
            "lm_head": LayerPolicy(keep=0.0, swap={"nvme": 1.0}),
        },
        tmp_path,
    )
    with apply(model, policy, host_pool_bytes=POOL) as handle:
        trace = train(model, batch("llama"))
        per_layer = handle.stats()["layers"]
    assert_identical(llama_reference, trace)
    assert per_layer["block.1"]["nvme"] == pytest.approx(3 * per_layer["block.1"]["gpu"], rel=0.1)
    assert per_layer["norm"]["gpu"] == 0 and per_layer["norm"]["cpu"] > 0


def test_gpt2_swap_and_whole_layer_recompute_are_exact(tmp_path):
    reference = train(make_model("gpt2"), batch("gpt2"))
    model = make_model("gpt2")
    policy = _policy(
        {
            "block.0": LayerPolicy(keep=0.0, swap={"cpu": 0.6, "nvme": 0.4}),
            "block.1": LayerPolicy(keep=0.0, full_recompute=True, input_checkpoint={"cpu": 1}),
        },
        tmp_path,
    )
    with apply(model, policy, host_pool_bytes=POOL):
        assert_identical(reference, train(model, batch("gpt2")))


def test_pool_and_nvme_files_do_not_grow(tmp_path):
    model = make_model("llama")
    policy = _policy(
        {f"block.{i}": LayerPolicy(keep=0.2, swap={"cpu": 0.5, "nvme": 0.3}) for i in (0, 1)},
        tmp_path,
    )
    handle = apply(model, policy, host_pool_bytes={"cpu": 1 << 20})
    pool = handle.engine.pools["cpu"]
    store = handle.engine.nvme
    seen = []

    def after_step():
        seen.append(
            (pool.in_use, pool.high_water, pool.free_blocks, len(store.files()), pool.capacity)
        )

    train(model, batch("llama"), steps=4, after_step=after_step)
    assert all(s == seen[0] for s in seen), seen
    in_use, high_water, free_blocks, files, capacity = seen[0]
    assert in_use == 0 and free_blocks == 1 and files == 0
    assert 0 < high_water <= capacity == 1 << 20
    assert store.bytes_written > 0
    directory = store.directory
    assert directory.exists()
    handle.remove()
    assert not directory.exists()


def test_pool_is_bounded(tmp_path):
    model = make_model("llama")
    policy = _policy({"block.0": LayerPolicy(keep=0.0, swap={"cpu": 1.0})}, tmp_path)
    with apply(model, policy, host_pool_bytes={"cpu": 4096}):
        with pytest.raises(MemtrainError, match="swap pool is full"):
            model(input_ids=batch("llama"), labels=batch("llama")).loss.backward()


def test_pinned_pool_rounds_to_pages_not_powers_of_two():
    from memtrain.offload.pool import PAGE, HostPool

    size = 5 * PAGE + 1  # a power-of-two allocator would give 8 pages
    pool = HostPool(size, pin=False)
    try:
        assert pool.capacity == 6 * PAGE
        blocks = [pool.allocate(1000) for _ in range(3)]
        pool.release(blocks[1])
        pool.release(blocks[0])
        pool.release(blocks[2])
        assert pool.free_blocks == 1 and pool.in_use == 0
    finally:
        pool.close()
