"""Locust smoke run of ``bench/locust_grpc.py`` against a real router and KServe backend.

Locust monkeypatches its process with gevent, so it runs as a subprocess; the router runs in
this test's event loop, which keeps serving while the subprocess is awaited.
"""

from __future__ import annotations

import asyncio
import csv
import sys
from collections.abc import Callable
from pathlib import Path

from tests.grpc_support import (
    GrpcRouterFactory,
    KServeBackend,
    grpc_backend,
)
from tests.support import REPO_ROOT

RUN_TIME_S = 2
USERS = 4
# Locust's own startup (gevent, imports) takes a few seconds on this 2-core machine.
PROCESS_TIMEOUT_S = RUN_TIME_S + 30


def _aggregated(csv_prefix: Path) -> dict[str, str]:
    with Path(f"{csv_prefix}_stats.csv").open(newline="") as f:
        return next(row for row in csv.DictReader(f) if row["Name"] == "Aggregated")


async def test_locust_grpc_user_runs_model_infer_through_the_router(
    kserve_backend: Callable[..., KServeBackend], grpc_router: GrpcRouterFactory, tmp_path: Path
) -> None:
    backend = kserve_backend("--models", "identity")
    router = await grpc_router([grpc_backend(backend.address, "identity")])
    prefix = tmp_path / "grpc"
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "locust", "-f", "bench/locust_grpc.py", "--headless",
        "--host", f"grpc://{router.target}", "-u", str(USERS), "-r", str(USERS),
        "-t", f"{RUN_TIME_S}s", "--stop-timeout", "5", "--csv", str(prefix), "--only-summary",
        "--loglevel", "WARNING",
        cwd=REPO_ROOT, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )
    try:
        async with asyncio.timeout(PROCESS_TIMEOUT_S):
            output, _ = await proc.communicate()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    text = output.decode(errors="replace")
    assert proc.returncode == 0, text
    totals = _aggregated(prefix)
    assert int(totals["Request Count"]) > 0, text
    assert int(totals["Failure Count"]) == 0, text
    # Locust's CSV is written once a second, so it may miss the last calls; never extra ones.
    assert router.app.stats.completed >= int(totals["Request Count"])
    assert router.app.stats.errored == {}
