"""Helpers for test modules that start real processes (by ``router.control.launcher``)."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from router.control.launcher import BlockingProcess, launch_blocking
from router.protocol.announce import ready_port

READY_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 5.0
REPO_ROOT = Path(__file__).resolve().parent.parent


def child_env(**extra: str) -> dict[str, str]:
    """The environment of a process a test starts: ours, importing this checkout."""
    return {**os.environ, "PYTHONPATH": str(REPO_ROOT), **extra}


@dataclass
class BackendProcess:
    """A backend started by ``backend_processes``: its process and the port it announced."""

    proc: BlockingProcess[int]

    @property
    def port(self) -> int:
        return self.proc.ready

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def kill(self) -> None:
        """SIGKILL, and reap it (bounded)."""
        self.proc.kill()
        self.proc.wait(timeout=READY_TIMEOUT_S)


@contextlib.contextmanager
def backend_processes(module: str) -> Iterator[Callable[..., BackendProcess]]:
    """A factory: ``start(*args)`` runs ``python -m MODULE --port 0 ARGS`` and waits for its
    ``READY <port>`` line; every process started is stopped on exit."""
    started: list[BlockingProcess[int]] = []

    def start(*args: str) -> BackendProcess:
        process = launch_blocking(
            [sys.executable, "-m", module, "--port", "0", *args], ready_port,
            cwd=REPO_ROOT, env=child_env(), ready_timeout_s=READY_TIMEOUT_S,
        )
        started.append(process)
        return BackendProcess(process)

    try:
        yield start
    finally:
        for process in started:
            process.stop(STOP_TIMEOUT_S)
