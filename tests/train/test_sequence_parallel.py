"""`memtrain run` with Ulysses sequence parallelism (DeepSpeed, gloo on the CPU).

Ranks that share each sequence train exactly as one process on the whole sequence: the same
loss, the same gradient norm and the same parameters after two AdamW steps, under ZeRO-2 and
ZeRO-3, and under a plan that recomputes token-wise inside each rank (its attention calls
between Ulysses' all-to-alls); the settings that cannot run are refused in one line.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

from memtrain.cli import main
from memtrain.errors import ConfigError
from memtrain.train.sequence_parallel import UlyssesSP, exchange_plan
from tests.train.test_run_and_resume import TINY

TOLERANCE = 1e-5
# A rank's plan with no host memory and a budget its activations do not fit: token-wise recompute
TOKENWISE = {"gpu_budget_fraction": 0.6, "cpu": "0"}


def _write(
    tmp_path: Path, out: str, nproc: int, degree: int, stage: int = 2, plan: dict | None = None
) -> Path:
    recipe = json.loads(json.dumps(TINY))  # tiny Llama: 2 layers, hidden 64, 4/2 heads, fp32
    # 128 tokens a rank: enough activations for a plan to recompute token-wise
    recipe["data"] = {"source": "stdlib", "seq": 256, "batch": 2}
    # eps well above float32 rounding: an entry whose gradient is ~0 follows the gradient
    # instead of its sign, so the weights compare at 1e-5
    recipe["optimizer"] = {"name": "adamw", "lr": 0.003, "options": {"eps": 1e-6}}
    recipe["schedule"] = {"steps": 2, "warmup": 0, "decay": "constant"}
    recipe["plan"] = plan or {"enabled": False}
    recipe["train"].update(out_dir=str(tmp_path / out), threads=1, checkpoint_every=2)
    recipe["launcher"] = {
        "kind": "deepspeed",
        "nproc": nproc,
        "sequence_parallel": degree,
        "zero_stage": stage,
    }
    path = tmp_path / f"{out}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def _run(path: Path) -> Path:
    cmd = [sys.executable, "-m", "memtrain", "run", str(path), "--no-progress"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return Path(yaml.safe_load(path.read_text())["train"]["out_dir"])


def _shm_buffers() -> set[str]:
    root = Path("/dev/shm")
    return {p.name for p in root.glob("deepspeed_allreduce_buffer_*")} if root.is_dir() else set()


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").open()]


def _weights(out: Path) -> dict[str, torch.Tensor]:
    """The whole model after step 2 (ZeRO-2 keeps it unsharded in the model-states file)."""
    path = out / "deepspeed" / "step2" / "mp_rank_00_model_states.pt"
    return torch.load(path, weights_only=False)["module"]


def _assert_same_steps(got: Path, want: Path) -> None:
    for a, b in zip(_metrics(got), _metrics(want), strict=True):
        assert abs(a["loss"] - b["loss"]) <= TOLERANCE * abs(b["loss"]), (a, b)
        assert abs(a["grad_norm"] - b["grad_norm"]) <= TOLERANCE * b["grad_norm"], (a, b)


@pytest.fixture(scope="module")
def one_process(tmp_path_factory) -> Path:
    """The reference: one DeepSpeed process on the whole sequence."""
    pytest.importorskip("deepspeed")
    return _run(_write(tmp_path_factory.mktemp("sp"), "one", nproc=1, degree=1))


# ------------------------------------------------------------------------------ fast checks


def test_settings_that_cannot_run_are_refused(tmp_path, capsys):
    path = _write(tmp_path, "bad", nproc=2, degree=2)
    assert main(["run", str(path), "launcher.kind=torchrun", "launcher.zero_stage=null"]) == 2
    assert "set launcher.kind=deepspeed" in capsys.readouterr().err
    assert main(["run", str(path), "launcher.nproc=3"]) == 2
    assert "must divide the number of ranks (3)" in capsys.readouterr().err
    assert main(["run", str(path), "data.seq=33"]) == 2
    assert "must divide data.seq (33)" in capsys.readouterr().err


def test_layers_that_run_attention_themselves_get_the_exchange_or_a_one_line_refusal():
    def part(name: str, heads: int, kv_heads: int):
        spec = SimpleNamespace(heads=heads, kv_heads=kv_heads)
        return SimpleNamespace(name=name, spec=spec, exchange=None)

    assert exchange_plan(None, "group", 2) == 0
    parts = [part("block.0", 4, 2), part("block.1", 4, 2)]
    handle = SimpleNamespace(attention_parts=parts)
    assert exchange_plan(handle, "group", 1) == 0  # one rank per sequence: nothing to exchange
    assert all(p.exchange is None for p in parts)
    assert exchange_plan(handle, "group", 2) == 2
    assert all(p.exchange.group == "group" and p.exchange.degree == 2 for p in parts)
    few = SimpleNamespace(attention_parts=[part("block.0", 8, 2)])
    with pytest.raises(ConfigError, match="8 attention heads and 2 key/value heads") as err:
        exchange_plan(few, "group", 4)  # fewer kv heads than ranks: not split evenly
    assert len(str(err.value).splitlines()) == 1
    assert few.attention_parts[0].exchange is None  # refused before any layer was changed


def test_labels_are_shifted_before_the_sequence_is_cut():
    ids = torch.arange(16).reshape(2, 8)
    shards = []
    for rank in range(2):
        sp = object.__new__(UlyssesSP)
        sp.degree, sp.rank = 2, rank
        shards.append(sp.shard(ids))
    labels = torch.cat([s["shift_labels"] for s in shards], dim=1)
    assert torch.equal(labels[:, :-1], ids[:, 1:]), "the target at the shard border is kept"
    assert (labels[:, -1] == -100).all()
    assert torch.equal(torch.cat([s["input_ids"] for s in shards], dim=1), ids)
    assert shards[1]["position_ids"].tolist() == [[4, 5, 6, 7]] * 2  # global positions


# --------------------------------------------------------------------------- launched runs


@pytest.mark.slow
def test_zero3_two_ranks_share_each_sequence_as_one_process_across_a_resume(tmp_path, one_process):
    """Two ranks, one sequence group: both read the same batches and each step's loss and
    gradient norm are the one-process run's (ZeRO-3 averages over every rank, sequence ranks
    included, so this checks the gradient scale too), also when the run stops after step 1 and
    resumes from its checkpoint. Weights are compared under ZeRO-2 by the four-rank test."""
    path = _write(tmp_path, "sp2z3", nproc=2, degree=2, stage=3)
    first = yaml.safe_load(path.read_text())
    first["schedule"]["steps"] = 1
    first["train"]["checkpoint_every"] = 1
    path.write_text(yaml.safe_dump(first))
    out = _run(path)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["launcher"]["sequence_parallel"] == 2
    config = json.loads((out / "deepspeed_config.json").read_text())
    assert config["sequence_parallel_size"] == 2 and config["train_batch_size"] == 2
    zero = config["zero_optimization"]
    assert zero["stage"] == 3 and zero["reduce_scatter"] is True
    ranks = summary["train"]["ranks"]
    assert ranks[0]["data_digest"] == ranks[1]["data_digest"]  # one data-parallel reader
    first["schedule"]["steps"] = 2
    path.write_text(yaml.safe_dump(first))
    _run(path)  # resumes through engine.load_checkpoint
    assert json.loads((out / "summary.json").read_text())["train"]["steps_run"] == 1
    assert [m["step"] for m in _metrics(out)] == [1, 2]
    _assert_same_steps(out, one_process)  # ZeRO-2 and ZeRO-3 steps agree for one process


@pytest.mark.slow
def test_four_ranks_two_sequence_groups_as_two_data_parallel_ranks(tmp_path):
    """SP=2 x DP=2: each group reads its own batches, as each rank of a 2-rank data-parallel
    run does, and the step is that run's, here with every rank recomputing token-wise."""
    pytest.importorskip("deepspeed")
    before = _shm_buffers()
    want = _run(_write(tmp_path, "dp2", nproc=2, degree=1))
    out = _run(_write(tmp_path, "sp2dp2", nproc=4, degree=2, plan=TOKENWISE))
    layers = yaml.safe_load((out / "plan.yaml").read_text())["layers"]
    assert any(x["recompute"] > 0 and x["name"].startswith("block.") for x in layers)
    assert _shm_buffers() <= before  # DeepSpeed's CPU all-reduce buffers are released
    ranks = json.loads((out / "summary.json").read_text())["train"]["ranks"]
    digests = [r["data_digest"] for r in ranks]
    assert digests[0] == digests[1] != digests[2] == digests[3]
    assert [r["first_position"] for r in ranks] == [0, 0, 1, 1]
    _assert_same_steps(out, want)
    got, ref = _weights(out), _weights(want)
    for key in ref:
        assert torch.allclose(got[key], ref[key], rtol=0, atol=TOLERANCE), key


@pytest.mark.slow
def test_tokenwise_recompute_inside_two_ranks_equals_one_process(tmp_path, one_process):
    """Each rank plans its 128 tokens with no host memory and a budget that does not keep its
    activations: the blocks recompute token-wise, calling attention themselves, on all tokens
    of the rank's heads between DeepSpeed's all-to-alls. Without the exchange each rank would
    attend over its own tokens only (a first loss 0.03 off)."""
    out = _run(_write(tmp_path, "sp2tokenwise", nproc=2, degree=2, plan=TOKENWISE))
    layers = yaml.safe_load((out / "plan.yaml").read_text())["layers"]
    assert any(x["recompute"] > 0 and x["name"].startswith("block.") for x in layers)
    _assert_same_steps(out, one_process)
