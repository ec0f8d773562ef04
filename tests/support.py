"""Helpers shared by test modules that start real processes."""

from __future__ import annotations

import contextlib
import os
import selectors
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

READY_TIMEOUT_S = 10.0
REPO_ROOT = Path(__file__).resolve().parent.parent


def wait_ready(proc: subprocess.Popen[bytes], timeout_s: float = READY_TIMEOUT_S) -> int:
    """Wait for a backend's ``READY <port>`` line (an event, not port polling); return the port."""
    assert proc.stdout is not None
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        if not sel.select(timeout=timeout_s):
            raise TimeoutError(f"backend not READY within {timeout_s} s")
    line = proc.stdout.readline().decode()
    parts = line.split()
    if len(parts) != 2 or parts[0] != "READY" or not parts[1].isdigit():
        raise RuntimeError(f"backend printed {line!r} instead of READY <port>")
    return int(parts[1])


@dataclass
class BackendProcess:
    """A backend started by ``backend_processes``: its process and the port it announced."""

    proc: subprocess.Popen[bytes]
    port: int

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def kill(self) -> None:
        """SIGKILL, and reap it (bounded)."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=READY_TIMEOUT_S)


def stop_process(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM, then SIGKILL if it has not exited within 5 s; always reaped."""
    if proc.poll() is None:
        proc.terminate()
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=5)
    if proc.stdout is not None:
        proc.stdout.close()


@contextlib.contextmanager
def backend_processes(module: str) -> Iterator[Callable[..., BackendProcess]]:
    """A factory: ``start(*args)`` runs ``python -m MODULE --port 0 ARGS`` and waits for its
    ``READY <port>`` line; every process started is stopped on exit."""
    started: list[subprocess.Popen[bytes]] = []
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}

    def start(*args: str) -> BackendProcess:
        proc = subprocess.Popen(
            [sys.executable, "-m", module, "--port", "0", *args],
            stdout=subprocess.PIPE, cwd=REPO_ROOT, env=env,
        )
        started.append(proc)
        return BackendProcess(proc, wait_ready(proc))

    try:
        yield start
    finally:
        for proc in started:
            stop_process(proc)
