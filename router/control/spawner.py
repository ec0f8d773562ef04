"""Starts the processes the config asks for (backends with a ``command``; the supervisor's
router processes), and stops them on exit.

Each one must print ``READY <port>`` on stdout once it listens (``launcher.ready_port``), so
``--port 0`` lets it choose a free port; its whole stdout goes to a log file named after its
pid. These processes are started once and stopped with the router; the replica manager
(``control.instances``) is what checks, restarts and scales processes.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from router.control.launcher import READY_TIMEOUT_S, STOP_TIMEOUT_S, LaunchedProcess, launch
from router.protocol.announce import ready_port


@dataclass(frozen=True, eq=False)
class SpawnedProcess:
    process: LaunchedProcess[int]

    @property
    def port(self) -> int:
        """The port it announced."""
        return self.process.ready

    def statistics(self) -> dict[str, Any]:
        return {**self.process.statistics(), "port": self.port}


class Spawner:
    def __init__(self, log_dir: Path | None = None,
                 ready_timeout_s: float = READY_TIMEOUT_S) -> None:
        self._log_dir = log_dir
        self._ready_timeout_s = ready_timeout_s
        self._processes: list[SpawnedProcess] = []

    def _log_path(self) -> Callable[[int], Path] | None:
        log_dir = self._log_dir
        return None if log_dir is None else (lambda pid: log_dir / f"backend-{pid}.log")

    async def spawn(self, argv: list[str]) -> SpawnedProcess:
        """Start ``argv`` and wait for its ``READY <port>``; ``SpawnError`` if it never comes."""
        process = await launch(
            argv, ready_port, log_path=self._log_path(), ready_timeout_s=self._ready_timeout_s,
            new_session=True,  # a Ctrl-C on the router's terminal is the router's to handle
        )
        spawned = SpawnedProcess(process)
        self._processes.append(spawned)
        return spawned

    async def stop(self, spawned: SpawnedProcess, timeout_s: float = STOP_TIMEOUT_S) -> None:
        """SIGTERM one process (its backend has left the registry); SIGKILL after
        ``timeout_s``."""
        if spawned in self._processes:
            self._processes.remove(spawned)
        await spawned.process.stop(timeout_s)

    async def stop_all(self, timeout_s: float = STOP_TIMEOUT_S) -> None:
        """SIGTERM every process at once; each gets ``timeout_s`` before SIGKILL."""
        await asyncio.gather(*(p.process.stop(timeout_s) for p in self._processes))
        self._processes.clear()

    def kill_now(self) -> None:
        """SIGKILL every process still running, without waiting (a forced exit)."""
        for spawned in self._processes:
            spawned.process.kill()

    def statistics(self) -> list[dict[str, Any]]:
        return [p.statistics() for p in self._processes]

    def __repr__(self) -> str:
        return f"Spawner(processes={len(self._processes)}, pid={os.getpid()})"
