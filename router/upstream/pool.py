"""The frame pool: the ``Upstream`` of a length-prefixed backend.

The shape follows asyncpg's pool and httpcore's "decide synchronously, then do I/O":

* Idle connections sit in a LIFO stack, so hot connections are reused and surplus ones age out.
* Every slot carries two stamps: ``created_at`` (for ``max_lifetime_s``) and ``idle_since``
  (for ``idle_timeout_s``). Both are checked lazily when a slot is taken or returned, and
  eagerly by ``expire()``, which the health monitor calls each pass. A health probe does *not*
  refresh ``idle_since``: a connection that only ever carries probes is still idle.
* A connection past ``max_lifetime_s`` finishes the requests it carries and is closed when
  returned, instead of being reused.
* ``open`` counts idle, borrowed and being-dialled connections together and never exceeds
  ``max_connections``.
* Pipelining: a connection carries up to ``pipeline_depth`` requests at once (answers come back
  in order, so the connection matches them FIFO). A connection that already carries requests
  and has room is lent before an idle one, so requests arriving together share a connection
  and go out in one write; on loopback that halves the router's syscalls per request.
  ``pipeline_depth = 1`` lends each connection exclusively.
* The depth follows demand: when requests wait and every connection ``max_connections``
  allows is open or being dialled, ``grow`` deepens every connection to what carries the
  requests lent and waiting, up to ``max_pipeline_depth``; each health pass (``expire``)
  brings it back towards ``pipeline_depth`` as demand falls. So 10,000 clients on two
  backends with the default 64 connections each go out at once (64 x 79 per backend) instead
  of 6,000 of them parking on the scheduler's queue, while light load keeps shallow
  pipelines. A connection filled to a deeper depth takes no new request until it is below
  the current one (``Slot.shared`` says whether it is in the lending list, whatever the depth
  was when it got there).

The pool never makes a borrower wait: ``try_acquire`` lends now or returns None, and the
scheduler keeps the waiting requests. ``grow`` dials in tasks the pool owns; each dial that
finishes or fails, each probed connection put back and each connection closed by ``expire``
is reported through ``on_room`` (see ``router.upstream.base``).

The network is injected as ``dial``, so the pool is tested against fake connections.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

from router.core.clock import Clock
from router.core.config import PoolConfig
from router.core.errors import BackendError, BackendUnavailable
from router.upstream.base import Attempt, ReplySink, RoomListener


class Connection(Protocol):
    """What a dialer returns: requests go out in order and their answers come back in order."""

    is_closed: bool  # read twice per request by the pool: an attribute, not a property

    def send(self, payload: bytes, sink: ReplySink, token: Any, timeout_s: float) -> None:
        """Send one frame; ``sink(token, ...)`` is called exactly once with its answer or a
        ``BackendError``, possibly before ``send`` returns (connection already closed)."""
        ...

    def close(self) -> None: ...


Dialer = Callable[[], Awaitable[Connection]]


def request(connection: Connection, payload: bytes, timeout_s: float) -> asyncio.Future[bytes]:
    """``send`` as a future, for callers off the hot path (health probes, tests)."""
    future: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
    connection.send(payload, _settle, future, timeout_s)
    return future


def _settle(future: asyncio.Future[bytes], response: bytes | None,
            error: BackendError | None) -> None:
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        assert response is not None
        future.set_result(response)


@dataclass(eq=False, slots=True)
class Slot:
    connection: Connection
    created_at: float
    idle_since: float
    generation: int
    uses: int = 0
    active: int = 0  # requests in flight on this connection
    retiring: bool = False  # takes no new requests; closed once ``active`` reaches 0
    shared: bool = False  # in the pool's list of busy connections with room


def effective_max_depth(config: PoolConfig) -> int:
    """How deep a pool's connections may pipeline under demand: ``max_pipeline_depth``, never
    below ``pipeline_depth``; 1 when ``pipeline_depth`` is 1 (a backend that takes one
    request at a time is never pipelined)."""
    if config.pipeline_depth == 1:
        return 1
    return max(config.pipeline_depth, config.max_pipeline_depth)


class Pool:
    def __init__(self, dial: Dialer, config: PoolConfig, clock: Clock, name: str = "") -> None:
        self._dial = dial
        self._config = config
        self._base_depth = config.pipeline_depth
        self._max_depth = effective_max_depth(config)
        self._depth = self._base_depth  # the current depth: base..max, following demand
        self._lent = 0  # requests in flight over every connection
        self._demand = 0  # the most requests lent and waiting seen since the last ``expire``
        self._max = config.max_connections
        self._clock = clock
        self._name = name
        self._idle: list[Slot] = []  # active == 0, most recently used last
        self._sharing: list[Slot] = []  # 0 < active < depth, most recently lent last
        self._open = 0
        self._dialing = 0
        self._dials: set[asyncio.Task[None]] = set()  # owned: cancelled by close()
        self._generation = 0
        self._closed = False
        self.on_room: RoomListener | None = None
        self._counts = {
            "dialed": 0,
            "dial_failed": 0,
            "closed_idle_timeout": 0,
            "closed_max_lifetime": 0,
            "closed_broken": 0,
            "closed_for_fresh": 0,
        }

    def reconfigure(self, config: PoolConfig) -> None:
        """New limits and timeouts (a reload), for the dials and expiry checks from now on.
        ``pipeline_depth`` stays: the connections open now were filled to the old one."""
        self._config = config
        self._max = config.max_connections
        self._room(None)  # a higher limit may let waiting requests dial

    # -- lending ----------------------------------------------------------------------------

    def try_acquire(self) -> Slot | None:
        """A live slot with room (one already carrying requests first, then the most recently
        used idle one), or None. Never awaits."""
        now = self._clock.now()
        sharing = self._sharing
        while sharing:
            slot = sharing[-1]
            reason = self._expiry_reason(slot, now, idle_check=False)
            if reason is not None or slot.active >= self._depth:  # full at a shallower depth
                sharing.pop()
                slot.shared = False
                if reason is not None:
                    self._start_retiring(slot, reason)
                continue
            slot.active += 1
            slot.uses += 1
            self._lent += 1
            if slot.active >= self._depth:
                sharing.pop()
                slot.shared = False
            return slot
        while self._idle:
            slot = self._idle.pop()
            reason = self._expiry_reason(slot, now)
            if reason is None:
                self._lend(slot)
                return slot
            self._retire(slot, reason)
        return None

    def start(self, lease: Slot, request: Attempt, sink: ReplySink, timeout_s: float) -> None:
        lease.connection.send(request.payload, sink, request, timeout_s)

    def grow(self, wanted: int) -> None:
        """Dial enough connections for ``wanted`` waiting requests at ``pipeline_depth`` each,
        less those already being dialled, within ``max_connections``. With no connection up
        (a cold pool, or a backend that may be down) one dial goes first: a dead backend then
        costs one refused connect per failure counted, not a burst of them."""
        if self._closed:
            return
        room = self._max - self._open
        demand = self._lent + wanted
        if demand > self._demand:
            self._demand = demand
        if room <= 0 and self._depth < self._max_depth and self._dialing == 0:
            # Every connection is up and none is coming: carry the demand deeper on them.
            self._depth = min(self._max_depth, max(self._depth, -(-demand // self._max)))
        if self._open == self._dialing:
            room = min(room, 1 - self._dialing)
        needed = -(-wanted // self._depth) - self._dialing
        loop = asyncio.get_running_loop()
        for _ in range(min(needed, room)):
            self._open += 1
            self._dialing += 1
            task = loop.create_task(self._dial_in_background())
            self._dials.add(task)
            task.add_done_callback(self._dials.discard)

    @property
    def stalled(self) -> bool:
        return self._open == 0

    @property
    def closed(self) -> bool:
        return self._closed

    async def acquire(self) -> Slot:
        """A slot now, or a newly dialled one, for callers off the hot path (the health
        monitor reviving a backend). Raises ``BackendUnavailable`` if the pool is closed,
        full, or the dial fails."""
        slot = self.try_acquire()
        if slot is not None:
            return slot
        if self._closed or self._open >= self._max:
            raise BackendUnavailable(f"pool {self._name} has no room")
        self._open += 1
        self._dialing += 1
        try:
            slot = await self._dial_slot()
        except BackendUnavailable:
            self._room(None)  # capacity to dial again
            raise
        self._lend(slot)
        return slot

    def start_fresh(self, request: Attempt, sink: ReplySink, timeout_s: float) -> bool:
        """Dial a connection for ``request`` and send it there first: for a request whose
        reused connection the backend closed before answering it (an idle connection may be
        closing just the same). At ``max_connections`` the oldest idle connection, a spare, is
        closed to make room; False when there is none (or the pool is closed)."""
        if self._closed:
            return False
        if self._open >= self._max:
            if not self._idle:
                return False
            self._retire(self._idle.pop(0), "closed_for_fresh")
        self._open += 1
        self._dialing += 1
        task = asyncio.get_running_loop().create_task(self._send_fresh(request, sink, timeout_s))
        self._dials.add(task)
        task.add_done_callback(self._dials.discard)
        return True

    async def _send_fresh(self, request: Attempt, sink: ReplySink, timeout_s: float) -> None:
        try:
            slot = await self._dial_slot()
        except BackendUnavailable as exc:
            self._room(None)  # capacity to dial again
            sink(request, None, exc)
            return
        except asyncio.CancelledError:
            sink(request, None, BackendUnavailable(f"pool {self._name} closed"))
            raise
        self._lend(slot)
        request.lease = slot
        slot.connection.send(request.payload, sink, request, timeout_s)
        self._room(None)  # room beyond this request, with pipelining

    async def _dial_in_background(self) -> None:
        try:
            slot = await self._dial_slot()
        except BackendUnavailable as exc:
            self._room(exc)
            return
        if self._closed:
            self._open -= 1
            slot.connection.close()
        else:
            self._idle.append(slot)
        self._room(None)

    async def _dial_slot(self) -> Slot:
        """Dial one connection already counted in ``open`` and ``dialing``."""
        try:
            async with asyncio.timeout(self._config.connect_timeout_s):
                connection = await self._dial()
        except BaseException as exc:
            self._open -= 1
            if isinstance(exc, asyncio.CancelledError):
                raise  # closed while dialling: not the backend's failure
            self._counts["dial_failed"] += 1
            if isinstance(exc, TimeoutError):
                timeout = self._config.connect_timeout_s
                raise BackendUnavailable(
                    f"connect to {self._name} timed out after {timeout}s"
                ) from None
            if isinstance(exc, OSError):
                raise BackendUnavailable(f"connect to {self._name} failed: {exc}") from None
            raise
        finally:
            self._dialing -= 1
        self._counts["dialed"] += 1
        now = self._clock.now()
        return Slot(connection, created_at=now, idle_since=now, generation=self._generation)

    def connection_failed(self, error: BackendError) -> None:
        """A connection failed with no request on it (an idle one whose backend sent bytes
        nobody asked for): counted against the backend as a failed dial is. The slot itself is
        retired when next taken (it reads ``is_closed``)."""
        self._room(error)

    def can_dial(self) -> bool:
        """Whether a new connection may be opened now (``open`` below ``max_connections``)."""
        return not self._closed and self._open < self._max

    def _room(self, error: BackendError | None) -> None:
        if self.on_room is not None:
            self.on_room(error)

    def _lend(self, slot: Slot) -> None:
        """``slot`` had no requests in flight; it now carries one."""
        slot.active = 1
        slot.uses += 1
        self._lent += 1
        if self._depth > 1:
            self._sharing.append(slot)
            slot.shared = True

    # -- returning --------------------------------------------------------------------------

    def release(self, slot: Slot, *, reusable: bool = True) -> None:
        """Give back one request's share of a slot. A broken, stale or non-reusable connection
        takes no new requests and is closed once the requests still on it are answered."""
        slot.active -= 1
        self._lent -= 1
        if slot.retiring:
            if slot.active == 0:
                self._retire(slot, None)
            return
        if not reusable or slot.connection.is_closed:
            self._unshare(slot)
            self._start_retiring(slot, "closed_broken")
            if slot.active:
                slot.connection.close()  # fails whatever else it carries: they retry elsewhere
            return
        now = self._clock.now()
        reason = self._expiry_reason(slot, now, idle_check=False)
        if reason is not None:
            self._unshare(slot)
            self._start_retiring(slot, reason)
            return
        if slot.active == 0:
            self._unshare(slot)
            slot.idle_since = now
            self._keep_idle(slot)
        elif not slot.shared and slot.active < self._depth:
            self._sharing.append(slot)  # it was full and has room again
            slot.shared = True

    def return_probed(self, slot: Slot, *, healthy: bool) -> None:
        """Put back a slot taken by ``take_idle_for_probe``, keeping its idle stamp."""
        if not healthy or slot.connection.is_closed:
            self._retire(slot, "closed_broken")
        else:
            self._keep_idle(slot)
        self._room(None)

    def _keep_idle(self, slot: Slot) -> None:
        if self._closed:
            self._retire(slot, "closed_broken")
        else:
            self._idle.append(slot)

    def _unshare(self, slot: Slot) -> None:
        if slot.shared:
            self._sharing.remove(slot)
            slot.shared = False

    def _start_retiring(self, slot: Slot, reason: str) -> None:
        """No new requests on ``slot``; close it now if it carries none."""
        slot.retiring = True
        self._counts[reason] = self._counts.get(reason, 0) + 1
        if slot.active == 0:
            self._retire(slot, None)

    def _retire(self, slot: Slot, reason: str | None) -> None:
        """Close an unused slot and free its capacity (``reason`` None: already counted)."""
        self._open -= 1
        if reason is not None:
            self._counts[reason] = self._counts.get(reason, 0) + 1
        slot.connection.close()

    def _expiry_reason(self, slot: Slot, now: float, *, idle_check: bool = True) -> str | None:
        if slot.connection.is_closed or slot.generation != self._generation:
            return "closed_broken"
        if now - slot.created_at >= self._config.max_lifetime_s:
            return "closed_max_lifetime"
        if idle_check and now - slot.idle_since >= self._config.idle_timeout_s:
            return "closed_idle_timeout"
        return None

    # -- maintenance ------------------------------------------------------------------------

    def expire(self) -> int:
        """Close idle slots past their idle timeout or lifetime, and stop lending busy ones past
        their lifetime; return how many idle slots were closed."""
        now = self._clock.now()
        keep: list[Slot] = []
        expired = 0
        for slot in self._idle:
            reason = self._expiry_reason(slot, now)
            if reason is None:
                keep.append(slot)
            else:
                expired += 1
                self._retire(slot, reason)
        self._idle = keep
        for slot in list(self._sharing):
            reason = self._expiry_reason(slot, now, idle_check=False)
            if reason is not None:
                self._unshare(slot)
                self._start_retiring(slot, reason)
        self._settle_depth()
        if expired:
            self._room(None)  # capacity to dial
        return expired

    def _settle_depth(self) -> None:
        """Bring the depth back to what the demand since the last pass needed (at least
        ``pipeline_depth``), and start counting that demand afresh."""
        demand = max(self._demand, self._lent)
        self._demand = self._lent
        wanted = max(self._base_depth, -(-demand // self._max))
        if wanted < self._depth:
            self._depth = wanted

    def take_idle_for_probe(self) -> list[Slot]:
        """Remove and return every idle slot, for probing; give each back with
        ``return_probed``."""
        taken, self._idle = self._idle, []
        return taken

    def expire_all(self) -> None:
        """Retire every connection: idle ones now, busy ones once their requests are answered."""
        self._generation += 1
        self.expire()

    def close(self) -> None:
        self._closed = True
        for task in self._dials:
            task.cancel()
        self.expire_all()
        self._room(None)

    # -- introspection ----------------------------------------------------------------------

    def statistics(self) -> dict[str, Any]:
        return {
            "open": self._open,
            "idle": len(self._idle),
            "borrowed": self._open - len(self._idle) - self._dialing,
            "sharing": len(self._sharing),
            "dialing": self._dialing,
            "max_connections": self._max,
            "pipeline_depth": self._depth,
            "max_pipeline_depth": self._max_depth,
            "in_flight": self._lent,
            **self._counts,
        }

    def __repr__(self) -> str:
        return (
            f"Pool({self._name!r}, open={self._open}, idle={len(self._idle)}, "
            f"max={self._max}, depth={self._depth})"
        )
