"""One relayed gRPC call: a client stream bridged to a backend stream, frame by frame.

A ``RelayCall`` is the ``Origin`` of the call's ``Request`` and its ``forward``: the scheduler
places it like any request (policy, room, queue deadline, retries), and when it starts an
attempt on a backend connection (the lease of ``H2Upstream``), ``forward`` opens a stream
there and sends the request headers and whatever data has arrived. From then on events pass
straight through, with no task and no await:

* client DATA -> backend DATA (the bytes as they are; only the frame header is new), and the
  response's HEADERS, DATA and trailers back the same way. Credit is passed through: the
  client's window is reopened only for bytes that left towards the backend (``sent``), and
  the backend's only for bytes that left towards the client, so a slow reader on either side
  holds the other back instead of making the router buffer.
* what is buffered before a backend stream exists (the call waits for room, or the first
  message is needed to route by model) is bounded by the stream window we gave the client,
  since none of it is credited until it is sent.

Accepted = submitted to the scheduler: at the request headers for calls routed by
``x-route-model`` or to any backend, after the first whole message for KServe calls routed by
``model_name``/``model_version``.

Explicit model control: when the attempt's placement must load its model first
(``model_control.py``), ``forward`` hands the attempt to the door's ``ModelController`` and
returns; the lease is held while it loads, and ``_controlled`` sends the call (or fails the
attempt) once it is done.

Retry: while no response byte has come back and the client has half-closed with every
request byte still held (``max_replay_bytes``), a failure before the answer (connection
refused or lost, REFUSED_STREAM, or a trailers-only UNAVAILABLE) is ``BackendUnavailable`` and
the scheduler may place the call again; the same bytes go to the next backend. Otherwise the
call gets its outcome: a relayed status unchanged, or the router's own as a trailers-only
response (or trailers, once headers went out) with the error's code in ``x-router-error``.

Deadlines: ``grpc-timeout`` starts a timer; when it fires the backend stream is cancelled and
the client answered DEADLINE_EXCEEDED. The backend is told the time left (its own
``grpc-timeout``). Once the client has half-closed and no response message has come back,
``request_timeout_s`` bounds the wait (BACKEND_TIMEOUT), unless the client's deadline is
sooner. A client's RST_STREAM cancels the backend stream (CANCEL) and ends the attempt.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from router.core.clock import Timer
from router.core.errors import (
    ROUTER_ERROR_HEADER,
    BackendError,
    BackendTimeout,
    BackendUnavailable,
    Cancelled,
    DeadlineExceeded,
    MalformedMessage,
    RouterError,
)
from router.dispatch.access import AccessEntry
from router.dispatch.request import Request
from router.protocol import h2frames as f
from router.protocol.grpc_compression import decompressed_start
from router.protocol.h2connection import Stream
from router.protocol.h2headers import Headers, encode_cached, encode_field
from router.upstream.h2_backend import H2BackendConnection

if TYPE_CHECKING:
    from router.frontdoor.grpc.relay import ClientConnection, RelayFrontDoor

# gRPC status names and numbers (the numbers are what travels in grpc-status).
STATUS_CODES = {
    "OK": 0, "CANCELLED": 1, "UNKNOWN": 2, "INVALID_ARGUMENT": 3, "DEADLINE_EXCEEDED": 4,
    "NOT_FOUND": 5, "ALREADY_EXISTS": 6, "PERMISSION_DENIED": 7, "RESOURCE_EXHAUSTED": 8,
    "FAILED_PRECONDITION": 9, "ABORTED": 10, "OUT_OF_RANGE": 11, "UNIMPLEMENTED": 12,
    "INTERNAL": 13, "UNAVAILABLE": 14, "DATA_LOSS": 15, "UNAUTHENTICATED": 16,
}
STATUS_NAMES = {str(number): name for name, number in STATUS_CODES.items()}
_UNAVAILABLE = "14"

# Headers that describe one hop, never relayed (RFC 9113 section 8.2.2), and the client's
# deadline, which the router re-states for the backend as the time left.
_HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "proxy-connection", "transfer-encoding", "upgrade",
    "grpc-timeout",
})
_READ_AT_THE_DOOR = _HOP_BY_HOP | {":path"}
_TIMEOUT_UNITS = {"H": 3600.0, "M": 60.0, "S": 1.0, "m": 1e-3, "u": 1e-6, "n": 1e-9}
_MESSAGE_HEADER = 5  # compressed flag, 4-byte length
DEADLINE_SLACK_S = 0.05
# A client's reset this close to its deadline is the deadline's: the client's clock started
# before its headers reached the router, by the transit time, which grows with load. A share
# of the timeout, bounded, instead of a fixed slack; only how the call is counted depends on it.
CLIENT_DEADLINE_SHARE = 0.2
CLIENT_DEADLINE_SLACK_MAX_S = 1.0


def client_reset_slack(timeout: float) -> float:
    """How early before its deadline a client's reset still counts as the deadline's."""
    return min(max(DEADLINE_SLACK_S, CLIENT_DEADLINE_SHARE * timeout), CLIENT_DEADLINE_SLACK_MAX_S)


def parse_timeout(value: str) -> float | None:
    """grpc-timeout ("100m", "5S", ...) in seconds; None if it is not one."""
    unit = _TIMEOUT_UNITS.get(value[-1:])
    digits = value[:-1]
    if unit is None or not digits.isdigit() or len(digits) > 8:
        return None
    return int(digits) * unit


def encode_timeout(seconds: float) -> str:
    return f"{max(int(seconds * 1_000_000), 1)}u" if seconds < 90 else f"{int(seconds)}S"


def grpc_message(text: str) -> str:
    """grpc-message's percent-encoding: UTF-8, everything outside printable ASCII and '%'."""
    out = []
    for byte in text.encode():
        out.append(chr(byte) if 0x20 <= byte <= 0x7E and byte != 0x25 else f"%{byte:02X}")
    return "".join(out)


def error_trailers(error: RouterError, with_headers: bool) -> Headers:
    status = [("grpc-status", str(STATUS_CODES[error.grpc_status])),
              ("grpc-message", grpc_message(error.message)), (ROUTER_ERROR_HEADER, error.code)]
    if with_headers:  # a trailers-only response
        return [(":status", "200"), ("content-type", "application/grpc"), *status]
    return status


def message_end(chunks: list[bytes], max_bytes: int) -> int:
    """How many bytes of request data hold the whole first message (5 until its prefix is
    in), compressed or not. Raises ``MalformedMessage`` past ``max_bytes``."""
    head = chunks[0] if chunks else b""
    if len(head) < _MESSAGE_HEADER:
        head = b"".join(chunks)[:_MESSAGE_HEADER]
        if len(head) < _MESSAGE_HEADER:
            return _MESSAGE_HEADER
    length = int.from_bytes(head[1:5])
    if length > max_bytes:
        raise MalformedMessage(f"a message of {length} bytes is over grpc.max_message_bytes")
    return _MESSAGE_HEADER + length


def first_message(chunks: list[bytes], max_bytes: int) -> bytes | None:
    """The first whole gRPC message of the request data so far; None if it is incomplete.
    Raises ``MalformedMessage`` for a compressed message (its fields cannot be read)."""
    data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
    if len(data) < _MESSAGE_HEADER:
        return None
    if data[0] != 0:
        raise MalformedMessage("a compressed message cannot be routed by model")
    length = int.from_bytes(data[1:5])
    if length > max_bytes:
        raise MalformedMessage(f"a message of {length} bytes is over grpc.max_message_bytes")
    if len(data) < _MESSAGE_HEADER + length:
        return None
    return data[_MESSAGE_HEADER:_MESSAGE_HEADER + length]


def first_message_start(chunks: list[bytes], max_bytes: int, encoding: str | None
                        ) -> tuple[bytes, bool] | None:
    """The first message of the request data so far, for the model field reader: as it
    came, or for a compressed one its start decompressed (``grpc_compression``), with
    whether that is all of it; None if the message is not all in yet."""
    data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
    if len(data) < _MESSAGE_HEADER or data[0] == 0:
        message = first_message([data], max_bytes)
        return None if message is None else (message, True)
    end = message_end([data], max_bytes)
    if len(data) < end:
        return None
    return decompressed_start(encoding, data[_MESSAGE_HEADER:end])


def split_messages(chunks: list[bytes]) -> tuple[list[bytes], bytes]:
    """The whole (uncompressed) gRPC messages in ``chunks``, and the bytes after them."""
    data = b"".join(chunks)
    messages = []
    pos = 0
    while len(data) - pos >= _MESSAGE_HEADER:
        length = int.from_bytes(data[pos + 1:pos + _MESSAGE_HEADER])
        end = pos + _MESSAGE_HEADER + length
        if end > len(data):
            break
        messages.append(data[pos + _MESSAGE_HEADER:end])
        pos = end
    return messages, data[pos:]


class MessageMeter:
    """Counts the message bytes of a gRPC data stream (without the 5-byte prefixes), for the
    access log."""

    __slots__ = ("_header", "_left", "total")

    def __init__(self) -> None:
        self._header = b""
        self._left = 0
        self.total = 0

    def feed(self, data: bytes) -> None:
        pos, end = 0, len(data)
        while pos < end:
            if self._left:
                take = min(self._left, end - pos)
                self._left -= take
                self.total += take
                pos += take
                continue
            part = data[pos:pos + _MESSAGE_HEADER - len(self._header)]
            pos += len(part)
            self._header += part
            if len(self._header) == _MESSAGE_HEADER:
                self._left = int.from_bytes(self._header[1:])
                self._header = b""

    def __repr__(self) -> str:
        return f"MessageMeter({self.total})"


class RelayCall:
    __slots__ = (
        "_bound_timer",
        "_deadline_timer",
        "abandoned",
        "answered",
        "attempt_sent",
        "backend",
        "bstream",
        "capture",
        "client",
        "client_ended",
        "credited",
        "data_answered",
        "deadline",
        "done",
        "door",
        "entry",
        "headers",
        "meters",
        "method",
        "replay",
        "replay_size",
        "request",
        "started",
        "status",
        "stream",
        "unsent",
        "unsent_size",
    )

    def __init__(self, door: RelayFrontDoor, client: ClientConnection, stream: Stream,
                 headers: Headers, end_stream: bool) -> None:
        self.door = door
        self.client = client
        self.stream = stream
        self.started = door.clock.now()
        self.client_ended = end_stream
        self.method = ""
        self.deadline: float | None = None
        forwarded = []
        for field in headers:  # one set lookup per field; the fields kept are not copied
            name = field[0]
            if name not in _READ_AT_THE_DOOR:
                forwarded.append(field)
            elif name == ":path":
                self.method = field[1]
                forwarded.append(field)
            elif name == "grpc-timeout":
                timeout = parse_timeout(field[1])
                if timeout is not None:
                    self.deadline = self.started + timeout
        self.headers = forwarded
        self.unsent: list[bytes] = []
        self.unsent_size = 0
        self.replay: list[bytes] | None = []
        self.replay_size = 0
        self.credited = 0  # request bytes whose credit went back to the client
        self.attempt_sent = 0  # request bytes the current attempt has sent
        self.request: Request | None = None
        self.backend: H2BackendConnection | None = None
        self.bstream: Stream | None = None
        self.answered = False  # response headers went to the client
        self.data_answered = False  # a response message too
        # ModelMetadata: (cache key, the response so far), kept for the router's cache.
        self.capture: tuple[str, list[bytes]] | None = None
        # With an access log: its entry, and the message bytes each way (in, out).
        self.entry: AccessEntry | None = None
        self.meters: tuple[MessageMeter, MessageMeter] | None = None
        if door.access_log is not None:
            self.entry = AccessEntry("grpc", client.peer, self.method)
            self.meters = (MessageMeter(), MessageMeter())
        self.done = False  # the client has its answer (or is gone)
        self.abandoned: RouterError | None = None
        self.status = "OK"
        self._deadline_timer: Timer | None = None
        self._bound_timer: Timer | None = None
        if self.deadline is not None:
            # The client's own timer fires first and it resets the stream; the router's ends
            # the call if the client did not (it answers DEADLINE_EXCEEDED to a silent one).
            self._deadline_timer = door.clock.call_at(self.deadline + DEADLINE_SLACK_S,
                                                      self._deadline_passed)

    def header(self, name: str) -> str | None:
        for key, value in self.headers:
            if key == name:
                return value
        return None

    # -- admission ----------------------------------------------------------------------------

    def submit(self, model: str | None) -> None:
        """Accept the call: the scheduler answers it exactly once (``request_done``)."""
        if self.entry is not None:
            self.entry.model = model
        request = Request(b"", self, self.started, kind="grpc", model=model,
                          forward=self.forward, replayable=self._replayable())
        self.request = request
        self.door.dispatcher.submit(request)

    def _replayable(self) -> bool:
        return self.client_ended and self.replay is not None and not self.answered

    # -- the client's side --------------------------------------------------------------------

    def client_data(self, data: bytes, end_stream: bool, flow: int) -> None:
        client = self.client.conn
        if self.done:
            client.consumed(self.stream.id, flow)
            return
        if self.meters is not None:
            self.meters[0].feed(data)
        if flow > len(data):
            client.consumed(self.stream.id, flow - len(data))  # padding: nothing to pass on
        if end_stream:
            self.client_ended = True
        bstream = self.bstream
        if bstream is not None:
            backend = self.backend
            assert backend is not None
            if self.replay is not None:
                self._keep(data)
            self._sent(backend.conn.send_data(bstream.id, data, end_stream))
            backend.mark()
            if end_stream:
                self._start_bound()
        else:
            if data:
                self.unsent.append(data)
                self.unsent_size += len(data)
            if self.request is None:
                # Read by the router before it is placed (the first message of a call routed
                # by model, a call it answers): bounded by grpc.max_message_bytes instead of
                # the window, so a message larger than the window still comes in whole.
                self._credit_buffered()
                self.door.waiting_call_data(self)
        if self.request is not None and end_stream:
            self.request.replayable = self._replayable()

    def _credit_buffered(self) -> None:
        if self.unsent_size > self.door.config.max_message_bytes + _MESSAGE_HEADER:
            self.fail(MalformedMessage(
                f"a request message over grpc.max_message_bytes="
                f"{self.door.config.max_message_bytes}"))
            return
        owed = self.unsent_size - self.credited
        if owed > 0:
            self.credited = self.unsent_size
            self.client.conn.consumed(self.stream.id, owed)
            self.client.mark()

    def _keep(self, data: bytes) -> None:
        self.replay_size += len(data)
        if self.replay_size > self.door.max_replay_bytes:
            self.replay = None
        elif self.replay is not None:
            self.replay.append(data)

    def _sent(self, count: int) -> None:
        """``count`` more request bytes of this attempt went out: credit the client up to it."""
        self.attempt_sent += count
        owed = self.attempt_sent - self.credited
        if owed > 0:
            self.credited = self.attempt_sent
            self.client.conn.consumed(self.stream.id, owed)
            self.client.mark()

    def client_sent(self, count: int) -> None:
        """``count`` response bytes left towards the client: the backend may send as many."""
        backend, bstream = self.backend, self.bstream
        if backend is not None and bstream is not None:
            backend.conn.consumed(bstream.id, count)
            backend.mark()

    def client_reset(self) -> None:
        """The client reset the stream or went away."""
        if self.done:
            return
        error: RouterError
        if self._deadline_reached():
            error = DeadlineExceeded("the client's deadline passed")
        else:
            error = Cancelled("the client cancelled the call")
        self._finish(error.grpc_status)
        self._end_attempt(error, f.CANCEL)

    def _deadline_passed(self) -> None:
        self._deadline_timer = None
        if not self.done:
            self.fail(DeadlineExceeded("the client's deadline passed"))

    def _start_bound(self) -> None:
        """The client has half-closed: the backend has ``request_timeout_s`` for its first
        response message, unless the client's own deadline comes first."""
        bound = self.door.request_timeout_s
        clock = self.door.clock
        if self._bound_timer is not None or self.data_answered:
            return
        if self.deadline is not None and self.deadline <= clock.now() + bound:
            return
        self._bound_timer = clock.call_at(clock.now() + bound, self._bound_passed)

    def _bound_passed(self) -> None:
        self._bound_timer = None
        if not self.done and self.bstream is not None:
            address = self.request.backend.address if self.request and self.request.backend else ""
            self.fail(BackendTimeout(
                f"{address} did not answer within request_timeout_s="
                f"{self.door.request_timeout_s}s of the request's end"))

    def fail(self, error: RouterError) -> None:
        """Answer the client with ``error`` now; end any attempt with it."""
        if self.done:
            return
        self._respond_error(error)
        self._end_attempt(error, f.CANCEL)

    def _end_attempt(self, error: RouterError, code: int) -> None:
        """Stop the attempt in progress (or the one still to come) with ``error``."""
        request = self.request
        if self.bstream is not None and self.backend is not None:
            self.backend.conn.reset_stream(self.bstream.id, code)
            self.backend.mark()
            self.bstream = None
            assert request is not None
            self.door.dispatcher.attempt_done(request, None, error)
        elif request is not None and not request.done:
            self.abandoned = error  # waiting for room: ended when the scheduler starts it

    # -- the scheduler's side -----------------------------------------------------------------

    def forward(self, request: Request) -> None:
        """The scheduler started an attempt on ``request.lease``: open the backend stream."""
        if self.abandoned is not None:
            loop = asyncio.get_running_loop()
            loop.call_soon(self.door.dispatcher.attempt_done, request, None, self.abandoned)
            return
        placement = request.placement
        if placement is not None and placement.control is not None:
            control = self.door.model_control
            if control is not None and control.hold(request, self.deadline, self._controlled):
                return  # explicit model control: the model is loaded there first
        backend = request.lease
        assert isinstance(backend, H2BackendConnection)
        if self.entry is not None and request.backend is not None:
            self.entry.backend = request.backend.spec.id
        stream = backend.open_stream(self)
        self.backend, self.bstream = backend, stream
        self.attempt_sent = 0
        chunks = (self.replay or []) + self.unsent if self.replay else self.unsent
        if self.replay is not None:
            self.replay = chunks
            self.replay_size = sum(len(c) for c in chunks)
            if self.replay_size > self.door.max_replay_bytes:
                self.replay = None
        self.unsent = []
        self.unsent_size = 0
        end = self.client_ended
        conn = backend.conn
        conn.send_headers(stream.id, self._backend_headers(), end and not chunks)
        if chunks:
            data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
            self._sent(conn.send_data(stream.id, data, end))
        backend.mark()
        if end:
            self._start_bound()

    def _controlled(self, request: Request, error: RouterError | None) -> None:
        """The model control calls before this attempt are over (``model_control.py``):
        send it on its lease, or fail the attempt with ``error``. The lease's connection may
        have gone (or filled up) meanwhile: a retryable failure, nothing was sent."""
        lease = request.lease
        if error is None and self.abandoned is None and isinstance(lease, H2BackendConnection) \
                and not lease.can_open:
            error = BackendUnavailable(f"{self._address()}: no stream could be opened on its "
                                       "connection after the model load")
        if error is not None and self.abandoned is None:
            self.door.dispatcher.attempt_done(request, None, error)
        else:
            self.forward(request)

    def _backend_headers(self) -> bytes:
        """The request block for the backend: the client's fields (encoded once per distinct
        set, ``encode_cached``) and the time left as its own grpc-timeout."""
        block = encode_cached(self.headers)
        if self.deadline is None:
            return block
        left = self.deadline - self.door.clock.now()
        return block + encode_field("grpc-timeout", encode_timeout(left))

    def request_done(self, request: Request) -> None:
        if not self.done and request.error is not None:
            self._respond_error(request.error)

    # -- the backend's side (StreamPeer) ------------------------------------------------------

    def backend_headers(self, headers: Headers, end_stream: bool, block: bytes | None = None
                        ) -> None:
        if self.done:
            return
        client = self.client
        relayed = _relayed(headers, block)
        if end_stream:
            status = _value(headers, "grpc-status")
            if not self.answered and status == _UNAVAILABLE and self._replayable():
                self._attempt_failed(BackendUnavailable(
                    f"{self._address()}: UNAVAILABLE: {_value(headers, 'grpc-message') or ''}"))
                return
            client.conn.send_headers(self.stream.id, relayed, end_stream=True)
            client.mark()
            if status == "0" and self.capture is not None:
                self.door.captured(self.capture[0], b"".join(self.capture[1]))
            self._complete(STATUS_NAMES.get(status or "", "UNKNOWN"))
            return
        if not self.answered:
            self._answer_started()
            client.conn.send_headers(self.stream.id, relayed)
            client.mark()

    def _answer_started(self) -> None:
        self.answered = True
        self.replay = None
        if self.request is not None:
            self.request.replayable = False

    def backend_data(self, data: bytes, end_stream: bool, flow: int) -> None:
        backend, bstream = self.backend, self.bstream
        if self.done or backend is None or bstream is None:
            if backend is not None:
                backend.conn.consumed(self.bstream.id if self.bstream else 0, flow)
            return
        if not self.answered:
            self._answer_started()
        self.data_answered = True
        if self._bound_timer is not None:  # a response message: the bound is met
            self._bound_timer.cancel()
            self._bound_timer = None
        if self.capture is not None:
            self.capture[1].append(data)
        if self.meters is not None:
            self.meters[1].feed(data)
        sent = self.client.conn.send_data(self.stream.id, data, end_stream)
        backend.conn.consumed(bstream.id, flow - len(data) + sent)
        self.client.mark()
        if end_stream:  # no trailers: the client sees a stream without a status
            self._complete("UNKNOWN")

    def backend_sent(self, count: int) -> None:
        self._sent(count)

    def backend_reset(self, error: BackendError, code: int | None) -> None:
        if self.done or self.bstream is None:
            return
        if not self.answered and (code is None or code == f.REFUSED_STREAM):
            self._attempt_failed(error)
            return
        self.bstream = None
        self.client.conn.reset_stream(self.stream.id, f.INTERNAL_ERROR if code is None else code)
        self.client.mark()
        self._finish(error.grpc_status)
        assert self.request is not None
        self.door.dispatcher.attempt_done(self.request, None, error)

    def _attempt_failed(self, error: BackendError) -> None:
        """The attempt failed before any answer: the scheduler retries or answers ``error``."""
        if self.bstream is not None and self.backend is not None:
            self.backend.conn.reset_stream(self.bstream.id, f.CANCEL)
            self.backend.mark()
        self.bstream = None
        self.backend = None
        request = self.request
        assert request is not None
        request.replayable = self._replayable()
        self.door.dispatcher.attempt_done(request, None, error)

    def _complete(self, status: str) -> None:
        """The backend's status went to the client: the call is over, relayed as it was."""
        self._finish(status)
        request = self.request
        if request is None:
            return
        if status == "DEADLINE_EXCEEDED" and self._deadline_reached():
            # The backend was told the time left: its timer is the client's deadline, and it
            # may fire before the client's reset arrives. Counted once, as the client's.
            error = DeadlineExceeded("the client's deadline passed")
            self.door.dispatcher.attempt_done(request, None, error)
        else:
            self.door.dispatcher.attempt_done(request, b"", None)

    def _deadline_reached(self) -> bool:
        """The client's deadline has passed, or is within the slack of its reset's transit."""
        deadline = self.deadline
        return deadline is not None and self.door.clock.now() >= deadline - client_reset_slack(
            deadline - self.started)

    # -- the end ------------------------------------------------------------------------------

    def _respond_error(self, error: RouterError) -> None:
        if self.entry is not None:
            self.entry.error = error.code
        client = self.client
        client.conn.send_headers(self.stream.id, error_trailers(error, not self.answered),
                                 end_stream=True)
        client.mark()
        self._finish(error.grpc_status)

    def _finish(self, status: str) -> None:
        self.done = True
        self.status = status
        for timer in (self._deadline_timer, self._bound_timer):
            if timer is not None:
                timer.cancel()
        self._deadline_timer = self._bound_timer = None
        stream = self.stream
        if not self.client_ended and not stream.pending and stream.id in self.client.conn.streams:
            # Answered before the client half-closed: it need send no more (gRPC's servers do
            # the same), and what it still sends is dropped with its credit returned.
            self.client.conn.reset_stream(stream.id, f.NO_ERROR)
        self.door.call_finished(self)

    def _address(self) -> str:
        request = self.request
        return request.backend.address if request is not None and request.backend else ""

    def __repr__(self) -> str:
        state = "done" if self.done else "answering" if self.answered else "pending"
        return f"RelayCall({self.method!r}, stream {self.stream.id}, {state})"


# Response blocks seen, by their bytes: whether they hold no hop-by-hop field, so that they go
# to the client as they came (a unary call's response headers and trailers repeat byte for
# byte: one lookup instead of filtering and encoding the fields again). Bounded like the
# decoder's cache of blocks.
_RELAYABLE_CACHE_SIZE = 256
_relayable: dict[bytes, bool] = {}


def _relayed(headers: Headers, block: bytes | None) -> Headers | bytes:
    """What goes to the client for a response header block: ``block`` itself when it is
    portable and has no hop-by-hop field, else the fields without those."""
    if block is not None:
        relayable = _relayable.get(block)
        if relayable is None:
            relayable = not any(name in _HOP_BY_HOP for name, _ in headers)
            if len(_relayable) >= _RELAYABLE_CACHE_SIZE:
                _relayable.clear()
            _relayable[block] = relayable
        if relayable:
            return block
    return [(k, v) for k, v in headers if k not in _HOP_BY_HOP]


def _value(headers: Headers, name: str) -> str | None:
    for key, value in headers:
        if key == name:
            return value
    return None

