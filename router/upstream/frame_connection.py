"""Connections to backends: a uvloop Protocol per connection, handed to the pool by a dialer.

A connection carries up to the pool's ``pipeline_depth`` requests at once. Requests sent in the
same loop iteration are written together (one writev, flushed by one ``call_soon``), and
answers are matched to requests in order, which the protocol guarantees. An oversize frame is
a protocol error and the connection is discarded.

Unsolicited bytes: an answer can only follow a request already written, so any byte that
arrives while no written request is outstanding (before the first flush, or after the last
answer) is a ``BackendProtocolError``, never an answer. A backend that greets on connect, or
sends one frame more than it was asked for, would otherwise shift every later answer onto the
wrong request. The connection is discarded and the backend charged a failure: through the
requests it carried (none of them was written, so each is safe to retry elsewhere), or, with
none, through ``on_broken`` (the pool's ``connection_failed``).

The connection check (``check=True``, which the router sets when backends answer zero-length
frame probes, ``health.probe = "frame"``): a greeting could still arrive just after the first
request was written, and nothing would tell it from that request's answer. So a new connection
writes one zero-length frame in ``connection_made``, before anything else, and the first frame
to come back must be empty: a greeting, or any other protocol on that port, is what answers
the check instead. Requests are not held for it (no round trip is added); those already
written when it fails get what a broken connection gives them, below.

When a connection fails, the oldest request gets the error if it was written: whether any byte
of its answer arrived decides which (none: ``BackendUnavailable``, safe to retry elsewhere;
some: ``BackendProtocolError``). The requests behind it, and every request not yet written,
received nothing and get ``BackendUnavailable``.

Timeouts cost one timer per connection, not one per request: the timer is armed for the oldest
request's deadline and, when it fires, re-armed for the then-oldest one. A request that times
out poisons the answers behind it, so the whole connection is discarded.
"""

from __future__ import annotations

import asyncio
import socket
from collections import deque
from collections.abc import Callable
from typing import Any, cast

from router.core.errors import (
    BackendError,
    BackendProtocolError,
    BackendTimeout,
    BackendUnavailable,
    FrameTooLarge,
)
from router.protocol.frames import FrameDecoder, encode_frame, frame_parts
from router.tls.context import BackendTls
from router.upstream.base import ReplySink
from router.upstream.pool import Connection, Dialer


class _Outstanding:
    __slots__ = ("deadline", "sink", "timeout_s", "token")

    def __init__(self, sink: ReplySink, token: Any, deadline: float, timeout_s: float) -> None:
        self.sink = sink
        self.token = token
        self.deadline = deadline
        self.timeout_s = timeout_s


BrokenListener = Callable[[BackendError], None]
CONNECTION_CHECK = encode_frame(b"")  # written first on a new connection with ``check``


class BackendConnection(asyncio.Protocol):
    def __init__(
        self, address: str, max_frame_bytes: int, on_broken: BrokenListener | None = None,
        *, check: bool = False,
    ) -> None:
        self._address = address
        self._decoder = FrameDecoder(max_frame_bytes)
        self._loop = asyncio.get_running_loop()
        self._on_broken = on_broken
        self._checking = check  # the connection check is (to be) written, its answer not in
        self._transport: asyncio.Transport | None = None
        self._outstanding: deque[_Outstanding] = deque()
        self._written = 0  # the oldest this many outstanding requests are written: answerable
        self._out: list[bytes] = []
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0
        self.is_closed = False
        self._answered = 0  # answers matched so far: a failure after one is on a reused connection

    # -- Connection interface used by the pool and the dispatcher -----------------------------

    def send(self, payload: bytes, sink: ReplySink, token: Any, timeout_s: float) -> None:
        if self.is_closed or self._transport is None:
            closed = BackendUnavailable(
                f"connection to {self._address} is closed", reused_connection=self._answered > 0
            )
            sink(token, None, closed)
            return
        deadline = self._loop.time() + timeout_s
        self._outstanding.append(_Outstanding(sink, token, deadline, timeout_s))
        out = self._out
        if not out:
            self._loop.call_soon(self._flush)
        out += frame_parts(payload)
        if self._timer is None or deadline < self._timer_at:
            self._arm_timer(deadline)

    def close(self) -> None:
        """Close now; requests still on the connection get ``BackendUnavailable``."""
        if not self.is_closed:
            self._discard(None)

    # -- asyncio.Protocol ---------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop transports implement asyncio.Transport without subclassing it
        self._transport = cast(asyncio.Transport, transport)
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family != socket.AF_UNIX:  # no Nagle on a unix socket
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self._checking:
            self._transport.write(CONNECTION_CHECK)

    def data_received(self, data: bytes) -> None:
        if not self._written and not self._checking:
            self._unsolicited(f"{self._address} sent {len(data)} bytes before it was asked")
            return
        try:
            frames = self._decoder.feed(data)
        except FrameTooLarge as exc:
            self._discard(BackendProtocolError(f"{self._address}: {exc.message}"))
            return
        outstanding = self._outstanding
        for frame in frames:
            if self._checking:
                if frame:
                    self._discard(BackendProtocolError(
                        f"{self._address} answered the zero-length connection check with "
                        f"{len(frame)} bytes (does it write before it is asked?)"
                    ))
                    return
                self._checking = False
                continue
            if not self._written:
                self._unsolicited(f"{self._address} sent a frame nobody asked for")
                return
            entry = outstanding.popleft()
            self._written -= 1
            self._answered += 1
            entry.sink(entry.token, frame, None)
        if self._decoder.error is not None:
            self._discard(BackendProtocolError(f"{self._address}: {self._decoder.error.message}"))

    def connection_lost(self, exc: Exception | None) -> None:
        if self.is_closed:
            return
        if self._decoder.buffered:
            self._discard(BackendProtocolError(f"{self._address} closed mid-response"))
        else:
            self._discard(BackendUnavailable(
                f"{self._address} closed before responding", reused_connection=self._answered > 0
            ))

    # -- internals ----------------------------------------------------------------------------

    def _flush(self) -> None:
        out, self._out = self._out, []
        if self.is_closed or self._transport is None or not out:
            return
        self._written = len(self._outstanding)  # ``out`` holds every request not yet written
        if len(out) == 1:
            self._transport.write(out[0])
        else:
            self._transport.writelines(out)  # one writev

    def _arm_timer(self, deadline: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = deadline
        self._timer = self._loop.call_at(deadline, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        if self.is_closed or not self._outstanding:
            return
        head = self._outstanding[0]
        if self._loop.time() >= head.deadline:
            self._discard(
                BackendTimeout(f"{self._address} did not answer within {head.timeout_s}s")
            )
        else:
            self._arm_timer(head.deadline)

    def _unsolicited(self, what: str) -> None:
        """Bytes with no written request outstanding: discard the connection (the requests
        on it were not written, so they fail as safe to retry elsewhere)."""
        self._discard(BackendProtocolError(what))

    def _discard(self, head_error: BackendError | None) -> None:
        """Close the connection and fail every request on it: the oldest with ``head_error``
        if it was written, the rest (and all of them when ``head_error`` is None) with
        ``BackendUnavailable``. A protocol error with no request to carry it goes to
        ``on_broken``, so that it counts against the backend all the same."""
        self.is_closed = True
        written, self._written = self._written, 0
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._out = []
        if self._transport is not None:
            if head_error is None:
                self._transport.close()  # an orderly close: FIN, not a reset
            else:
                self._transport.abort()
        entries = list(self._outstanding)
        self._outstanding.clear()
        broken = head_error if isinstance(head_error, BackendProtocolError) else None
        if broken is not None and not entries and self._on_broken is not None:
            self._on_broken(broken)
        # A protocol error is no keep-alive connection closing: what it fails counts.
        reused = self._answered > 0 and broken is None
        closed = f"{self._address}: connection closed before answering"
        for index, entry in enumerate(entries):
            if index == 0 and head_error is not None and written:
                error: BackendError = head_error
            else:
                if index >= written and head_error is not None:
                    closed = f"{self._address}: not sent: {head_error.message}"
                error = BackendUnavailable(closed, reused_connection=reused)
            entry.sink(entry.token, None, error)

    def __repr__(self) -> str:
        state = "closed" if self.is_closed else f"{len(self._outstanding)} in flight"
        return f"BackendConnection({self._address}, {state})"


def make_dialer(
    host: str, port: int, max_frame_bytes: int, tls: BackendTls | None = None,
    on_broken: BrokenListener | None = None, *, check: bool = False,
) -> Dialer:
    """Dial ``host:port``; over TLS with ``tls``'s context at the time of each dial (so a
    reload applies to the next connection), its handshake inside the pool's connect timeout. A
    certificate that fails verification is an ``ssl.SSLError``, an ``OSError``, so the pool
    reports it as ``BackendUnavailable`` with OpenSSL's reason. ``on_broken(error)`` hears of a
    connection that broke the protocol with no request on it, and ``check`` turns on the
    connection check (module docstring)."""
    address = f"{host}:{port}"

    async def dial() -> Connection:
        loop = asyncio.get_running_loop()
        def protocol_factory() -> BackendConnection:
            return BackendConnection(address, max_frame_bytes, on_broken, check=check)

        if tls is None:
            _, protocol = await loop.create_connection(protocol_factory, host, port)
        else:
            _, protocol = await loop.create_connection(
                protocol_factory, host, port, ssl=tls.context, server_hostname=tls.server_name,
            )
        return protocol

    return dial


def make_unix_dialer(
    path: str, max_frame_bytes: int, on_broken: BrokenListener | None = None, *,
    check: bool = False,
) -> Dialer:
    """Dials the unix socket at ``path`` (plaintext: the config refuses TLS over one), as
    ``make_dialer`` does a TCP address. A missing socket file or nobody listening is an
    ``OSError``, reported by the pool as ``BackendUnavailable`` like a refused TCP connect."""
    address = f"unix:{path}"

    async def dial() -> Connection:
        loop = asyncio.get_running_loop()
        _, protocol = await loop.create_unix_connection(
            lambda: BackendConnection(address, max_frame_bytes, on_broken, check=check), path
        )
        return protocol

    return dial
