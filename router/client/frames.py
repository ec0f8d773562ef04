"""A small asyncio client for the length-prefixed protocol.

``FrameClient`` keeps one persistent connection and may pipeline: answers come back in request
order, so each request's future is resolved from a FIFO.
"""

from __future__ import annotations

import asyncio
import ssl as ssl_module
from collections import deque
from typing import Any, cast

from router.protocol.frames import DEFAULT_MAX_FRAME_BYTES, ErrorFrame, FrameDecoder, encode_frame


class ErrorReply(Exception):
    """The router answered with an error frame."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class ConnectionLost(Exception):
    """The connection closed with this request unanswered: the router never processed it."""


class _ClientProtocol(asyncio.Protocol):
    def __init__(self, max_frame_bytes: int) -> None:
        self.decoder = FrameDecoder(max_frame_bytes, accept_error_flag=True)
        self.waiters: deque[asyncio.Future[bytes]] = deque()
        self.transport: asyncio.Transport | None = None
        self.eof = False
        self.closed = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop transports implement asyncio.Transport without subclassing it
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        for frame in self.decoder.feed(data):
            waiter = self.waiters.popleft()
            if waiter.done():
                continue
            if isinstance(frame, ErrorFrame):
                waiter.set_exception(ErrorReply(*frame.code_and_message))
            else:
                waiter.set_result(frame)

    def eof_received(self) -> bool:
        self.eof = True
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        while self.waiters:
            waiter = self.waiters.popleft()
            if not waiter.done():
                waiter.set_exception(ConnectionLost("connection closed before the answer"))
        if not self.closed.done():
            self.closed.set_result(None)


class FrameClient:
    def __init__(self, protocol: _ClientProtocol) -> None:
        self._protocol = protocol

    @classmethod
    async def connect(
        cls, host: str, port: int, *, max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
        ssl: ssl_module.SSLContext | None = None, server_hostname: str | None = None,
    ) -> FrameClient:
        """Connect (over TLS with ``ssl``, verifying ``server_hostname``, default ``host``)."""
        loop = asyncio.get_running_loop()
        _, protocol = await loop.create_connection(
            lambda: _ClientProtocol(max_frame_bytes), host, port, ssl=ssl,
            server_hostname=server_hostname if ssl is not None else None,
        )
        return cls(protocol)

    @property
    def peer_certificate(self) -> dict[str, Any] | None:
        """The router's certificate as ``ssl.SSLSocket.getpeercert`` gives it (TLS only)."""
        transport = self._protocol.transport
        return transport.get_extra_info("peercert") if transport is not None else None

    def send(self, payload: bytes) -> asyncio.Future[bytes]:
        """Send one request now; the future resolves to its answer (pipelining allowed)."""
        protocol = self._protocol
        waiter: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        transport = protocol.transport
        if transport is None or self.is_closing:
            waiter.set_exception(ConnectionLost("connection is closed"))
            return waiter
        protocol.waiters.append(waiter)
        transport.write(encode_frame(payload))
        return waiter

    async def request(self, payload: bytes) -> bytes:
        return await self.send(payload)

    @property
    def is_closed(self) -> bool:
        return self._protocol.closed.done()

    @property
    def is_closing(self) -> bool:
        """Closed, or the router has shut its side (a drain): send nothing more here."""
        transport = self._protocol.transport
        return self.is_closed or transport is None or transport.is_closing() or self._protocol.eof



    async def close(self) -> None:
        if self._protocol.transport is not None:
            self._protocol.transport.close()
        await self._protocol.closed


class RetryingClient:
    """A client that keeps the router's retry contract.

    The router never closes a connection while a request it accepted there is unanswered (short
    of its drain deadline). So a request whose connection closes before its answer was never
    processed, and this client resends exactly those requests on a fresh connection, trying the
    addresses in turn (for a rolling restart or a second router). Answered errors (OVERLOADED,
    NO_BACKEND, ...) are answers, raised as ``ErrorReply`` and not resent.
    """

    def __init__(
        self,
        addresses: list[tuple[str, int]],
        *,
        max_attempts: int = 5,
        connect_timeout_s: float = 2.0,
    ) -> None:
        if not addresses:
            raise ValueError("RetryingClient needs at least one address")
        self._addresses = addresses
        self._next_address = 0
        self._max_attempts = max_attempts
        self._connect_timeout_s = connect_timeout_s
        self._client: FrameClient | None = None
        self._connecting: asyncio.Lock | None = None
        self.resent = 0
        self.reconnects = 0

    async def request(self, payload: bytes) -> bytes:
        for attempt in range(self._max_attempts):
            client = await self._connected()
            try:
                return await client.send(payload)
            except ConnectionLost:
                if attempt + 1 < self._max_attempts:
                    self.resent += 1
        raise ConnectionLost(f"no answer after {self._max_attempts} attempts")

    async def _connected(self) -> FrameClient:
        if self._connecting is None:
            self._connecting = asyncio.Lock()
        async with self._connecting:  # one reconnect shared by every request that needs it
            if self._client is not None and not self._client.is_closing:
                return self._client
            last_error: OSError | TimeoutError | None = None
            for _ in range(len(self._addresses)):
                host, port = self._addresses[self._next_address]
                try:
                    async with asyncio.timeout(self._connect_timeout_s):
                        self._client = await FrameClient.connect(host, port)
                except (OSError, TimeoutError) as exc:
                    last_error = exc
                    self._next_address = (self._next_address + 1) % len(self._addresses)
                    continue
                self.reconnects += 1
                return self._client
            raise ConnectionLost(f"cannot connect to any of {self._addresses}: {last_error}")

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()
