"""The HTTP/2 connection state machine, two of them back to back (no sockets, no sleeps), and
hostile frame sequences that must end in the right connection or stream error."""

from __future__ import annotations

from typing import Any

import pytest
from hpack import Encoder
from hypothesis import given, settings
from hypothesis import strategies as st

from router.protocol import h2frames as f
from router.protocol.h2connection import (
    DataReceived,
    GoAwayReceived,
    H2Connection,
    HeadersReceived,
    PingAcked,
    StreamReset,
    Terminated,
)
from router.protocol.h2headers import encode_block

REQUEST = [(":method", "POST"), (":scheme", "http"), (":path", "/pkg.Svc/Call"),
           (":authority", "x"), ("content-type", "application/grpc"), ("te", "trailers")]


def pump(a: H2Connection, b: H2Connection) -> tuple[list[Any], list[Any]]:
    """Exchange bytes until both are quiet; the events each side saw."""
    seen_a: list[Any] = []
    seen_b: list[Any] = []
    for _ in range(50):
        out_a, out_b = a.data_to_send(), b.data_to_send()
        if not out_a and not out_b:
            return seen_a, seen_b
        seen_b += b.receive_data(out_a)
        seen_a += a.receive_data(out_b)
    raise AssertionError("the two connections never went quiet")


def pair(**server: Any) -> tuple[H2Connection, H2Connection]:
    client, srv = H2Connection(client=True), H2Connection(client=False, **server)
    assert pump(client, srv) == ([], [])
    return client, srv


def test_a_unary_call_both_ways_and_header_blocks_cached_after_the_ack():
    client, server = pair()
    for _ in range(3):
        stream = client.open_stream()
        client.send_headers(stream.id, REQUEST)
        client.send_data(stream.id, b"hello", end_stream=True)
        _, at_server = pump(client, server)
        assert [type(e) for e in at_server] == [HeadersReceived, DataReceived]
        assert at_server[0].headers == REQUEST and at_server[1].data == b"hello"
        assert at_server[1].end_stream
        server.send_headers(stream.id, [(":status", "200"), ("content-type", "application/grpc")])
        server.send_data(stream.id, b"world")
        server.send_headers(stream.id, [("grpc-status", "0")], end_stream=True)
        at_client, _ = pump(client, server)
        assert [(type(e), getattr(e, "trailers", None)) for e in at_client] == [
            (HeadersReceived, False), (DataReceived, None), (HeadersReceived, True)]
        assert at_client[2].end_stream and not client.streams and not server.streams
    # The first block each way shrinks the table (b"\x20"): every later repeat is a hit.
    assert server.statistics()["header_cache_hits"] == 1
    assert client.statistics()["header_cache_hits"] == 3


def test_a_slow_reader_holds_the_window_shut_and_credit_moves_the_rest():
    client, server = pair(initial_window=1000)
    stream = client.open_stream()
    client.send_headers(stream.id, REQUEST)
    assert client.send_data(stream.id, b"a" * 2500, end_stream=True) == 1000
    client.send_headers(stream.id, [("x-never", "sent")])  # after END_STREAM: ignored
    _, at_server = pump(client, server)
    assert sum(len(e.data) for e in at_server if isinstance(e, DataReceived)) == 1000
    _, at_server = pump(client, server)  # nothing consumed: nothing more comes
    assert at_server == []
    server.consumed(stream.id, 400)  # under half a window: no update yet
    assert pump(client, server) == ([], [])
    server.consumed(stream.id, 600)
    at_client, at_server = pump(client, server)
    assert [repr(e) for e in at_client] == [f"Sent({stream.id}, 1000)"]
    server.consumed(stream.id, 1000)
    at_client, at_server = pump(client, server)
    assert [repr(e) for e in at_client] == [f"Sent({stream.id}, 500)"]
    assert at_server[-1].end_stream and len(at_server[-1].data) == 500


def test_trailers_wait_behind_data_that_waits_for_window():
    client, server = pair()
    server.initial_window = 0  # nothing: the server's side of a stream it sends on
    stream = client.open_stream()
    client.send_headers(stream.id, REQUEST, end_stream=True)
    pump(client, server)
    client_stream = client.streams[stream.id]
    client_stream.recv_window = 10**9  # the client reads everything; the window is the server's
    server.streams[stream.id].send_window = 3
    server.send_headers(stream.id, [(":status", "200")])
    assert server.send_data(stream.id, b"abcdef") == 3
    server.send_headers(stream.id, [("grpc-status", "0")], end_stream=True)
    at_client, _ = pump(client, server)
    assert [type(e) for e in at_client] == [HeadersReceived, DataReceived]
    client.receive_data(b"")
    server.receive_data(f.encode_window_update(stream.id, 10))
    at_client, _ = pump(client, server)
    assert [type(e) for e in at_client] == [DataReceived, HeadersReceived]
    assert at_client[0].data == b"def" and at_client[1].trailers and at_client[1].end_stream


def test_goaway_refuses_the_streams_past_its_last_stream_id():
    client, server = pair()
    first, second = client.open_stream(), client.open_stream()
    client.send_headers(first.id, REQUEST)
    pump(client, server)
    server.goaway()
    client.send_headers(second.id, REQUEST)
    at_client, at_server = pump(client, server)
    assert at_server == []  # past the GOAWAY: ignored
    assert [repr(e) for e in at_client] == [
        repr(GoAwayReceived(first.id, 0, b"")),
        f"StreamReset({second.id}, code={f.REFUSED_STREAM:#x}, remote=True)"]
    assert not client.can_open and first.id in server.streams


def test_streams_past_max_concurrent_are_refused():
    client, server = pair(max_concurrent_streams=2)
    ids = [client.open_stream().id for _ in range(3)]
    for stream_id in ids:
        client.send_headers(stream_id, REQUEST)
    at_client, at_server = pump(client, server)
    assert [e.stream_id for e in at_server] == ids[:2]
    assert [repr(e) for e in at_client] == [
        f"StreamReset({ids[2]}, code={f.REFUSED_STREAM:#x}, remote=True)"]


def raw_server() -> H2Connection:
    server = H2Connection(client=False)
    server.receive_data(f.PREFACE + f.encode_settings([]) + f.SETTINGS_ACK)
    server.data_to_send()
    return server


def headers_frame(stream_id: int, end: bool = False) -> bytes:
    return f.encode_headers(stream_id, b"\x20" + encode_block(REQUEST), end, 16_384)


def terminated(events: list[Any]) -> int:
    assert isinstance(events[-1], Terminated), events
    return events[-1].error.code


@pytest.mark.parametrize(("frames", "code"), [
    (headers_frame(3) + headers_frame(1), f.PROTOCOL_ERROR),  # a lower stream id: reused
    (headers_frame(2), f.PROTOCOL_ERROR),  # an even id from a client
    (f.frame(f.DATA, 0, 5, b"x"), f.PROTOCOL_ERROR),  # DATA on an idle stream
    (f.frame(f.PUSH_PROMISE, 0, 1, b"\0" * 4), f.PROTOCOL_ERROR),
    (f.frame(f.HEADERS, 0, 1, b"") + f.frame(f.PING, 0, 0, b"\0" * 8), f.PROTOCOL_ERROR),
    (f.frame(f.CONTINUATION, f.END_HEADERS, 1, b""), f.PROTOCOL_ERROR),
    (f.frame(f.HEADERS, 0, 1, b"") + f.frame(f.CONTINUATION, 0, 1, b"") * 70,
     f.ENHANCE_YOUR_CALM),  # a CONTINUATION flood
    (f.frame(f.HEADERS, 0, 1, b"\0" * 10_000) + f.frame(f.CONTINUATION, 0, 1, b"\0" * 10_000),
     f.ENHANCE_YOUR_CALM),  # a huge header list
    (f.encode_window_update(0, f.MAX_WINDOW), f.FLOW_CONTROL_ERROR),  # window overflow
    (f.frame(f.HEADERS, f.END_HEADERS, 1, b"\xff\xff\xff\xff"), f.COMPRESSION_ERROR),
])
def test_connection_errors(frames, code):
    server = raw_server()
    events = server.receive_data(frames)
    assert terminated(events) == code
    goaway = f.FrameDecoder().receive(server.data_to_send())[-1]
    assert goaway[0] == f.GOAWAY and f.read_goaway(goaway[3], 0)[1] == code
    assert server.receive_data(headers_frame(99)) == []  # nothing after the end


def test_data_past_the_connection_window_is_a_flow_control_error():
    server = H2Connection(client=False, connection_window=f.DEFAULT_WINDOW, initial_window=1 << 20)
    server.receive_data(f.PREFACE + f.encode_settings([]))
    events = server.receive_data(headers_frame(1) + f.encode_data(1, b"x" * 70_000, False, 16_384))
    assert terminated(events) == f.FLOW_CONTROL_ERROR


def test_data_past_a_stream_window_resets_that_stream_only():
    server = H2Connection(client=False, initial_window=100)
    server.receive_data(f.PREFACE + f.encode_settings([]))
    events = server.receive_data(headers_frame(1) + f.frame(f.DATA, 0, 1, b"x" * 101)
                                 + headers_frame(3))
    assert repr(events[1]) == f"StreamReset(1, code={f.FLOW_CONTROL_ERROR:#x}, remote=False)"
    assert isinstance(events[2], HeadersReceived) and events[2].stream_id == 3


def test_rapid_reset_ends_the_connection():
    server = raw_server()
    flood = b"".join(headers_frame(i) + f.encode_rst_stream(i, f.CANCEL)
                     for i in range(1, 1000, 2))
    events = server.receive_data(flood)
    assert terminated(events) == f.ENHANCE_YOUR_CALM
    assert sum(isinstance(e, StreamReset) for e in events) < 200


def test_answered_streams_earn_back_the_reset_budget():
    server = raw_server()
    for i in range(1, 2000, 2):
        events = server.receive_data(headers_frame(i, end=True))
        assert isinstance(events[0], HeadersReceived)
        if i % 4 == 1:
            server.send_headers(i, [(":status", "200")], end_stream=True)
        else:
            assert server.receive_data(f.encode_rst_stream(i, f.CANCEL))[0].remote
    assert not server.terminated


def test_a_ping_is_answered_and_settings_acknowledged():
    server = raw_server()
    settings_frame = f.encode_settings([(f.MAX_FRAME_SIZE, 20_000)])
    server.receive_data(f.encode_ping(b"12345678") + settings_frame)
    frames = f.FrameDecoder().receive(server.data_to_send())
    assert [(k, fl, p) for k, fl, _, p in frames] == [
        (f.PING, f.ACK, b"12345678"), (f.SETTINGS, f.ACK, b"")]
    assert server.peer_max_frame_size == 20_000


def test_blocks_sent_with_the_dynamic_table_before_the_ack_decode():
    server = H2Connection(client=False)
    peer = Encoder()
    block = peer.encode(REQUEST)
    again = peer.encode(REQUEST)  # references the dynamic table
    events = server.receive_data(
        f.PREFACE + f.encode_settings([]) + f.encode_headers(1, block, True, 16_384)
        + f.encode_headers(3, again, True, 16_384))
    assert [e.headers for e in events] == [REQUEST, REQUEST]



def test_only_blocks_that_need_no_table_are_portable_and_they_relay_as_they_came():
    client, server = pair()
    answer = [(":status", "200"), ("content-type", "application/grpc")]
    portable = []
    for _ in range(2):
        stream = client.open_stream()
        client.send_headers(stream.id, REQUEST, end_stream=True)
        pump(client, server)
        server.send_headers(stream.id, answer, end_stream=True)
        at_client, _ = pump(client, server)
        portable.append(at_client[0].block)
    # The server's first block starts with the table size update the client's setting asked
    # for: it is not relayed as it is (another decoder need not expect one); the next is.
    assert portable[0] is None
    assert portable[1] == encode_block(answer)

    # Relayed as bytes to a third connection, the block means the same there.
    relay_client, backend = pair()
    stream = relay_client.open_stream()
    relay_client.send_headers(stream.id, portable[1], end_stream=True)
    _, at_backend = pump(relay_client, backend)
    assert at_backend[0].headers == answer

    # Before our table size setting is acknowledged the peer may use its dynamic table: a
    # block that does is never portable, and neither is one right after it (table not empty).
    raw = H2Connection(client=False)
    peer = Encoder()
    events = raw.receive_data(
        f.PREFACE + f.encode_settings([]) + f.encode_headers(1, peer.encode(REQUEST), True,
                                                             16_384)
        + f.encode_headers(3, peer.encode(REQUEST), True, 16_384))
    assert [e.headers for e in events] == [REQUEST, REQUEST]
    assert [e.block for e in events] == [None, None]


# -- hostile input -----------------------------------------------------------------------------

frame_st = st.tuples(
    st.integers(0, 11), st.integers(0, 255), st.integers(0, 9),
    st.one_of(st.binary(max_size=40), st.just(encode_block(REQUEST)), st.just(b"\0\0\0\1"),
              st.just(b"\x7f\xff\xff\xff")),
)


@settings(deadline=None, max_examples=400)
@given(st.lists(frame_st, max_size=40), st.booleans())
def test_hostile_frame_sequences_end_in_errors_never_exceptions(frames, as_client):
    conn = H2Connection(client=as_client, max_concurrent_streams=4)
    start = b"" if as_client else f.PREFACE
    data = start + b"".join(f.frame(*fr) for fr in frames)
    events = conn.receive_data(data)
    assert all(not isinstance(e, Terminated) for e in events[:-1])
    for stream_id in list(conn.streams):  # whatever is open still takes a send
        conn.send_data(stream_id, b"x" * 100, end_stream=True)
    assert len(conn.streams) <= 4 or as_client
    assert len(conn.data_to_send()) < 100 * 4 + 60 * (len(frames) + 4) + 1000


def test_a_graceful_shutdown_takes_streams_until_the_final_goaway_then_refuses_them():
    """Server side: the notice (2^31-1) and a PING; a stream the client opened before it read
    the notice is still taken; the ack lets the final GOAWAY name the last stream taken, and a
    stream above it is refused (REFUSED_STREAM), one at or below it goes on."""
    client, server = pair()
    first = client.open_stream()
    client.send_headers(first.id, REQUEST)
    pump(client, server)
    server.goaway(last_stream_id=f.MAX_WINDOW)
    server.ping(b"drain-01")
    racing = client.open_stream()  # sent before the notice arrived
    client.send_headers(racing.id, REQUEST)
    at_server = server.receive_data(client.data_to_send())
    assert [(type(e), e.stream_id) for e in at_server] == [(HeadersReceived, racing.id)]
    at_client = client.receive_data(server.data_to_send())
    assert [repr(e) for e in at_client] == [repr(GoAwayReceived(f.MAX_WINDOW, 0, b""))]
    assert not client.can_open  # the notice: no new streams from a well-behaved client
    acked = server.receive_data(client.data_to_send())
    assert [repr(e) for e in acked] == [repr(PingAcked(b"drain-01"))]
    server.goaway()
    server.goaway()  # once: a second final GOAWAY repeats nothing
    final = [fr for fr in f.FrameDecoder().receive(server.data_to_send()) if fr[0] == f.GOAWAY]
    assert [f.read_goaway(fr[3], 0)[:2] for fr in final] == [(racing.id, f.NO_ERROR)]
    assert server.goaway_sent == racing.id
    late = racing.id + 2  # a client that ignores the notice
    server.receive_data(f.encode_headers(late, encode_block(REQUEST), True, 16_384))
    refused = f.FrameDecoder().receive(server.data_to_send())
    assert [(k, s, f.read_rst_stream(p, s)) for k, _, s, p in refused] == [
        (f.RST_STREAM, late, f.REFUSED_STREAM)]
    assert late not in server.streams and {first.id, racing.id} <= set(server.streams)
    server.send_headers(racing.id, [(":status", "200"), ("grpc-status", "0")], end_stream=True)
    answer = client.receive_data(server.data_to_send())  # answered as usual below the last id
    assert [(type(e), e.stream_id, e.end_stream) for e in answer] == [
        (HeadersReceived, racing.id, True)]


def test_a_backend_goaway_keeps_the_streams_it_covers_and_refuses_the_rest():
    """Client side: GOAWAY(last) ends the streams above ``last`` as REFUSED_STREAM (never
    processed: safe to retry elsewhere), leaves those at or below it open, and opens no more."""
    client, server = pair()
    streams = [client.open_stream() for _ in range(4)]
    for stream in streams[:2]:
        client.send_headers(stream.id, REQUEST, end_stream=True)
    pump(client, server)
    events = client.receive_data(f.encode_goaway(streams[1].id, f.NO_ERROR))
    assert [repr(e) for e in events] == [
        repr(GoAwayReceived(streams[1].id, 0, b"")),
        *(f"StreamReset({s.id}, code={f.REFUSED_STREAM:#x}, remote=True)" for s in streams[2:])]
    assert set(client.streams) == {streams[0].id, streams[1].id} and not client.can_open
    events = client.receive_data(f.encode_goaway(f.MAX_WINDOW, f.NO_ERROR))
    assert client.goaway_received == streams[1].id  # a later GOAWAY never raises it
    server.send_headers(streams[0].id, [(":status", "200"), ("grpc-status", "0")], True)
    events = client.receive_data(server.data_to_send())
    assert [(type(e), e.stream_id) for e in events] == [(HeadersReceived, streams[0].id)]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from(["open", "notice", "final", "deliver"]), max_size=40))
def test_every_stream_is_taken_at_or_below_the_final_goaway_and_refused_above_it(
    steps: list[str]
) -> None:
    """Whatever the interleaving of a client opening streams and a server shutting down
    gracefully (notice, final GOAWAY) with bytes delivered at any point: each stream is taken
    (HeadersReceived) iff its id is at or below the final last-stream-id, each one above it is
    reset REFUSED_STREAM at the client, and the last-stream-id never changes once sent."""
    client, server = pair()
    taken: set[int] = set()
    opened: list[int] = []
    refused: set[int] = set()

    def deliver() -> None:
        for event in server.receive_data(client.data_to_send()):
            if isinstance(event, HeadersReceived):
                taken.add(event.stream_id)
        for event in client.receive_data(server.data_to_send()):
            if isinstance(event, StreamReset) and event.code == f.REFUSED_STREAM:
                refused.add(event.stream_id)

    final: int | None = None
    for step in steps:
        if step == "open":
            stream = client.open_stream()  # even past a GOAWAY: a rude client
            client.send_headers(stream.id, REQUEST, end_stream=True)
            opened.append(stream.id)
        elif step == "notice":
            server.goaway(last_stream_id=f.MAX_WINDOW)
        elif step == "final":
            server.goaway()
            final = server.goaway_sent if final is None else final
            assert server.goaway_sent == final
        else:
            deliver()
    deliver()
    deliver()
    last = server.goaway_sent
    if last is None:
        assert taken == set(opened)
        return
    assert taken == {i for i in opened if i <= last}
    assert {i for i in opened if i > last} <= refused
