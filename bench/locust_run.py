"""Run ``bench/locustfile.py`` headless against a local router (``make locust``).

``python -m bench.locust_run [--users 50] [--spawn-rate 50] [--run-time 30] [--csv PREFIX]``

Starts two echo backends and the router with ``bench.run``'s helpers, runs Locust as a
subprocess (``--headless``, bounded by ``--run-time``) with ``--host tcp://127.0.0.1:<port>``,
and leaves Locust's CSV stats at ``PREFIX_stats.csv``, ``PREFIX_failures.csv``, ... (default
``bench/results/locust``). Exits with Locust's status: 1 when any request failed.

Locust is only ever run as a subprocess: importing it monkeypatches the importing process with
gevent. This module imports nothing of Locust, so the smoke test can use ``locust_argv`` and
``read_totals``.
"""

from __future__ import annotations

import argparse
import csv
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from bench.run import ROOT, Service, start_echo, start_router

LOCUSTFILE = ROOT / "bench" / "locustfile.py"
DEFAULT_CSV = ROOT / "bench" / "results" / "locust"
# Locust starts in ~1-2 s (gevent, its imports) and stops its users within --stop-timeout.
STARTUP_MARGIN_S = 30.0
STOP_TIMEOUT_S = 5


@dataclass(frozen=True, slots=True)
class Totals:
    """The ``Aggregated`` row of a Locust ``*_stats.csv``."""

    requests: int
    failures: int
    requests_per_s: float
    median_ms: float | None


def locust_argv(host: str, port: int, *, users: int, spawn_rate: float, run_time_s: int,
                csv_prefix: Path, locustfile: Path = LOCUSTFILE) -> list[str]:
    return [
        sys.executable, "-m", "locust", "-f", str(locustfile), "--headless",
        "--host", f"tcp://{host}:{port}", "-u", str(users), "-r", str(spawn_rate),
        "-t", f"{run_time_s}s", "--stop-timeout", str(STOP_TIMEOUT_S),
        "--csv", str(csv_prefix), "--only-summary", "--loglevel", "WARNING",
    ]


def run_timeout_s(run_time_s: int) -> float:
    """How long to wait for a Locust subprocess before killing it."""
    return run_time_s + STOP_TIMEOUT_S + STARTUP_MARGIN_S


def read_totals(csv_prefix: Path) -> Totals:
    with Path(f"{csv_prefix}_stats.csv").open(newline="") as f:
        for row in csv.DictReader(f):
            if row["Name"] == "Aggregated":
                median = row.get("Median Response Time") or ""
                return Totals(
                    requests=int(row["Request Count"]), failures=int(row["Failure Count"]),
                    requests_per_s=float(row["Requests/s"]),
                    median_ms=float(median) if median not in ("", "N/A") else None,
                )
    raise ValueError(f"{csv_prefix}_stats.csv has no Aggregated row")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.locust_run", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--users", type=int, default=50)
    parser.add_argument("--spawn-rate", type=float, default=50.0)
    parser.add_argument("--run-time", type=int, default=30, metavar="SECONDS")
    parser.add_argument("--csv", type=Path, default=DEFAULT_CSV, metavar="PREFIX")
    parser.add_argument("--locustfile", type=Path, default=LOCUSTFILE)
    args = parser.parse_args(argv)
    if args.users < 1 or args.spawn_rate <= 0 or args.run_time < 1:
        parser.error("--users, --spawn-rate and --run-time must be positive")
    args.csv.parent.mkdir(parents=True, exist_ok=True)
    services: list[Service] = []
    with tempfile.TemporaryDirectory(prefix="bench-locust-") as tmp:
        try:
            backends = []
            for index in (1, 2):
                echo = start_echo(f"echo{index}", Path(tmp))
                services.append(echo)
                backends.append(echo.port)
            router, _ = start_router(backends, Path(tmp))
            services.append(router)
            cmd = locust_argv("127.0.0.1", router.port, users=args.users,
                              spawn_rate=args.spawn_rate, run_time_s=args.run_time,
                              csv_prefix=args.csv, locustfile=args.locustfile)
            print(" ".join(cmd), file=sys.stderr, flush=True)
            code = subprocess.run(cmd, cwd=ROOT, timeout=run_timeout_s(args.run_time)).returncode
        finally:
            for service in reversed(services):
                service.stop()
    totals = read_totals(args.csv)
    print(f"requests {totals.requests}, failures {totals.failures}, "
          f"{totals.requests_per_s:.0f} req/s, median {totals.median_ms} ms; "
          f"CSV: {args.csv}_stats.csv")
    sys.exit(code)


if __name__ == "__main__":
    main()
