"""Locust smoke run of ``bench/locust_grpc.py`` against a real router and KServe backend.

Locust monkeypatches its process with gevent, so it runs as a subprocess; the router runs in
this test's event loop, which keeps serving while the subprocess is awaited.
"""

from __future__ import annotations

import asyncio
import re
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


# The summary locust prints when it stops: "Aggregated  <requests>  <failures>(<percent>)".
# Its CSV is written once a second and may be written last before the final tally, so the
# printed summary is the figure of record.
_SUMMARY = re.compile(r"^\s*Aggregated\s+(\d+)\s+(\d+)\(", re.MULTILINE)


def _aggregated(text: str) -> tuple[int, int]:
    """(requests, failures) from locust's printed summary."""
    found = _SUMMARY.search(text)
    assert found is not None, text
    return int(found.group(1)), int(found.group(2))


async def test_locust_grpc_user_runs_model_infer_through_the_router(
    kserve_backend: Callable[..., KServeBackend], grpc_router: GrpcRouterFactory, tmp_path: Path
) -> None:
    backend = kserve_backend("--models", "identity")
    router = await grpc_router([grpc_backend(backend.address, "identity")])
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "locust", "-f", "bench/locust_grpc.py", "--headless",
        "--host", f"grpc://{router.target}", "-u", str(USERS), "-r", str(USERS),
        "-t", f"{RUN_TIME_S}s", "--stop-timeout", "5", "--only-summary",
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
    requests, failures = _aggregated(text)
    assert requests > 0 and failures == 0, text
    # Every call locust counted went through the router (a call it gave up on may not count).
    assert router.app.stats.completed >= requests
    assert router.app.stats.errored == {}
