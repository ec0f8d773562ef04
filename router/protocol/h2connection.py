"""One HTTP/2 connection as a state machine, either side: bytes in, events out, bytes to send.

``receive_data(bytes)`` returns the events the bytes complete; the methods that send
(``send_headers``, ``send_data``, ``reset_stream``, ``goaway``, ``consumed``) append frames
that ``data_to_send()`` hands over. No socket, no clock, no asyncio: the relay's Protocols own
those, and tests wire two of these back to back.

What it keeps and why:

* Streams: ``Stream`` per open stream, with both windows and both half-closes. A stream is
  forgotten once both sides ended it or either reset it; frames that race a reset (DATA or
  trailers in flight) are dropped, their flow control still counted, their header blocks
  still decoded (HPACK state is the connection's, not the stream's).
* Stream ids (server side): a client opens odd ids, each above the last (a lower or even id
  is PROTOCOL_ERROR); past ``max_concurrent_streams`` a new stream is refused
  (REFUSED_STREAM), and so is one past our final GOAWAY's last-stream-id (never processed:
  the client may send it elsewhere). A graceful shutdown is two GOAWAYs: ``goaway`` with
  ``last_stream_id`` 2^31-1 and a ``ping`` first (streams still taken), then, once the
  ``PingAcked`` shows the peer has seen the notice, the final ``goaway()`` naming the last
  stream taken; what the peer opened before the notice reached it is therefore covered.
  Client side: ``open_stream`` takes the next odd id while the peer's
  MAX_CONCURRENT_STREAMS and GOAWAY allow; a GOAWAY refuses our streams above its
  last-stream-id (``StreamReset`` with REFUSED_STREAM: they were never processed, so safe to
  retry).
* Flow control, receiving: a peer that sends past a window is a FLOW_CONTROL_ERROR. Credit is
  returned only through ``consumed``: the relay calls it when the bytes left on the other
  side, so a slow reader there holds its windows here shut and nothing buffers without bound.
  Credit goes back in WINDOW_UPDATEs of at least half a window (one per megabyte, not one per
  frame). Sending: ``send_data`` writes what both windows allow and queues the rest on the
  stream; when WINDOW_UPDATE or SETTINGS opens them, the queue moves and ``Sent`` says how
  many bytes of which stream left (the relay returns that much credit upstream). Trailers
  and END_STREAM wait behind queued data.
* Header blocks: HEADERS then CONTINUATION with nothing between (else PROTOCOL_ERROR), bounded
  in bytes and frames; decoded by ``h2headers.HeaderDecoder``, encoded without dynamic table.
* Settings: ours go out first (table size 0, no push, our limits); the peer's are applied
  and acknowledged in order. A PING is answered.
* Rapid reset: every stream a client resets before it was answered costs one of
  ``_RESET_BUDGET`` tokens, every stream that ends normally gives one back; at zero the
  connection ends with ENHANCE_YOUR_CALM (CVE-2023-44487), so opening and resetting streams
  cannot cost a backend more than the client is willing to see answered.

A connection error (``H2Error`` with stream 0) sends GOAWAY with its code and ends the
connection (``Terminated``); a stream error sends RST_STREAM and ends the stream
(``StreamReset`` with ``remote`` False). No other exception escapes ``receive_data``, whatever
the bytes (a hypothesis test holds it to that).
"""

from __future__ import annotations

from typing import Any

from router.protocol import h2frames as f
from router.protocol.h2frames import H2Error
from router.protocol.h2headers import HeaderDecoder, Headers, encode_block

_RESET_BUDGET = 200
_MAX_CONTINUATIONS = 64  # frames in one header block (an empty-CONTINUATION flood ends here)


class HeadersReceived:
    __slots__ = ("block", "end_stream", "headers", "stream", "stream_id", "trailers")

    def __init__(self, stream: Stream, headers: Headers, end_stream: bool, trailers: bool,
                 block: bytes | None = None) -> None:
        self.stream = stream  # the stream's record, even once it is forgotten (ended)
        self.stream_id = stream.id
        self.headers = headers
        self.end_stream = end_stream
        self.trailers = trailers  # not the stream's first header block
        # The block as it came when it needs no HPACK state to read (``portable``): it may be
        # sent on another connection as it is, instead of encoding ``headers`` again.
        self.block = block

    def __repr__(self) -> str:
        return f"HeadersReceived({self.stream_id}, {self.headers}, end={self.end_stream})"


class DataReceived:
    __slots__ = ("data", "end_stream", "flow", "stream", "stream_id")

    def __init__(self, stream: Stream, data: bytes, end_stream: bool, flow: int) -> None:
        self.stream = stream
        self.stream_id = stream.id
        self.data = data
        self.end_stream = end_stream
        self.flow = flow  # bytes counted against the windows (padding included)

    def __repr__(self) -> str:
        return f"DataReceived({self.stream_id}, {len(self.data)} bytes, end={self.end_stream})"


class StreamReset:
    __slots__ = ("code", "remote", "stream", "stream_id")

    def __init__(self, stream: Stream, code: int, remote: bool) -> None:
        self.stream = stream
        self.stream_id = stream.id
        self.code = code
        self.remote = remote  # the peer reset it (else we did, for its error)

    def __repr__(self) -> str:
        return f"StreamReset({self.stream_id}, code={self.code:#x}, remote={self.remote})"


class GoAwayReceived:
    __slots__ = ("code", "debug", "last_stream_id")

    def __init__(self, last_stream_id: int, code: int, debug: bytes) -> None:
        self.last_stream_id = last_stream_id
        self.code = code
        self.debug = debug

    def __repr__(self) -> str:
        return f"GoAwayReceived(last={self.last_stream_id}, code={self.code:#x})"


class PingAcked:
    """The peer acknowledged our PING with ``opaque``."""

    __slots__ = ("opaque",)

    def __init__(self, opaque: bytes) -> None:
        self.opaque = opaque

    def __repr__(self) -> str:
        return f"PingAcked({self.opaque!r})"


class Sent:
    """``count`` queued data bytes of ``stream_id`` went out (a window opened)."""

    __slots__ = ("count", "stream", "stream_id")

    def __init__(self, stream: Stream, count: int) -> None:
        self.stream = stream
        self.stream_id = stream.id
        self.count = count

    def __repr__(self) -> str:
        return f"Sent({self.stream_id}, {self.count})"


class Terminated:
    """The connection is over: we sent GOAWAY for the peer's ``error``."""

    __slots__ = ("error",)

    def __init__(self, error: H2Error) -> None:
        self.error = error

    def __repr__(self) -> str:
        return f"Terminated({self.error!r})"


Event = (HeadersReceived | DataReceived | StreamReset | GoAwayReceived | PingAcked | Sent
         | Terminated)


class Stream:
    __slots__ = (
        "headers_received", "id", "local_closed", "peer", "pending", "pending_end",
        "pending_trailers", "recv_unacked", "recv_window", "remote_closed", "send_window",
    )

    def __init__(self, stream_id: int, recv_window: int, send_window: int) -> None:
        self.id = stream_id
        self.recv_window = recv_window
        self.send_window = send_window
        self.recv_unacked = 0
        self.remote_closed = False
        self.local_closed = False
        self.headers_received = False
        self.pending = b""  # data waiting for window
        self.pending_end = False  # END_STREAM after it
        self.pending_trailers: Headers | bytes | None = None
        self.peer: Any = None  # the relay's, for the stream on the other side

    def __repr__(self) -> str:
        return (f"Stream({self.id}, recv={self.recv_window}, send={self.send_window}, "
                f"pending={len(self.pending)})")


class H2Connection:
    def __init__(
        self, *, client: bool, max_concurrent_streams: int = 256,
        initial_window: int = 1 << 20, connection_window: int = 4 << 20,
        max_header_list_size: int = 16_384, max_frame_size: int = f.DEFAULT_MAX_FRAME_SIZE,
    ) -> None:
        self.client = client
        self.max_concurrent_streams = max_concurrent_streams
        self.initial_window = initial_window
        self._connection_window = connection_window
        self._frames = f.FrameDecoder(max_frame_size, expect_preface=not client)
        self._decoder = HeaderDecoder(max_header_list_size)
        self.streams: dict[int, Stream] = {}
        self._blocked: dict[int, Stream] = {}  # streams with data queued for window
        # Frames to send; DATA as header and payload apart (``append_data``), written with one
        # vectored write (``output``) or joined (``data_to_send``).
        self._out: list[bytes | memoryview] = []
        self._next_stream_id = 1
        self._last_peer_stream = 0
        self._active_peer = 0
        self._active_local = 0
        self.peer_max_frame_size = f.DEFAULT_MAX_FRAME_SIZE
        self.peer_initial_window = f.DEFAULT_WINDOW
        self.peer_max_streams = 1 << 31
        self.send_window = f.DEFAULT_WINDOW
        self.recv_window = connection_window
        self._recv_unacked = 0
        self._continuation: list[Any] | None = None  # [stream id, end_stream, parts, size]
        self._reset_budget = _RESET_BUDGET
        # The peer set SETTINGS_HEADER_TABLE_SIZE: our next block starts with a table size
        # update to 0 (RFC 7541 section 4.2; nghttp2 and hpack refuse a block without one
        # after a decrease). Our blocks never use the table, so 0 suits any size.
        self._table_update = False
        self.goaway_sent: int | None = None
        self.goaway_received: int | None = None
        self.terminated = False
        self.streams_opened = 0
        self._handlers = (
            self._on_data, self._on_headers, self._on_priority, self._on_rst_stream,
            self._on_settings, self._on_push_promise, self._on_ping, self._on_goaway,
            self._on_window_update, self._on_continuation,
        )
        settings = [
            (f.HEADER_TABLE_SIZE, 0), (f.ENABLE_PUSH, 0),
            (f.MAX_CONCURRENT_STREAMS, max_concurrent_streams),
            (f.INITIAL_WINDOW_SIZE, initial_window), (f.MAX_FRAME_SIZE, max_frame_size),
            (f.MAX_HEADER_LIST_SIZE, max_header_list_size),
        ]
        if client:
            self._out.append(f.PREFACE)
        self._out.append(f.encode_settings(settings))
        if connection_window > f.DEFAULT_WINDOW:
            self._out.append(f.encode_window_update(0, connection_window - f.DEFAULT_WINDOW))

    # -- receiving ----------------------------------------------------------------------------

    def receive_data(self, data: bytes) -> list[Event]:
        events: list[Event] = []
        if self.terminated:
            return events
        try:
            frames = self._frames.receive(data)
            handlers = self._handlers
            for kind, flags, stream_id, payload in frames:
                if self._continuation is not None and kind != f.CONTINUATION:
                    raise H2Error(f.PROTOCOL_ERROR, "header block interrupted by another frame")
                if kind > f.CONTINUATION:
                    continue  # unknown frame types are ignored (RFC 9113 section 4.1)
                try:
                    handlers[kind](flags, stream_id, payload, events)
                except H2Error as error:
                    if not error.stream_id:
                        raise
                    self._stream_error(error, events)
        except H2Error as error:
            self._fail(error, events)
        return events

    def _stream_error(self, error: H2Error, events: list[Event]) -> None:
        stream = self.streams.get(error.stream_id)
        self._out.append(f.encode_rst_stream(error.stream_id, error.code))
        if stream is not None:
            self._close(stream)
            events.append(StreamReset(stream, error.code, remote=False))

    def _fail(self, error: H2Error, events: list[Event]) -> None:
        self.goaway(error.code, error.message.encode()[:256])
        self.terminated = True
        events.append(Terminated(error))

    def _idle(self, stream_id: int) -> bool:
        """No stream has had this id yet."""
        if self.client:
            return stream_id % 2 == 0 or stream_id >= self._next_stream_id
        return stream_id % 2 == 0 or stream_id > self._last_peer_stream

    def _on_data(self, flags: int, stream_id: int, payload: bytes, events: list[Event]) -> None:
        # Unpadded on a stream (nearly every DATA frame): the payload is the data.
        data = payload if stream_id and not flags & f.PADDED else f.data_of(
            flags, payload, stream_id)
        flow = len(payload)
        if flow > self.recv_window:
            raise H2Error(f.FLOW_CONTROL_ERROR, "DATA past the connection window")
        self.recv_window -= flow
        stream = self.streams.get(stream_id)
        if stream is None or stream.remote_closed:
            self.consumed(stream_id, flow)  # dropped: its credit goes back at once
            if stream is None and self._idle(stream_id):
                raise H2Error(f.PROTOCOL_ERROR, f"DATA on idle stream {stream_id}")
            if stream is not None:
                raise H2Error(f.STREAM_CLOSED, "DATA after END_STREAM", stream_id)
            return  # a stream we reset or ended: frames in flight
        if flow > stream.recv_window:
            self.consumed(stream_id, flow)
            raise H2Error(f.FLOW_CONTROL_ERROR, "DATA past the stream window", stream_id)
        stream.recv_window -= flow
        end = bool(flags & f.END_STREAM)
        if end:
            stream.remote_closed = True
        events.append(DataReceived(stream, data, end, flow))
        if end and stream.local_closed:
            self._close(stream)

    def _on_headers(self, flags: int, stream_id: int, payload: bytes, events: list[Event]
                    ) -> None:
        if stream_id and not flags & (f.PADDED | f.PRIORITY_FLAG):
            fragment = payload  # no padding, no priority: the payload is the fragment
        else:
            fragment = f.fragment_of(f.HEADERS, flags, payload, stream_id)
        end = bool(flags & f.END_STREAM)
        if flags & f.END_HEADERS:
            self._headers_complete(stream_id, end, fragment, events)
            return
        self._continuation = [stream_id, end, [fragment], len(fragment)]
        self._check_block_size(len(fragment), 1)

    def _on_continuation(self, flags: int, stream_id: int, payload: bytes, events: list[Event]
                         ) -> None:
        block = self._continuation
        if block is None or block[0] != stream_id:
            raise H2Error(f.PROTOCOL_ERROR, "CONTINUATION without a header block to continue")
        block[2].append(payload)
        block[3] += len(payload)
        self._check_block_size(block[3], len(block[2]))
        if flags & f.END_HEADERS:
            self._continuation = None
            self._headers_complete(stream_id, block[1], b"".join(block[2]), events)

    def _check_block_size(self, size: int, frames: int) -> None:
        if size > self._decoder.max_header_list_size or frames > _MAX_CONTINUATIONS:
            raise H2Error(f.ENHANCE_YOUR_CALM, "header block too large")

    def _headers_complete(self, stream_id: int, end: bool, block: bytes, events: list[Event]
                          ) -> None:
        # Always decoded: the HPACK context is the connection's, whatever the stream's state.
        headers, portable_block = self._decoder.decode_portable(block)
        portable = block if portable_block else None
        stream = self.streams.get(stream_id)
        if stream is None:
            if self.client or not self._idle(stream_id):
                if self._idle(stream_id):
                    raise H2Error(f.PROTOCOL_ERROR, f"HEADERS on idle stream {stream_id}")
                if not self.client and not end:
                    # Not trailers racing our reset: a new request on a used id.
                    raise H2Error(f.PROTOCOL_ERROR, f"stream id {stream_id} used again")
                return  # a stream that ended or that we reset: in flight, dropped
            if stream_id % 2 == 0:
                raise H2Error(f.PROTOCOL_ERROR, f"even stream id {stream_id} from a client")
            stream = self._accept(stream_id)
            if stream is None:
                return
            events.append(HeadersReceived(stream, headers, end, False, portable))
        else:
            if stream.remote_closed:
                raise H2Error(f.STREAM_CLOSED, "HEADERS after END_STREAM", stream_id)
            trailers = stream.headers_received
            if trailers and not end:
                raise H2Error(f.PROTOCOL_ERROR, "trailers without END_STREAM", stream_id)
            stream.headers_received = True
            events.append(HeadersReceived(stream, headers, end, trailers, portable))
        if end:
            stream.remote_closed = True
            if stream.local_closed:
                self._close(stream)

    def _accept(self, stream_id: int) -> Stream | None:
        """A stream the client opened; None if refused (too many, or past our final GOAWAY)."""
        self._last_peer_stream = stream_id
        if self.goaway_sent is not None or self._active_peer >= self.max_concurrent_streams:
            self._out.append(f.encode_rst_stream(stream_id, f.REFUSED_STREAM))
            return None
        stream = Stream(stream_id, self.initial_window, self.peer_initial_window)
        stream.headers_received = True
        self.streams[stream_id] = stream
        self._active_peer += 1
        self.streams_opened += 1
        return stream

    def _on_priority(self, flags: int, stream_id: int, payload: bytes, events: list[Event]
                     ) -> None:
        f.check_priority(payload, stream_id)  # priorities are advisory: not acted on

    def _on_rst_stream(self, flags: int, stream_id: int, payload: bytes, events: list[Event]
                       ) -> None:
        code = f.read_rst_stream(payload, stream_id)
        stream = self.streams.get(stream_id)
        if stream is None:
            if self._idle(stream_id):
                raise H2Error(f.PROTOCOL_ERROR, f"RST_STREAM on idle stream {stream_id}")
            return
        if not self.client and not stream.local_closed:
            self._reset_budget -= 1
            if self._reset_budget <= 0:
                raise H2Error(f.ENHANCE_YOUR_CALM, "too many streams reset before an answer")
        self._close(stream, normal=False)
        events.append(StreamReset(stream, code, remote=True))

    def _on_settings(self, flags: int, stream_id: int, payload: bytes, events: list[Event]
                     ) -> None:
        settings = f.read_settings(flags, payload, stream_id)
        if flags & f.ACK:
            return  # our table size of 0 takes effect with the peer's size update, not here
        for ident, value in settings:
            if ident == f.INITIAL_WINDOW_SIZE:
                delta = value - self.peer_initial_window
                self.peer_initial_window = value
                for stream in self.streams.values():
                    stream.send_window += delta
                    if stream.send_window > f.MAX_WINDOW:
                        raise H2Error(f.FLOW_CONTROL_ERROR, "a stream window over 2^31-1")
            elif ident == f.MAX_FRAME_SIZE:
                self.peer_max_frame_size = value
            elif ident == f.MAX_CONCURRENT_STREAMS:
                self.peer_max_streams = value
            elif ident == f.HEADER_TABLE_SIZE:
                self._table_update = True
        self._out.append(f.SETTINGS_ACK)
        if self._blocked:
            self._flush(list(self._blocked.values()), events)

    def _on_push_promise(self, flags: int, stream_id: int, payload: bytes, events: list[Event]
                         ) -> None:
        raise H2Error(f.PROTOCOL_ERROR, "PUSH_PROMISE (push is disabled)")

    def _on_ping(self, flags: int, stream_id: int, payload: bytes, events: list[Event]) -> None:
        f.check_ping(payload, stream_id)
        if flags & f.ACK:
            events.append(PingAcked(payload))
        else:
            self._out.append(f.encode_ping(payload, ack=True))

    def _on_goaway(self, flags: int, stream_id: int, payload: bytes, events: list[Event]
                   ) -> None:
        last, code, debug = f.read_goaway(payload, stream_id)
        self.goaway_received = last if self.goaway_received is None else min(
            last, self.goaway_received)
        events.append(GoAwayReceived(last, code, debug))
        if not self.client:
            return
        for stream in [s for s in self.streams.values() if s.id > last]:
            self._close(stream, normal=False)  # never processed: safe to send elsewhere
            events.append(StreamReset(stream, f.REFUSED_STREAM, remote=True))

    def _on_window_update(self, flags: int, stream_id: int, payload: bytes, events: list[Event]
                          ) -> None:
        increment = f.read_window_update(payload, stream_id)
        if stream_id == 0:
            self.send_window += increment
            if self.send_window > f.MAX_WINDOW:
                raise H2Error(f.FLOW_CONTROL_ERROR, "the connection window over 2^31-1")
            if self._blocked:
                self._flush(list(self._blocked.values()), events)
            return
        stream = self.streams.get(stream_id)
        if stream is None:
            if self._idle(stream_id):
                raise H2Error(f.PROTOCOL_ERROR, f"WINDOW_UPDATE on idle stream {stream_id}")
            return
        stream.send_window += increment
        if stream.send_window > f.MAX_WINDOW:
            raise H2Error(f.FLOW_CONTROL_ERROR, "a stream window over 2^31-1", stream_id)
        if stream.pending or stream.pending_end:
            self._flush([stream], events)

    # -- sending ------------------------------------------------------------------------------

    @property
    def can_open(self) -> bool:
        """A stream may be opened now (client side)."""
        return (not self.terminated and self.goaway_received is None
                and self._active_local < self.peer_max_streams
                and self._next_stream_id <= f.MAX_WINDOW)

    @property
    def active_streams(self) -> int:
        return self._active_local + self._active_peer

    def open_stream(self) -> Stream:
        """A new stream of ours (client side); check ``can_open`` first."""
        stream_id = self._next_stream_id
        self._next_stream_id += 2
        stream = Stream(stream_id, self.initial_window, self.peer_initial_window)
        self.streams[stream_id] = stream
        self._active_local += 1
        self.streams_opened += 1
        return stream

    def send_headers(self, stream_id: int, headers: Headers | bytes, end_stream: bool = False
                     ) -> None:
        """``headers`` as fields, or as a block already encoded without the dynamic table (a
        ``portable`` block received on another connection)."""
        stream = self.streams.get(stream_id)
        if stream is None or stream.local_closed or stream.pending_end:
            return  # reset meanwhile, or ended: nothing to send it on
        if stream.pending:
            stream.pending_trailers = headers  # behind the data still waiting for window
            stream.pending_end = True
            return
        self._out.append(f.encode_headers(
            stream_id, self._block(headers), end_stream, self.peer_max_frame_size))
        if end_stream:
            self._end_local(stream)

    def send_data(self, stream_id: int, data: bytes, end_stream: bool = False) -> int:
        """Send ``data`` as far as the windows allow, queue the rest; the bytes sent now."""
        stream = self.streams.get(stream_id)
        if stream is None or stream.local_closed:
            return len(data)  # reset meanwhile: dropped (its credit may go back)
        if stream.pending or stream.pending_end:
            stream.pending += data
            stream.pending_end = stream.pending_end or end_stream
            return 0
        size = len(data)
        window = min(self.send_window, stream.send_window)
        if size <= window:
            self.send_window -= size
            stream.send_window -= size
            f.append_data(self._out, stream_id, data, end_stream, self.peer_max_frame_size)
            if end_stream:
                self._end_local(stream)
            return size
        sent = max(window, 0)
        if sent:
            self.send_window -= sent
            stream.send_window -= sent
            f.append_data(self._out, stream_id, data[:sent], False, self.peer_max_frame_size)
        stream.pending = data[sent:]
        stream.pending_end = end_stream
        self._blocked[stream_id] = stream
        return sent

    def _flush(self, streams: list[Stream], events: list[Event]) -> None:
        """Move queued data of ``streams`` as far as the windows now allow."""
        for stream in streams:
            window = min(self.send_window, stream.send_window)
            pending = stream.pending
            if window <= 0 and pending:
                continue
            chunk, stream.pending = pending[:window], pending[window:]
            done = not stream.pending
            trailers = stream.pending_trailers if done else None
            end = done and stream.pending_end and trailers is None
            if chunk or end:
                self.send_window -= len(chunk)
                stream.send_window -= len(chunk)
                f.append_data(self._out, stream.id, chunk, end, self.peer_max_frame_size)
            if chunk:
                events.append(Sent(stream, len(chunk)))
            if not done:
                continue
            self._blocked.pop(stream.id, None)
            stream.pending_trailers = None
            if trailers is not None:
                self._out.append(f.encode_headers(
                    stream.id, self._block(trailers), True, self.peer_max_frame_size))
            if stream.pending_end:
                stream.pending_end = False
                self._end_local(stream)

    def _block(self, headers: Headers | bytes) -> bytes:
        block = headers if isinstance(headers, bytes) else encode_block(headers)
        if self._table_update:
            self._table_update = False
            return b"\x20" + block
        return block

    def _end_local(self, stream: Stream) -> None:
        stream.local_closed = True
        if stream.remote_closed:
            self._close(stream)

    def consumed(self, stream_id: int, count: int) -> None:
        """``count`` received bytes of ``stream_id`` are dealt with: their credit may go back."""
        if count <= 0:
            return
        self._recv_unacked += count
        if self._recv_unacked >= self._connection_window >> 1:
            self._out.append(f.encode_window_update(0, self._recv_unacked))
            self.recv_window += self._recv_unacked
            self._recv_unacked = 0
        stream = self.streams.get(stream_id)
        if stream is None or stream.remote_closed:
            return  # it sends no more: no credit needed
        stream.recv_unacked += count
        if stream.recv_unacked >= self.initial_window >> 1:
            self._out.append(f.encode_window_update(stream_id, stream.recv_unacked))
            stream.recv_window += stream.recv_unacked
            stream.recv_unacked = 0

    def reset_stream(self, stream_id: int, code: int = f.CANCEL) -> None:
        stream = self.streams.get(stream_id)
        if stream is None:
            return
        self._out.append(f.encode_rst_stream(stream_id, code))
        self._close(stream, normal=False)

    def goaway(self, code: int = f.NO_ERROR, debug: bytes = b"", *,
               last_stream_id: int | None = None) -> None:
        """No new streams of the peer's beyond the ones it has opened; those go on. With
        ``last_stream_id`` (2^31-1): the notice of a graceful shutdown (RFC 9113 section
        6.8), after which streams are still taken until the final GOAWAY. The final one is
        sent once without an error: a later one repeats nothing (an error's GOAWAY still goes
        out, with the same last-stream-id: it may never go up)."""
        if last_stream_id is None:
            if self.goaway_sent is not None:
                if code == f.NO_ERROR:
                    return
                last_stream_id = self.goaway_sent
            else:
                last_stream_id = self.goaway_sent = self._last_peer_stream
        self._out.append(f.encode_goaway(last_stream_id, code, debug))

    def ping(self, opaque: bytes = b"\0" * 8) -> None:
        self._out.append(f.encode_ping(opaque))

    def _close(self, stream: Stream, *, normal: bool = True) -> None:
        if self.streams.pop(stream.id, None) is None:
            return
        self._blocked.pop(stream.id, None)
        if (stream.id % 2 == 1) == self.client:
            self._active_local -= 1
        else:
            self._active_peer -= 1
            if normal and self._reset_budget < _RESET_BUDGET:
                self._reset_budget += 1

    def data_to_send(self) -> bytes:
        out = self._out
        if not out:
            return b""
        data = b"".join(out)
        out.clear()
        return data

    def output(self) -> list[bytes | memoryview]:
        """What ``data_to_send`` would join, as the parts themselves (for ``writelines``:
        one vectored write, no copy of the data frames' payloads)."""
        out = self._out
        if out:
            self._out = []
        return out

    def statistics(self) -> dict[str, Any]:
        return {
            "streams": len(self.streams), "streams_opened": self.streams_opened,
            "blocked_streams": len(self._blocked),
            "pending_bytes": sum(len(s.pending) for s in self._blocked.values()),
            "send_window": self.send_window,
            "recv_window": self.recv_window, "header_blocks_decoded": self._decoder.decoded,
            "header_cache_hits": self._decoder.hits, "goaway_sent": self.goaway_sent,
            "goaway_received": self.goaway_received, "terminated": self.terminated,
        }

    def __repr__(self) -> str:
        side = "client" if self.client else "server"
        return f"H2Connection({side}, streams={len(self.streams)}, terminated={self.terminated})"
