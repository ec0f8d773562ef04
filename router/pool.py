"""A per-backend connection pool.

The shape follows asyncpg's pool and httpcore's "decide synchronously, then do I/O":

* Idle connections sit in a LIFO stack, so hot connections are reused and surplus ones age out.
* Every slot carries two stamps: ``created_at`` (for ``max_lifetime_s``) and ``idle_since``
  (for ``idle_timeout_s``). Both are checked lazily when a slot is taken or returned, and
  eagerly by ``expire()``, which the health checker calls each probe interval. A health probe
  does *not* refresh ``idle_since``: a connection that only ever carries probes is still idle.
  (The C++ router this replaces reset both stamps on every probe and release, so neither limit
  ever fired.)
* A connection past ``max_lifetime_s`` finishes the request it is carrying and is closed when
  returned, instead of being reused.
* ``open`` counts idle, borrowed and being-dialled connections together and never exceeds
  ``max_connections``; when it is reached, borrowers queue as waiters and are handed a slot
  (or the right to dial) when one comes back.

The network is injected as ``dial``, so the pool is tested against fake connections.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

from router.clock import Clock
from router.errors import BackendUnavailable


class Connection(Protocol):
    """What a dialer returns: one exclusive request/response exchange at a time."""

    @property
    def is_closed(self) -> bool: ...

    def request(self, payload: bytes, timeout_s: float) -> asyncio.Future[bytes]:
        """Send one frame; the future resolves to the response payload or fails with a
        ``BackendError``."""
        ...

    def close(self) -> None: ...


Dialer = Callable[[], Awaitable[Connection]]


@dataclass(eq=False, slots=True)
class Slot:
    connection: Connection
    created_at: float
    idle_since: float
    generation: int
    uses: int = 0


@dataclass(frozen=True, slots=True)
class PoolLimits:
    max_connections: int = 64
    connect_timeout_s: float = 2.0
    idle_timeout_s: float = 60.0
    max_lifetime_s: float = 600.0


class Pool:
    def __init__(self, dial: Dialer, limits: PoolLimits, clock: Clock, name: str = "") -> None:
        self._dial = dial
        self._limits = limits
        self._clock = clock
        self._name = name
        self._idle: list[Slot] = []
        self._open = 0
        self._dialing = 0
        # A waiter resolves to a Slot handed over directly, or None: "capacity freed, dial".
        self._waiters: deque[asyncio.Future[Slot | None]] = deque()
        self._generation = 0
        self._closed = False
        self._counts = {
            "dialed": 0,
            "dial_failed": 0,
            "closed_idle_timeout": 0,
            "closed_max_lifetime": 0,
            "closed_broken": 0,
        }

    # -- borrowing --------------------------------------------------------------------------

    def acquire_nowait(self) -> Slot | None:
        """The most recently used live idle slot, or None. Never awaits."""
        now = self._clock.now()
        while self._idle:
            slot = self._idle.pop()
            reason = self._expiry_reason(slot, now)
            if reason is None:
                slot.uses += 1
                return slot
            self._retire(slot, reason)
        return None

    async def acquire(self) -> Slot:
        """A slot: idle, newly dialled, or handed back by another borrower.

        Raises ``BackendUnavailable`` if dialling fails or times out. Waiting for a free slot
        is bounded by the caller (the dispatcher's request deadline cancels it).
        """
        while True:
            slot = self.acquire_nowait()
            if slot is not None:
                return slot
            if self._closed:
                raise BackendUnavailable(f"pool {self._name} is closed")
            if self._open < self._limits.max_connections:
                return await self._dial_slot()
            waiter: asyncio.Future[Slot | None] = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            try:
                handed = await waiter
            except asyncio.CancelledError:
                if waiter.done() and not waiter.cancelled():
                    self._pass_on(waiter.result())
                raise
            if handed is not None:
                handed.uses += 1
                return handed

    async def _dial_slot(self) -> Slot:
        self._open += 1
        self._dialing += 1
        try:
            async with asyncio.timeout(self._limits.connect_timeout_s):
                connection = await self._dial()
        except BaseException as exc:
            self._open -= 1
            self._counts["dial_failed"] += 1
            self._pass_on(None)
            if isinstance(exc, TimeoutError):
                raise BackendUnavailable(
                    f"connect to {self._name} timed out after {self._limits.connect_timeout_s}s"
                ) from None
            if isinstance(exc, OSError):
                raise BackendUnavailable(f"connect to {self._name} failed: {exc}") from None
            raise
        finally:
            self._dialing -= 1
        self._counts["dialed"] += 1
        now = self._clock.now()
        return Slot(connection, created_at=now, idle_since=now, generation=self._generation, uses=1)

    # -- returning --------------------------------------------------------------------------

    def release(self, slot: Slot, *, reusable: bool = True) -> None:
        """Return a borrowed slot. A broken, stale or non-reusable connection is closed."""
        now = self._clock.now()
        if not reusable or slot.connection.is_closed:
            self._retire(slot, "closed_broken")
            return
        reason = self._expiry_reason(slot, now, idle_check=False)
        if reason is not None:
            self._retire(slot, reason)
            return
        slot.idle_since = now
        self._pass_on(slot)

    def return_probed(self, slot: Slot, *, healthy: bool) -> None:
        """Put back a slot taken by ``take_idle_for_probe``, keeping its idle stamp."""
        if not healthy or slot.connection.is_closed:
            self._retire(slot, "closed_broken")
            return
        self._pass_on(slot, restamp=False)

    def _pass_on(self, slot: Slot | None, *, restamp: bool = True) -> None:
        """Hand a slot (or, with None, freed capacity) to the first live waiter, else keep it."""
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(slot)
                return
        if slot is not None:
            if self._closed:
                self._retire(slot, "closed_broken")
            else:
                self._idle.append(slot)

    def _retire(self, slot: Slot, reason: str) -> None:
        self._open -= 1
        self._counts[reason] = self._counts.get(reason, 0) + 1
        slot.connection.close()
        self._pass_on(None)

    def _expiry_reason(self, slot: Slot, now: float, *, idle_check: bool = True) -> str | None:
        if slot.connection.is_closed or slot.generation != self._generation:
            return "closed_broken"
        if now - slot.created_at >= self._limits.max_lifetime_s:
            return "closed_max_lifetime"
        if idle_check and now - slot.idle_since >= self._limits.idle_timeout_s:
            return "closed_idle_timeout"
        return None

    # -- maintenance ------------------------------------------------------------------------

    def expire(self) -> int:
        """Close idle slots past their idle timeout or lifetime; return how many."""
        now = self._clock.now()
        keep: list[Slot] = []
        expired = 0
        for slot in self._idle:
            reason = self._expiry_reason(slot, now)
            if reason is None:
                keep.append(slot)
            else:
                expired += 1
                self._open -= 1
                self._counts[reason] += 1
                slot.connection.close()
        self._idle = keep
        for _ in range(expired):
            self._pass_on(None)
        return expired

    def take_idle_for_probe(self) -> list[Slot]:
        """Remove and return every idle slot, for probing; give each back with
        ``return_probed``."""
        taken, self._idle = self._idle, []
        return taken

    def expire_all(self) -> None:
        """Retire every connection: idle ones now, borrowed ones when they come back."""
        self._generation += 1
        self.expire()

    def close(self) -> None:
        self._closed = True
        self.expire_all()
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)

    # -- introspection ----------------------------------------------------------------------

    def statistics(self) -> dict[str, Any]:
        return {
            "open": self._open,
            "idle": len(self._idle),
            "borrowed": self._open - len(self._idle) - self._dialing,
            "dialing": self._dialing,
            "waiters": sum(1 for w in self._waiters if not w.done()),
            "max_connections": self._limits.max_connections,
            **self._counts,
        }

    def __repr__(self) -> str:
        return (
            f"Pool({self._name!r}, open={self._open}, idle={len(self._idle)}, "
            f"max={self._limits.max_connections})"
        )
