"""The command line shared by every chaos scenario: run, print the summary, write JSON.

Exit status 1 when any invariant failed, so `make chaos` fails the build.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

Runner = Callable[[int, int, int | None], dict[str, Any]]


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
) -> int:
    parser = argparse.ArgumentParser(
        prog=prog, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--clients", type=int, default=clients)
    parser.add_argument("--requests", type=int, default=requests)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--json", type=Path, default=default_json)
    args = parser.parse_args(argv)
    if args.clients < 1 or args.requests < 1:
        parser.error("--clients and --requests must be >= 1")
    result = run(args.clients, args.requests, args.seed)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(summary(result))
    print(f"wrote {args.json}")
    return 0 if result["passed"] else 1
