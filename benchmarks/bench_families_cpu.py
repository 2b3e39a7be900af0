"""Every decoder family with a block adapter, on the CPU: the dry run against the measured run,
and prepare()'s plans at half and a quarter of the unplanned peak against the unwrapped model.

Tiny random-weight configs from tests/families.py (each family's peculiarity on: sliding windows
shorter than the sequence, softcaps, q/k norms, residual multipliers, experts with the router's
auxiliary loss), float32:

  dry run     a meta-device copy of the model profiled for the CPU (nothing allocated) against
              a measured CPU step: peak and the worst layer's saved bytes
  plans       memtrain.prepare(model, seq=512, gpu_budget_fraction=F, fused_loss=True), two SGD
              steps: largest relative error (norm of the difference over the norm) of the losses
              and of the first step's gradients (at 0.5x) or of the parameter updates (at 0.25x,
              where gradients and SGD states go to the host: at these sizes weights and
              gradients alone come near a quarter of the peak) against the unwrapped model with
              its stock loss, and the activation modes the plan installed

Example: python -m benchmarks.bench_families_cpu
"""

from __future__ import annotations

import copy
import time
from typing import Any

import torch

from benchmarks.harness import parser, results_for

DRY_SEQS = (64, 256)
PLAN_SEQ = 512
PLAN_SHAPE = {
    "hidden_size": 64, "intermediate_size": 256, "moe_intermediate_size": 128,
    "num_attention_heads": 1, "num_key_value_heads": 1, "head_dim": 64,
}  # fmt: skip


def dry_vs_measured(family: str, seq: int) -> dict[str, Any]:
    from memtrain.models.build import meta_twin
    from memtrain.profile import profile_model
    from memtrain.profile.profiler import default_loss
    from tests.families import family_model

    model = family_model(family)
    ids = torch.zeros(1, seq, dtype=torch.long)
    meta_ids = ids.to("meta")
    dry = profile_model(
        meta_twin(model), {"input_ids": meta_ids, "labels": meta_ids}, seq=seq,
        loss_fn=default_loss, optimizer="adamw", target="cpu",
    )  # fmt: skip
    real = profile_model(
        copy.deepcopy(model), {"input_ids": ids, "labels": ids}, seq=seq, loss_fn=default_loss,
        optimizer="adamw",
    )  # fmt: skip
    worst = max(
        abs(d.saved_bytes - r.saved_bytes) / max(r.saved_bytes, 1)
        for d, r in zip(dry.layers, real.layers, strict=True)
    )
    return {
        "dry_peak": dry.simulated_peak_bytes,
        "measured_peak": real.simulated_peak_bytes,
        "peak_error": dry.simulated_peak_bytes / real.simulated_peak_bytes - 1,
        "worst_layer_error": worst,
    }


def _steps(model, ids, optimizer=None, steps: int = 2):
    optimizer = optimizer or torch.optim.SGD(model.parameters(), lr=0.05)
    losses, grads = [], []
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        losses.append(loss.detach().clone())
        grads.append({n: p.grad.detach().clone() for n, p in model.named_parameters()
                      if p.grad is not None})  # fmt: skip
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return losses, grads


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def plan_row(family: str, fraction: float) -> dict[str, Any]:
    import memtrain
    from memtrain.planner.plan import PlanInfeasible
    from tests.families import family_ids, family_model

    shape = dict(PLAN_SHAPE)
    if family == "gpt_neox":
        shape["num_key_value_heads"] = shape["num_attention_heads"]
    ids = family_ids(PLAN_SEQ)
    reference = family_model(family, **shape)
    before = {n: p.detach().clone() for n, p in reference.named_parameters()}
    want = _steps(reference, ids)
    model = family_model(family, **shape)
    on_host = fraction < 0.5
    try:
        prepared = memtrain.prepare(
            model, seq=PLAN_SEQ, gpu_budget_fraction=fraction, optimizer="sgd:momentum=0",
            lr=0.05, fused_loss=True, build_optimizer=on_host, state_offload=on_host,
        )  # fmt: skip
    except PlanInfeasible as exc:
        return {"status": "infeasible", "message": str(exc)}
    with prepared:
        got = _steps(model, ids, prepared.optimizer)
        modes = prepared.handle.stats()["modes"] if prepared.handle is not None else {}
    row: dict[str, Any] = {"status": "ok", "grads": "host" if on_host else "gpu"}
    row["loss_error"] = max(_relative(a, b) for a, b in zip(got[0], want[0], strict=True))
    if on_host:
        row["update_error"] = max(
            _relative(p.detach() - before[n], reference.get_parameter(n).detach() - before[n])
            for n, p in model.named_parameters()
        )
    else:
        row["grad_error"] = max(_relative(got[1][0][n], want[1][0][n]) for n in want[1][0])
    row["modes"] = sorted({m for name, m in modes.items() if name.startswith("block.")})
    return row


def main() -> None:
    from tests.families import FAMILIES

    p = parser(__doc__)
    p.add_argument("--families", nargs="*", default=sorted(FAMILIES))
    args = p.parse_args()
    results = results_for("bench_families_cpu", args, device="cpu")
    print(
        "| family | dry vs measured peak (64 / 256 tokens) | worst layer | plan 0.5x | plan 0.25x |"
    )
    print("|---|---|---|---|---|")
    for family in args.families:
        started = time.perf_counter()
        dry = {seq: dry_vs_measured(family, seq) for seq in DRY_SEQS}
        plans = {fraction: plan_row(family, fraction) for fraction in (0.5, 0.25)}
        results.write(
            family,
            family=family,
            dry_run={str(k): v for k, v in dry.items()},
            plans={str(k): v for k, v in plans.items()},
            seconds=round(time.perf_counter() - started, 1),
        )
        peaks = " / ".join(f"{dry[s]['peak_error']:+.4%}" for s in DRY_SEQS)
        worst = max(dry[s]["worst_layer_error"] for s in DRY_SEQS)

        def cell(row: dict[str, Any]) -> str:
            if row["status"] != "ok":
                return f"infeasible ({row['message']})"
            what = "updates" if "update_error" in row else "grads"
            error = row.get("update_error", row.get("grad_error"))
            return (
                f"runs ({', '.join(row['modes'])}); loss {row['loss_error']:.1e}, "
                f"{what} {error:.1e}"
            )

        print(f"| {family} | {peaks} | {worst:.4%} | {cell(plans[0.5])} | {cell(plans[0.25])} |")


if __name__ == "__main__":
    main()
