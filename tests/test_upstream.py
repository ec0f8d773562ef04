"""BackendConnection (router.upstream) against scripted backends over loopback sockets."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from router.core.errors import (
    BackendError,
    BackendProtocolError,
    BackendTimeout,
    BackendUnavailable,
)
from router.protocol.frames import FrameDecoder, encode_frame
from router.upstream.frame_connection import BackendConnection, make_dialer
from router.upstream.pool import Connection, request

WAIT_S = 5.0
Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class Script:
    """A backend whose behaviour is the test's handler; records the size of each read."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.server: asyncio.Server | None = None
        self.reads: list[int] = []

    async def connect(self) -> Connection:
        assert self.server is not None
        port = self.server.sockets[0].getsockname()[1]
        return await make_dialer("127.0.0.1", port, 1 << 20)()


@pytest.fixture
async def script() -> AsyncIterator[Callable[[Handler], Awaitable[Script]]]:
    scripts: list[Script] = []

    async def start(handler: Handler) -> Script:
        s = Script(handler)

        async def run(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                await s.handler(reader, writer)
            except (asyncio.IncompleteReadError, ConnectionError):
                pass
            finally:
                writer.close()

        s.server = await asyncio.start_server(run, "127.0.0.1", 0)
        scripts.append(s)
        return s

    yield start
    for s in scripts:
        assert s.server is not None
        s.server.close()
        await s.server.wait_closed()


async def read_frames(reader: asyncio.StreamReader, count: int, reads: list[int]) -> list[bytes]:
    decoder = FrameDecoder(1 << 20)
    frames: list[bytes] = []
    while len(frames) < count:
        chunk = await reader.read(65536)
        if not chunk:
            raise asyncio.IncompleteReadError(b"", None)
        reads.append(len(chunk))
        frames.extend(decoder.feed(chunk))
    return frames


class Sink:
    """Collects (token, response, error) in the order the connection reports them."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, bytes | None, BackendError | None]] = []
        self._changed = asyncio.Event()

    def __call__(self, token: Any, response: bytes | None, error: BackendError | None) -> None:
        self.calls.append((token, response, error))
        self._changed.set()

    async def wait_for(self, count: int) -> None:
        async with asyncio.timeout(WAIT_S):
            while len(self.calls) < count:
                self._changed.clear()
                await self._changed.wait()


async def test_pipelined_requests_share_one_write_and_answers_match_in_order(
    script: Callable[[Handler], Awaitable[Script]],
) -> None:
    async def echo_reversed_in_order(reader: asyncio.StreamReader,
                                     writer: asyncio.StreamWriter) -> None:
        frames = await read_frames(reader, 5, backend.reads)
        # Answer the first three, then the rest in a second write: order is all that links them.
        writer.write(b"".join(encode_frame(f[::-1]) for f in frames[:3]))
        await writer.drain()
        writer.write(b"".join(encode_frame(f[::-1]) for f in frames[3:]))
        await writer.drain()
        await reader.read()  # until the router closes

    backend = await script(echo_reversed_in_order)
    connection = await backend.connect()
    sink = Sink()
    for i in range(5):  # sent in one loop iteration: one write
        connection.send(f"req-{i}".encode(), sink, i, WAIT_S)
    await sink.wait_for(5)

    assert [(token, response) for token, response, _ in sink.calls] == [
        (i, f"req-{i}".encode()[::-1]) for i in range(5)
    ]
    assert backend.reads == [5 * (4 + 5)]  # all five frames arrived in one read
    assert not connection.is_closed
    connection.close()


async def test_large_payload_round_trips(script: Callable[[Handler], Awaitable[Script]]) -> None:
    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        (frame,) = await read_frames(reader, 1, backend.reads)
        writer.write(encode_frame(frame))
        await writer.drain()
        await reader.read()

    backend = await script(echo)
    connection = await backend.connect()
    payload = bytes(range(256)) * 1024  # 256 KiB: header and payload written separately
    async with asyncio.timeout(WAIT_S):
        assert await request(connection, payload, WAIT_S) == payload
    connection.close()


async def test_lost_mid_answer_fails_the_head_as_protocol_error_and_the_rest_as_retryable(
    script: Callable[[Handler], Awaitable[Script]],
) -> None:
    async def half_answer_then_close(reader: asyncio.StreamReader,
                                     writer: asyncio.StreamWriter) -> None:
        await read_frames(reader, 3, backend.reads)
        writer.write(encode_frame(b"complete answer to the first")[:-3])
        await writer.drain()

    backend = await script(half_answer_then_close)
    connection = await backend.connect()
    sink = Sink()
    for i in range(3):
        connection.send(b"x", sink, i, WAIT_S)
    await sink.wait_for(3)

    kinds = [(token, type(error)) for token, _, error in sink.calls]
    assert kinds == [(0, BackendProtocolError), (1, BackendUnavailable), (2, BackendUnavailable)]
    assert connection.is_closed


async def test_connection_closed_before_any_answer_fails_every_request_as_retryable(
    script: Callable[[Handler], Awaitable[Script]],
) -> None:
    async def read_then_close(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_frames(reader, 2, backend.reads)

    backend = await script(read_then_close)
    connection = await backend.connect()
    sink = Sink()
    connection.send(b"a", sink, "a", WAIT_S)
    connection.send(b"b", sink, "b", WAIT_S)
    await sink.wait_for(2)
    assert [(token, type(error)) for token, _, error in sink.calls] == [
        ("a", BackendUnavailable), ("b", BackendUnavailable)
    ]


async def test_timeout_of_the_oldest_request_discards_the_connection(
    script: Callable[[Handler], Awaitable[Script]],
) -> None:
    async def never_answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()

    backend = await script(never_answer)
    connection = await backend.connect()
    sink = Sink()
    connection.send(b"slow", sink, 0, 0.05)
    connection.send(b"behind it", sink, 1, WAIT_S)
    await sink.wait_for(2)

    assert [(token, type(error)) for token, _, error in sink.calls] == [
        (0, BackendTimeout), (1, BackendUnavailable)
    ]
    assert connection.is_closed


async def test_a_shorter_deadline_rearms_the_connection_timer(
    script: Callable[[Handler], Awaitable[Script]],
) -> None:
    """One timer per connection, armed for the earliest deadline: a probe with a short timeout
    sent after a long-timeout request that was answered must still time out on time."""

    async def answer_once(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        (frame,) = await read_frames(reader, 1, backend.reads)
        writer.write(encode_frame(frame))
        await writer.drain()
        await reader.read()

    backend = await script(answer_once)
    connection = await backend.connect()
    async with asyncio.timeout(WAIT_S):
        assert await request(connection, b"long", 60.0) == b"long"  # leaves a 60 s timer armed
        with pytest.raises(BackendTimeout):
            await request(connection, b"", 0.05)


async def test_send_on_a_closed_connection_fails_at_once(
    script: Callable[[Handler], Awaitable[Script]],
) -> None:
    async def idle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()

    backend = await script(idle)
    connection = await backend.connect()
    connection.close()
    sink = Sink()
    connection.send(b"late", sink, "late", WAIT_S)
    assert [(token, type(error)) for token, _, error in sink.calls] == [
        ("late", BackendUnavailable)
    ]


# -- bytes nobody asked for, and the connection check (a recording transport, no socket) -------


class RecordingTransport:
    """The transport calls a BackendConnection makes, in order, with what was written."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.written = b""

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default

    def write(self, data: bytes) -> None:
        self.calls.append("write")
        self.written += data

    def writelines(self, parts: list[bytes]) -> None:
        self.calls.append("writelines")
        self.written += b"".join(parts)

    def close(self) -> None:
        self.calls.append("close")

    def abort(self) -> None:
        self.calls.append("abort")


def recorded_connection(
    *, check: bool = False
) -> tuple[BackendConnection, RecordingTransport, list[BackendError]]:
    broken: list[BackendError] = []
    connection = BackendConnection("backend:1", 1 << 20, broken.append, check=check)
    transport = RecordingTransport()
    connection.connection_made(transport)  # type: ignore[arg-type]  # the calls it makes
    return connection, transport, broken


async def flushed() -> None:
    """Let the ``call_soon`` flush of this loop iteration run."""
    await asyncio.sleep(0)


async def test_bytes_before_the_first_flush_answer_nothing_and_fail_the_queued_requests() -> None:
    """A greeting read while the requests are still queued (not written) is no answer: the
    connection is discarded and each request fails as never sent, safe to retry elsewhere and
    counted (not a keep-alive connection closing)."""
    connection, transport, broken = recorded_connection()
    sink = Sink()
    connection.send(b"a", sink, "a", WAIT_S)
    connection.send(b"b", sink, "b", WAIT_S)
    connection.data_received(encode_frame(b"hello"))  # before the flush ran
    await flushed()

    assert [(token, response) for token, response, _ in sink.calls] == [("a", None), ("b", None)]
    errors = [error for _, _, error in sink.calls]
    assert all(isinstance(e, BackendUnavailable) and not e.reused_connection for e in errors)
    assert transport.written == b"" and transport.calls == ["abort"]
    assert connection.is_closed
    assert broken == []  # the failed requests carry the failure


async def test_bytes_on_an_idle_connection_reach_on_broken() -> None:
    connection, transport, broken = recorded_connection()
    connection.data_received(b"\x00\x00")
    assert [type(error) for error in broken] == [BackendProtocolError]
    assert "before it was asked" in broken[0].message
    assert connection.is_closed and transport.calls == ["abort"]


async def test_a_frame_after_the_last_answer_is_unsolicited() -> None:
    connection, _, broken = recorded_connection()
    sink = Sink()
    connection.send(b"a", sink, "a", WAIT_S)
    await flushed()
    connection.data_received(encode_frame(b"A") + encode_frame(b"extra"))
    assert [(token, response, error) for token, response, error in sink.calls] == [
        ("a", b"A", None)
    ]
    assert [type(error) for error in broken] == [BackendProtocolError]
    assert connection.is_closed


async def test_the_connection_check_goes_first_and_its_empty_answer_is_not_a_reply() -> None:
    connection, transport, broken = recorded_connection(check=True)
    assert transport.written == encode_frame(b"")  # in connection_made, before any request
    sink = Sink()
    connection.send(b"a", sink, "a", WAIT_S)
    await flushed()
    assert transport.written == encode_frame(b"") + encode_frame(b"a")  # not held back
    connection.data_received(encode_frame(b"") + encode_frame(b"A"))
    assert [(token, response, error) for token, response, error in sink.calls] == [
        ("a", b"A", None)
    ]
    assert not connection.is_closed and broken == []


async def test_a_greeting_answering_the_connection_check_is_a_protocol_error() -> None:
    """The greeting comes back first, where the check's empty answer belongs: the written
    request gets BACKEND_PROTOCOL_ERROR (the backend may have run it), the one still queued
    fails as never sent, and no answer is delivered."""
    connection, _, broken = recorded_connection(check=True)
    sink = Sink()
    connection.send(b"a", sink, "a", WAIT_S)
    await flushed()
    connection.send(b"b", sink, "b", WAIT_S)
    connection.data_received(encode_frame(b"hello") + encode_frame(b"") + encode_frame(b"a"))
    await flushed()
    assert [(token, response, type(error)) for token, response, error in sink.calls] == [
        ("a", None, BackendProtocolError), ("b", None, BackendUnavailable)
    ]
    assert "connection check" in str(sink.calls[0][2])
    assert connection.is_closed and broken == []


async def test_a_greeting_on_an_idle_checked_connection_reaches_on_broken() -> None:
    connection, _, broken = recorded_connection(check=True)
    connection.data_received(encode_frame(b"hello"))
    assert [type(error) for error in broken] == [BackendProtocolError]
    assert connection.is_closed
