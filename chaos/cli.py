"""The command line shared by every chaos scenario: run, print the summary, write JSON.

Exit status 1 when any invariant failed, so `make chaos` fails the build.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

Runner = Callable[..., dict[str, Any]]  # (clients, requests, seed[, processes=N])


def scenario_main(
    prog: str,
    doc: str | None,
    run: Runner,
    summary: Callable[[dict[str, Any]], str],
    default_json: Path,
    argv: list[str] | None,
    *,
    clients: int,
    requests: int,
    supports_processes: bool = False,
) -> int:
    parser = argparse.ArgumentParser(
        prog=prog, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--clients", type=int, default=clients)
    parser.add_argument("--requests", type=int, default=requests)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--json", type=Path, default=default_json)
    if supports_processes:
        parser.add_argument("--processes", type=int, default=1,
                            help="router processes under one supervisor (listener.processes)")
    args = parser.parse_args(argv)
    if args.clients < 1 or args.requests < 1:
        parser.error("--clients and --requests must be >= 1")
    extra = {"processes": args.processes} if supports_processes else {}
    result = run(args.clients, args.requests, args.seed, **extra)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(summary(result))
    print(f"wrote {args.json}")
    return 0 if result["passed"] else 1
