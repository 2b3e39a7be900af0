"""How long a dry run takes and how much host memory it needs, for large models and sequences.

Each case runs in a fresh subprocess so its peak resident memory (ru_maxrss) is its own.

Run:  python benchmarks/bench_profile_dry_run.py [--cases llama-3.1-70b:131072 ...]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import textwrap

CHILD = textwrap.dedent(
    """
    import json, resource, sys, time
    start = time.perf_counter()
    from memtrain.profile import profile_causal_lm
    imported = time.perf_counter()
    r = profile_causal_lm(sys.argv[1], seq=int(sys.argv[2]), dtype="bf16", device="meta")
    done = time.perf_counter()
    print(json.dumps({
        "model": sys.argv[1], "seq": int(sys.argv[2]),
        "import_s": imported - start, "profile_s": done - imported,
        "maxrss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "simulated_peak_gib": r.simulated_peak_bytes / 2**30,
        "params_b": r.param_count / 1e9,
    }))
    """
)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument(
        "--cases",
        nargs="+",
        default=["llama-3.1-70b:131072", "llama-3.1-70b:1048576", "llama-3.1-8b:131072"],
    )
    args = parser.parse_args()
    print(
        f"host: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"python {platform.python_version()}"
    )
    print(
        "| model | seq | profile time (s) | import time (s) | peak host RSS (GiB) | "
        "simulated device peak (GiB) |"
    )
    print("|---|---|---|---|---|---|")
    for case in args.cases:
        model, seq = case.split(":")
        out = (
            subprocess.run(
                [sys.executable, "-c", CHILD, model, seq],
                capture_output=True,
                text=True,
                check=True,
            )
            .stdout.strip()
            .splitlines()[-1]
        )
        r = json.loads(out)
        print(
            f"| {r['model']} | {r['seq']:,} | {r['profile_s']:.1f} | {r['import_s']:.1f} | "
            f"{r['maxrss_gib']:.2f} | {r['simulated_peak_gib']:,.0f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
