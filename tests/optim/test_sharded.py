"""Every memtrain optimizer on FSDP2's row shards (2 gloo ranks on the CPU; 1 and 4 ranks for
one optimizer of each way states are kept: one rank still steps DTensors, 8-bit rows included).

Each rank of a fully sharded tiny Llama (a 311-row tied embedding: uneven shards over 2 and 4
ranks) takes three steps on the same batches as one process. The weights must equal the
one-process run's within 1e-5 (a step moves them by about the learning rate, 1e-2): the ranks
sum low-rank products in another order, which Natural GaLore's damped inverse amplifies to a
few 1e-6; gathered whole matrices match exactly; 8-bit moments, quantised in blocks
along each rank's rows instead of across rows, differ from the one-process 8-bit run by the
order of quantisation itself (less than twice the 8-bit run's distance from 32-bit moments). Steps 1-2 are saved with torch.distributed.checkpoint and reloaded into a
fresh model and optimizer: step 3 from there equals the uninterrupted one bit for bit. Each
rank's optimizer states are measured: row shards add up to one process's states, and only
projections, low-rank moments of left projections and counters are held whole by every rank.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import pytest
import torch

from memtrain.optim.memory import measured_state_bytes, parse_optimizer_spec
from memtrain.optim.sharded import ROW_STEPS, WHOLE_MATRIX_STEPS, sharded_step_kind
from memtrain.optim.sharded_memory import model_rank_state_bytes

SPECS = [
    "adamw",
    "sgd:momentum=0.9",
    "adamw8bit",
    "galore:rank=8,update_proj_gap=2",
    "galore:rank=8,update_proj_gap=2,proj_method=svd,bits=8",
    "galore-adafactor:rank=8,update_proj_gap=2",
    "natural-galore:rank=8,update_proj_gap=2",
    "apollo:rank=4,update_proj_gap=2",
    "apollo-mini",
    "cosmos",
    "frugal:density=0.25,update_proj_gap=2",
    "adafactor",
]
# Four ranks: one of each way states are kept (row shards, 8-bit row blocks, replicated
# low-rank moments and history, whole-matrix steps).
FOUR_RANKS = [
    "adamw8bit",
    "galore:rank=8,update_proj_gap=2,proj_method=svd,bits=8",
    "natural-galore:rank=8,update_proj_gap=2",
    "apollo:rank=4,update_proj_gap=2",
    "frugal:density=0.25,update_proj_gap=2",
]
EIGHT_BIT = {
    "adamw8bit": "adamw",
    "galore:rank=8,update_proj_gap=2,proj_method=svd,bits=8": (
        "galore:rank=8,update_proj_gap=2,proj_method=svd"
    ),
}
STEPS = 3
LR = 1e-2


def _model():
    from tests.optim.reference import tiny_llama

    return tiny_llama(vocab_size=311, hidden_size=64, intermediate_size=160, head_dim=16)


def _batches() -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return [torch.randint(0, 311, (2, 24), generator=gen) for _ in range(STEPS)]


def _optimizer(model, spec: str):
    from memtrain.optim import build_optimizer

    return build_optimizer(model, parse_optimizer_spec(spec), lr=LR)


def _step(model, optimizer, ids: torch.Tensor, name: str | None = None) -> None:
    """One step; ``name``: the optimizer on sharded weights, stepped as the fsdp launcher does
    (memtrain's own ``step`` for all of memtrain's, gathering where they need whole matrices;
    torch's Adafactor through ``step_whole_matrices``)."""
    from memtrain.optim.sharded import step_sharded

    model(input_ids=ids, labels=ids).loss.backward()
    if name is None:
        optimizer.step()
    else:
        step_sharded(optimizer, name)
    optimizer.zero_grad(set_to_none=True)


def _one_process(spec: str) -> dict[str, torch.Tensor]:
    torch.set_num_threads(1)  # as each rank: some factorisations round with the thread count
    model = _model()
    optimizer = _optimizer(model, spec)
    for ids in _batches():
        _step(model, optimizer, ids)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _sharded(spec: str):
    from torch.distributed.fsdp import fully_shard

    model = _model()
    for block in model.model.layers:
        fully_shard(block)
    fully_shard(model)
    optimizer = _optimizer(model, spec)
    return model, optimizer, parse_optimizer_spec(spec).name


def _full_weights(model) -> dict[str, torch.Tensor]:
    from memtrain.optim.sharded import full

    return {k: full(v).detach().clone() for k, v in model.state_dict().items()}


def _worker(rank: int, world: int, init: str, out: str, specs: list[str]) -> None:
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    from memtrain.optim.sharded import init_states, state_bytes_split, step_sharded

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
    results = {}
    try:
        for index, spec in enumerate(specs):
            batches = _batches()
            model, optimizer, name = _sharded(spec)
            for ids in batches[:-1]:
                _step(model, optimizer, ids, name)
            folder = os.path.join(out, f"spec{index}")
            model_state, optim_state = get_state_dict(model, optimizer)
            dcp.save({"model": model_state, "optimizer": optim_state}, checkpoint_id=folder)
            _step(model, optimizer, batches[-1], name)
            state_bytes = [None] * world
            dist.all_gather_object(state_bytes, state_bytes_split(optimizer))
            uninterrupted = _full_weights(model)

            model, optimizer, name = _sharded(spec)
            init_states(optimizer, functools.partial(step_sharded, optimizer, name))
            model_state, optim_state = get_state_dict(model, optimizer)
            loaded = {"model": model_state, "optimizer": optim_state}
            dcp.load(loaded, checkpoint_id=folder)
            set_state_dict(
                model,
                optimizer,
                model_state_dict=loaded["model"],
                optim_state_dict=loaded["optimizer"],
            )
            _step(model, optimizer, batches[-1], name)
            results[spec] = {
                "weights": uninterrupted,
                "resumed": _full_weights(model),
                "state_bytes": state_bytes,
            }
        if rank == 0:
            torch.save(results, os.path.join(out, "results.pt"))
    finally:
        dist.destroy_process_group()


def _spawn(world: int, tmp_path: Path, specs: list[str]) -> dict:
    import torch.multiprocessing as mp

    init = tmp_path / "init"
    args = (world, str(init), str(tmp_path), specs)
    mp.spawn(_worker, args=args, nprocs=world, join=True)
    return torch.load(tmp_path / "results.pt", weights_only=False)


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def test_every_optimizer_name_has_a_sharded_step():
    from memtrain.optim.factory import ALLOWED_OPTIONS  # every name build_optimizer builds

    assert set(ROW_STEPS) | set(WHOLE_MATRIX_STEPS) == set(ALLOWED_OPTIONS)
    assert not set(ROW_STEPS) & set(WHOLE_MATRIX_STEPS)


@pytest.mark.slow
@pytest.mark.parametrize("world", [1, 2, 4])
def test_sharded_steps_equal_one_process_and_resume(world, tmp_path):
    pytest.importorskip("transformers")
    specs = SPECS if world == 2 else FOUR_RANKS
    results = _spawn(world, tmp_path, specs)
    single_bytes = {}
    for spec in specs:
        got = results[spec]
        expected = _one_process(spec)
        assert expected.keys() == got["weights"].keys()
        if spec in EIGHT_BIT:
            quantisation = _max_diff(expected, _one_process(EIGHT_BIT[spec]))
            # another blocking of the same 8-bit code: a difference of the quantisation's order
            assert _max_diff(expected, got["weights"]) < 2 * quantisation, spec
        else:
            for key in expected:
                torch.testing.assert_close(
                    got["weights"][key], expected[key], rtol=1e-4, atol=1e-5, msg=f"{spec} {key}"
                )
        for key, value in got["weights"].items():
            assert torch.equal(got["resumed"][key], value), f"{spec} {key} after reload"
        model = _model()
        optimizer = _optimizer(model, spec)
        _step(model, optimizer, _batches()[0])
        single_bytes[spec] = sum(measured_state_bytes(optimizer).values())
    for spec in specs:
        # every rank holds its share of the row-sharded states and all of the replicated ones:
        # the shards add up to one process's bytes, nothing duplicated
        split = [s for s, _ in results[spec]["state_bytes"]]
        whole = {w for _, w in results[spec]["state_bytes"]}
        assert len(whole) == 1, (spec, results[spec]["state_bytes"])
        replicated = whole.pop()
        if spec in EIGHT_BIT:  # 8-bit scales per row block: at least the flat blocks' bytes
            assert sum(split) + replicated >= single_bytes[spec], spec
        else:
            assert sum(split) + replicated == single_bytes[spec], (spec, split, replicated)
        if sharded_step_kind(parse_optimizer_spec(spec).name) == "whole":
            assert sum(split) == 0, spec
    errors = []
    for spec in specs:  # rank 0 holds the most rows: the formula's figure
        predicted = model_rank_state_bytes(_model(), spec, world)
        measured = sum(results[spec]["state_bytes"][0])
        if measured != predicted:
            errors.append((spec, measured, predicted))
    assert not errors, errors
    for spec in {"adamw", "adamw8bit", "sgd:momentum=0.9"} & set(specs):  # counters replicated
        per_rank = results[spec]["state_bytes"]
        assert per_rank[0][1] <= 4 * 21, (spec, per_rank)
        assert max(s for s, _ in per_rank) < single_bytes[spec] / world * 1.2, (spec, per_rank)


def test_row_blocks_equal_flat_blocks_for_whole_blocks_per_row():
    from memtrain.optim.quant8 import dequantize_rows, quantize, quantize_rows

    gen = torch.Generator().manual_seed(0)
    values = torch.randn(6, 512, generator=gen)
    codes, absmax = quantize_rows(values, signed=True)
    flat_codes, flat_absmax = quantize(values, signed=True)
    assert torch.equal(codes, flat_codes) and torch.equal(absmax.reshape(-1), flat_absmax)
    odd = torch.randn(5, 300, generator=gen).abs()  # rows that end in a partial block
    codes, absmax = quantize_rows(odd, signed=False)
    assert absmax.shape == (5, 2) and codes.shape == odd.shape
    back = dequantize_rows(codes, absmax, signed=False)
    assert float(((back - odd).abs() / odd.abs().amax(dim=1, keepdim=True)).max()) < 0.02
