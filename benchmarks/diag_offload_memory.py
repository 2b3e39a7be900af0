"""Measured GPU memory at every layer boundary of one step under a stored plan, beside the
planner's prediction for the same moment.

The plan (``bench_offload_plans.json``, made by ``bench_offload_gpu.py --make-plans``) lists a
predicted GPU peak for the forward and the backward of every layer (``predicted.gpu_moments``).
This runs the 1.2B Llama-style model under that plan, records the allocator's peak inside each
layer's forward and backward (``torch.cuda.max_memory_allocated``, reset at every boundary), and
prints both side by side, so a gap between prediction and measurement shows where it arises.

``--layers N`` plans and runs a copy with N blocks instead (where a full-depth step outlasts a
device command: the peak per added block).

Run:  python benchmarks/diag_offload_memory.py --seq 65536
      python benchmarks/diag_offload_memory.py --seq 1048576 --layers 1
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_offload_gpu as bench  # noqa: E402

from memtrain.kernels import patch_causal_lm_loss  # noqa: E402
from memtrain.models import build_causal_lm, load_config  # noqa: E402
from memtrain.models.build import causal_lm_layers  # noqa: E402
from memtrain.offload import apply, offload_optimizer  # noqa: E402
from memtrain.planner.plot import measured_moments, write_plan_plot  # noqa: E402
from memtrain.profile.scopes import Clock, CudaMemory, LayerScopes  # noqa: E402

GiB = 2**30


def measure(seq: int, host_gib: float, layers: int | None = None, first_step: bool = False) -> dict:
    if layers is None:
        plan, profile = bench.load_plan(seq, host_gib)
    else:  # a shallower copy, planned for itself (needs pulp)
        made, profile = bench.plan_for(seq, host_gib, layers)
        plan = made.to_dict()
    config = load_config(bench.MODEL)
    if layers is not None:
        config.num_hidden_layers = layers
    config.use_cache = False
    model = build_causal_lm(config, "bf16", "cuda")
    model.train()
    patch_causal_lm_loss(model)
    handle = apply(model, plan, profile=profile)
    if handle.needs_optimizer_offload:
        optimizer = offload_optimizer(handle, torch.optim.AdamW, lr=1e-5, fused=True)
    else:
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
    ids = torch.randint(0, config.vocab_size, (1, seq), device="cuda")

    def step(scopes: LayerScopes | None = None) -> None:
        if scopes is not None:
            scopes.begin("forward")
        loss = model(input_ids=ids, labels=ids).loss
        if scopes is not None:
            scopes.begin("backward")
        loss.backward()
        if scopes is not None:
            scopes.end()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    if not first_step:
        step()  # optimizer states exist from here on, as in the plan
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    device = torch.device("cuda")
    scopes = LayerScopes(causal_lm_layers(model), CudaMemory(device), Clock(device))
    out_of_memory = None
    try:
        step(scopes)
    except torch.OutOfMemoryError as exc:  # the moments up to here still say where it grew
        out_of_memory = str(exc).split("\n")[0][:600]
        optimizer.zero_grad(set_to_none=True)
    scopes.remove()
    torch.cuda.synchronize()
    measured: dict[str, int] = {}
    for phase, name, value in scopes.timeline:
        key = f"{phase} {name}"
        measured[key] = max(measured.get(key, 0), value)
    predicted = dict(plan["predicted"].get("gpu_moments", []))
    # The first step has no optimizer states yet: they are added to what it measured, so the
    # comparison is with the plan's steady state (an estimate, named in the result).
    absent = plan["predicted"]["gpu_resident_bytes"]["optimizer"] if first_step else 0
    measured = {key: value + absent for key, value in measured.items()}
    rows = []
    for key in dict.fromkeys([*predicted, *measured]):
        pred, meas = predicted.get(key), measured.get(key)
        rows.append(
            {
                "moment": key,
                "predicted_gib": None if pred is None else round(pred / GiB, 3),
                "measured_gib": None if meas is None else round(meas / GiB, 3),
                "error": None if not pred or meas is None else round(meas / pred - 1, 4),
            }
        )
    handle.remove()
    return {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "seq": seq,
        "layers": config.num_hidden_layers,
        "command": "python benchmarks/diag_offload_memory.py " + " ".join(sys.argv[1:]),
        "predicted_peak_gib": plan["predicted"]["peak_bytes"]["gpu"] / GiB,
        "predicted_peak_at": plan["predicted"]["peak_at"]["gpu"],
        "measured_peak_gib": (scopes.global_peak + absent) / GiB,
        "out_of_memory": out_of_memory,
        "first_step_plus_optimizer_states_gib": absent / GiB if first_step else None,
        "allocator_peak_gib": torch.cuda.max_memory_allocated() / GiB,
        "moments": rows,
        "plan": plan,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int, default=65536)
    parser.add_argument("--host-gib", type=float, default=80.0)
    parser.add_argument("--layers", type=int, help="a shallower copy, planned on the spot")
    parser.add_argument(
        "--gpu-cap-gib", type=float, help="allocate at most this much (79.2: an 80 GB H100)"
    )
    parser.add_argument(
        "--first-step",
        action="store_true",
        help="measure the first step (half the time) and add the plan's optimizer-state bytes",
    )
    args = parser.parse_args()
    limits = bench.cap_gpu(args.gpu_cap_gib)
    result = {**measure(args.seq, args.host_gib, args.layers, args.first_step), **limits}
    print(f"{'moment':24s} {'predicted GiB':>14s} {'measured GiB':>13s} {'error':>8s}")
    for row in result["moments"]:
        pred = "-" if row["predicted_gib"] is None else f"{row['predicted_gib']:.2f}"
        meas = "-" if row["measured_gib"] is None else f"{row['measured_gib']:.2f}"
        err = "-" if row["error"] is None else f"{100 * row['error']:+.1f}%"
        print(f"{row['moment']:24s} {pred:>14s} {meas:>13s} {err:>8s}")
    if result["out_of_memory"]:
        print(f"out of memory: {result['out_of_memory']}")
    print(
        f"step peak: measured {result['measured_peak_gib']:.2f} GiB, predicted "
        f"{result['predicted_peak_gib']:.2f} GiB at {result['predicted_peak_at']}"
    )
    if os.environ.get("OUT"):
        depth = f"_{args.layers}l" if args.layers else ""
        path = Path(os.environ["OUT"], f"diag_offload_memory_{args.seq}{depth}.json")
        path.write_text(json.dumps(result, indent=1))
        # the same curves as `memtrain plan --plot ... --measured <this JSON>`
        write_plan_plot(result["plan"], path.with_suffix(".png"), measured_moments(result))


if __name__ == "__main__":
    main()
