"""A small asyncio client for the length-prefixed protocol.

``FrameClient`` keeps one persistent connection and may pipeline: answers come back in request
order, so each request's future is resolved from a FIFO.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import cast

from router.wire import DEFAULT_MAX_FRAME_BYTES, ErrorFrame, FrameDecoder, encode_frame


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
        cls, host: str, port: int, *, max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES
    ) -> FrameClient:
        loop = asyncio.get_running_loop()
        _, protocol = await loop.create_connection(
            lambda: _ClientProtocol(max_frame_bytes), host, port
        )
        return cls(protocol)

    def send(self, payload: bytes) -> asyncio.Future[bytes]:
        """Send one request now; the future resolves to its answer (pipelining allowed)."""
        protocol = self._protocol
        waiter: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        if protocol.transport is None or protocol.transport.is_closing():
            waiter.set_exception(ConnectionLost("connection is closed"))
            return waiter
        protocol.waiters.append(waiter)
        protocol.transport.write(encode_frame(payload))
        return waiter

    async def request(self, payload: bytes) -> bytes:
        return await self.send(payload)

    @property
    def is_closed(self) -> bool:
        return self._protocol.closed.done()

    async def close(self) -> None:
        if self._protocol.transport is not None:
            self._protocol.transport.close()
        await self._protocol.closed
