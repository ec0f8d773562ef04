"""Regression gate: a short smoke bench compared with ``bench/results/baseline.json``.

Absolute requests/s drift on a shared 2-core machine, so the gate compares a ratio measured
within one run: router throughput over direct-to-backend throughput, at the same client count.
The gate fails when the smoke ratio falls more than ``--drift`` (default 30 %) below the
baseline's. ``--write-baseline`` records the smoke run as the new baseline.

    python -m bench.regress                 # make bench-smoke
    python -m bench.regress --write-baseline
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path
from typing import Any

from bench import run as bench_run

BASELINE = bench_run.RESULTS_DIR / "baseline.json"
SMOKE_NAME = "smoke"
SMOKE_ARGS = ["--clients", "50", "--requests", "500", "--no-haproxy", "--router-processes", "1",
              "--processes", "2", "--rounds", "3", "--name", SMOKE_NAME]


def router_direct_ratios(result: dict[str, Any]) -> dict[int, float]:
    """{clients: router/direct req/s} from a bench.run result."""
    return {
        int(item["clients"]): float(item["requests_per_s"])
        for item in result["ratios"]
        if item["ratio"] == "router/direct" and item["requests_per_s"] is not None
    }


def compare(smoke: dict[int, float], baseline: dict[int, float], drift: float) -> list[str]:
    """Problems found; empty when the smoke run is within ``drift`` of the baseline."""
    problems = []
    for clients, base in sorted(baseline.items()):
        if clients not in smoke:
            problems.append(f"{clients} clients: missing from the smoke run")
            continue
        floor = base * (1.0 - drift)
        if smoke[clients] < floor:
            problems.append(
                f"{clients} clients: router/direct {smoke[clients]:.3f} < {floor:.3f} "
                f"(baseline {base:.3f} - {drift:.0%})"
            )
    return problems


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="bench.regress", description=__doc__)
    parser.add_argument("--drift", type=float, default=0.30)
    parser.add_argument("--write-baseline", action="store_true")
    args = parser.parse_args(argv)
    bench_run.main(SMOKE_ARGS)
    smoke_path = bench_run.RESULTS_DIR / f"{SMOKE_NAME}.json"
    if args.write_baseline:
        shutil.copyfile(smoke_path, BASELINE)
        print(f"baseline written: {BASELINE}")
        return
    smoke = router_direct_ratios(json.loads(smoke_path.read_text()))
    baseline = router_direct_ratios(json.loads(Path(BASELINE).read_text()))
    problems = compare(smoke, baseline, args.drift)
    for clients, ratio in sorted(smoke.items()):
        print(f"{clients} clients: router/direct {ratio:.3f} (baseline {baseline.get(clients)})")
    if problems:
        print("REGRESSION:\n  " + "\n  ".join(problems), file=sys.stderr)
        sys.exit(1)
    print(f"within {args.drift:.0%} of the baseline")


if __name__ == "__main__":
    main()
