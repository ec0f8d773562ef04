"""The one scheduler: every front door's requests are admitted, placed, retried and completed here.

A front door turns each whole request it reads into a ``Request`` and ``submit``s it; from that
moment the request is *accepted* and will be answered exactly once, through its origin's
``request_done``. A TCP frame, a unary gRPC call and a gRPC stream take the same path:

* admission (``submit``): count it, stamp its queue deadline once, place it;
* placement (``_place``): the policy picks among the healthy backends of the request's kind
  and model that it has not tried; when the backend's ``Upstream`` lends a lease at once and
  nobody waits there before it, the attempt starts from the caller's own callback (no task
  switch, no future); otherwise the request waits on that backend (``WaitQueue``) and the
  upstream is asked to grow;
* assignment (``_assign``): the one synchronous step run on every capacity event of a
  backend — a lease released (an answer came back), a dial finished or failed, probed
  connections came back, a connection closed, the backend went out of rotation or began to
  drain. It hands
  leases to waiting requests in deadline order, and moves them to other backends when room
  will not come back on theirs;
* completion (``attempt_done``): the answer (or failure) of an attempt, from a pooled
  connection or from a gRPC call's handler; it releases the lease, runs the assignment step,
  then finishes or retries the request.

httpcore's rule: decide synchronously, then do I/O. Nothing here awaits: dials are the pool's
own tasks, gRPC attempts run in their call's handler. Events the upstream raises from inside
its own bookkeeping (``on_room``) are handled on the next loop iteration, so that bookkeeping
never runs twice at once.

Overload: a request that waits past its deadline (``queue_timeout_s`` after acceptance, however
often it moved) is answered OVERLOADED; waiting requests count toward ``queue_size``, at which
the front doors stop reading.

Retry: an attempt that fails before any response byte (``BackendUnavailable``: refused, reset,
closed) is placed again on a backend the request has not tried, up to ``max_retries``. A
timeout, a malformed response, or any failure of a stream is not retried: the backend may have
acted on it.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable
from typing import Any

from router.balance.policies import KeyedPolicy, Policy, as_keyed
from router.core.clock import Clock
from router.core.config import DispatchConfig
from router.core.errors import (
    BackendError,
    BackendUnavailable,
    NoBackend,
    Overloaded,
    RouterError,
    quoted,
)
from router.dispatch.access import AccessLog, tcp_entry
from router.dispatch.backends import Backend, Registry
from router.dispatch.queue import WaitQueue
from router.dispatch.request import Origin, Request
from router.dispatch.stats import DataPlaneStats

__all__ = ["Dispatcher", "Origin", "Request"]

log = logging.getLogger(__name__)


class Dispatcher:
    def __init__(
        self,
        registry: Registry,
        policy: Policy,
        config: DispatchConfig,
        clock: Clock,
        stats: DataPlaneStats,
        rng: random.Random | None = None,
        access_log: AccessLog | None = None,
    ) -> None:
        self._registry = registry
        self._policy = policy
        # A policy that sees the model and follows its placements (affinity, hashing).
        self._keyed = as_keyed(policy)
        self._config = config
        self._timeout_s = config.request_timeout_s
        self._clock = clock
        self.stats = stats
        self._rng = rng or random.Random()
        # Told of every finished TCP request (None: no access log, one check per request).
        self.access_log = access_log
        self._pressure_listeners: list[Callable[[bool], None]] = []
        self.queue = WaitQueue(config.queue_size, clock, self._notify_pressure, self._expired)
        self._idle_waiters: list[asyncio.Future[None]] = []
        self._room_events: dict[Backend, BackendError | None] = {}
        # Bumped when the drain abandons what is left: answers to requests of an older epoch
        # no longer count (they were counted dropped).
        self._epoch = 0
        registry.add_join_listener(self._attach)
        registry.add_listener(self._on_backend_change)
        for backend in registry:
            self._attach(backend)

    def reconfigure(self, config: DispatchConfig, policy: Policy | None = None) -> None:
        """New settings (a reload): requests accepted from now on get the new queue timeout,
        every placement from now on the new ``policy`` (None: the same one, its state kept),
        every attempt started from now on the new request timeout and retry budget. Requests
        already accepted keep their deadline."""
        self._config = config
        self._timeout_s = config.request_timeout_s
        if policy is not None:
            self._policy = policy
            self._keyed = as_keyed(policy)
        self.queue.resize(config.queue_size)

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
        stats = self.stats
        stats.accepted += 1
        stats.inflight += 1
        request.deadline = request.accepted_at + self._config.queue_timeout_s
        request.epoch = self._epoch
        self._place(request)

    def refuse(self, request: Request, error: RouterError) -> None:
        """Accept a request and answer it with ``error`` at once (a front door found it
        unroutable: a bad routing key, a model nobody serves); counted as ``submit`` counts."""
        stats = self.stats
        stats.accepted += 1
        stats.inflight += 1
        request.epoch = self._epoch
        self.finish(request, None, error)

    @property
    def registry(self) -> Registry:
        return self._registry

    @property
    def policy(self) -> Policy:
        """The policy placements use now (a reload may change it)."""
        return self._policy

    # -- placement ----------------------------------------------------------------------------

    def _place(self, request: Request) -> None:
        candidates = self._registry.candidates(request.tried, request.kind, request.model)
        if not candidates:
            last = request.tried[-1] if request.tried else None
            self.finish(request, None, request.last_error or NoBackend(_no_backend(request)), last)
            return
        keyed = self._keyed
        if keyed is not None:
            self._place_keyed(request, candidates, keyed)
        elif len(candidates) == 1:
            self._place_on(request, candidates[0])
        else:
            self._place_on(request, candidates[self._policy.choose(candidates, self._rng)])

    def _place_keyed(self, request: Request, candidates: list[Backend],
                     keyed: KeyedPolicy) -> None:
        """A keyed policy sees the model and key; its token follows the request until it
        leaves the backend (told here when a request placed before moves on)."""
        previous = request.placement
        if previous is not None:
            request.placement = None
            previous.done(False, self._clock.now())
        index, request.placement = keyed.place(
            request.model, request.route_key or request.model, candidates, self._rng,
            previous is not None or request.attempts > 0,
        )
        self._place_on(request, candidates[index])

    def _place_on(self, request: Request, backend: Backend) -> None:
        upstream = backend.upstream
        if not backend.waiting:
            lease = upstream.try_acquire()
            if lease is not None:
                self._start(request, backend, lease)
                return
        self.queue.put(request, backend)
        upstream.grow(len(backend.waiting))

    def _start(self, request: Request, backend: Backend, lease: Any) -> None:
        backend.inflight += 1
        request.backend = backend
        request.lease = lease
        if request.placement is not None:
            request.placement.started(self._clock.now())
        backend.upstream.start(lease, request, self.attempt_done, self._timeout_s)

    def _assign(self, backend: Backend) -> None:
        """Hand ``backend``'s room to the requests waiting on it; move them elsewhere when room
        will not come back there."""
        waiting = backend.waiting
        upstream = backend.upstream
        queue = self.queue
        while waiting:
            lease = upstream.try_acquire()
            if lease is None:
                break
            self._start(queue.pop(backend), backend, lease)
        if not waiting:
            return
        if backend.healthy and not backend.draining and not upstream.closed:
            upstream.grow(len(waiting))
            return
        for request in queue.take_all(backend):
            self._place(request)  # out of rotation or draining: it is no candidate any more

    # -- capacity events ----------------------------------------------------------------------

    def room_changed(self, backend: Backend, error: BackendError | None = None) -> None:
        """An upstream's ``on_room``: handled on the next loop iteration (outside the
        upstream's bookkeeping). ``error``: why a dial failed."""
        events = self._room_events
        if not events:
            asyncio.get_running_loop().call_soon(self._handle_room_events)
        if error is not None or backend not in events:
            events[backend] = error

    def _handle_room_events(self) -> None:
        events, self._room_events = self._room_events, {}
        for backend, error in events.items():
            if error is not None:
                self._dial_failed(backend, error)
            if backend.waiting:
                self._assign(backend)
            if backend.draining:
                self._registry.settle(backend)

    def _dial_failed(self, backend: Backend, error: BackendError) -> None:
        backend.record_failure()
        if not backend.upstream.stalled:
            return  # connections it has will serve the waiting requests
        for request in self.queue.take_all(backend):
            if self._may_retry(request, backend, error):
                self._place(request)

    def _attach(self, backend: Backend) -> None:
        """Listen to the capacity events of a backend that joined."""
        backend.upstream.on_room = lambda error: self.room_changed(backend, error)

    def _on_backend_change(self, backend: Backend, reason: str) -> None:
        """Out of rotation or draining: move the requests waiting on it."""
        if backend.waiting and (not backend.healthy or backend.draining or backend.drained):
            self.room_changed(backend)

    # -- completion ---------------------------------------------------------------------------

    def attempt_done(
        self, request: Request, response: bytes | None, error: RouterError | None
    ) -> None:
        """The outcome of the attempt in progress on ``request``: its answer, or why it failed.
        A ``BackendError`` counts against the backend; any other error (the client's deadline
        or cancel, on gRPC) does not."""
        backend = request.backend
        assert backend is not None
        request.backend = None
        backend.inflight -= 1
        if request.lease is not None:  # None: a fresh connection for it was never made
            backend.upstream.release(request.lease, reusable=error is None)
            request.lease = None
        if backend.waiting:
            self._assign(backend)
        if backend.draining:
            self._registry.settle(backend)  # its last attempt: it leaves now
        if error is None:
            backend.record_success()
            if not backend.healthy:  # tried in panic (every backend was down), and it answered
                backend.mark_up("answered a request")
            self.finish(request, response, None, backend)
            return
        if isinstance(error, BackendUnavailable) and request.replayable:
            if (error.reused_connection and not request.resent and backend.healthy
                    and not backend.draining):
                # The backend closed a connection that had served before (a keep-alive limit,
                # HAProxy's retry-on conn-failure): once, on a fresh connection to it, and not
                # counted against it.
                request.resent = True
                backend.inflight += 1
                request.backend = backend
                if not backend.upstream.start_fresh(request, self.attempt_done, self._timeout_s):
                    backend.inflight -= 1
                    request.backend = None
                    self._place_on(request, backend)  # no room to dial: wait for any
                return
            backend.record_failure()
            if self._may_retry(request, backend, error):
                self._place(request)
            return  # placed again, or answered with the error by _may_retry
        if isinstance(error, BackendError):
            backend.record_failure()
        self.finish(request, None, error, backend)

    def _may_retry(self, request: Request, backend: Backend, error: BackendError) -> bool:
        """Record a retryable failure; True if the request has retries left (else it is
        answered with ``error``)."""
        request.tried += (backend,)
        request.last_error = error
        request.attempts += 1
        if request.attempts > self._config.max_retries:
            self.finish(request, None, error, backend)
            return False
        self.stats.retried += 1
        return True

    def _expired(self, request: Request) -> None:
        timeout = self._config.queue_timeout_s
        self.finish(request, None, Overloaded(f"waited over queue_timeout_s={timeout}s"))

    def finish(
        self, request: Request, response: bytes | None, error: RouterError | None,
        backend: Backend | None = None,
    ) -> None:
        """Answer ``request`` (once: later calls are ignored). ``backend``: the one of its
        last attempt, if any, for the access log."""
        if request.response is not None or request.error is not None:
            return  # already answered (``request.done``, spelled out: this runs per request)
        if error is None:
            request.response = response
        else:
            request.error = error
        placement = request.placement
        if placement is not None:
            request.placement = None
            placement.done(error is None, self._clock.now())
        if request.epoch == self._epoch:
            stats = self.stats
            if error is None:
                stats.completed += 1
            else:
                stats.count_error(error.code)
            stats.inflight -= 1
            stats.latency.observe(self._clock.now() - request.accepted_at)
        request.origin.request_done(request)
        access = self.access_log
        if access is not None and request.kind == "tcp":  # gRPC calls: their front door's
            access.write(tcp_entry(request, backend, error, self._clock.now()))
        if self._idle_waiters and self.stats.inflight == 0:
            for waiter in self._idle_waiters:
                if not waiter.done():
                    waiter.set_result(None)
            self._idle_waiters.clear()

    # -- lifecycle ----------------------------------------------------------------------------

    async def wait_zero(self) -> None:
        """Return once no accepted request is unanswered."""
        if self.stats.inflight == 0:
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._idle_waiters.append(waiter)
        await waiter

    def abandon(self) -> int:
        """Give up on every unanswered request (the drain's deadline passed): count them
        dropped, and from now on ignore their late answers or failures. Returns how many."""
        dropped = self.stats.inflight
        self.stats.dropped += dropped
        self.stats.inflight = 0
        self._epoch += 1
        return dropped

    def close(self) -> None:
        self.queue.close()

    def statistics(self) -> dict[str, Any]:
        return {
            **self.stats.statistics(),
            "waiting": self.queue.waiting,
            "queue_saturated": self.queue.saturated,
            "policy": self._policy.name,
        }

    def __repr__(self) -> str:
        return (
            f"Dispatcher(policy={self._policy.name}, waiting={self.queue.waiting}, "
            f"inflight={self.stats.inflight})"
        )


def _no_backend(request: Request) -> str:
    what = "gRPC backend" if request.kind == "grpc" else "backend"
    return f"no healthy {what}" + (f" for model {quoted(request.model)}" if request.model else "")
