"""The ``Upstream`` of a gRPC backend under the relay (``grpc.engine = "relay"``): a few
multiplexed HTTP/2 connections, many relayed calls on each.

``H2Upstream`` lends a stream slot on one of its connections: the one carrying the fewest
streams among those the backend lets us open more on (its MAX_CONCURRENT_STREAMS, no GOAWAY),
while the backend carries fewer than ``max_calls`` relayed calls. A lease is that connection;
``start`` wakes the call (``request.forward``), which opens its stream there. The first
connection is dialled when a call waits for one (``grow``); another once every open one
carries ``spread_at`` streams, up to ``max_connections``, so that one TCP connection's
ordering does not serialise a busy backend. A dial that fails is reported through ``on_room``
with its ``BackendUnavailable``, which the scheduler counts against the backend and uses to
move the waiting calls.

``H2BackendConnection`` is the uvloop Protocol of one connection: it feeds an
``H2Connection`` (client side) and hands each stream's events to the stream's peer, the
front door's call (``StreamPeer``). Writes are batched: whatever the events of one read, or a
call's own sends, put on the connection goes out in one ``transport.write`` on the next loop
iteration. A connection that goes away (closed, reset, a protocol error of the backend) ends
every stream on it with ``BackendUnavailable`` for calls not yet answered.

A connection retires (leaves ``connections``, so another may be dialled in its place, opens no
stream more, finishes those it carries, then closes) when the backend sends GOAWAY (the
streams above its last-stream-id end REFUSED_STREAM: never processed, so the call is retried
elsewhere while no response byte has come back), when it has carried no stream for the pool's
``idle_timeout_s``, or once it is ``max_lifetime_s`` old (``H2Lifetime``). A connection that
carries streams and has received nothing for ``keepalive_s`` (checked every ``keepalive_s``,
so after between one and two of them) is sent a PING; without its ack
within ``keepalive_timeout_s`` it is lost (its calls fail over as on any lost connection). One
timer per connection carries all of it, at the next of those deadlines, checked lazily: the
read path only counts reads.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol, cast

from router.core.clock import Clock, Timer
from router.core.errors import BackendError, BackendProtocolError, BackendUnavailable
from router.protocol import h2frames as f
from router.protocol.h2connection import (
    DataReceived,
    GoAwayReceived,
    H2Connection,
    HeadersReceived,
    PingAcked,
    Sent,
    Stream,
    StreamReset,
    Terminated,
)
from router.protocol.h2headers import Headers
from router.tls.context import BackendTls
from router.upstream.base import Attempt, ReplySink, RoomListener

log = logging.getLogger(__name__)

KEEPALIVE_PING = b"rkeepal\0"


@dataclass(frozen=True, slots=True)
class H2Lifetime:
    """How long a backend connection lives, and when it is asked whether it still does."""

    clock: Clock
    idle_timeout_s: float
    max_lifetime_s: float
    keepalive_s: float
    keepalive_timeout_s: float


class StreamPeer(Protocol):
    """What a backend stream tells the call relayed on it."""

    def backend_headers(self, headers: Headers, end_stream: bool, block: bytes | None
                        ) -> None:
        """A header block of the response (``block``: its bytes, when ``portable``)."""
        ...

    def backend_data(self, data: bytes, end_stream: bool, flow: int) -> None: ...

    def backend_sent(self, count: int) -> None:
        """``count`` bytes of the call's request data left towards the backend."""
        ...

    def backend_reset(self, error: BackendError, code: int | None) -> None:
        """The stream ended without its trailers: reset by the backend (``code``) or its
        connection went away (``code`` None)."""
        ...


class H2BackendConnection(asyncio.Protocol):
    def __init__(self, upstream: H2Upstream, name: str, max_frame_size: int) -> None:
        self.upstream = upstream
        self.name = name
        self.conn = H2Connection(client=True, max_frame_size=max_frame_size,
                                 max_concurrent_streams=1)
        self.transport: asyncio.Transport | None = None
        self._flush_scheduled = False
        self._closing = False
        # Once per connection: get_running_loop() costs a getpid() system call each time.
        self._loop = asyncio.get_running_loop()
        self.closed = False
        self.retired: str | None = None  # why it takes no new stream: goaway, idle, lifetime
        # Upkeep (``H2Lifetime``): stamps checked by one timer, not on every read.
        self.reads = 0
        self._reads_seen = 0
        self._quiet_since = 0.0  # no read since (as of the last check that saw one)
        self._created_at = 0.0
        self._idle_since: float | None = None
        self._idle_opened = -1  # streams_opened when it was last seen idle
        self._ping_sent_at: float | None = None
        self._timer: Timer | None = None

    # -- asyncio ------------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses: a cast, not a check.
        self.transport = transport = cast(asyncio.Transport, transport)
        transport.write(self.conn.data_to_send())
        lifetime = self.upstream.lifetime
        if lifetime is not None:
            self._created_at = self._quiet_since = lifetime.clock.now()
            self._schedule(lifetime, self._created_at)

    def data_received(self, data: bytes) -> None:
        self.reads += 1
        # The flush at the end writes what the events put on this connection: a mark() on the
        # way schedules no flush of its own.
        self._flush_scheduled = True
        try:
            for event in self.conn.receive_data(data):
                cls = type(event)
                if cls is DataReceived:
                    assert isinstance(event, DataReceived)
                    event.stream.peer.backend_data(event.data, event.end_stream, event.flow)
                elif cls is HeadersReceived:
                    assert isinstance(event, HeadersReceived)
                    event.stream.peer.backend_headers(event.headers, event.end_stream,
                                                      event.block)
                elif cls is Sent:
                    assert isinstance(event, Sent)
                    event.stream.peer.backend_sent(event.count)
                elif cls is StreamReset:
                    assert isinstance(event, StreamReset)
                    self._reset(event)
                elif cls is GoAwayReceived:
                    self.retire("goaway")
                elif cls is PingAcked:
                    assert isinstance(event, PingAcked)
                    if event.opaque == KEEPALIVE_PING:
                        self._ping_sent_at = None
                elif cls is Terminated:
                    assert isinstance(event, Terminated)
                    log.warning("%s: HTTP/2 error from the backend: %s", self.name,
                                event.error.message)
                    self._lose(BackendProtocolError(f"{self.name}: {event.error.message}"))
        finally:
            self.flush()

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        reason = f": {exc}" if exc else ""
        self._lose(BackendUnavailable(f"{self.name}: connection closed{reason}"))

    # -- streams ------------------------------------------------------------------------------

    @property
    def streams(self) -> int:
        return len(self.conn.streams)

    @property
    def closing(self) -> bool:
        """Closing: it takes no new streams and closes once its last one has ended."""
        return self._closing

    @property
    def can_open(self) -> bool:
        return not self.closed and not self._closing and self.conn.can_open

    def open_stream(self, peer: StreamPeer) -> Stream:
        stream = self.conn.open_stream()
        stream.peer = peer
        return stream

    def _reset(self, event: StreamReset) -> None:
        peer = event.stream.peer
        if peer is None:
            return
        if event.code == f.REFUSED_STREAM:
            # Never processed (past a GOAWAY, or over its stream limit): the backend is there,
            # so once on another connection to it, as a keep-alive close is, and not counted.
            error = BackendUnavailable(f"{self.name}: stream refused", reused_connection=True)
        else:
            error = BackendUnavailable(f"{self.name}: stream reset (code {event.code:#x})")
        peer.backend_reset(error, event.code)

    def _lose(self, error: BackendError) -> None:
        if self.closed:
            return
        self.closed = True
        peers = [s.peer for s in self.conn.streams.values() if s.peer is not None]
        self.conn.streams.clear()
        self.upstream.connection_lost(self, error)
        for peer in peers:
            peer.backend_reset(error, None)
        if self.transport is not None:
            self.flush()
            self.transport.close()

    # -- writing ------------------------------------------------------------------------------

    def mark(self) -> None:
        """Something was put on the connection: write it on the next loop iteration."""
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self.flush)

    def flush(self) -> None:
        self._flush_scheduled = False
        out = self.conn.output()
        transport = self.transport
        if transport is None:
            return
        if out:
            transport.writelines(out)  # one vectored write; DATA payloads not copied
        if self._closing and not self.conn.streams:
            transport.close()

    # -- upkeep -------------------------------------------------------------------------------

    def _schedule(self, lifetime: H2Lifetime, now: float) -> None:
        retiring = self.retired is not None  # only the keepalive of its last streams is left
        when = now + lifetime.keepalive_s if retiring else (
            self._created_at + lifetime.max_lifetime_s)
        if self._ping_sent_at is not None:
            when = min(when, self._ping_sent_at + lifetime.keepalive_timeout_s)
        else:  # a check every keepalive_s: the reads since the last one mean not quiet
            when = min(when, now + lifetime.keepalive_s)
        if self.conn.streams:
            when = min(when, now + lifetime.idle_timeout_s)
        if retiring:
            pass
        elif self._idle_since is not None:
            when = min(when, self._idle_since + lifetime.idle_timeout_s)
        elif not self.conn.streams:
            when = min(when, now + lifetime.idle_timeout_s)
        self._timer = lifetime.clock.call_at(when, self._tick)

    def _tick(self) -> None:
        self._timer = None
        lifetime = self.upstream.lifetime
        if self.closed or lifetime is None:
            return
        now = lifetime.clock.now()
        if self.reads != self._reads_seen:
            self._reads_seen, self._quiet_since = self.reads, now
        if self._ping_sent_at is not None:
            if now >= self._ping_sent_at + lifetime.keepalive_timeout_s:
                self._keepalive_failed(lifetime)
                return
        elif self.conn.streams and now - self._quiet_since >= lifetime.keepalive_s:
            # Streams open and not a byte for keepalive_s: is the backend still there?
            self._ping_sent_at = now
            self.conn.ping(KEEPALIVE_PING)
            self.mark()
        self._check_retire(lifetime, now)
        if not self.closed and (self.retired is None or self._ping_sent_at is not None
                                or self.conn.streams):
            self._schedule(lifetime, now)

    def _check_retire(self, lifetime: H2Lifetime, now: float) -> None:
        if self.retired is not None:
            return
        if now - self._created_at >= lifetime.max_lifetime_s:
            self.retire("lifetime")
            return
        if self.conn.streams:
            self._idle_since = None
            return
        opened = self.conn.streams_opened
        if self._idle_since is None or self._idle_opened != opened:
            self._idle_since, self._idle_opened = now, opened  # idle since at least now
        elif now - self._idle_since >= lifetime.idle_timeout_s:
            self.retire("idle")

    def went_idle(self) -> None:
        """Its last stream ended: the idle timeout counts from now. The timer set is due no
        later than that (it was set within idle_timeout_s of its own time), so it stays."""
        lifetime = self.upstream.lifetime
        if lifetime is not None and self.retired is None:
            self._idle_since, self._idle_opened = lifetime.clock.now(), self.conn.streams_opened

    def _keepalive_failed(self, lifetime: H2Lifetime) -> None:
        log.warning("%s: no answer to a keepalive PING within %ss: connection closed",
                    self.name, lifetime.keepalive_timeout_s)
        self.upstream.keepalive_failures += 1
        transport, self.transport = self.transport, None  # aborted, not flushed and closed
        self._lose(BackendUnavailable(
            f"{self.name}: no answer to a keepalive PING within "
            f"grpc.relay_keepalive_timeout_s={lifetime.keepalive_timeout_s}s"))
        if transport is not None:
            transport.abort()

    def retire(self, reason: str) -> None:
        """Out of the pool (another may be dialled): no new stream here; those it carries
        finish, then it closes. ``reason``: goaway, idle, lifetime."""
        if self.retired is not None or self.closed:
            return
        self.retired = reason
        self.upstream.connection_retired(self, reason)
        self.close()

    def close(self) -> None:
        """No new streams; the transport closes once those on it have ended."""
        if self._closing or self.closed:
            return
        self._closing = True
        if self.transport is None:
            return
        self.conn.goaway()
        self.flush()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    def __repr__(self) -> str:
        return f"H2BackendConnection({self.name!r}, {self.conn!r})"


Dial = Callable[["H2Upstream"], Awaitable[H2BackendConnection]]


class H2Upstream:
    def __init__(self, dial: Dial, max_calls: int, name: str = "", *,
                 max_connections: int = 4, spread_at: int = 64,
                 lifetime: H2Lifetime | None = None) -> None:
        self._dial = dial
        self.lifetime = lifetime  # None: connections live until lost or closed
        self._max_calls = max_calls
        self._max_connections = max_connections
        self._spread_at = spread_at
        self.name = name
        self.connections: list[H2BackendConnection] = []
        self._dialing = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self.active = 0
        self.peak = 0
        self.dials = 0
        self.dial_failures = 0
        self.retired = {"goaway": 0, "idle": 0, "lifetime": 0}
        self.keepalive_failures = 0
        self._closed = False
        self.on_room: RoomListener | None = None

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def stalled(self) -> bool:
        return self._dialing == 0 and not any(c.can_open for c in self.connections)

    def try_acquire(self) -> H2BackendConnection | None:
        if self._closed or self.active >= self._max_calls:
            return None
        best = None
        for connection in self.connections:
            if connection.can_open and (best is None or connection.streams < best.streams):
                best = connection
        if best is None:
            return None
        if best.streams >= self._spread_at:
            self._spread()
        self.active += 1
        if self.active > self.peak:
            self.peak = self.active
        return best

    def _spread(self) -> None:
        if self._dialing == 0 and len(self.connections) < self._max_connections:
            self._start_dial()

    def grow(self, wanted: int) -> None:
        if self._closed or self._dialing or self.active >= self._max_calls:
            return
        if any(c.can_open for c in self.connections):
            return  # room comes back as streams end
        if len(self.connections) < self._max_connections:
            self._start_dial()

    def _start_dial(self) -> None:
        self._dialing += 1
        self.dials += 1
        task = asyncio.get_running_loop().create_task(self._dial_one())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _dial_one(self) -> None:
        error: BackendError | None = None
        try:
            connection = await self._dial(self)
        except OSError as exc:
            self.dial_failures += 1
            error = BackendUnavailable(f"{self.name}: {exc.strerror or exc}")
        else:
            if self._closed:
                connection.close()
            else:
                self.connections.append(connection)
        finally:
            self._dialing -= 1
        if self.on_room is not None:
            self.on_room(error)

    def connection_retired(self, connection: H2BackendConnection, reason: str) -> None:
        """``connection`` takes no more streams: out of the pool, so another may be dialled."""
        if connection in self.connections:
            self.connections.remove(connection)
            self.retired[reason] += 1
        if self.on_room is not None:
            self.on_room(None)

    def connection_lost(self, connection: H2BackendConnection, error: BackendError) -> None:
        if connection in self.connections:
            self.connections.remove(connection)
        if self.on_room is not None:
            self.on_room(None)

    def start(self, lease: Any, request: Attempt, sink: ReplySink, timeout_s: float) -> None:
        assert request.forward is not None, "a gRPC backend only carries gRPC calls"
        request.forward(request)

    def start_fresh(self, request: Attempt, sink: ReplySink, timeout_s: float) -> bool:
        return False

    def release(self, lease: Any, *, reusable: bool = True) -> None:
        self.active -= 1
        if isinstance(lease, H2BackendConnection):
            if lease.closing:
                # A closing connection whose last stream ended closes now. An open one is not
                # flushed here: whatever the ended stream put on it was marked, and goes out
                # with the rest of this loop iteration's frames in one write, not one per call.
                lease.flush()
            if not lease.conn.streams:
                lease.went_idle()

    def reconfigure(self, max_calls: int, lifetime: H2Lifetime | None = None) -> None:
        """New limits; a new ``lifetime`` applies at each connection's next check."""
        self._max_calls = max_calls
        if lifetime is not None:
            self.lifetime = lifetime
        if self.on_room is not None:
            self.on_room(None)

    def close(self) -> None:
        self._closed = True
        for connection in self.connections:
            connection.close()
        if self.on_room is not None:
            self.on_room(None)

    def statistics(self) -> dict[str, Any]:
        return {
            "active_calls": self.active, "peak_calls": self.peak, "max_calls": self._max_calls,
            "connections": len(self.connections), "dials": self.dials,
            "dial_failures": self.dial_failures,
            "connections_retired": dict(self.retired),
            "keepalive_failures": self.keepalive_failures,
            "streams": [c.streams for c in self.connections],
            "pending_bytes": sum(c.conn.statistics()["pending_bytes"] for c in self.connections),
        }

    def __repr__(self) -> str:
        return (f"H2Upstream({self.name!r}, {self.active}/{self._max_calls}, "
                f"connections={len(self.connections)})")


def make_h2_dialer(host: str | None, port: int | None, unix_path: str | None, *,
                   tls: BackendTls | None = None,
                   max_frame_size: int = f.DEFAULT_MAX_FRAME_SIZE,
                   connect_timeout_s: float = 5.0) -> Dial:
    """Dial a backend over TCP (with ``tls``: its context at each dial, ALPN ``h2``) or its
    unix socket; ``OSError`` when it cannot be reached (a failed handshake included)."""
    name = f"unix:{unix_path}" if unix_path is not None else f"{host}:{port}"

    async def dial(upstream: H2Upstream) -> H2BackendConnection:
        loop = asyncio.get_running_loop()

        def factory() -> H2BackendConnection:
            return H2BackendConnection(upstream, name, max_frame_size)

        try:
            async with asyncio.timeout(connect_timeout_s):
                if unix_path is not None:
                    _, protocol = await loop.create_unix_connection(factory, unix_path)
                else:
                    assert host is not None and port is not None
                    if tls is None:
                        _, protocol = await loop.create_connection(factory, host, port)
                    else:
                        context = tls.context
                        context.set_alpn_protocols(["h2"])
                        _, protocol = await loop.create_connection(
                            factory, host, port, ssl=context, server_hostname=tls.server_name)
        except TimeoutError:
            raise OSError(f"connect timed out after {connect_timeout_s}s") from None
        return protocol

    return dial
