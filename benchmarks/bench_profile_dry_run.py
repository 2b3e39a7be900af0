"""How long a dry run takes and how much host memory it needs, for large models and sequences.

Each case (MODEL:TOKENS; MODEL is a preset name or a config.json) runs in a fresh process so
its peak resident memory (ru_maxrss) is its own; the ~2 s import is timed apart.

Example: python -m benchmarks.bench_profile_dry_run --cases llama-3.1-70b:131072 llama-3.1-8b:131072
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

from benchmarks.harness import ROOT, parser, results_for

CHILD = textwrap.dedent(
    """
    import json, resource, sys, time
    start = time.perf_counter()
    from memtrain.profile import profile_causal_lm
    imported = time.perf_counter()
    r = profile_causal_lm(sys.argv[1], seq=int(sys.argv[2]), dtype="bf16", device="meta")
    done = time.perf_counter()
    print(json.dumps({
        "import_s": imported - start, "profile_s": done - imported,
        "maxrss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "simulated_peak_gib": r.simulated_peak_bytes / 2**30, "params_b": r.param_count / 1e9,
    }))
    """
)
CASES = ["llama-3.1-70b:131072", "llama-3.1-70b:1048576", "llama-3.1-8b:131072"]


def dry_run(model: str, seq: int) -> dict:
    done = subprocess.run(
        [sys.executable, "-c", CHILD, model, str(seq)],
        capture_output=True, text=True, check=True, cwd=ROOT,
    )  # fmt: skip
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--cases", nargs="+", default=CASES, help="MODEL:TOKENS ...")
    args = p.parse_args()
    results = results_for("bench_profile_dry_run", args, device="cpu")
    print(
        "| model | tokens | profile time (s) | peak host RSS (GiB) | simulated device peak (GiB) |"
    )
    print("|---|---|---|---|---|")
    for case in args.cases:
        model, _, seq = case.rpartition(":")
        row = {"model": model, "seq": int(seq), **dry_run(model, int(seq))}
        results.write(case, **row)
        print(
            f"| {model} | {int(seq):,} | {row['profile_s']:.1f} | {row['maxrss_gib']:.2f} | "
            f"{row['simulated_peak_gib']:,.0f} |",
            flush=True,
        )
    print(f"wrote {results.path}")


if __name__ == "__main__":
    main()
