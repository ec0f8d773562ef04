"""Connections to backends: a uvloop Protocol per connection, handed to the pool by a dialer.

One request at a time per connection (the pool lends it exclusively). The response is the next
frame; a frame nobody asked for, an oversize one, or bytes after the response are protocol
errors and the connection is discarded. Whether any response byte arrived decides whether a
lost connection is safe to retry (``BackendUnavailable``) or not (``BackendProtocolError``).
"""

from __future__ import annotations

import asyncio
import socket
from typing import cast

from router.errors import (
    BackendError,
    BackendProtocolError,
    BackendTimeout,
    BackendUnavailable,
    FrameTooLarge,
)
from router.pool import Connection, Dialer
from router.wire import FrameDecoder, frame_parts


class BackendConnection(asyncio.Protocol):
    def __init__(self, address: str, max_frame_bytes: int) -> None:
        self._address = address
        self._decoder = FrameDecoder(max_frame_bytes)
        self._loop = asyncio.get_running_loop()
        self._transport: asyncio.Transport | None = None
        self._waiter: asyncio.Future[bytes] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._received_any = False
        self._closed = False

    # -- Connection interface used by the pool ------------------------------------------------

    @property
    def is_closed(self) -> bool:
        return self._closed

    def request(self, payload: bytes, timeout_s: float) -> asyncio.Future[bytes]:
        waiter: asyncio.Future[bytes] = self._loop.create_future()
        if self._closed or self._transport is None:
            waiter.set_exception(BackendUnavailable(f"connection to {self._address} is closed"))
            return waiter
        if self._waiter is not None:
            raise RuntimeError("BackendConnection carries one request at a time")
        self._waiter = waiter
        self._received_any = False
        self._timer = self._loop.call_later(timeout_s, self._on_timeout, timeout_s)
        self._transport.writelines(frame_parts(payload))  # one writev
        return waiter

    def close(self) -> None:
        if self._transport is not None and not self._closed:
            self._closed = True
            self._transport.close()

    # -- asyncio.Protocol ---------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop transports implement asyncio.Transport without subclassing it
        self._transport = cast(asyncio.Transport, transport)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        self._received_any = True
        try:
            frames = self._decoder.feed(data)
        except FrameTooLarge as exc:
            self._fail(BackendProtocolError(f"{self._address}: {exc.message}"))
            return
        if not frames:
            return
        if self._waiter is None or len(frames) > 1 or self._decoder.buffered or self._decoder.error:
            self._fail(BackendProtocolError(f"{self._address} sent a frame nobody asked for"))
            return
        waiter, self._waiter = self._waiter, None
        self._cancel_timer()
        if not waiter.done():
            waiter.set_result(frames[0])

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        if self._received_any:
            self._fail(BackendProtocolError(f"{self._address} closed mid-response"))
        else:
            self._fail(BackendUnavailable(f"{self._address} closed before responding"))

    # -- internals ----------------------------------------------------------------------------

    def _on_timeout(self, timeout_s: float) -> None:
        self._timer = None
        self._fail(BackendTimeout(f"{self._address} did not answer within {timeout_s}s"))

    def _fail(self, error: BackendError) -> None:
        self._cancel_timer()
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_exception(error)
        if not self._closed and self._transport is not None:
            self._closed = True
            self._transport.abort()

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def __repr__(self) -> str:
        state = "closed" if self._closed else ("busy" if self._waiter else "idle")
        return f"BackendConnection({self._address}, {state})"


def make_dialer(host: str, port: int, max_frame_bytes: int) -> Dialer:
    address = f"{host}:{port}"

    async def dial() -> Connection:
        loop = asyncio.get_running_loop()
        _, protocol = await loop.create_connection(
            lambda: BackendConnection(address, max_frame_bytes), host, port
        )
        return protocol

    return dial
