"""Active health checks and pool upkeep, one pass per backend per ``probe_interval_s``.

Each pass (``check_backend``):
1. expires idle connections past ``idle_timeout_s`` / ``max_lifetime_s`` (the probes below do
   not count as use, so a connection that only carries probes still times out);
2. probes the remaining idle connections (``probe = "frame"``: a zero-length frame must come
   back as a zero-length frame); a failed probe closes that connection;
3. for a backend marked down, dials a fresh connection (and, in frame mode, probes it); success
   brings the backend back into rotation.

``check_backend`` is a plain coroutine so tests drive it with an injected clock; ``run`` is the
periodic loop the application owns.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Literal

from router.core.errors import BackendError
from router.dispatch.backends import Backend, Registry
from router.upstream.pool import Connection, Pool, request

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ProbeSettings:
    mode: Literal["frame", "connect"] = "frame"
    interval_s: float = 2.0
    timeout_s: float = 1.0


class HealthChecker:
    def __init__(self, registry: Registry, settings: ProbeSettings) -> None:
        self._registry = registry
        self._settings = settings
        self.probes_sent = 0
        self.probes_failed = 0
        self.marked_up = 0

    async def run(self) -> None:
        """Check every backend each interval, until cancelled."""
        while True:
            await self.check_all()
            await asyncio.sleep(self._settings.interval_s)

    async def check_all(self) -> None:
        async with asyncio.TaskGroup() as group:
            for backend in self._registry:
                group.create_task(self.check_backend(backend))

    async def check_backend(self, backend: Backend) -> None:
        pool = backend.pool
        if pool is None:
            return  # not a frame backend: the gRPC prober's
        pool.expire()
        if self._settings.mode == "frame":
            slots = pool.take_idle_for_probe()
            try:
                while slots:
                    healthy = await self._probe(slots[-1].connection)
                    pool.return_probed(slots.pop(), healthy=healthy)
            except BaseException:
                # Cancelled mid-probe (shutdown): the slots taken out must not leak.
                for slot in slots:
                    pool.return_probed(slot, healthy=False)
                raise
        if not backend.healthy and await self._revive(pool):
            backend.mark_up()
            self.marked_up += 1
            log.info("backend %s is back in rotation", backend.address)

    async def _revive(self, pool: Pool) -> bool:
        try:
            slot = await pool.acquire()
        except BackendError:
            return False
        try:
            healthy = self._settings.mode == "connect" or await self._probe(slot.connection)
        except BaseException:
            pool.release(slot, reusable=False)
            raise
        pool.release(slot, reusable=healthy)
        return healthy

    async def _probe(self, connection: Connection) -> bool:
        self.probes_sent += 1
        try:
            reply = await request(connection, b"", self._settings.timeout_s)
        except BackendError:
            self.probes_failed += 1
            return False
        if reply:
            self.probes_failed += 1
            connection.close()
            return False
        return True

    def statistics(self) -> dict[str, int]:
        return {
            "probes_sent": self.probes_sent,
            "probes_failed": self.probes_failed,
            "marked_up": self.marked_up,
        }

    def __repr__(self) -> str:
        return f"HealthChecker({self._settings.mode}, every {self._settings.interval_s}s)"
