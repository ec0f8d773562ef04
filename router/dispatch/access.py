"""What the data plane tells an access log: one ``AccessEntry`` per TCP request or gRPC call.

The access log itself (JSON lines, a bounded buffer, a writer thread) is the control plane's
(``router.control.access_log``); the composition root hands it to the ``Dispatcher`` and the
gRPC front door as an ``AccessLog``. With no access log configured they hold ``None``, and the
hot path pays one attribute check per request.

TCP requests are reported by ``Dispatcher.finish``, the one completion path, once the answer
is handed to the connection. gRPC calls are reported by the gRPC front door when the call
ends, with the status the client saw (calls the router answers itself included); their
``Request``, if any, is not reported by ``finish``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from router.core.errors import RouterError

if TYPE_CHECKING:
    from router.dispatch.backends import Backend
    from router.dispatch.request import Request


@dataclass(slots=True)
class AccessEntry:
    """One line of the access log. ``status``: "OK", or for TCP "ERROR", for gRPC the status
    code's name; ``error``: the router's error code when the router chose the outcome."""

    front_door: str  # "tcp" or "grpc"
    # The client's address as the listener's accept() gave it (a tuple, or a unix path) or as
    # text; ``format_peer`` spells it, in the writer's thread rather than on the loop.
    client: Any
    method: str | None = None  # gRPC only: the full method name
    model: str | None = None
    backend: str | None = None  # the id of the backend of the last attempt
    status: str = "OK"
    error: str | None = None
    bytes_in: int = 0  # payload bytes (TCP: without the 4-byte length word)
    bytes_out: int = 0
    duration_s: float = 0.0


class AccessLog(Protocol):
    def write(self, entry: AccessEntry) -> None:
        """Take one entry; never blocks (a full buffer drops it and counts the drop)."""
        ...


def format_peer(peer: Any) -> str | None:
    """``host:port`` (``[host]:port`` for IPv6) of a socket address; a unix path as is."""
    if isinstance(peer, tuple) and len(peer) >= 2:
        host, port = peer[0], peer[1]
        return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
    if isinstance(peer, str) and peer:
        return peer
    return None


def tcp_entry(
    request: Request, backend: Backend | None, error: RouterError | None, now: float
) -> AccessEntry:
    """The entry of a finished TCP request. Its origin (the connection's session) names the
    client through ``peer`` when it knows it."""
    response = request.response
    return AccessEntry(
        "tcp", getattr(request.origin, "peer", None), None, request.model,
        backend.spec.id if backend is not None else None,
        "OK" if error is None else "ERROR", None if error is None else error.code,
        len(request.payload), len(response) if response is not None else 0,
        now - request.accepted_at,
    )
