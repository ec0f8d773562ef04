"""The bounded request queue and the worker coroutines that serve it.

A front door (TCP acceptor, later gRPC) turns each whole request it reads into a ``Request`` and
``submit``s it; from that moment the request is *accepted* and will be answered exactly once,
through its origin's ``request_done``. Workers take requests in FIFO order, pick a backend with
the policy, borrow a pooled connection, forward the payload and wait for the answer.

Overload: the queue has a soft bound. Reaching it tells the front doors to stop reading
(backpressure through TCP); requests already read still get queued, never discarded. A request
that waits longer than ``queue_timeout_s`` is answered OVERLOADED. One timer, armed for the
deadline of the request at the head of the queue, enforces that without a timer per request.

Retry: an attempt that fails before any response byte arrived (``BackendUnavailable``: refused,
reset, closed) is retried on a backend the request has not tried, up to ``max_retries``. A
timeout or a malformed response is not retried: the backend may have acted on the request.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from router.balance import Policy
from router.clock import Clock
from router.errors import (
    BackendError,
    BackendTimeout,
    BackendUnavailable,
    NoBackend,
    Overloaded,
    RouterError,
)
from router.metrics import DataPlaneStats
from router.registry import Backend, Registry

log = logging.getLogger(__name__)


class Origin(Protocol):
    """Where a request came from; told once when its answer is ready."""

    def request_done(self, request: Request) -> None: ...


class Request:
    __slots__ = ("accepted_at", "error", "origin", "payload", "response")

    def __init__(self, payload: bytes, origin: Origin, accepted_at: float) -> None:
        self.payload = payload
        self.origin = origin
        self.accepted_at = accepted_at
        self.response: bytes | None = None
        self.error: RouterError | None = None

    @property
    def done(self) -> bool:
        return self.response is not None or self.error is not None

    def __repr__(self) -> str:
        state = "done" if self.done else "pending"
        return f"Request({len(self.payload)} bytes, {state})"


@dataclass(frozen=True, slots=True)
class DispatchSettings:
    workers: int = 256
    queue_size: int = 4096
    queue_timeout_s: float = 5.0
    request_timeout_s: float = 30.0
    max_retries: int = 2


class RequestQueue:
    """FIFO with a soft bound; ``saturated`` flips at the bound and back at half of it."""

    def __init__(self, capacity: int, on_pressure: Callable[[bool], None]) -> None:
        self.capacity = capacity
        self._items: deque[Request] = deque()
        self._getters: deque[asyncio.Future[None]] = deque()
        self._on_pressure = on_pressure
        self.saturated = False

    def __len__(self) -> int:
        return len(self._items)

    def put(self, request: Request) -> None:
        self._items.append(request)
        while self._getters:
            getter = self._getters.popleft()
            if not getter.done():
                getter.set_result(None)
                break
        if not self.saturated and len(self._items) >= self.capacity:
            self.saturated = True
            self._on_pressure(True)

    async def get(self) -> Request:
        while not self._items:
            getter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._getters.append(getter)
            await getter
        return self.pop_head()

    def head(self) -> Request | None:
        return self._items[0] if self._items else None

    def pop_head(self) -> Request:
        """Remove the oldest request (taken by a worker, or expired)."""
        request = self._items.popleft()
        if self.saturated and len(self._items) <= self.capacity // 2:
            self.saturated = False
            self._on_pressure(False)
        return request


class Dispatcher:
    def __init__(
        self,
        registry: Registry,
        policy: Policy,
        settings: DispatchSettings,
        clock: Clock,
        stats: DataPlaneStats,
        rng: random.Random | None = None,
    ) -> None:
        self._registry = registry
        self._policy = policy
        self._settings = settings
        self._clock = clock
        self.stats = stats
        self._rng = rng or random.Random()
        self._pressure_listeners: list[Callable[[bool], None]] = []
        self.queue = RequestQueue(settings.queue_size, self._notify_pressure)
        self._expiry_timer: asyncio.TimerHandle | None = None
        self._idle_waiters: list[asyncio.Future[None]] = []

    # -- front-door side ----------------------------------------------------------------------

    def add_pressure_listener(self, listener: Callable[[bool], None]) -> None:
        """``listener(True)`` when the queue fills (stop reading), ``(False)`` when it drains."""
        self._pressure_listeners.append(listener)

    def remove_pressure_listener(self, listener: Callable[[bool], None]) -> None:
        self._pressure_listeners.remove(listener)

    @property
    def saturated(self) -> bool:
        return self.queue.saturated

    def _notify_pressure(self, saturated: bool) -> None:
        for listener in list(self._pressure_listeners):
            listener(saturated)

    def submit(self, request: Request) -> None:
        """Accept a request: it will be answered exactly once through its origin."""
        self.stats.accepted += 1
        self.stats.inflight += 1
        self.queue.put(request)
        if self._expiry_timer is None:
            self._arm_expiry(request.accepted_at)

    def finish(self, request: Request, response: bytes | None, error: RouterError | None) -> None:
        if request.done:
            return
        stats = self.stats
        if error is None:
            request.response = response
            stats.completed += 1
        else:
            request.error = error
            stats.count_error(error.code)
        stats.inflight -= 1
        stats.latency.observe(self._clock.now() - request.accepted_at)
        request.origin.request_done(request)
        if stats.inflight == 0 and self._idle_waiters:
            for waiter in self._idle_waiters:
                if not waiter.done():
                    waiter.set_result(None)
            self._idle_waiters.clear()

    def count_dropped(self, count: int) -> None:
        self.stats.dropped += count
        self.stats.inflight -= count

    async def wait_idle(self) -> None:
        """Return once no accepted request is unanswered."""
        if self.stats.inflight == 0:
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._idle_waiters.append(waiter)
        await waiter

    # -- queue deadline ---------------------------------------------------------------------

    def _arm_expiry(self, accepted_at: float) -> None:
        delay = accepted_at + self._settings.queue_timeout_s - self._clock.now()
        loop = asyncio.get_running_loop()
        self._expiry_timer = loop.call_later(max(delay, 0.0), self._on_expiry_timer)

    def _on_expiry_timer(self) -> None:
        self._expiry_timer = None
        self.expire_queued()
        head = self.queue.head()
        if head is not None:
            self._arm_expiry(head.accepted_at)

    def expire_queued(self) -> int:
        """Answer OVERLOADED to queued requests past ``queue_timeout_s``; return how many."""
        deadline = self._clock.now() - self._settings.queue_timeout_s
        expired = 0
        while (head := self.queue.head()) is not None and head.accepted_at <= deadline:
            self.queue.pop_head()
            expired += 1
            self.finish(
                head,
                None,
                Overloaded(f"waited over queue_timeout_s={self._settings.queue_timeout_s}s"),
            )
        return expired

    # -- workers ----------------------------------------------------------------------------

    async def run(self) -> None:
        """Run the workers until cancelled."""
        try:
            async with asyncio.TaskGroup() as group:
                for index in range(self._settings.workers):
                    group.create_task(self._worker(), name=f"worker-{index}")
        finally:
            if self._expiry_timer is not None:
                self._expiry_timer.cancel()
                self._expiry_timer = None

    async def _worker(self) -> None:
        queue = self.queue
        while True:
            request = await queue.get()
            try:
                await self._serve(request)
            except RouterError as exc:
                self.finish(request, None, exc)
            except Exception as exc:  # a bug: answer the client, keep the worker alive
                log.exception("worker failed on %r", request)
                self.finish(request, None, RouterError(f"internal error: {type(exc).__name__}"))

    async def _serve(self, request: Request) -> None:
        tried: tuple[Backend, ...] = ()
        last_error: RouterError | None = None  # built only on failure: this is the hot path
        for attempt in range(self._settings.max_retries + 1):
            candidates = self._registry.candidates(tried)
            if not candidates:
                break
            if attempt:
                self.stats.retried += 1
            backend = candidates[self._policy.choose(candidates, self._rng)]
            try:
                response = await self._attempt(backend, request.payload)
            except BackendUnavailable as exc:
                backend.record_failure()
                tried += (backend,)
                last_error = exc
                continue
            except BackendError as exc:
                backend.record_failure()
                self.finish(request, None, exc)
                return
            backend.record_success()
            self.finish(request, response, None)
            return
        self.finish(request, None, last_error or NoBackend("no healthy backend"))

    async def _attempt(self, backend: Backend, payload: bytes) -> bytes:
        pool = backend.pool
        backend.inflight += 1
        try:
            slot = pool.acquire_nowait()
            if slot is None:
                try:
                    async with asyncio.timeout(self._settings.request_timeout_s):
                        slot = await pool.acquire()
                except TimeoutError:
                    raise BackendTimeout(
                        f"no connection to {backend.address} within "
                        f"{self._settings.request_timeout_s}s"
                    ) from None
            try:
                response = await slot.connection.request(payload, self._settings.request_timeout_s)
            except BaseException:
                pool.release(slot, reusable=False)
                raise
            pool.release(slot)
            return response
        finally:
            backend.inflight -= 1

    def statistics(self) -> dict[str, Any]:
        return {
            **self.stats.statistics(),
            "queue_depth": len(self.queue),
            "queue_saturated": self.queue.saturated,
            "workers": self._settings.workers,
            "policy": self._policy.name,
        }

    def __repr__(self) -> str:
        return (
            f"Dispatcher(policy={self._policy.name}, queue={len(self.queue)}, "
            f"inflight={self.stats.inflight})"
        )
