"""One client connection of the length-prefixed protocol, as a sans-IO state machine.

A connection carries many requests, possibly pipelined. ``TcpSession`` turns the bytes a client
sends into accepted requests, turns their answers into bytes in request order, and decides when
reading pauses, when the connection closes and how. It does no I/O of its own: the I/O layer
(a uvloop ``Protocol``) reports events by calling its methods, and the session carries out its
decisions through what it was handed: a ``Transport`` (``write``, ``writelines``,
``pause_reading``, ``resume_reading``, ``write_eof``, ``close``, ``abort``: asyncio's names, so
a uvloop transport is one, and a test's recorder is another), ``new_request`` and ``submit``
(what accepting a request means to the dispatcher), and one timer set through the injected
``Clock.call_at``. Calls rather than returned action objects, so the common path (one frame in,
one submit, one answer out, one write) allocates nothing but the request itself.

Events in: ``data_received``, ``eof_received``, ``connection_lost``, ``pause_writing`` /
``resume_writing`` (the write buffer filled / drained), ``set_queue_pressure`` (the dispatcher's
queue), ``request_done`` (an answer is ready; the session is each request's ``origin``),
``start_drain``, ``abort`` and ``timer_fired``.

States (``State``; the transitions are the table ``TRANSITIONS`` below, checked on every change):

    OPEN                 reading, accepting frames.
    CLOSING_AT_BOUNDARY  FIN at the next request boundary: nothing accepted is unanswered, no
                         frame is half read and no whole frame is held back. Input is still
                         accepted after a drain (a client may finish what it is writing) and has
                         ended after EOF, bad input or the idle timeout.
    LINGER               our FIN is out; input is discarded until the client's FIN (then close)
                         or ``linger_s`` (then close anyway). Closing with unread input would send
                         a reset that can destroy answers the client has not read yet. A TLS
                         transport cannot send a FIN under TLS (``can_write_eof`` is false):
                         its ``close`` is the half-close, sending close_notify and reading, and
                         discarding, until the client's (the front door bounds that wait by
                         ``linger_s``), so the session hands the linger to it and closes at once.
    CLOSED               closed, aborted or lost; answers that arrive later are not written.

Beside the state: *error pending* (bad input: an oversize length, a truncated frame at EOF, a
partial frame held past ``read_timeout_s``; ``refuse``: the connection is turned away before
anything it sent is read, such as a client outside the TLS allow-list or one over a connection
limit; or the frame refused by the read budget) means the error frame goes out after the last
pending answer, just before the FIN; *peer EOF* means the client has sent its FIN, so the
boundary closes at once instead of lingering; and the *pause bits*, the reasons reading is
paused (too many answers pending, the write buffer full, the dispatcher's queue saturated, the
frame being read waiting for room in the read budget): reading resumes when the last one
clears.

The read budget (``router.protocol.budget``, shared by every session of a front door): while
the decoder holds part of a frame whose length is known, the session is charged the whole
frame; while it holds whole frames held back (above), it is charged those bytes. Nothing is
charged on the common path, where each read ends at a frame boundary and none was partial
before it: the budget costs nothing there. A frame that does not fit pauses reading until
``budget_granted``; one larger than the budget is FRAME_TOO_LARGE; bytes the budget takes
back (``budget_shed``) end the input with OVERLOADED.

Answers (``request_done``) go out in request order, coalesced: when the last pending request
is answered, every answer ready goes out at once in one write (the common path, one request
and one answer, is one ``write`` of one frame). When the head of the line is answered while
requests behind it are not, its write is deferred to the end of the loop iteration through the
front door's ``AnswerFlusher`` (a session given none writes at once), so a pipelining client
whose answers arrive in one read from a backend (or in several reads of one iteration) gets
them in one write, not one each.

The retry contract (docs/protocol.md): the session never closes a connection while a request
accepted on it is unanswered, short of ``abort``. A request is accepted when it is handed to
``submit``.

``max_pipelined`` holds within a read: a read may carry thousands of frames, and only as many
as leave ``max_pipelined`` pending are accepted; the rest stay in the decoder's buffer (not yet
accepted), reading pauses, and once answers bring the pending count down to half the cap the
held frames are taken, from a timer callback due at once (so a submit never runs inside the
dispatcher's completion callback). Reading resumes once none is held.

One deadline, recomputed from the state (``_deadline``) and served by one timer, which is armed
lazily: an answer moves the idle deadline later without touching the timer, and a timer that
fires early re-arms for the real deadline (one wakeup per ``idle_timeout_s`` at most):

    LINGER                         ``linger_s`` after our FIN
    whole frames held, room again  now (unless paused for another reason too)
    reading paused, or input over  none: while the router does not read, the client's read
                                   and idle clocks stand still (they restart on resume)
    a partial frame held           ``read_timeout_s`` after the frame began, or after reading
                                   last resumed if later
    nothing pending (OPEN)         ``idle_timeout_s`` after the last activity (a read, the last
                                   answer, or reading resuming)
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from typing import Any, Generic, Protocol, TypeVar

from mypy_extensions import mypyc_attr

from router.core.clock import Clock, Timer
from router.core.config import ListenerConfig
from router.core.errors import (
    ClientProtocolError,
    FrameTooLarge,
    Overloaded,
    ReadTimeout,
    RouterError,
)
from router.protocol.budget import GRANTED, TOO_LARGE, WAITING, ReadBudget
from router.protocol.frames import (
    HEADER_BYTES,
    FrameDecoder,
    encode_router_error,
    frame_parts,
)


class State(enum.Enum):
    OPEN = "open"
    CLOSING_AT_BOUNDARY = "closing at boundary"
    LINGER = "linger"
    CLOSED = "closed"


class Trigger(enum.Enum):
    """What moves a session from one state to another."""

    DRAIN = "drain started"
    PEER_EOF = "client sent FIN"
    BAD_INPUT = "bad input"  # oversize length, truncated frame, read timeout
    REFUSED = "refused"  # turned away before any input is read (a client not allowed)
    LIMIT = "over a limit"  # connection limit, read budget
    IDLE = "idle timeout"
    BOUNDARY = "request boundary reached, FIN sent"
    LINGER_OVER = "linger expired"
    TRANSPORT_LINGERS = "transport lingers itself"  # TLS: close() sends close_notify, then reads
    ABORT = "aborted"
    LOST = "connection lost"


OPEN = State.OPEN
CLOSING_AT_BOUNDARY = State.CLOSING_AT_BOUNDARY
LINGER = State.LINGER
CLOSED = State.CLOSED

# state -> trigger -> next state. A trigger missing from a state's row is a bug in the caller
# (TransitionError), as in h11's tables.
TRANSITIONS: dict[State, dict[Trigger, State]] = {
    OPEN: {
        Trigger.DRAIN: CLOSING_AT_BOUNDARY,
        Trigger.PEER_EOF: CLOSING_AT_BOUNDARY,
        Trigger.BAD_INPUT: CLOSING_AT_BOUNDARY,
        Trigger.LIMIT: CLOSING_AT_BOUNDARY,
        Trigger.IDLE: CLOSING_AT_BOUNDARY,
        Trigger.REFUSED: CLOSING_AT_BOUNDARY,
        Trigger.ABORT: CLOSED,
        Trigger.LOST: CLOSED,
    },
    CLOSING_AT_BOUNDARY: {
        Trigger.DRAIN: CLOSING_AT_BOUNDARY,
        Trigger.PEER_EOF: CLOSING_AT_BOUNDARY,
        Trigger.BAD_INPUT: CLOSING_AT_BOUNDARY,
        Trigger.LIMIT: CLOSING_AT_BOUNDARY,
        Trigger.BOUNDARY: LINGER,
        Trigger.ABORT: CLOSED,
        Trigger.LOST: CLOSED,
    },
    LINGER: {
        Trigger.DRAIN: LINGER,
        Trigger.PEER_EOF: CLOSED,
        Trigger.LINGER_OVER: CLOSED,
        Trigger.TRANSPORT_LINGERS: CLOSED,
        Trigger.ABORT: CLOSED,
        Trigger.LOST: CLOSED,
    },
    CLOSED: {
        Trigger.DRAIN: CLOSED,
        Trigger.ABORT: CLOSED,
        Trigger.LOST: CLOSED,
    },
}

# Reasons reading is paused, as bits.
PIPELINE_FULL = 1  # max_pipelined answers pending, or whole frames held back
WRITE_BLOCKED = 2  # the transport's write buffer is over its high-water mark
QUEUE_SATURATED = 4  # the dispatcher's queue is full (global backpressure)
READ_BUDGET = 8  # the frame being read waits for room in the read budget
_PAUSE_NAMES = ((PIPELINE_FULL, "pipeline_full"), (WRITE_BLOCKED, "write_blocked"),
                (QUEUE_SATURATED, "queue_saturated"), (READ_BUDGET, "read_budget"))

_INF = float("inf")
# Below this an answer is joined with its header (one copy) for the single-write path; the
# same threshold as frame_parts.
_SINGLE_WRITE_BELOW = 64 * 1024


@mypyc_attr(native_class=False)  # mypyc compiles no subclass of this builtin
class TransitionError(RuntimeError):
    """An event the current state does not allow: a bug in the I/O layer driving the session."""


class Answer(Protocol):
    """What the session reads from a request it accepted, once ``request_done`` reports it."""

    @property
    def response(self) -> bytes | None: ...

    @property
    def error(self) -> RouterError | None: ...


class Transport(Protocol):
    """The part of an asyncio transport the session drives."""

    def write(self, data: bytes, /) -> None: ...
    def writelines(self, parts: list[bytes], /) -> None: ...
    def pause_reading(self) -> None: ...
    def resume_reading(self) -> None: ...
    def can_write_eof(self) -> bool: ...
    def write_eof(self) -> None: ...
    def close(self) -> None: ...
    def abort(self) -> None: ...


R = TypeVar("R", bound=Answer)


class AnswerFlusher:
    """What the sessions of one front door share for their answers: ``call_soon`` (the
    loop's), through which one callback at the end of the loop iteration writes the answers
    each session deferred, and ``writes``, the count of writes of answers by every session
    (answers written / ``writes`` is what coalescing saved). Without ``call_soon`` nothing is
    deferred: every answer first in line is written at once."""

    __slots__ = ("_call_soon", "_due", "writes")

    def __init__(self, call_soon: Callable[[Callable[[], object]], object] | None) -> None:
        self._call_soon = call_soon
        self._due: list[TcpSession[Any]] = []
        self.writes = 0

    def defer(self, session: TcpSession[Any]) -> bool:
        """Have ``session.flush_deferred`` called at the end of this loop iteration; False
        when this flusher does not defer (write now)."""
        call_soon = self._call_soon
        if call_soon is None:
            return False
        due = self._due
        if not due:
            call_soon(self._run)
        due.append(session)
        return True

    def _run(self) -> None:
        due, self._due = self._due, []
        for session in due:
            session.flush_deferred()

    def __repr__(self) -> str:
        return f"AnswerFlusher(writes={self.writes}, due={len(self._due)})"


class TcpSession(Generic[R]):
    __slots__ = (
        "_budget", "_claim", "_clock", "_decoder", "_deferred", "_error", "_flusher", "_held",
        "_idle_timeout_s", "_input_ended", "_last_activity", "_linger_s", "_linger_until",
        "_lost", "_max_pipelined", "_new_request", "_now", "_on_transition", "_partial_since",
        "_paused", "_peer_eof", "_pending", "_read_timeout_s", "_ready", "_resume_at", "_state",
        "_submit", "_submitting", "_timer", "_timer_at", "_transport", "peer",
    )

    def __init__(
        self,
        transport: Transport,
        config: ListenerConfig,
        linger_s: float,
        clock: Clock,
        new_request: Callable[[bytes, TcpSession[R], float], R],
        submit: Callable[[R], object],
        *,
        saturated: bool = False,
        budget: ReadBudget | None = None,
        on_transition: Callable[[State, Trigger, State], object] | None = None,
        peer: Any = None,
        flusher: AnswerFlusher | None = None,
    ) -> None:
        """The connection is made: start reading (unless the queue is ``saturated``).

        ``new_request(payload, origin, accepted_at)`` builds the request ``submit`` accepts;
        its ``origin``, this session, is told through ``request_done`` once it is answered.
        ``budget`` is the read budget shared with the other connections (by default one of
        ``max_buffered_bytes`` for this connection alone).
        ``on_transition(before, trigger, after)``, if given, hears every state change.
        ``peer`` is the client's address as the listener's accept() gave it (for the access
        log; the session itself never reads it). ``flusher`` writes deferred answers and
        counts writes (shared by a front door's sessions; by default one that defers nothing).
        """
        self.peer = peer
        self._transport = transport
        self._flusher = flusher if flusher is not None else AnswerFlusher(None)
        self._max_pipelined = config.max_pipelined
        self._resume_at = config.max_pipelined // 2
        self._read_timeout_s = config.read_timeout_s
        self._idle_timeout_s = config.idle_timeout_s
        self._linger_s = linger_s
        self._clock = clock
        self._now = clock.now
        self._new_request = new_request
        self._submit = submit
        self._on_transition = on_transition
        self._decoder = FrameDecoder(config.max_frame_bytes)
        self._budget = budget if budget is not None else ReadBudget(config.max_buffered_bytes)
        # What the budget was last charged for: a frame's size, or minus the held-back bytes.
        self._claim = 0
        # Requests accepted here, oldest first. A list, not a deque: it rarely holds more than
        # one (an empty deque costs 760 bytes per connection, a list 56).
        self._pending: list[R] = []
        self._ready = 0  # pending requests answered, not yet written
        self._deferred = False  # a write is due from the flusher
        self._state = OPEN
        self._paused = 0
        self._input_ended = False  # EOF, bad input, idle timeout or our FIN: no more frames
        self._peer_eof = False
        self._lost = False  # connection_lost came: the transport is gone
        self._error: RouterError | None = None  # written after the pending answers
        self._held = False  # whole frames sit in the decoder past max_pipelined
        self._submitting = False  # inside the accepting loop: it settles once it is done
        now = self._now()
        self._last_activity = now
        self._partial_since: float | None = None  # set while the decoder holds bytes
        self._linger_until = 0.0
        self._timer: Timer | None = None
        self._timer_at = _INF  # deadline of the armed timer (inf: none armed)
        if saturated:
            self._pause(QUEUE_SATURATED)
        self._sync_timer(now)

    # -- input --------------------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        if self._input_ended:
            return  # after EOF, bad input or our FIN: input is discarded
        now = self._now()
        self._last_activity = now
        pending = self._pending
        room = self._max_pipelined - len(pending)
        decoder = self._decoder
        try:
            payloads = decoder.feed(data, room)
        except ClientProtocolError as exc:
            self._bad_input(exc, now)
            return
        if payloads:
            self._submitting = True
            try:
                new_request = self._new_request
                submit = self._submit
                for payload in payloads:
                    request = new_request(payload, self, now)
                    pending.append(request)  # before submit: it may be answered at once
                    submit(request)
            finally:
                self._submitting = False
        if decoder.error is not None:
            self._bad_input(decoder.error, now)  # after the whole frames before it
            return
        if decoder.buffered:
            if len(payloads) >= room and decoder.frame_ready:
                self._held = True  # whole frames left behind the cap
                self._pause(PIPELINE_FULL)
            if payloads or self._partial_since is None:
                self._partial_since = now  # a new frame began
                self._sync_timer(now)
            if not self._charge(now):
                return
        elif self._partial_since is not None:  # this read finished the frame that was partial
            self._partial_since = None
            if self._claim:  # only ever set while a frame is partial
                self._release_claim()
        if len(pending) >= self._max_pipelined:
            self._pause(PIPELINE_FULL)
        if not pending or self._state is not OPEN:
            self._settle(now)

    def eof_received(self) -> bool:
        """The client's FIN. Always True: the session closes the transport itself."""
        self._peer_eof = True
        state = self._state
        if state is CLOSED:
            return True  # closed by us already: nothing reads any more
        if state is LINGER:
            self._close(Trigger.PEER_EOF)  # both sides have sent FIN: the linger is over
            return True
        self._to(Trigger.PEER_EOF)
        if self._input_ended:
            return True  # bad input: its boundary now closes at once instead of lingering
        self._input_ended = True
        now = self._now()
        if not self._held:
            try:
                self._decoder.close()
            except ClientProtocolError as exc:
                self._bad_input(exc, now)  # a truncated frame
                return True
        self._settle(now)
        return True

    def _take_held(self, now: float) -> None:
        """Accept whole frames held in the decoder, up to ``max_pipelined`` pending."""
        pending = self._pending
        room = self._max_pipelined - len(pending)
        decoder = self._decoder
        try:
            payloads = decoder.feed(b"", room)
        except ClientProtocolError as exc:
            self._bad_input(exc, now)
            return
        self._held = len(payloads) >= room and decoder.frame_ready
        self._submitting = True
        try:  # the loop of data_received, which keeps its own copy: it is the hot path
            for payload in payloads:
                request = self._new_request(payload, self, now)
                pending.append(request)
                self._submit(request)
        finally:
            self._submitting = False
        if decoder.error is not None:
            self._bad_input(decoder.error, now)
            return
        if not self._held:
            if decoder.buffered and self._peer_eof:
                self._truncated(now)
                return
            self._partial_since = now if decoder.buffered else None
        if not self._charge(now):
            return
        self._settle(now)

    def _truncated(self, now: float) -> None:
        try:
            self._decoder.close()
        except ClientProtocolError as exc:
            self._bad_input(exc, now)

    def _bad_input(
        self, error: RouterError, now: float, trigger: Trigger = Trigger.BAD_INPUT
    ) -> None:
        self._input_ended = True
        self._held = False  # nothing more is taken from the decoder
        self._decoder.discard()  # what it holds will never be a request
        if self._claim:
            self._release_claim()
        self._error = error
        self._to(trigger)
        self._settle(now)

    def refuse(self, error: RouterError) -> None:
        """Turn the connection away before reading anything (a client outside the TLS
        allow-list, one over a connection limit): ``error``'s frame, then the FIN. Called right
        after the session is made, so nothing has been accepted."""
        self._bad_input(error, self._now(), Trigger.REFUSED)

    # -- the read budget ----------------------------------------------------------------------

    def _charge(self, now: float) -> bool:
        """Charge the budget for what the decoder holds, if that changed (the module
        docstring); False when the input ended over it."""
        decoder = self._decoder
        size = decoder.frame_size
        claim = size or (-decoder.buffered if self._held else 0)  # held-back bytes: negative
        if claim == self._claim:
            return True
        if not claim:
            self._release_claim()
            return True
        self._claim = claim
        outcome = self._budget.charge(self, size, decoder.buffered)
        if outcome is GRANTED:
            return True
        if outcome is WAITING:
            self._pause(READ_BUDGET)
            return True
        self._claim = 0
        limit = self._budget.limit
        if outcome is TOO_LARGE:
            error: RouterError = FrameTooLarge(
                f"frame of {size - HEADER_BYTES} bytes exceeds listener.max_buffered_bytes="
                f"{limit}, all the router holds of partly read frames"
            )
        else:
            error = _shed_error(limit)
        self._bad_input(error, now, Trigger.LIMIT)
        return False

    def _release_claim(self) -> None:
        self._claim = 0
        self._budget.release(self)

    def budget_granted(self) -> None:
        """The read budget admits the frame this connection waits to read."""
        self._resume(READ_BUDGET, self._now())

    def budget_shed(self) -> None:
        """The read budget takes back what this connection holds: the frame is refused."""
        self._claim = 0  # the budget dropped it already
        self._bad_input(_shed_error(self._budget.limit), self._now(), Trigger.LIMIT)

    # -- answers ------------------------------------------------------------------------------

    def request_done(self, request: R) -> None:
        """``request`` is answered: write the answers first in line now if none is left
        unanswered behind them, else at the end of the loop iteration (module docstring)."""
        pending = self._pending
        if not pending:
            return  # abandoned: its connection wrote what it could and forgot the rest
        if pending[0] is not request:
            # Written after the requests before it. A head answered and not yet written is
            # always deferred (``_flush`` stops at the first unanswered request), so this
            # answer may complete the line.
            ready = self._ready = self._ready + 1
            if self._deferred and ready == len(pending):
                self._flush()
            return
        response = request.response
        if (len(pending) == 1 and response is not None and len(response) < _SINGLE_WRITE_BELOW
                and self._state is OPEN):
            # The common case (no pipelining): one frame, one write, no list.
            pending.pop()
            self._transport.write(len(response).to_bytes(4, "big") + response)
            self._flusher.writes += 1
            now = self._now()
            self._last_activity = now
            # Settle only off the common path: paused, or no timer armed by the new idle
            # deadline (the usual armed timer is earlier; it fires and re-arms).
            if self._paused or self._timer_at > now + self._idle_timeout_s:
                self._settle(now)
            return
        ready = self._ready = self._ready + 1
        if ready < len(pending):
            if self._deferred:
                return
            if self._flusher.defer(self):
                self._deferred = True
                return
        self._flush()

    def flush_deferred(self) -> None:
        """The flusher's call at the end of the loop iteration: write what is ready."""
        self._deferred = False
        pending = self._pending
        if pending and _answered(pending[0]):
            self._flush()

    def _flush(self) -> None:
        """All answers ready at the head of the line, in one ``writelines`` (one writev)."""
        pending = self._pending
        out: list[bytes] = []
        ready = 0
        for done in pending:
            response = done.response
            if response is not None:
                out.extend(frame_parts(response))
            elif done.error is not None:
                out.append(encode_router_error(done.error))
            else:
                break
            ready += 1
        del pending[:ready]
        self._ready -= ready
        state = self._state
        if state is not CLOSED:
            self._transport.writelines(out)
            self._flusher.writes += 1
        now = self._now()
        if pending:
            if self._paused:
                self._settle(now)  # perhaps room in the pipeline again
            return
        self._last_activity = now
        if self._paused or state is not OPEN or self._timer_at > now + self._idle_timeout_s:
            self._settle(now)

    # -- closing ------------------------------------------------------------------------------

    def start_drain(self) -> None:
        """Close at the next request boundary (at once if the connection is at one)."""
        self._to(Trigger.DRAIN)
        self._settle(self._now())

    def abort(self) -> None:
        """Reset the connection now, answered or not (the drain's grace deadline)."""
        self._to(Trigger.ABORT)
        self._input_ended = True
        if self._claim:
            self._release_claim()
        self._cancel_timer()
        if not self._lost:
            self._transport.abort()  # also a connection we closed that is still flushing

    def connection_lost(self) -> None:
        self._lost = True
        self._input_ended = True
        if self._claim:
            self._release_claim()
        self._to(Trigger.LOST)
        self._cancel_timer()

    def _shutdown(self, now: float) -> None:
        """At the boundary: the pending error frame, then FIN; linger unless the client's FIN
        is already in."""
        transport = self._transport
        if self._error is not None:
            transport.write(encode_router_error(self._error))
        self._input_ended = True
        self._to(Trigger.BOUNDARY)
        if self._peer_eof:
            self._close(Trigger.PEER_EOF)  # nothing left to linger for
            return
        if self._paused:
            self._paused = 0
            transport.resume_reading()  # read, and discard, until the client's FIN
        if not transport.can_write_eof():
            self._close(Trigger.TRANSPORT_LINGERS)  # TLS: close_notify, then it reads
            return
        transport.write_eof()
        self._linger_until = now + self._linger_s
        self._sync_timer(now)

    def _close(self, trigger: Trigger) -> None:
        self._to(trigger)
        self._cancel_timer()
        self._transport.close()

    # -- flow control -------------------------------------------------------------------------

    def pause_writing(self) -> None:
        self._pause(WRITE_BLOCKED)

    def resume_writing(self) -> None:
        self._resume(WRITE_BLOCKED, self._now())

    def set_queue_pressure(self, saturated: bool) -> None:
        if saturated:
            self._pause(QUEUE_SATURATED)
        else:
            self._resume(QUEUE_SATURATED, self._now())

    def _pause(self, reason: int) -> None:
        state = self._state
        if state is LINGER or state is CLOSED:
            return  # lingering reads (and discards) regardless; closed reads nothing
        if not self._paused and not self._peer_eof:
            # After the client's FIN nothing is left to read, and _resume leaves the transport
            # alone then: pausing it would leave it paused with no reason recorded.
            self._transport.pause_reading()
        self._paused |= reason

    def _resume(self, reason: int, now: float) -> None:
        paused = self._paused
        if not paused & reason:
            return
        self._paused = paused = paused & ~reason
        if not paused and self._state is not CLOSED and not self._peer_eof:
            self._transport.resume_reading()
            # The client's clocks stopped while the router was not reading: they restart now.
            self._last_activity = now
            if self._partial_since is not None:
                self._partial_since = now
        self._sync_timer(now)  # perhaps held frames may be taken now

    # -- the boundary, and the one timer ----------------------------------------------------

    def _settle(self, now: float) -> None:
        """Off the common path: resume a full pipeline, close at the boundary, and keep the
        timer no later than the deadline."""
        if self._submitting:
            return  # the accepting loop settles once it has finished
        state = self._state
        if state is LINGER or state is CLOSED:
            return
        pending = self._pending
        if self._paused & PIPELINE_FULL and not self._held and len(pending) <= self._resume_at:
            self._resume(PIPELINE_FULL, now)
        if (state is CLOSING_AT_BOUNDARY and not pending and not self._held
                and (self._input_ended or not self._decoder.buffered)):
            self._shutdown(now)
            return
        self._sync_timer(now)

    def _deadline(self, now: float) -> float | None:
        """When the session next has something to do by itself (see the module docstring)."""
        state = self._state
        if state is LINGER:
            return self._linger_until
        if state is CLOSED:
            return None
        if self._held:  # taken as reading would resume: for no other pause than the pipeline
            if self._paused == PIPELINE_FULL and len(self._pending) <= self._resume_at:
                return now
            return None
        if self._paused or self._input_ended:
            return None
        if self._partial_since is not None:
            return self._partial_since + self._read_timeout_s
        if self._pending or state is not OPEN:
            return None
        return self._last_activity + self._idle_timeout_s

    def _sync_timer(self, now: float) -> None:
        """Arm the timer if the deadline is earlier than the armed one. A later deadline keeps
        the armed timer: it fires, finds nothing due and re-arms."""
        deadline = self._deadline(now)
        if deadline is not None and deadline < self._timer_at:
            if self._timer is not None:
                self._timer.cancel()
            self._timer_at = deadline
            self._timer = self._clock.call_at(deadline, self.timer_fired)

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._timer_at = _INF

    def timer_fired(self) -> None:
        self._timer = None
        self._timer_at = _INF
        now = self._now()
        state = self._state
        if state is CLOSED:
            return
        deadline = self._deadline(now)
        if deadline is None or now < deadline:
            self._sync_timer(now)
        elif state is LINGER:
            self._close(Trigger.LINGER_OVER)  # the client never closed its side
        elif self._held:
            self._take_held(now)
        elif self._partial_since is not None:
            limit = self._read_timeout_s
            self._bad_input(ReadTimeout(f"partial frame held for over {limit}s"), now)
        else:
            self._input_ended = True
            self._to(Trigger.IDLE)
            self._settle(now)

    def _to(self, trigger: Trigger) -> None:
        before = self._state
        try:
            self._state = TRANSITIONS[before][trigger]
        except KeyError:
            raise TransitionError(f"{trigger.value!r} in state {before.value!r}") from None
        if self._on_transition is not None:
            self._on_transition(before, trigger, self._state)

    # -- introspection ------------------------------------------------------------------------

    @property
    def state(self) -> State:
        return self._state

    @property
    def unanswered(self) -> int:
        """Requests accepted here and not answered yet."""
        return len(self._pending)

    @property
    def paused_for(self) -> tuple[str, ...]:
        """Why reading is paused (empty while reading)."""
        return tuple(name for bit, name in _PAUSE_NAMES if self._paused & bit)

    def statistics(self) -> dict[str, Any]:
        return {
            "state": self._state.value,
            "unanswered": len(self._pending),
            "paused_for": self.paused_for,
            "buffered_bytes": self._decoder.buffered,
            "budget_claim": self._claim,
            "frames_held": self._held,
            "error_pending": self._error.code if self._error is not None else None,
            "peer_eof": self._peer_eof,
            "timer_at": None if self._timer_at == _INF else self._timer_at,
        }

    def __repr__(self) -> str:
        paused = ",".join(self.paused_for) or "no"
        return (f"TcpSession({self._state.value}, unanswered={len(self._pending)}, "
                f"paused={paused})")


def _answered(request: Answer) -> bool:
    return request.response is not None or request.error is not None


def _shed_error(limit: int) -> Overloaded:
    return Overloaded(
        f"the read budget (listener.max_buffered_bytes={limit}) is full: the frame being read "
        "was not accepted, send it again later"
    )
