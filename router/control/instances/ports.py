"""The ports replicas listen on: taken from ``manager.port_range`` or given as
``base_port + 1 + i``, held by one replica each for as long as it exists (across its
restarts), and checked free by binding before every start.

The check binds with SO_REUSEADDR, as servers do, so a port whose last connections linger
in TIME_WAIT (a replica that was just stopped) counts as free, and one something listens on
does not. It is advisory: another program may bind the port between the check and the
replica's own bind; the replica then fails to start and is retried like any failure.

The allocator's bookkeeping is pure; the bind check is injected (``is_free``), so tests run
it without sockets. Allocation scans the range from where the last allocation stopped, so a
port just released is the last one handed out again.
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Callable, Sequence
from typing import Any

from router.core.errors import PortAllocationFailed, PortConflict


def can_bind(host: str, port: int) -> bool:
    """Whether a listening socket could bind ``host:port`` now."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except OSError:
        return False
    family, kind, proto, _, address = infos[0]
    with contextlib.closing(socket.socket(family, kind, proto)) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(address)
        except OSError:
            return False
    return True


class PortAllocator:
    def __init__(self, host: str, port_range: Sequence[int],
                 is_free: Callable[[str, int], bool] = can_bind) -> None:
        self._host = host
        self._first, self._last = port_range
        self._is_free = is_free
        self._held: dict[int, str] = {}  # port -> the replica (backend id) holding it
        self._cursor = self._first

    def reserve(self, port: int, owner: str) -> None:
        """Hold ``port`` for ``owner`` (a ``base_port`` replica); ``PortConflict`` if another
        replica holds it or it cannot be bound."""
        holder = self._held.get(port)
        if holder is not None and holder != owner:
            raise PortConflict(f"port {port} is held by replica {holder}")
        if holder is None and not self._is_free(self._host, port):
            raise PortConflict(f"port {port} on {self._host} is in use by another program")
        self._held[port] = owner

    def allocate(self, owner: str) -> int:
        """A port of the range for ``owner``, free now; ``PortAllocationFailed`` if none is."""
        size = self._last - self._first + 1
        for step in range(size):
            port = self._first + (self._cursor - self._first + step) % size
            if port in self._held or not self._is_free(self._host, port):
                continue
            self._held[port] = owner
            self._cursor = self._first + (port - self._first + 1) % size
            return port
        raise PortAllocationFailed(f"no free port in manager.port_range {self._first}-"
                                   f"{self._last} ({len(self._held)} held by replicas)")

    def check(self, port: int, owner: str) -> None:
        """Before ``owner`` starts on the port it holds: ``PortConflict`` if something else
        has bound it meanwhile."""
        if self._held.get(port) != owner:
            raise PortConflict(f"port {port} is not held by replica {owner}")
        if not self._is_free(self._host, port):
            raise PortConflict(f"port {port} on {self._host} is in use by another program")

    def release(self, port: int, owner: str) -> None:
        if self._held.get(port) == owner:
            del self._held[port]

    def holder(self, port: int) -> str | None:
        return self._held.get(port)

    def statistics(self) -> dict[str, Any]:
        return {"range": [self._first, self._last], "held": len(self._held)}

    def __repr__(self) -> str:
        return f"PortAllocator({self._first}-{self._last}, held={len(self._held)})"
