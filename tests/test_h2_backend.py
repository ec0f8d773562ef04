"""The relay's backend connections (``H2Upstream``, ``H2BackendConnection``) against a
transport that records writes: what goes out when, without sockets."""

from __future__ import annotations

import asyncio
from typing import Any

from router.core.errors import BackendError
from router.protocol.h2headers import Headers
from router.upstream.h2_backend import H2BackendConnection, H2Upstream

REQUEST = [(":method", "POST"), (":scheme", "http"), (":path", "/pkg.Svc/Call"),
           (":authority", "x"), ("content-type", "application/grpc"), ("te", "trailers")]


class RecordingTransport:
    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.closed = False

    def write(self, data: bytes) -> None:
        self.writes.append(data)

    def writelines(self, parts: list[bytes | memoryview]) -> None:
        self.writes.append(b"".join(parts))  # one vectored write

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.closed = True

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default


class Peer:
    def backend_headers(self, headers: Headers, end_stream: bool, block: bytes | None) -> None:
        raise AssertionError("no frames come from the backend in these tests")

    def backend_data(self, data: bytes, end_stream: bool, flow: int) -> None:
        raise AssertionError("no frames come from the backend in these tests")

    def backend_sent(self, count: int) -> None:
        raise AssertionError("no window opens in these tests")

    def backend_reset(self, error: BackendError, code: int | None) -> None:
        raise AssertionError("no stream is reset by the backend in these tests")


async def _never_dialled(upstream: H2Upstream) -> H2BackendConnection:
    raise AssertionError("the connection is given, not dialled")


def _connected() -> tuple[H2Upstream, H2BackendConnection, RecordingTransport]:
    upstream = H2Upstream(_never_dialled, max_calls=8, name="b")
    connection = H2BackendConnection(upstream, "b", 16_384)
    transport = RecordingTransport()
    connection.connection_made(transport)  # type: ignore[arg-type]
    upstream.connections.append(connection)
    assert len(transport.writes) == 1  # the preface and our settings
    return upstream, connection, transport


async def test_frames_of_one_iteration_go_out_in_one_write_however_many_calls_end() -> None:
    upstream, connection, transport = _connected()
    leases = [upstream.try_acquire() for _ in range(3)]
    assert leases == [connection] * 3
    for lease in leases:  # each call: its request goes on the connection, then it ends
        stream = connection.open_stream(Peer())
        connection.conn.send_headers(stream.id, REQUEST, end_stream=True)
        connection.mark()
        connection.conn.reset_stream(stream.id)
        upstream.release(lease)
    assert len(transport.writes) == 1  # releasing an open connection writes nothing by itself
    await asyncio.sleep(0)  # one loop iteration: the marked flush runs
    assert len(transport.writes) == 2
    assert not transport.closed and upstream.active == 0


async def test_a_closing_connection_closes_when_its_last_stream_is_released() -> None:
    upstream, connection, transport = _connected()
    lease = upstream.try_acquire()
    stream = connection.open_stream(Peer())
    connection.conn.send_headers(stream.id, REQUEST, end_stream=True)
    connection.close()  # GOAWAY; the stream in progress goes on
    assert connection.closing and not connection.can_open and not transport.closed
    connection.conn.reset_stream(stream.id)
    upstream.release(lease)
    assert transport.closed
