"""Starts backend processes the config asks for, and stops them on exit.

A spawned backend must print ``READY <port>`` on stdout once it listens; the spawner waits for
that line (no port polling), so ``--port 0`` lets the backend choose a free port. Each process's
remaining output goes to a log file. This is the seed of the replica manager.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from router.core.errors import SpawnError, quoted

log = logging.getLogger(__name__)


@dataclass(eq=False)
class SpawnedProcess:
    argv: list[str]
    process: asyncio.subprocess.Process
    port: int
    log_file: IO[bytes] | None

    def statistics(self) -> dict[str, Any]:
        return {"argv": self.argv, "pid": self.process.pid, "port": self.port,
                "returncode": self.process.returncode}


class Spawner:
    def __init__(self, log_dir: Path | None = None, ready_timeout_s: float = 20.0) -> None:
        self._log_dir = log_dir
        self._ready_timeout_s = ready_timeout_s
        self._processes: list[SpawnedProcess] = []
        self._relays: set[asyncio.Task[None]] = set()

    async def spawn(self, argv: list[str]) -> SpawnedProcess:
        process = await asyncio.create_subprocess_exec(
            *argv,
            stdout=asyncio.subprocess.PIPE,
            stdin=asyncio.subprocess.DEVNULL,
            start_new_session=True,  # a Ctrl-C on the router's terminal is the router's to handle
        )
        assert process.stdout is not None
        try:
            async with asyncio.timeout(self._ready_timeout_s):
                line = await process.stdout.readline()
        except TimeoutError:
            process.kill()
            await process.wait()
            limit = self._ready_timeout_s
            raise SpawnError(f"{argv} did not print READY within {limit}s") from None
        words = line.decode(errors="replace").split()
        if len(words) != 2 or words[0] != "READY" or not words[1].isdigit():
            process.kill()
            await process.wait()
            raise SpawnError(f"{argv} exited or printed {quoted(line)} instead of 'READY <port>'")
        log_file = None
        if self._log_dir is not None:
            self._log_dir.mkdir(parents=True, exist_ok=True)
            log_file = (self._log_dir / f"backend-{process.pid}.log").open("ab")
        spawned = SpawnedProcess(argv, process, int(words[1]), log_file)
        relay = asyncio.create_task(self._relay_output(spawned))
        self._relays.add(relay)
        relay.add_done_callback(self._relays.discard)
        self._processes.append(spawned)
        return spawned

    async def _relay_output(self, spawned: SpawnedProcess) -> None:
        stream = spawned.process.stdout
        assert stream is not None
        while line := await stream.readline():
            if spawned.log_file is not None:
                spawned.log_file.write(line)
                spawned.log_file.flush()

    async def stop_all(self, timeout_s: float = 5.0) -> None:
        for spawned in self._processes:
            if spawned.process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    spawned.process.send_signal(signal.SIGTERM)
        for spawned in self._processes:
            try:
                async with asyncio.timeout(timeout_s):
                    await spawned.process.wait()
            except TimeoutError:
                log.warning("backend pid %d ignored SIGTERM; killing", spawned.process.pid)
                with contextlib.suppress(ProcessLookupError):
                    spawned.process.kill()
                await spawned.process.wait()
            if spawned.log_file is not None:
                spawned.log_file.close()
        for relay in list(self._relays):
            relay.cancel()
        await asyncio.gather(*self._relays, return_exceptions=True)
        self._processes.clear()

    def kill_now(self) -> None:
        """SIGKILL every process still running, without waiting (a forced exit)."""
        for spawned in self._processes:
            if spawned.process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    spawned.process.kill()

    def statistics(self) -> list[dict[str, Any]]:
        return [p.statistics() for p in self._processes]

    def __repr__(self) -> str:
        return f"Spawner(processes={len(self._processes)}, pid={os.getpid()})"
