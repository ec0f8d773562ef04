"""Fuzz target: the TCP session (router/protocol/session.py) under every interleaving of events.

A hypothesis state machine plays the client, the transport, the dispatcher and time around one
``TcpSession``: the client writes whole frames, oversize and error-flagged length words and
garbage, which arrive split anywhere; requests are answered in any order (also from inside
``submit``, and after the connection is gone); the write buffer fills and drains; the
dispatcher's queue saturates; the drain starts; the client sends FIN or resets; the drain
aborts; and a ``ManualClock`` moves by amounts that straddle every timeout. The transport only
does what a uvloop transport does: data and EOF arrive while reading, nothing arrives once it
is closed or lost.

Invariants, after every step:

* no exception escapes the session (its own input errors are answered, not raised);
* answers go out in request order, each the answer its request got, and the only other frame
  is one input error (FRAME_TOO_LARGE, TRUNCATED_FRAME, READ_TIMEOUT), last;
* nothing accepted is lost: FIN and close come only once every accepted request is answered
  and its answer written (short of abort); nothing is written after FIN or close;
* what was accepted is a prefix of the frames a reference parser finds in what was delivered;
* unanswered requests stay within ``max_pipelined``; the decoder holds less than one frame
  (header + ``max_frame_bytes``) unless whole frames are held back past the cap, and never
  more than that plus one read;
* reading is paused exactly while the session names a reason; one timer at most, none once
  closed.

At the end of each run the client is served to completion: every request answered, every
byte delivered, FIN. Then the connection must be closed with every answer written, and, unless
a drain, an idle timeout or bad input ended the input early, with every frame accepted.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from router.core.clock import ManualClock
from router.core.config import ListenerConfig
from router.core.errors import NoBackend, RouterError
from router.protocol.frames import (
    ERROR_FLAG,
    HEADER_BYTES,
    LENGTH_MASK,
    ErrorFrame,
    FrameDecoder,
    encode_frame,
)
from router.protocol.session import (
    CLOSED,
    CLOSING_AT_BOUNDARY,
    OPEN,
    AnswerFlusher,
    State,
    TcpSession,
    Trigger,
)
from tests.fuzz.budget import budget, run_for_budget
from tests.fuzz.reference import reference

READ_TIMEOUT_S = 10.0
IDLE_TIMEOUT_S = 300.0
LINGER_S = 2.0
INPUT_ERRORS = frozenset({"FRAME_TOO_LARGE", "TRUNCATED_FRAME", "READ_TIMEOUT"})
# Steps of the clock: none, small, and each timeout just before, at and after.
STEPS = [0.0, 0.0, 0.001, 1.0, LINGER_S, READ_TIMEOUT_S - 0.001, READ_TIMEOUT_S,
         READ_TIMEOUT_S + 1, IDLE_TIMEOUT_S - 0.001, IDLE_TIMEOUT_S]
# What share of the bytes written so far has arrived (hypothesis's floats favour tiny ones).
SHARES = [1.0, 1.0, 0.5, 0.1, 0.9, 0.0]


class Req:
    __slots__ = ("accepted_at", "answered", "error", "index", "origin", "payload", "response")

    def __init__(self, payload: bytes, origin: Any, accepted_at: float) -> None:
        self.payload = payload
        self.origin = origin
        self.accepted_at = accepted_at
        self.response: bytes | None = None
        self.error: RouterError | None = None
        self.answered = False
        self.index = -1


class Transport:
    """What a uvloop transport does, recorded; refuses what a session must never do."""

    def __init__(self, machine: SessionMachine) -> None:
        self._machine = machine
        self.out = bytearray()
        self.reading = True
        self.eof_written = False
        self.closed = False
        self.aborted = False

    def write(self, data: bytes, /) -> None:
        self._writable()
        self.out += data

    def writelines(self, parts: list[bytes], /) -> None:
        self._writable()
        self.out += b"".join(parts)

    def _writable(self) -> None:
        assert not (self.eof_written or self.closed or self.aborted), "write after FIN/close"
        assert not self._machine.lost, "write after connection_lost"

    def pause_reading(self) -> None:
        assert self.reading, "paused twice"
        self.reading = False

    def resume_reading(self) -> None:
        assert not self.reading, "resumed while reading"
        self.reading = True

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        assert not (self.eof_written or self.closed or self.aborted), "FIN twice or after close"
        self._machine.check_nothing_unanswered("FIN")
        self.eof_written = True

    def close(self) -> None:
        assert not (self.closed or self.aborted), "closed twice"
        self._machine.check_nothing_unanswered("close")
        self.closed = True

    def abort(self) -> None:
        assert not self.aborted, "aborted twice"
        self.aborted = True


_payloads = st.binary(max_size=24)
# Mostly whole frames, so that requests flow; now and then what ends the input early.
_SEGMENTS = {
    "frame": _payloads.map(encode_frame),
    "frames": st.lists(_payloads, min_size=2, max_size=6).map(
        lambda ps: b"".join(map(encode_frame, ps))
    ),
    "garbage": st.binary(min_size=1, max_size=6),
    "length word": st.integers(0, LENGTH_MASK).map(lambda n: n.to_bytes(4, "big")),
    "error flag": _payloads.map(lambda p: (len(p) | ERROR_FLAG).to_bytes(4, "big") + p),
}
_KINDS = ["frame"] * 20 + ["frames"] * 6 + ["garbage", "length word", "error flag"]
segments = st.sampled_from(_KINDS).flatmap(_SEGMENTS.__getitem__)


class SessionMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.clock = ManualClock()
        self.transport = Transport(self)
        self.submitted: list[Req] = []
        self.triggers: list[Trigger] = []
        self.outbox = bytearray()  # written by the client, not yet delivered
        self.delivered = bytearray()
        self.largest_read = 0
        self.lost = False
        self.eof_sent = False
        self.write_paused = False
        self.saturated = False
        self.answer_in_submit: str | None = None  # "ok" / "error": the dispatcher answers at once
        self._client = FrameDecoder(accept_error_flag=True)
        self.written: list[bytes] = []  # every frame the session wrote, decoded
        self.session: TcpSession[Req] | None = None
        # The loop's call_soon when the session defers answers to the iteration's end.
        self.soon: list[Callable[[], object]] = []

    @initialize(
        max_pipelined=st.sampled_from([1, 2, 3, 5]),
        max_frame_bytes=st.sampled_from([64, 1024, 8]),  # 8: payloads over it are common
        saturated=st.sampled_from([False, False, False, True]),
        deferring=st.booleans(),
    )
    def open(
        self, max_pipelined: int, max_frame_bytes: int, saturated: bool, deferring: bool = False
    ) -> None:
        self.saturated = saturated
        self.config = ListenerConfig(
            max_pipelined=max_pipelined, max_frame_bytes=max_frame_bytes,
            read_timeout_s=READ_TIMEOUT_S, idle_timeout_s=IDLE_TIMEOUT_S,
        )
        self.session = TcpSession(
            self.transport, self.config, LINGER_S, self.clock, self._new_request, self._submit,
            saturated=saturated, on_transition=self._transition,
            flusher=AnswerFlusher(self.soon.append if deferring else None),
        )

    # -- what the session calls ----------------------------------------------------------------

    def _new_request(self, payload: bytes, origin: Any, accepted_at: float) -> Req:
        return Req(payload, origin, accepted_at)

    def _submit(self, request: Req) -> None:
        request.index = len(self.submitted)
        self.submitted.append(request)
        if self.answer_in_submit is not None:
            self._answer(request, self.answer_in_submit == "ok")

    def _transition(self, before: State, trigger: Trigger, after: State) -> None:
        self.triggers.append(trigger)

    def _answer(self, request: Req, ok: bool) -> None:
        assert not request.answered
        request.answered = True
        if ok:
            request.response = request.payload + b"!"
        else:
            request.error = NoBackend("no healthy backend")
        self.sess.request_done(request)

    @property
    def sess(self) -> TcpSession[Req]:
        assert self.session is not None
        return self.session

    # -- the client and the transport -----------------------------------------------------------

    @property
    def can_read(self) -> bool:
        """Whether the transport would deliver data or EOF now."""
        t = self.transport
        return t.reading and not (t.closed or t.aborted or self.lost or self.eof_sent)

    @precondition(lambda self: not self.eof_sent)
    @rule(written=st.lists(segments, min_size=1, max_size=4), share=st.sampled_from(SHARES))
    def client_sends(self, written: list[bytes], share: float) -> None:
        """The client writes; the part of what it wrote so far that has arrived is read."""
        for segment in written:
            self.outbox += segment
        if self.can_read:
            self._deliver(round(len(self.outbox) * share))

    @precondition(lambda self: self.outbox and self.can_read)
    @rule(share=st.sampled_from(SHARES))
    def more_arrives(self, share: float) -> None:
        self._deliver(max(1, round(len(self.outbox) * share)))

    def _deliver(self, n: int) -> None:
        if n == 0:
            return
        chunk = bytes(self.outbox[:n])
        del self.outbox[:n]
        self.delivered += chunk
        self.largest_read = max(self.largest_read, len(chunk))
        self.sess.data_received(chunk)

    @precondition(lambda self: self.delivered)  # an idle connection's end is the teardown's
    @rule(what=st.sampled_from(["fin", "fin", "drain", "drain", "reset", "abort", "closed"]))
    def something_ends(self, what: str) -> None:
        """One rule for every way a connection ends, so that ending is one step in several."""
        t = self.transport
        if what == "fin":  # everything written arrives, then the client's FIN
            if self.outbox and self.can_read:
                self._deliver(len(self.outbox))
            if not self.outbox and self.can_read:
                self.client_fin()
        elif what == "drain" and not self.lost:
            self.sess.start_drain()
        elif what == "reset" and not self.lost:
            self._lose()
        elif what == "abort" and not self.lost and not self.transport.aborted:
            self.sess.abort()  # the drain's grace deadline
        elif what == "closed" and not self.lost and (t.closed or t.aborted):
            self._lose()  # the transport finished closing

    def client_fin(self) -> None:
        self.eof_sent = True
        assert self.sess.eof_received() is True

    def _lose(self) -> None:
        self.lost = True
        self.sess.connection_lost()

    @precondition(lambda self: not self.lost)
    @rule()
    def write_buffer_fills_or_drains(self) -> None:
        self.write_paused = not self.write_paused
        if self.write_paused:
            self.sess.pause_writing()
        else:
            self.sess.resume_writing()

    # -- the dispatcher, time -------------------------------------------------------------------

    @precondition(lambda self: any(not r.answered for r in self.submitted))
    @rule(picks=st.lists(st.integers(0, 1000), min_size=1, max_size=4), ok=st.booleans())
    def answer(self, picks: list[int], ok: bool) -> None:
        for pick in picks:
            open_ = [r for r in self.submitted if not r.answered]
            if open_:
                self._answer(open_[pick % len(open_)], ok)

    @rule(mode=st.sampled_from([None, "ok", "error"]))
    def dispatcher_answers_inside_submit(self, mode: str | None) -> None:
        self.answer_in_submit = mode

    @precondition(lambda self: not self.lost)
    @rule()
    def queue_fills_or_drains(self) -> None:
        self.saturated = not self.saturated
        self.sess.set_queue_pressure(self.saturated)

    @rule()
    def iteration_ends(self) -> None:
        """The loop runs what was deferred to the end of its iteration (answers)."""
        soon, self.soon[:] = list(self.soon), []
        for callback in soon:
            callback()

    @rule(seconds=st.sampled_from(STEPS))
    def time_passes(self, seconds: float) -> None:
        self.iteration_ends()  # no time passes within one loop iteration
        self.clock.advance(seconds)

    # -- invariants -----------------------------------------------------------------------------

    def _read_output(self) -> None:
        out = self.transport.out
        if out:
            self.written.extend(self._client.feed(bytes(out)))
            out.clear()

    def _answers_written(self) -> int:
        """How many frames written are answers; checks each against its request, in order."""
        self._read_output()
        count = 0
        for frame in self.written:
            if count == len(self.submitted):
                break
            request = self.submitted[count]
            if isinstance(frame, ErrorFrame):
                code = frame.code_and_message[0]
                if code in INPUT_ERRORS:
                    break
                assert request.error is not None and code == request.error.code
            else:
                assert request.response is not None and frame == request.response
            assert request.answered
            count += 1
        return count

    def check_nothing_unanswered(self, what: str) -> None:
        """FIN or close: every accepted request is answered and its answer written."""
        unanswered = [r.index for r in self.submitted if not r.answered]
        assert not unanswered, f"{what} with requests {unanswered} unanswered"
        assert self._answers_written() == len(self.submitted), f"{what} before every answer"

    @invariant()
    def answers_in_order_then_at_most_one_input_error(self) -> None:
        if self.session is None:
            return
        answers = self._answers_written()
        extra = self.written[answers:]
        assert len(extra) <= 1, f"frames beyond the answers: {extra!r}"
        if extra:
            frame = extra[0]
            assert isinstance(frame, ErrorFrame) and frame.code_and_message[0] in INPUT_ERRORS
            assert self.transport.eof_written or self.transport.closed

    @invariant()
    def accepted_is_a_prefix_of_what_was_delivered(self) -> None:
        if self.session is None:
            return
        frames = reference(bytes(self.delivered), self.config.max_frame_bytes, False).frames
        accepted = [r.payload for r in self.submitted]
        assert accepted == [payload for payload, _ in frames[:len(accepted)]]

    @invariant()
    def bounded(self) -> None:
        if self.session is None:
            return
        stats = self.sess.statistics()
        assert self.sess.unanswered <= self.config.max_pipelined
        one_frame = HEADER_BYTES + self.config.max_frame_bytes
        assert stats["buffered_bytes"] <= one_frame + self.largest_read
        if not stats["frames_held"] and stats["error_pending"] is None:
            assert stats["buffered_bytes"] < one_frame, stats

    @invariant()
    def reading_is_paused_exactly_while_there_is_a_reason(self) -> None:
        if self.session is None:
            return
        t = self.transport
        state = self.sess.state
        if state in (OPEN, CLOSING_AT_BOUNDARY) and not (self.eof_sent or self.lost):
            assert t.reading == (not self.sess.paused_for), (t.reading, self.sess.paused_for)

    @invariant()
    def a_connection_being_read_has_a_deadline(self) -> None:
        """A partial frame has its read timeout, an idle connection its idle timeout: nothing
        the client does (or fails to do) keeps a connection open for ever while it is read."""
        if self.session is None:
            return
        t = self.transport
        stats = self.sess.statistics()
        if (self.sess.state not in (OPEN, CLOSING_AT_BOUNDARY) or not t.reading or self.eof_sent
                or self.lost or t.closed or t.aborted or stats["error_pending"] is not None):
            return
        if stats["buffered_bytes"] or (not stats["unanswered"] and not stats["frames_held"]):
            assert stats["timer_at"] is not None, stats

    @invariant()
    def one_timer_at_most_and_none_once_closed(self) -> None:
        if self.session is None:
            return
        assert self.clock.pending_timers <= 1
        if self.sess.state is CLOSED:
            assert self.clock.pending_timers == 0

    # -- the end: serve the client to completion --------------------------------------------------

    def teardown(self) -> None:
        if self.session is None:
            return
        ended = self.lost or self.transport.aborted
        self.answer_in_submit = None
        if not self.lost:
            if self.write_paused:
                self.write_buffer_fills_or_drains()
            self.sess.set_queue_pressure(False)
        # Bounded: each round accepts a frame (4 bytes at least) or ends the loop.
        for _ in range((len(self.delivered) + len(self.outbox)) // HEADER_BYTES + 20):
            for request in [r for r in self.submitted if not r.answered]:
                self._answer(request, True)
            self.iteration_ends()
            self.clock.advance(0)  # held frames are taken from a timer due at once
            if self.outbox and self.can_read:
                self._deliver(len(self.outbox))
            elif not self.outbox and self.can_read:
                self.client_fin()
            elif all(r.answered for r in self.submitted) and not self.can_read:
                break
        self.iteration_ends()
        self.clock.advance(READ_TIMEOUT_S + IDLE_TIMEOUT_S + LINGER_S)
        if ended:
            return  # aborted or reset: what was unanswered then is the drain's to count
        assert self.transport.closed, f"not closed at the end: {self.sess.statistics()}"
        assert self.sess.state is CLOSED
        assert self._answers_written() == len(self.submitted)
        errors = [f.code_and_message[0] for f in self.written[len(self.submitted):]]
        parsed = reference(bytes(self.delivered), self.config.max_frame_bytes, False)
        bad_stream = parsed.too_large or parsed.consumed < len(self.delivered)
        if not {Trigger.DRAIN, Trigger.IDLE} & set(self.triggers) and errors != ["READ_TIMEOUT"]:
            # FIN after a partial frame is TRUNCATED_FRAME, a refused length FRAME_TOO_LARGE.
            assert bool(errors) == bad_stream, (errors, parsed)
        cut_short = {Trigger.DRAIN, Trigger.IDLE, Trigger.BAD_INPUT} & set(self.triggers)
        if not cut_short:
            assert not self.outbox
            frames = reference(bytes(self.delivered), self.config.max_frame_bytes, False)
            assert [r.payload for r in self.submitted] == [p for p, _ in frames.frames]


def test_session_holds_its_invariants_under_any_events() -> None:
    run_for_budget(lambda: run_state_machine_as_test(
        SessionMachine, settings=budget(150),
    ))


# -- what the machine found, replayed step by step ---------------------------------------------


def test_found_queue_pressure_after_the_clients_fin_never_pauses_reading_twice() -> None:
    """The queue saturating, clearing and saturating again after the client's FIN paused the
    transport twice: the FIN had made ``_resume`` leave the transport paused with no reason."""
    machine = SessionMachine()
    machine.open(max_pipelined=2, max_frame_bytes=64, saturated=False)
    machine.client_sends([encode_frame(b"")], 1.0)
    machine.something_ends("fin")
    for _ in range(3):
        machine.queue_fills_or_drains()
    machine.answers_in_order_then_at_most_one_input_error()
    machine.teardown()
    assert machine.transport.closed
