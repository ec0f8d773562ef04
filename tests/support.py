"""Helpers for test modules that start real processes (by ``router.control.launcher``)."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from router.control.launcher import BlockingProcess, launch_blocking
from router.protocol.announce import ready_port, ready_unix_path

READY_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 5.0
REPO_ROOT = Path(__file__).resolve().parent.parent


def child_env(**extra: str) -> dict[str, str]:
    """The environment of a process a test starts: ours, importing this checkout."""
    return {**os.environ, "PYTHONPATH": str(REPO_ROOT), **extra}


@dataclass
class BackendProcess:
    """A backend started by ``backend_processes``: its process and the port (or unix socket
    path) it announced."""

    proc: BlockingProcess[int] | BlockingProcess[str]

    @property
    def port(self) -> int:
        ready = self.proc.ready
        if not isinstance(ready, int):
            raise ValueError(f"the backend listens on the unix socket {ready}: it has no port")
        return ready

    @property
    def address(self) -> str:
        ready = self.proc.ready
        return f"unix:{ready}" if isinstance(ready, str) else f"127.0.0.1:{ready}"

    def kill(self) -> None:
        """SIGKILL, and reap it (bounded)."""
        self.proc.kill()
        self.proc.wait(timeout=READY_TIMEOUT_S)


@contextlib.contextmanager
def backend_processes(module: str) -> Iterator[Callable[..., BackendProcess]]:
    """A factory: ``start(*args)`` runs ``python -m MODULE --port 0 ARGS`` and waits for its
    ``READY <port>`` line; ``start(*args, unix=PATH)`` runs it with ``--unix PATH`` instead
    and waits for ``READY unix:PATH``. Every process started is stopped on exit."""
    started: list[BlockingProcess[int] | BlockingProcess[str]] = []

    def start(*args: str, unix: Path | None = None) -> BackendProcess:
        argv = [sys.executable, "-m", module]
        process: BlockingProcess[int] | BlockingProcess[str]
        if unix is None:
            process = launch_blocking([*argv, "--port", "0", *args], ready_port, cwd=REPO_ROOT,
                                      env=child_env(), ready_timeout_s=READY_TIMEOUT_S)
        else:
            process = launch_blocking([*argv, "--unix", str(unix), *args], ready_unix_path,
                                      cwd=REPO_ROOT, env=child_env(),
                                      ready_timeout_s=READY_TIMEOUT_S)
        started.append(process)
        return BackendProcess(process)

    try:
        yield start
    finally:
        for process in started:
            process.stop(STOP_TIMEOUT_S)


# The in-process routers of the tests: loopback, free ports, short timeouts and probes.
BASE_CONFIG: dict[str, Any] = {
    "listener": {"listen": "127.0.0.1:0"},
    "admin": {"listen": "127.0.0.1:0"},
    "dispatch": {"request_timeout_s": 5.0},
    "pool": {"connect_timeout_s": 1.0},
    "health": {"interval_s": 0.5, "timeout_s": 1.0},
    # gRPC channels retry a connect at most this far apart (as the probe interval above).
    "grpc": {"reconnect_backoff_max_s": 0.5},
    "drain": {"shutdown_grace_s": 5.0, "linger_s": 0.5},
}
