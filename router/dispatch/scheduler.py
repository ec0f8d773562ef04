"""The bounded request queue, the worker coroutines that serve it, and request completion.

A front door (TCP acceptor, later gRPC) turns each whole request it reads into a ``Request`` and
``submit``s it; from that moment the request is *accepted* and will be answered exactly once,
through its origin's ``request_done``.

Decide synchronously, then do I/O (httpcore's rule). ``submit`` picks a backend with the policy
and, when that backend's pool can lend a connection without waiting and nothing is queued ahead,
sends the request at once from the caller's callback: no task switch, no future. A backend whose
pool is full (``max_connections`` x ``pipeline_depth`` in flight) *parks* the request: it waits
in that backend's FIFO, and each answer from the backend, which frees room, sends the next
parked request from the same callback. Everything else goes to the FIFO queue, whose worker
coroutines do the waiting that needs a task: dialling a connection, or a retry that found no
free connection. Either way the answer arrives through ``_on_reply``, a callback from the
backend connection, which completes the request or retries it. (With 10,000 clients, waking a
worker per request to wait for room cost a quarter of the router's time.)

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
import contextlib
import functools
import logging
import random
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from router.balance.policies import Policy
from router.core.clock import Clock
from router.core.errors import (
    BackendError,
    BackendTimeout,
    BackendUnavailable,
    NoBackend,
    Overloaded,
    RouterError,
)
from router.dispatch.backends import Backend, Registry
from router.dispatch.stats import DataPlaneStats
from router.upstream.pool import Slot

log = logging.getLogger(__name__)


class Origin(Protocol):
    """Where a request came from; told once when its answer is ready."""

    def request_done(self, request: Request) -> None: ...


# Starts one attempt of a request on a backend by other means than a pooled TCP connection
# (the gRPC front door's calls); the outcome comes back through ``Dispatcher.forward_done``.
Forward = Callable[["Request", Backend], None]


class Request:
    __slots__ = (
        "accepted_at", "attempts", "backend", "error", "forward", "kind", "last_error", "model",
        "origin", "payload", "queued_at", "response", "slot", "tried",
    )

    def __init__(
        self, payload: bytes, origin: Origin, accepted_at: float, *, kind: str = "tcp",
        model: str | None = None, forward: Forward | None = None,
    ) -> None:
        self.payload = payload
        self.origin = origin
        self.accepted_at = accepted_at
        # Which backends may take it: their protocol, and the model they must serve (if any).
        self.kind = kind
        self.model = model
        self.forward = forward
        self.queued_at = accepted_at
        self.response: bytes | None = None
        self.error: RouterError | None = None
        # The attempt in progress, and the backends tried so far (a retry avoids them).
        self.backend: Backend | None = None
        self.slot: Slot | None = None
        self.tried: tuple[Backend, ...] = ()
        self.attempts = 0
        self.last_error: BackendError | None = None

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
    """FIFO with a soft bound; ``saturated`` flips at the bound and back at half of it.

    The bound covers the requests held elsewhere while they wait (``hold``/``release_held``:
    those parked on a full pool), so waiting requests stay bounded wherever they wait.
    """

    def __init__(self, capacity: int, on_pressure: Callable[[bool], None]) -> None:
        self.capacity = capacity
        self.items: deque[Request] = deque()  # read-only outside: use put / pop_head
        self._held = 0
        self._getters: deque[asyncio.Future[None]] = deque()
        self._on_pressure = on_pressure
        self.saturated = False

    def __len__(self) -> int:
        return len(self.items)

    @property
    def waiting(self) -> int:
        """Queued plus held: every accepted request not yet sent to a backend."""
        return len(self.items) + self._held

    def hold(self) -> None:
        self._held += 1
        self._check_bound()

    def release_held(self) -> None:
        self._held -= 1
        self._check_bound()

    def _check_bound(self) -> None:
        waiting = len(self.items) + self._held
        if not self.saturated and waiting >= self.capacity:
            self.saturated = True
            self._on_pressure(True)
        elif self.saturated and waiting <= self.capacity // 2:
            self.saturated = False
            self._on_pressure(False)

    def put(self, request: Request) -> None:
        self.items.append(request)
        while self._getters:
            getter = self._getters.popleft()
            if not getter.done():
                getter.set_result(None)
                break
        self._check_bound()

    async def get(self) -> Request:
        while not self.items:
            getter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._getters.append(getter)
            await getter
        return self.pop_head()

    def head(self) -> Request | None:
        return self.items[0] if self.items else None

    def pop_head(self) -> Request:
        """Remove the oldest request (taken by a worker, or expired)."""
        request = self.items.popleft()
        self._check_bound()
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
        self._parked: dict[Backend, deque[Request]] = {}  # waiting for room on a full pool
        self._unpark_scheduled: set[Backend] = set()
        # Workers waiting for a forwarded request to finish (a backend at its call_limit).
        self._capacity_waiters: deque[asyncio.Future[None]] = deque()

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
        if self.queue.items or not self._send_nowait(request):
            self._enqueue(request)

    def _enqueue(self, request: Request) -> None:
        request.queued_at = self._clock.now()
        self.queue.put(request)
        if self._expiry_timer is None:
            self._arm_expiry(request.queued_at)

    def finish(self, request: Request, response: bytes | None, error: RouterError | None) -> None:
        if request.response is not None or request.error is not None:
            return  # already answered (``request.done``, spelled out: this runs per request)
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

    def _arm_expiry(self, queued_at: float) -> None:
        delay = queued_at + self._settings.queue_timeout_s - self._clock.now()
        loop = asyncio.get_running_loop()
        self._expiry_timer = loop.call_later(max(delay, 0.0), self._on_expiry_timer)

    def _on_expiry_timer(self) -> None:
        self._expiry_timer = None
        self.expire_queued()
        heads = [parked[0].queued_at for parked in self._parked.values()]
        if (head := self.queue.head()) is not None:
            heads.append(head.queued_at)
        if heads:
            self._arm_expiry(min(heads))

    def _overloaded(self) -> Overloaded:
        return Overloaded(f"waited over queue_timeout_s={self._settings.queue_timeout_s}s")

    def expire_queued(self) -> int:
        """Answer OVERLOADED to requests queued or parked past ``queue_timeout_s``; return how
        many."""
        deadline = self._clock.now() - self._settings.queue_timeout_s
        expired = 0
        while (head := self.queue.head()) is not None and head.queued_at <= deadline:
            self.queue.pop_head()
            expired += 1
            self.finish(head, None, self._overloaded())
        for backend in list(self._parked):
            expired += self._expire_parked(backend, deadline)
        return expired

    def _expire_parked(self, backend: Backend, deadline: float) -> int:
        """OVERLOADED to ``backend``'s requests parked since before ``deadline``."""
        parked = self._parked[backend]
        expired = 0
        while parked and parked[0].queued_at <= deadline:
            request = parked.popleft()
            backend.inflight -= 1
            self.queue.release_held()
            self.finish(request, None, self._overloaded())
            expired += 1
        if not parked:
            del self._parked[backend]
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
                await self._send_when_possible(request)
            except RouterError as exc:
                self.finish(request, None, exc)
            except Exception as exc:  # a bug: answer the client, keep the worker alive
                log.exception("worker failed on %r", request)
                self.finish(request, None, RouterError(f"internal error: {type(exc).__name__}"))

    # -- attempts -----------------------------------------------------------------------------

    def _choose(self, request: Request) -> Backend | None:
        """The policy's pick among healthy backends the request has not tried; None (and the
        request answered) when there is none left."""
        candidates = self._registry.candidates(request.tried, request.kind, request.model)
        if not candidates:
            self.finish(request, None, request.last_error or NoBackend("no healthy backend"))
            return None
        return candidates[self._policy.choose(candidates, self._rng)]

    def _send_nowait(self, request: Request) -> bool:
        """Send on a connection the chosen backend can lend at once. False if it has none:
        the choice stays on the request for the worker, so the policy decides once."""
        backend = self._choose(request)
        if backend is None:
            return True  # answered
        if request.forward is not None:
            return self._forward_nowait(request, backend)
        slot = backend.pool.acquire_nowait()
        if slot is None:
            if not backend.pool.can_dial():
                self._park(request, backend)
                return True
            request.backend = backend
            return False
        self._send(request, backend, slot)
        return True

    async def _send_when_possible(self, request: Request) -> None:
        """The worker's part: wait for (or dial) a connection, retrying failed connects."""
        if request.forward is not None:
            await self._forward_when_possible(request)
            return
        backend, request.backend = request.backend, None
        if backend is None or not backend.healthy:  # the choice was made before it went down
            backend = self._choose(request)
        while backend is not None:
            slot = backend.pool.acquire_nowait()
            if slot is None and not backend.pool.can_dial():
                self._park(request, backend)
                return
            slot = slot or await self._wait_for_slot(backend, request)
            if slot is not None:
                self._send(request, backend, slot)
                return
            if request.done:
                return  # the failed connect used up its retries
            backend = self._choose(request)

    async def _wait_for_slot(self, backend: Backend, request: Request) -> Slot | None:
        """A connection from ``backend``'s pool, or None after a failed connect (the request
        is then answered if it has no retries left)."""
        backend.inflight += 1  # waiting for its connection counts as load on it
        try:
            async with asyncio.timeout(self._settings.request_timeout_s):
                return await backend.pool.acquire()
        except TimeoutError:
            backend.record_failure()
            raise BackendTimeout(
                f"no connection to {backend.address} within {self._settings.request_timeout_s}s"
            ) from None
        except BackendUnavailable as exc:
            backend.record_failure()
            self._may_retry(request, backend, exc)
            return None
        finally:
            backend.inflight -= 1

    def _send(self, request: Request, backend: Backend, slot: Slot) -> None:
        backend.inflight += 1
        request.backend = backend
        request.slot = slot
        slot.connection.send(
            request.payload, self._on_reply, request, self._settings.request_timeout_s
        )

    def _on_reply(self, request: Request, response: bytes | None,
                  error: BackendError | None) -> None:
        """The backend connection's answer (or failure) for ``request``."""
        backend, slot = request.backend, request.slot
        assert backend is not None and slot is not None
        request.backend = request.slot = None
        backend.inflight -= 1
        backend.pool.release(slot, reusable=error is None)
        if backend in self._parked:
            self._unpark(backend)
        if error is None:
            backend.record_success()
            self.finish(request, response, None)
            return
        backend.record_failure()
        if not isinstance(error, BackendUnavailable):
            self.finish(request, None, error)  # the backend may have acted on it: no retry
        elif self._may_retry(request, backend, error) and not self._send_nowait(request):
            self._enqueue(request)

    def _park(self, request: Request, backend: Backend) -> None:
        backend.inflight += 1  # load on it, for the policy
        self.queue.hold()  # counts toward queue_size, like a queued request
        request.queued_at = self._clock.now()
        parked = self._parked.get(backend)
        if parked is None:
            parked = self._parked[backend] = deque()
            if backend.pool.on_room is None:
                backend.pool.on_room = functools.partial(self._schedule_unpark, backend)
        parked.append(request)
        if self._expiry_timer is None:  # answers may not come (a hung backend): time it out
            self._arm_expiry(request.queued_at)

    def _schedule_unpark(self, backend: Backend) -> None:
        """The pool says room may have appeared other than by an answer (probed connections
        came back, a dial finished, a connection closed): look at ``backend``'s parked
        requests from the loop, outside the pool's own bookkeeping. Without this, requests
        parked while every connection was out for a probe waited for an answer that no
        request in flight would ever bring."""
        if backend in self._parked and backend not in self._unpark_scheduled:
            self._unpark_scheduled.add(backend)
            asyncio.get_running_loop().call_soon(self._scheduled_unpark, backend)

    def _scheduled_unpark(self, backend: Backend) -> None:
        self._unpark_scheduled.discard(backend)
        if backend in self._parked:
            self._unpark(backend)

    def _unpark(self, backend: Backend) -> None:
        """Send parked requests while ``backend``'s pool has room; answer OVERLOADED those
        parked past ``queue_timeout_s``. If room will not come back by itself (the backend is
        down or gone, or it lost connections the pool may now re-dial), hand the rest to the
        workers."""
        self._expire_parked(backend, self._clock.now() - self._settings.queue_timeout_s)
        parked = self._parked.get(backend)
        if parked is None:
            return
        pool = backend.pool
        while parked:
            slot = pool.acquire_nowait()
            if slot is None:
                break
            backend.inflight -= 1
            self.queue.release_held()
            self._send(parked.popleft(), backend, slot)
        if parked and (not backend.healthy or pool.closed or pool.can_dial()):
            keep = backend.healthy and not pool.closed
            while parked:
                request = parked.popleft()
                backend.inflight -= 1
                self.queue.release_held()
                request.backend = backend if keep else None
                self._enqueue(request)
        if not parked:
            del self._parked[backend]

    def _may_retry(self, request: Request, backend: Backend, error: BackendError) -> bool:
        """Record a retryable failure; True if the request has retries left (else it is
        answered with ``error``)."""
        request.tried += (backend,)
        request.last_error = error
        request.attempts += 1
        if request.attempts > self._settings.max_retries:
            self.finish(request, None, error)
            return False
        self.stats.retried += 1
        return True

    # -- forwarded requests (gRPC) -----------------------------------------------------------
    #
    # Same choice, retry budget and counters as pooled TCP requests; what differs is that the
    # attempt is started by ``request.forward`` and a backend's own ``call_limit`` (not a pool)
    # bounds what it carries. A request whose chosen backend is at its limit waits in the
    # queue like one waiting for a pooled connection, then in a worker until a forwarded
    # request finishes, at most until ``queue_timeout_s`` after it was queued.

    def _forward_nowait(self, request: Request, backend: Backend) -> bool:
        if backend.call_limit and backend.inflight >= backend.call_limit:
            return False
        self._start_forward(request, backend)
        return True

    async def _forward_when_possible(self, request: Request) -> None:
        deadline = request.queued_at + self._settings.queue_timeout_s
        loop = asyncio.get_running_loop()
        while (backend := self._choose(request)) is not None:
            if not backend.call_limit or backend.inflight < backend.call_limit:
                self._start_forward(request, backend)
                return
            remaining = deadline - self._clock.now()
            if remaining <= 0:
                self.finish(request, None, self._overloaded())
                return
            waiter: asyncio.Future[None] = loop.create_future()
            self._capacity_waiters.append(waiter)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(remaining):
                    await waiter

    def _start_forward(self, request: Request, backend: Backend) -> None:
        assert request.forward is not None
        backend.inflight += 1
        request.backend = backend
        request.forward(request, backend)

    def forward_done(
        self, request: Request, response: bytes | None, error: RouterError | None
    ) -> None:
        """The outcome of the attempt ``request.forward`` started. A ``BackendUnavailable``
        is retried on another backend while the budget lasts; a ``BackendError`` counts
        against the backend; any other error (the client's deadline, a cancel) does not."""
        backend, request.backend = request.backend, None
        assert backend is not None
        backend.inflight -= 1
        while self._capacity_waiters:
            waiter = self._capacity_waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                break
        if error is None:
            backend.record_success()
            self.finish(request, response, None)
            return
        if isinstance(error, BackendError):
            backend.record_failure()
        if not isinstance(error, BackendUnavailable):
            self.finish(request, None, error)
        elif self._may_retry(request, backend, error) and not self._send_nowait(request):
            self._enqueue(request)

    def admit(self, request: Request) -> None:
        """Count a request that is served outside the queue (a gRPC stream, which holds its
        backend for its whole life) as accepted; ``finish`` answers it as usual."""
        self.stats.accepted += 1
        self.stats.inflight += 1

    def pick(
        self, kind: str, model: str | None, exclude: tuple[Backend, ...] = ()
    ) -> Backend | None:
        """The policy's choice among healthy backends of ``kind`` serving ``model``."""
        candidates = self._registry.candidates(exclude, kind, model)
        if not candidates:
            return None
        return candidates[self._policy.choose(candidates, self._rng)]

    def statistics(self) -> dict[str, Any]:
        return {
            **self.stats.statistics(),
            "queue_depth": len(self.queue),
            "parked": self.queue.waiting - len(self.queue),
            "queue_saturated": self.queue.saturated,
            "workers": self._settings.workers,
            "policy": self._policy.name,
        }

    def __repr__(self) -> str:
        return (
            f"Dispatcher(policy={self._policy.name}, queue={len(self.queue)}, "
            f"inflight={self.stats.inflight})"
        )
