"""Where accepted requests wait for room: the one waiting place of the data plane.

A request that its chosen backend cannot take now waits on that backend (``backend.waiting``,
ordered by deadline), counted as load on it so the policy steers new requests elsewhere. The
queue keeps the total: at ``capacity`` it is *saturated* and tells the front doors to stop
reading (backpressure through TCP, RESOURCE_EXHAUSTED on gRPC), and it clears at half of it;
requests already read are always kept, never discarded.

Each request's deadline was stamped once at acceptance. One timer, armed through the injected
clock for the earliest deadline among the heads, hands every request past it to
``on_expired`` (the scheduler answers OVERLOADED), wherever it waits.
"""

from __future__ import annotations

from bisect import insort
from collections.abc import Callable
from typing import TYPE_CHECKING

from router.core.clock import Clock, Timer
from router.dispatch.request import Request

if TYPE_CHECKING:
    from router.dispatch.backends import Backend


def _deadline(request: Request) -> float:
    return request.deadline


class WaitQueue:
    def __init__(
        self, capacity: int, clock: Clock, on_pressure: Callable[[bool], None],
        on_expired: Callable[[Request], None],
    ) -> None:
        self.capacity = capacity
        self._clock = clock
        self._on_pressure = on_pressure
        self._on_expired = on_expired
        self.waiting = 0
        self.saturated = False
        self._backends: set[Backend] = set()  # those with waiting requests
        self._timer: Timer | None = None
        self._timer_at = 0.0

    def put(self, request: Request, backend: Backend) -> None:
        waiting = backend.waiting
        if not waiting or waiting[-1].deadline <= request.deadline:
            waiting.append(request)
        else:  # an older request moved here from another backend
            insort(waiting, request, key=_deadline)
        backend.inflight += 1  # waiting on it is load on it, for the policy
        self._backends.add(backend)
        self.waiting += 1
        if not self.saturated and self.waiting >= self.capacity:
            self.saturated = True
            self._on_pressure(True)
        if self._timer is None or request.deadline < self._timer_at:
            self._arm(request.deadline)

    def resize(self, capacity: int) -> None:
        """A new ``capacity`` (a reload); saturation is judged against it at once."""
        self.capacity = capacity
        if not self.saturated and self.waiting >= capacity:
            self.saturated = True
            self._on_pressure(True)
        elif self.saturated and self.waiting <= capacity // 2:
            self.saturated = False
            self._on_pressure(False)

    def pop(self, backend: Backend) -> Request:
        """The head of ``backend``'s waiting requests (there must be one)."""
        request = backend.waiting.popleft()
        self._left(backend, 1)
        return request

    def take_all(self, backend: Backend) -> list[Request]:
        """Every request waiting on ``backend`` (to be placed again elsewhere)."""
        taken = list(backend.waiting)
        backend.waiting.clear()
        self._left(backend, len(taken))
        return taken

    def _left(self, backend: Backend, count: int) -> None:
        backend.inflight -= count
        self.waiting -= count
        if not backend.waiting:
            self._backends.discard(backend)
        if self.saturated and self.waiting <= self.capacity // 2:
            self.saturated = False
            self._on_pressure(False)

    # -- deadlines --------------------------------------------------------------------------

    def _arm(self, when: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = when
        self._timer = self._clock.call_at(when, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        now = self._clock.now()
        expired: list[Request] = []
        for backend in list(self._backends):
            waiting = backend.waiting
            count = 0
            while waiting and waiting[0].deadline <= now:
                expired.append(waiting.popleft())
                count += 1
            if count:
                self._left(backend, count)
        for request in expired:
            self._on_expired(request)
        heads = [b.waiting[0].deadline for b in self._backends]
        if heads and self._timer is None:
            self._arm(min(heads))

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def __len__(self) -> int:
        return self.waiting

    def __repr__(self) -> str:
        return f"WaitQueue(waiting={self.waiting}/{self.capacity}, saturated={self.saturated})"

