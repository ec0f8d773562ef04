"""The interface through which a backend lends capacity to the scheduler.

Every backend has exactly one ``Upstream``: the frame pool for length-prefixed backends, the
call limiter for gRPC ones. The scheduler never waits inside an upstream: it asks for a lease
now (``try_acquire``), and when there is none it keeps the request in its own waiting list and
asks the upstream to make room (``grow``). The upstream then reports every way room may have
appeared (a dial finished or failed, probed connections came back, a connection closed) through
``on_room``, and the scheduler runs its one assignment step for that backend. A lease returned
by the scheduler itself (``release``) needs no event: the scheduler assigns right after.

``start`` puts one attempt of a request on a lease: over a pooled connection its answer comes
back through ``sink(token, response, error)``; a gRPC attempt is carried out by the call's own
handler, which reports its outcome to the scheduler.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from router.core.errors import BackendError

# Told once per attempt: (token, response, None) or (token, None, error).
ReplySink = Callable[[Any, "bytes | None", "BackendError | None"], None]
# Told when room may have appeared other than by a release; the error is why a dial failed.
RoomListener = Callable[["BackendError | None"], None]


class Attempt(Protocol):
    """What an upstream sees of a request: its bytes, and for a gRPC call the hook that wakes
    the call's handler to carry the attempt out."""

    payload: bytes
    forward: Callable[[Any], None] | None
    lease: Any


class Upstream(Protocol):
    on_room: RoomListener | None

    @property
    def closed(self) -> bool: ...

    @property
    def stalled(self) -> bool:
        """Nothing in flight or being dialled: no room will appear without ``grow``."""
        ...

    def try_acquire(self) -> Any | None:
        """A lease on capacity now, or None. Never awaits."""
        ...

    def grow(self, wanted: int) -> None:
        """``wanted`` requests are waiting: open capacity for them if the limits allow."""
        ...

    def start(self, lease: Any, request: Attempt, sink: ReplySink, timeout_s: float) -> None:
        """Put one attempt of ``request`` on ``lease``; its outcome reaches ``sink(request,
        ...)`` (for gRPC, through the handler ``request.forward`` wakes)."""
        ...

    def start_fresh(self, request: Attempt, sink: ReplySink, timeout_s: float) -> bool:
        """Put the attempt on a connection opened for it, setting ``request.lease`` once it
        is open; False if none may be opened now."""
        ...

    def release(self, lease: Any, *, reusable: bool = True) -> None: ...

    def close(self) -> None: ...

    def statistics(self) -> dict[str, Any]: ...
