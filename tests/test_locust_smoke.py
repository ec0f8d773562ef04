"""Locust smoke runs: ``bench/locustfile.py`` against a real router, as a subprocess.

Locust monkeypatches its process with gevent on import, so it runs only as a subprocess here;
this module imports ``bench.locust_run`` (argv and CSV parsing), never the locustfile. The
router runs in this test's event loop, which keeps serving while the subprocess is awaited.
"""

from __future__ import annotations

import asyncio
import csv
from collections.abc import Callable
from pathlib import Path

from bench.locust_run import Totals, locust_argv, read_totals, run_timeout_s
from tests.conftest import EchoBackend, RouterFactory
from tests.support import REPO_ROOT

# 3 s of load with 4 closed-loop users (all started within the first second) gives
# thousands of requests and at least two of Locust's once-a-second CSV writes after the first
# request, with margin for a loaded machine; each run takes ~4 s with Locust's startup.
RUN_TIME_S = 3
USERS = 4


async def run_locust(host: str, port: int, csv_prefix: Path) -> tuple[int, str, Totals]:
    argv = locust_argv(host, port, users=USERS, spawn_rate=USERS, run_time_s=RUN_TIME_S,
                       csv_prefix=csv_prefix)
    proc = await asyncio.create_subprocess_exec(
        *argv, cwd=REPO_ROOT, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    try:
        async with asyncio.timeout(run_timeout_s(RUN_TIME_S)):
            output, _ = await proc.communicate()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode is not None
    return proc.returncode, output.decode(errors="replace"), read_totals(csv_prefix)


async def test_locust_user_sends_echoes_through_the_router(
    echo_backend: Callable[..., EchoBackend], router_factory: RouterFactory, tmp_path: Path
) -> None:
    backend = echo_backend()
    router = await router_factory([backend.address])

    code, output, totals = await run_locust(router.host, router.port, tmp_path / "ok")

    assert code == 0, output
    assert totals.requests > 0, output
    assert totals.failures == 0, output


async def test_locust_reports_router_errors_as_failures(
    router_factory: RouterFactory, dead_port: int, tmp_path: Path
) -> None:
    # Nothing listens on the only backend: every request is answered with an error frame.
    router = await router_factory([f"127.0.0.1:{dead_port}"])

    code, output, totals = await run_locust(router.host, router.port, tmp_path / "dead")

    assert code == 1, output  # Locust's exit status when any request failed
    assert totals.requests > 0, output
    assert totals.failures == totals.requests, output
    with (tmp_path / "dead_failures.csv").open(newline="") as f:
        errors = [row["Error"] for row in csv.DictReader(f)]
    assert errors, output
    # Locust keys failures by the exception's repr: the router's codes, nothing else.
    assert all(e.startswith("RouterErrorReply(")
               and ("NO_BACKEND" in e or "BACKEND_UNAVAILABLE" in e) for e in errors), errors
