"""Probers for frame (TCP) backends, over each backend's connection pool.

Each pass, for every frame backend, ``plan``:

1. expires idle connections past ``idle_timeout_s`` / ``max_lifetime_s`` (the probes below do
   not count as use, so a connection that only carries probes still times out);
2. picks the backends to probe: every backend out of rotation, and (``FrameProber``) every
   backend with idle connections. A backend in rotation with nothing idle is not dialled just
   to be probed: its requests are its health check.

``probe``, for a backend in rotation (``FrameProber`` only), sends a zero-length frame over each
idle connection, which must come back as a zero-length frame; a connection that fails is
closed. For a backend out of rotation it dials a fresh connection (``FrameProber``: and probes
it); success is SERVING, and the connection is kept for use.
"""

from __future__ import annotations

from collections.abc import Sequence

from router.core.errors import BackendError
from router.dispatch.backends import Backend
from router.health.probe import ProbeResult
from router.upstream.pool import Connection, Pool, request


class _PoolProber:
    """What both probers share: pool upkeep in ``plan``, and reviving a backend out of
    rotation by taking a connection from its pool (a fresh dial: going down closed the idle
    ones) and checking it (``_check``)."""

    probes_idle = False  # whether a backend in rotation with idle connections is probed
    serving_reason = ""

    async def plan(self, backends: Sequence[Backend]) -> Sequence[Backend]:
        due = []
        for backend in backends:
            pool = _pool(backend)
            pool.expire()
            if not backend.healthy or (self.probes_idle and _has_idle(pool)):
                due.append(backend)
        return due

    async def probe(self, backend: Backend) -> ProbeResult:
        return await self._revive(_pool(backend))

    async def _revive(self, pool: Pool) -> ProbeResult:
        try:
            slot = await pool.acquire()
        except BackendError as exc:
            return ProbeResult.no_answer(f"connect failed: {exc.message}")
        try:
            failure = await self._check(slot.connection)
        except BaseException:
            pool.release(slot, reusable=False)
            raise
        pool.release(slot, reusable=failure is None)
        if failure is not None:
            return ProbeResult.no_answer(failure)
        return ProbeResult.serving(self.serving_reason)

    async def _check(self, connection: Connection) -> str | None:
        """What is wrong with ``connection``; None: nothing."""
        return None


class ConnectProber(_PoolProber):
    """probe = "connect": a backend out of rotation is back once a connection opens."""

    serving_reason = "accepted a connection"

    def __repr__(self) -> str:
        return "ConnectProber()"


class FrameProber(_PoolProber):
    """probe = "frame": a zero-length frame must come back as a zero-length frame."""

    probes_idle = True
    serving_reason = "answered a frame probe"

    def __init__(self, timeout_s: float) -> None:
        self._timeout_s = timeout_s

    async def probe(self, backend: Backend) -> ProbeResult:
        pool = _pool(backend)
        result = await self._probe_idle(pool)
        if backend.healthy:
            return result
        return await self._revive(pool)

    async def _probe_idle(self, pool: Pool) -> ProbeResult:
        """Probe every idle connection; the first failure is the result."""
        failures: list[str] = []
        slots = pool.take_idle_for_probe()
        try:
            while slots:
                failure = await self._check(slots[-1].connection)
                pool.return_probed(slots.pop(), healthy=failure is None)
                if failure is not None:
                    failures.append(failure)
        except BaseException:
            # Cancelled mid-probe (shutdown): the slots taken out must not leak.
            for slot in slots:
                pool.return_probed(slot, healthy=False)
            raise
        if failures:
            return ProbeResult.no_answer(failures[0])
        return ProbeResult.serving(self.serving_reason)

    async def _check(self, connection: Connection) -> str | None:
        try:
            reply = await request(connection, b"", self._timeout_s)
        except BackendError as exc:
            return f"frame probe failed: {exc.message}"
        if reply:
            connection.close()
            return f"frame probe answered {len(reply)} bytes instead of none"
        return None

    def __repr__(self) -> str:
        return f"FrameProber(timeout_s={self._timeout_s})"


def _has_idle(pool: Pool) -> bool:
    # Read once per backend per pass, off the hot path: the pool's public count is enough.
    idle: int = pool.statistics()["idle"]
    return idle > 0


def _pool(backend: Backend) -> Pool:
    """A frame backend's pool (the monitor hands these probers only frame backends)."""
    pool = backend.pool
    assert pool is not None, f"{backend.address} has no frame pool"
    return pool
