"""The host optimizer step (states off the GPU): torch's fused CPU kernel against its for-each
and per-tensor implementations, and DeepSpeed's cpu_adam where it is built.

AdamW on float32 master weights split into tensors of a 4096-wide model's shapes, gradients
random; each row: seconds per step (median of 5 after one warm-up) and parameters per second.
``--dtype bfloat16`` steps bf16 weights with bf16 moments, as FSDP2's CPU offload does (no
float32 masters).

Example: python -m benchmarks.bench_host_optimizer --params 50e6
"""

from __future__ import annotations

import time
from typing import Any

import torch

from benchmarks.harness import median, parser, results_for

IMPLEMENTATIONS = ("fused", "foreach", "single", "deepspeed")


def _tensors(count: int, dtype: torch.dtype = torch.float32) -> list[torch.nn.Parameter]:
    shapes, left = [], count
    while left > 0:
        n = min(left, 4096 * 4096)
        shapes.append(n)
        left -= n
    params = [torch.nn.Parameter(torch.randn(n, dtype=dtype)) for n in shapes]
    for p in params:
        p.grad = torch.randn_like(p)
    return params


def _optimizer(kind: str, params) -> Any:
    if kind == "deepspeed":
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(params, lr=1e-3, adamw_mode=True)
    options = {"fused": {"fused": True}, "foreach": {"foreach": True}, "single": {"foreach": False}}
    return torch.optim.AdamW(params, lr=1e-3, **options[kind])


def time_step(
    kind: str, count: int, repeats: int = 5, dtype: torch.dtype = torch.float32
) -> dict[str, Any]:
    params = _tensors(count, dtype)
    try:
        optimizer = _optimizer(kind, params)
        optimizer.step()
    except Exception as exc:  # not built or installed here
        return {"status": f"unavailable: {type(exc).__name__}: {str(exc)[:120]}"}
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        optimizer.step()
        times.append(time.perf_counter() - started)
    seconds = median(times)
    return {"status": "ok", "step_s": seconds, "params_per_s": count / seconds}


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--params", type=float, default=50e6, help="parameters stepped")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    count = int(args.params)
    results = results_for("bench_host_optimizer", args, device="cpu")
    dtype = getattr(torch, args.dtype)
    print(f"AdamW host step, {count:,} {args.dtype} parameters, {torch.get_num_threads()} threads")
    print("| implementation | s / step | parameters / s |")
    print("|---|---|---|")
    for kind in IMPLEMENTATIONS:
        row = time_step(kind, count, dtype=dtype)
        key = f"{kind}@{count}" + ("" if dtype == torch.float32 else f"@{args.dtype}")
        results.write(key, implementation=kind, params=count, dtype=args.dtype,
                      threads=torch.get_num_threads(), **row)  # fmt: skip
        if row["status"] == "ok":
            print(f"| {kind} | {row['step_s']:.3f} | {row['params_per_s'] / 1e6:,.0f}M |")
        else:
            print(f"| {kind} | {row['status']} | |")


if __name__ == "__main__":
    main()
