"""The uvloop Protocol of one client connection: the I/O side of a ``TcpSession``.

Everything the connection decides (what is accepted, answer order, pausing, closing, timeouts)
lives in ``router.protocol.session``. This class only hands the transport's events to the
session; the session acts through the transport itself, ``Dispatcher.submit``, and timers set
through the injected clock. The session is each request's ``origin``, so answers go from the
dispatcher to the session without passing through here.

On a TLS listener ``connection_made`` comes after the handshake, so the client's verified
certificate is known there: a client the listener's allow-list refuses is answered
CLIENT_NOT_ALLOWED through ``TcpSession.refuse`` before a byte it sent is read.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, cast

from router.core.errors import RouterError
from router.dispatch.scheduler import Request
from router.protocol.session import TcpSession
from router.tls.identity import PeerIdentity

if TYPE_CHECKING:
    from router.frontdoor.tcp.server import TcpFrontDoor

log = logging.getLogger(__name__)


class ClientConnection(asyncio.Protocol):
    # ``data_received`` is the session's own bound method, stored in a slot once the session
    # is made (the transport calls it once per read: no frame of this class in between).
    __slots__ = ("_address", "_front_door", "_peer", "_refusal", "data_received", "session")

    def __init__(
        self, front_door: TcpFrontDoor, peer: str | None, refusal: RouterError | None = None,
        address: Any = None,
    ) -> None:
        """``peer``: the key the front door counts this connection under (None: not counted);
        ``refusal``: the limit it is over, answered at once; ``address``: the client's address
        as accept() returned it (for the access log)."""
        self._front_door = front_door
        self._peer = peer
        self._refusal = refusal
        self._address = address
        self.session: TcpSession[Request]  # from connection_made on
        # A slot holding a bound method where asyncio.Protocol has a method: the same call.
        self.data_received: Callable[[bytes], None]  # type: ignore[assignment]

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        front_door = self._front_door
        dispatcher = front_door.dispatcher
        # uvloop transports implement asyncio.Transport without subclassing it; TCP_NODELAY is
        # set at accept.
        self.session = TcpSession(
            cast(asyncio.Transport, transport), front_door.config, front_door.linger_s,
            front_door.session_clock, Request, front_door.submit, saturated=dispatcher.saturated,
            budget=front_door.budget, peer=self._address, flusher=front_door.flusher,
        )
        session = self.session
        self.data_received = session.data_received
        tls = front_door.tls
        if tls is None:
            # uvloop took ``protocol.data_received`` when the transport was made (unset then)
            # and reads it again here; reading starts after connection_made, so nothing else
            # changes. A TLS transport looks the method up on every read.
            transport.set_protocol(self)
        elif tls.allow_list.active:
            identity = PeerIdentity.from_peercert(transport.get_extra_info("peercert"))
            refusal = tls.refusal(identity)
            if refusal is not None:
                log.info("refused %s: %s", transport.get_extra_info("peername"), refusal.message)
                self.session.refuse(refusal)
        front_door.connection_opened(self.session)
        if self._refusal is not None:
            self.session.refuse(self._refusal)

    def eof_received(self) -> bool:
        return self.session.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        self.session.connection_lost()
        self.uncount()
        self._front_door.connection_closed(self.session)

    def uncount(self) -> None:
        """Stop counting this connection against the limits; only the first call counts."""
        peer, self._peer = self._peer, None
        self._front_door.release(peer)

    def pause_writing(self) -> None:
        self.session.pause_writing()

    def resume_writing(self) -> None:
        self.session.resume_writing()

    def __repr__(self) -> str:
        session = getattr(self, "session", None)
        return f"ClientConnection({session!r})"
