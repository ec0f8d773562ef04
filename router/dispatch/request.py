"""One accepted request, from whichever front door, until it is answered exactly once."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

from router.balance.policies import Placed
from router.core.errors import BackendError, RouterError

if TYPE_CHECKING:
    from router.dispatch.backends import Backend


class Origin(Protocol):
    """Where a request came from; told once when its answer is ready."""

    def request_done(self, request: Request) -> None: ...


class Request:
    """``deadline`` is stamped once, at acceptance (``accepted_at + queue_timeout_s``), and
    bounds every wait for room the request makes, however often it moves between backends.

    ``forward`` is set for gRPC calls: it wakes the call's handler to carry out an attempt on
    ``backend``. ``replayable`` is False for a stream, whose messages cannot be sent twice.
    """

    __slots__ = (
        "accepted_at", "attempts", "backend", "deadline", "epoch", "error", "forward", "kind",
        "last_error", "lease", "model", "origin", "payload", "placement", "replayable", "resent",
        "response", "route_key", "tried",
    )

    def __init__(
        self, payload: bytes, origin: Origin, accepted_at: float, *, kind: str = "tcp",
        model: str | None = None, forward: Callable[[Request], None] | None = None,
        replayable: bool = True,
    ) -> None:
        self.payload = payload
        self.origin = origin
        self.accepted_at = accepted_at
        self.deadline = accepted_at  # set by the scheduler on submit
        self.epoch = 0  # the scheduler's epoch at submit: a request from an abandoned one
        # Which backends may take it: their protocol, and the model they must serve (if any).
        self.kind = kind
        self.model = model
        # What a keyed policy hashes when it is not the model (gRPC ``x-route-key``).
        self.route_key: str | None = None
        # A keyed policy's token for the backend it chose (None: a plain policy).
        self.placement: Placed | None = None
        self.forward = forward
        self.replayable = replayable
        self.resent = False  # sent again on the backend whose reused connection closed under it
        self.response: bytes | None = None
        self.error: RouterError | None = None
        # The attempt in progress, and the backends tried so far (a retry avoids them).
        self.backend: Backend | None = None
        self.lease: Any = None
        self.tried: tuple[Backend, ...] = ()
        self.attempts = 0
        self.last_error: BackendError | None = None

    @property
    def done(self) -> bool:
        return self.response is not None or self.error is not None

    def __repr__(self) -> str:
        state = "done" if self.done else "pending"
        return f"Request({self.kind}, {len(self.payload)} bytes, {state})"
