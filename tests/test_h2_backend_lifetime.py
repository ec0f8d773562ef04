"""The relay's backend connections over time (``H2Lifetime``): GOAWAY from the backend, idle
timeout, max lifetime and keepalive PINGs, on a ManualClock. Each connection talks to an
``H2Connection`` playing the backend, through a transport that only records bytes: no
sockets, no sleeps."""

from __future__ import annotations

from typing import Any

import pytest

from router.core.clock import ManualClock
from router.core.errors import BackendError
from router.protocol import h2frames as f
from router.protocol.h2connection import H2Connection, HeadersReceived, Stream
from router.protocol.h2headers import Headers
from router.upstream.h2_backend import KEEPALIVE_PING, H2BackendConnection, H2Lifetime, H2Upstream

REQUEST = [(":method", "POST"), (":scheme", "http"), (":path", "/pkg.Svc/Call"),
           (":authority", "x"), ("content-type", "application/grpc"), ("te", "trailers")]
IDLE_S, LIFETIME_S, KEEPALIVE_S, KEEPALIVE_TIMEOUT_S = 60.0, 600.0, 30.0, 10.0


class Transport:
    def __init__(self, protocol: H2BackendConnection) -> None:
        self.protocol = protocol
        self.written = bytearray()
        self.closed = self.aborted = False

    def write(self, data: bytes) -> None:
        self.written += data

    def writelines(self, parts: list[bytes | memoryview]) -> None:
        for part in parts:
            self.written += part

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.protocol.connection_lost(None)

    def abort(self) -> None:
        self.aborted = True
        self.close()

    def get_extra_info(self, name: str) -> Any:
        return None


class Peer:
    """A call's side of a backend stream: what it was told."""

    def __init__(self) -> None:
        self.headers: list[Headers] = []
        self.resets: list[tuple[BackendError, int | None]] = []

    def backend_headers(self, headers: Headers, end_stream: bool, block: bytes | None) -> None:
        self.headers.append(headers)

    def backend_data(self, data: bytes, end_stream: bool, flow: int) -> None:
        pass

    def backend_sent(self, count: int) -> None:
        pass

    def backend_reset(self, error: BackendError, code: int | None) -> None:
        self.resets.append((error, code))


class Link:
    """One backend connection of ``upstream`` and the backend's end of it."""

    def __init__(self, upstream: H2Upstream) -> None:
        self.upstream = upstream
        self.conn = H2BackendConnection(upstream, "backend:1", f.DEFAULT_MAX_FRAME_SIZE)
        self.transport = Transport(self.conn)
        self.conn.connection_made(self.transport)  # type: ignore[arg-type]
        upstream.connections.append(self.conn)
        self.backend = H2Connection(client=False)
        self.frames = f.FrameDecoder()
        self.pump()

    def pump(self) -> list[Any]:
        """Router -> backend and back until quiet; the backend's events."""
        seen: list[Any] = []
        for _ in range(20):
            self.conn.flush()
            out = bytes(self.transport.written)
            self.transport.written.clear()
            back = self.backend.data_to_send()
            if not out and not back:
                return seen
            seen += self.backend.receive_data(out)
            if back and not self.transport.closed:
                self.conn.data_received(back)
        raise AssertionError("never quiet")

    def frames_to_backend(self) -> list[f.Frame]:
        self.conn.flush()
        out = bytes(self.transport.written)
        self.transport.written.clear()
        self.backend.receive_data(out)
        return self.frames.receive(out)

    def open(self, peer: Peer) -> Stream:
        assert self.upstream.try_acquire() is self.conn
        stream = self.conn.open_stream(peer)
        self.conn.conn.send_headers(stream.id, REQUEST, end_stream=True)
        return stream

    def answer(self, stream: Stream) -> None:
        self.pump()
        self.backend.send_headers(stream.id, [(":status", "200"), ("grpc-status", "0")], True)
        self.pump()
        self.upstream.release(self.conn)


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
def upstream(clock: ManualClock) -> H2Upstream:
    async def no_dial(_: H2Upstream) -> H2BackendConnection:
        raise OSError("the tests make their connections themselves")

    lifetime = H2Lifetime(clock, IDLE_S, LIFETIME_S, KEEPALIVE_S, KEEPALIVE_TIMEOUT_S)
    return H2Upstream(no_dial, 100, "backend:1", lifetime=lifetime)


async def test_a_connection_idle_past_the_timeout_retires_and_closes(
    clock: ManualClock, upstream: H2Upstream
) -> None:
    link = Link(upstream)
    link.answer(link.open(Peer()))
    clock.advance(IDLE_S - 1)
    assert upstream.connections == [link.conn]
    stream = link.open(Peer())  # in use again: the idle time starts over when it ends
    clock.advance(2)
    link.answer(stream)
    clock.advance(IDLE_S - 1)
    assert upstream.connections == [link.conn] and not link.transport.closed
    clock.advance(1)
    assert upstream.connections == [] and link.transport.closed
    assert upstream.statistics()["connections_retired"] == {"goaway": 0, "idle": 1,
                                                            "lifetime": 0}


async def test_a_connection_past_its_lifetime_finishes_its_streams_then_closes(
    clock: ManualClock, upstream: H2Upstream
) -> None:
    link = Link(upstream)
    peer = Peer()
    stream = link.open(peer)
    link.pump()
    for _ in range(int(LIFETIME_S)):  # the backend answers each keepalive PING at once
        clock.advance(1)
        link.pump()
    assert upstream.connections == []  # retired: another may be dialled in its place
    assert upstream.try_acquire() is None
    kinds = [kind for kind, *_ in link.frames_to_backend()]
    assert not link.transport.closed and link.backend.goaway_received is not None
    link.answer(stream)
    assert peer.headers and not peer.resets and link.transport.closed
    assert not link.transport.aborted
    assert upstream.statistics()["connections_retired"]["lifetime"] == 1
    assert f.GOAWAY not in kinds  # it was sent once, when it retired


async def test_a_silent_connection_is_pinged_and_lost_without_the_ack(
    clock: ManualClock, upstream: H2Upstream
) -> None:
    link = Link(upstream)
    peer = Peer()
    link.open(peer)
    seen = link.pump()
    assert [type(e) for e in seen] == [HeadersReceived]
    clock.advance(KEEPALIVE_S)  # the check that sees the reads since the last: not quiet
    assert not [fr for fr in link.frames_to_backend() if fr[0] == f.PING]
    clock.advance(KEEPALIVE_S - 1)
    assert not [fr for fr in link.frames_to_backend() if fr[0] == f.PING]
    clock.advance(1)  # nothing received for a whole check
    pings = [fr for fr in link.frames_to_backend() if fr[0] == f.PING]
    assert [(flags, payload) for _, flags, _, payload in pings] == [(0, KEEPALIVE_PING)]
    link.pump()  # the backend acks it: all is well
    clock.advance(KEEPALIVE_TIMEOUT_S)
    assert not link.transport.closed and not peer.resets
    pings = []
    for _ in range(int(2 * KEEPALIVE_S)):  # silent again, and this time the ack is lost
        clock.advance(1)
        pings += [fr for fr in link.frames_to_backend() if fr[0] == f.PING]
        if pings:
            break
    assert len(pings) == 1
    link.backend.data_to_send()  # the ack, lost
    clock.advance(KEEPALIVE_TIMEOUT_S - 1)
    assert not link.transport.closed
    clock.advance(1)
    assert link.transport.aborted and upstream.connections == []
    assert [(e.code, code) for e, code in peer.resets] == [("BACKEND_UNAVAILABLE", None)]
    assert "keepalive" in peer.resets[0][0].message
    assert upstream.statistics()["keepalive_failures"] == 1


async def test_a_backend_goaway_retires_the_connection_and_refuses_streams_past_it(
    clock: ManualClock, upstream: H2Upstream
) -> None:
    link = Link(upstream)
    covered, refused = Peer(), Peer()
    first = link.open(covered)
    link.pump()
    link.open(refused)  # not yet read by the backend when it sends GOAWAY
    link.backend.goaway()
    link.conn.data_received(link.backend.data_to_send())
    assert upstream.connections == [] and upstream.try_acquire() is None
    assert [(e.code, code) for e, code in refused.resets] == [
        ("BACKEND_UNAVAILABLE", f.REFUSED_STREAM)]  # never processed: retried elsewhere
    assert not covered.resets and not link.transport.closed
    link.answer(first)
    assert covered.headers and link.transport.closed
    assert upstream.statistics()["connections_retired"]["goaway"] == 1
