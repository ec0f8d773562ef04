"""The ``Upstream`` of a gRPC backend: a bound on the calls it carries at once.

HTTP/2 multiplexes every call to a backend over its channel (``grpc_channels``), so there is
nothing to dial per call: capacity is a count, ``max_calls_per_backend``. A lease is the
limiter itself. ``start`` wakes the call's handler (``request.forward``), which carries the
attempt out on the channel and reports its outcome to the scheduler; a call that is refused
room waits in the scheduler like a frame request waiting for a pooled connection.
"""

from __future__ import annotations

from typing import Any

from router.upstream.base import Attempt, ReplySink, RoomListener


class GrpcCallLimiter:
    def __init__(self, max_calls: int, name: str = "") -> None:
        self._max_calls = max_calls
        self._name = name
        self.active = 0
        self.peak = 0
        self._closed = False
        self.on_room: RoomListener | None = None

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def stalled(self) -> bool:
        return False  # room comes back when calls in flight end

    def try_acquire(self) -> GrpcCallLimiter | None:
        if self._closed or self.active >= self._max_calls:
            return None
        self.active += 1
        if self.active > self.peak:
            self.peak = self.active
        return self

    def reconfigure(self, max_calls: int) -> None:
        """A new bound (a reload); calls in flight beyond a lower one finish."""
        self._max_calls = max_calls
        if self.on_room is not None:
            self.on_room(None)  # a higher bound has room for waiting calls

    def grow(self, wanted: int) -> None:
        return None  # a channel has no connections to add

    def start(self, lease: Any, request: Attempt, sink: ReplySink, timeout_s: float) -> None:
        assert request.forward is not None, "a gRPC backend only carries gRPC calls"
        request.forward(request)

    def start_fresh(self, request: Attempt, sink: ReplySink, timeout_s: float) -> bool:
        return False  # a call never lands on a connection the backend closed under it

    def release(self, lease: Any, *, reusable: bool = True) -> None:
        self.active -= 1

    def close(self) -> None:
        self._closed = True
        if self.on_room is not None:
            self.on_room(None)

    def statistics(self) -> dict[str, Any]:
        return {"active_calls": self.active, "peak_calls": self.peak,
                "max_calls": self._max_calls}

    def __repr__(self) -> str:
        return f"GrpcCallLimiter({self._name!r}, {self.active}/{self._max_calls})"
