"""The uvloop Protocol of one client connection: the I/O side of a ``TcpSession``.

Everything the connection decides (what is accepted, answer order, pausing, closing, timeouts)
lives in ``router.protocol.session``. This class only hands the transport's events to the
session; the session acts through the transport itself, ``Dispatcher.submit``, and timers set
through the injected clock. The session is each request's ``origin``, so answers go from the
dispatcher to the session without passing through here.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any, cast

from router.dispatch.scheduler import Request
from router.protocol.session import TcpSession

if TYPE_CHECKING:
    from router.frontdoor.tcp.server import TcpFrontDoor


class ClientConnection(asyncio.Protocol):
    __slots__ = ("_front_door", "_peer", "session")

    def __init__(self, front_door: TcpFrontDoor, peer: Any = None) -> None:
        self._front_door = front_door
        self._peer = peer  # the client's address, as accept() returned it
        self.session: TcpSession[Request]  # from connection_made on

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        front_door = self._front_door
        dispatcher = front_door.dispatcher
        # uvloop transports implement asyncio.Transport without subclassing it; TCP_NODELAY is
        # set at accept.
        self.session = TcpSession(
            cast(asyncio.Transport, transport), front_door.config, front_door.linger_s,
            front_door.clock, Request, dispatcher.submit, saturated=dispatcher.saturated,
            peer=self._peer,
        )
        front_door.connection_opened(self.session)

    def data_received(self, data: bytes) -> None:
        self.session.data_received(data)

    def eof_received(self) -> bool:
        return self.session.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        self.session.connection_lost()
        self._front_door.connection_closed(self.session)

    def pause_writing(self) -> None:
        self.session.pause_writing()

    def resume_writing(self) -> None:
        self.session.resume_writing()

    def __repr__(self) -> str:
        session = getattr(self, "session", None)
        return f"ClientConnection({session!r})"
