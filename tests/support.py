"""Helpers shared by test modules that start real processes."""

from __future__ import annotations

import selectors
import subprocess

READY_TIMEOUT_S = 10.0


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
