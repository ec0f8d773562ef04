"""TcpSession, the sans-IO state machine of one client connection: no sockets, a ManualClock.

A recording transport stands in for uvloop's (it refuses writes after our FIN or a close, as a
real one would make them pointless), requests are answered by hand through ``request_done``,
and time moves only through ``ManualClock.advance``, which runs the session's timer.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from router.core.clock import ManualClock
from router.core.config import ListenerConfig
from router.core.errors import ClientNotAllowed, NoBackend, RouterError
from router.protocol.budget import ReadBudget
from router.protocol.frames import ErrorFrame, FrameDecoder, encode_frame, encode_frames
from router.protocol.session import (
    CLOSED,
    CLOSING_AT_BOUNDARY,
    LINGER,
    OPEN,
    TRANSITIONS,
    AnswerFlusher,
    State,
    TcpSession,
    Trigger,
)

READ_TIMEOUT_S = 10.0
IDLE_TIMEOUT_S = 300.0
LINGER_S = 2.0


class FakeRequest:
    __slots__ = ("accepted_at", "error", "origin", "payload", "response")

    def __init__(self, payload: bytes, origin: TcpSession[FakeRequest], accepted_at: float) -> None:
        self.payload = payload
        self.origin = origin
        self.accepted_at = accepted_at
        self.response: bytes | None = None
        self.error: RouterError | None = None


class RecordingTransport:
    def __init__(self) -> None:
        self.actions: list[str] = []
        self.out = bytearray()
        self.reading = True
        self.eof_written = False
        self.closed = False
        self.aborted = False
        self.eof_capable = True  # False: a TLS transport, which has no half-close of its own

    def write(self, data: bytes, /) -> None:
        self._check_writable()
        self.actions.append("write")
        self.out += data

    def writelines(self, parts: list[bytes], /) -> None:
        self._check_writable()
        self.actions.append("writelines")
        self.out += b"".join(parts)

    def _check_writable(self) -> None:
        assert not (self.eof_written or self.closed or self.aborted), "write after FIN/close"

    def pause_reading(self) -> None:
        assert self.reading, "paused twice"
        self.actions.append("pause_reading")
        self.reading = False

    def resume_reading(self) -> None:
        assert not self.reading, "resumed while reading"
        self.actions.append("resume_reading")
        self.reading = True

    def can_write_eof(self) -> bool:
        return self.eof_capable

    def write_eof(self) -> None:
        self.actions.append("write_eof")
        self.eof_written = True

    def close(self) -> None:
        self.actions.append("close")
        self.closed = True

    def abort(self) -> None:
        self.actions.append("abort")
        self.aborted = True


class Harness:
    def __init__(
        self, *, saturated: bool = False, answer_at_once: RouterError | None = None,
        budget: ReadBudget | None = None, clock: ManualClock | None = None,
        flusher: AnswerFlusher | None = None, **config: Any,
    ) -> None:
        self.clock = clock or ManualClock()
        self.transport = RecordingTransport()
        self.submitted: list[FakeRequest] = []
        self.transitions: list[tuple[State, Trigger, State]] = []
        self.max_pending = 0
        self._answer_at_once = answer_at_once
        settings = {"read_timeout_s": READ_TIMEOUT_S, "idle_timeout_s": IDLE_TIMEOUT_S, **config}
        self.session: TcpSession[FakeRequest] = TcpSession(
            self.transport, ListenerConfig(**settings), LINGER_S, self.clock, FakeRequest,
            self._submit, saturated=saturated, budget=budget,
            on_transition=lambda *t: self.transitions.append(t), flusher=flusher,
        )
        self._decoder = FrameDecoder(accept_error_flag=True)

    def _submit(self, request: FakeRequest) -> None:
        self.submitted.append(request)
        self.max_pending = max(self.max_pending, self.session.unanswered)
        if self._answer_at_once is not None:  # the dispatcher answering inside submit
            request.error = self._answer_at_once
            self.session.request_done(request)

    @property
    def payloads(self) -> list[bytes]:
        return [r.payload for r in self.submitted]

    def send(self, *payloads: bytes) -> None:
        self.session.data_received(encode_frames(payloads))

    def answer(self, index: int, response: bytes | None = None) -> None:
        request = self.submitted[index]
        request.response = request.payload if response is None else response
        self.session.request_done(request)

    def fail(self, index: int, error: RouterError) -> None:
        request = self.submitted[index]
        request.error = error
        self.session.request_done(request)

    def frames_out(self) -> list[bytes]:
        """Every frame written so far (each call returns only the new ones)."""
        frames = self._decoder.feed(bytes(self.transport.out))
        self.transport.out.clear()
        return frames

    def error_codes_out(self) -> list[str]:
        return [f.code_and_message[0] if isinstance(f, ErrorFrame) else "answer"
                for f in self.frames_out()]

    def saw(self, before: State, trigger: Trigger) -> bool:
        return (before, trigger, TRANSITIONS[before][trigger]) in self.transitions


# -- the common path ---------------------------------------------------------------------------


def test_one_frame_in_one_submit_one_answer_one_write() -> None:
    h = Harness()
    h.clock.advance(1.5)
    h.send(b"ping")
    assert h.payloads == [b"ping"]
    assert h.submitted[0].accepted_at == h.clock.now()
    assert h.submitted[0].origin is h.session
    h.answer(0, b"pong")
    assert h.transport.actions == ["write"]
    assert h.frames_out() == [b"pong"]
    assert h.session.unanswered == 0
    assert h.session.state is OPEN


def test_pipelined_answers_go_out_in_request_order_coalesced() -> None:
    h = Harness()
    h.send(b"a", b"b", b"c")
    h.answer(2)
    h.answer(1)
    assert h.transport.actions == []  # "a" is still unanswered: nothing may overtake it
    h.answer(0)
    assert h.transport.actions == ["writelines"]  # all three in one writev
    assert h.frames_out() == [b"a", b"b", b"c"]


class LoopIteration:
    """A loop's ``call_soon``: callbacks queued, run by ``end()`` as the iteration ends."""

    def __init__(self) -> None:
        self.callbacks: list[Callable[[], object]] = []

    def __call__(self, callback: Callable[[], object]) -> None:
        self.callbacks.append(callback)

    def end(self) -> None:
        callbacks, self.callbacks = self.callbacks, []
        for callback in callbacks:
            callback()


def test_answers_of_one_iteration_with_more_behind_them_go_out_in_one_write_at_its_end() -> None:
    iteration = LoopIteration()
    flusher = AnswerFlusher(iteration)
    h = Harness(flusher=flusher)
    h.send(b"a", b"b", b"c", b"d")
    h.answer(0)
    h.answer(1)
    assert h.transport.actions == []  # "c" and "d" are unanswered: wait for the iteration
    assert len(iteration.callbacks) == 1
    iteration.end()
    assert h.transport.actions == ["writelines"]
    assert h.frames_out() == [b"a", b"b"]
    h.answer(2)
    iteration.end()
    h.answer(3)  # the last one pending: written at once
    assert h.transport.actions == ["writelines", "writelines", "write"]
    assert h.frames_out() == [b"c", b"d"]
    assert flusher.writes == 3
    assert h.session.unanswered == 0


def test_the_answer_completing_the_line_writes_it_all_at_once_and_the_deferred_call_nothing(
) -> None:
    iteration = LoopIteration()
    flusher = AnswerFlusher(iteration)
    h = Harness(flusher=flusher)
    h.send(b"a", b"b", b"c")
    h.answer(0)
    h.answer(2)
    assert h.transport.actions == []
    h.answer(1)
    assert h.transport.actions == ["writelines"]
    assert h.frames_out() == [b"a", b"b", b"c"]
    iteration.end()
    assert h.transport.actions == ["writelines"]
    assert flusher.writes == 1


def test_one_flusher_call_per_iteration_writes_every_session_that_deferred() -> None:
    iteration = LoopIteration()
    flusher = AnswerFlusher(iteration)
    sessions = [Harness(flusher=flusher) for _ in range(3)]
    for h in sessions:
        h.send(b"x", b"y")
        h.answer(0)
    assert len(iteration.callbacks) == 1
    iteration.end()
    assert [h.frames_out() for h in sessions] == [[b"x"]] * 3
    assert flusher.writes == 3


def test_a_deferred_answer_of_a_connection_closed_meanwhile_is_not_written() -> None:
    iteration = LoopIteration()
    h = Harness(flusher=AnswerFlusher(iteration))
    h.send(b"a", b"b")
    h.answer(0)
    h.session.connection_lost()
    iteration.end()
    assert h.transport.actions == []
    assert h.session.unanswered == 1


def test_a_drain_closes_after_the_deferred_answers_are_written() -> None:
    iteration = LoopIteration()
    h = Harness(flusher=AnswerFlusher(iteration))
    h.send(b"a", b"b")
    h.session.start_drain()
    h.answer(0)
    iteration.end()
    assert h.frames_out() == [b"a"]
    assert not h.transport.eof_written  # "b" is still unanswered
    h.answer(1)
    assert h.frames_out() == [b"b"]
    assert h.transport.eof_written


def test_an_error_answer_is_an_error_frame_in_its_place() -> None:
    h = Harness()
    h.send(b"a", b"b")
    h.fail(0, NoBackend("none"))
    h.answer(1)
    assert h.error_codes_out() == ["NO_BACKEND", "answer"]


def test_a_large_answer_is_written_without_joining_it_to_its_header() -> None:
    h = Harness()
    h.send(b"big")
    h.answer(0, b"x" * 100_000)
    assert h.transport.actions == ["writelines"]
    assert h.frames_out() == [b"x" * 100_000]


def test_an_answer_submitted_and_answered_at_once_is_written() -> None:
    h = Harness(answer_at_once=NoBackend("no healthy backend"))
    h.send(b"a", b"b", b"c")
    assert h.error_codes_out() == ["NO_BACKEND"] * 3
    assert h.session.unanswered == 0
    assert h.session.state is OPEN


# -- every transition of the table -------------------------------------------------------------


def _open_with_pending(h: Harness) -> None:
    h.send(b"pending")
    assert h.session.state is OPEN


def _closing(h: Harness) -> None:
    _open_with_pending(h)
    h.session.start_drain()
    assert h.session.state is CLOSING_AT_BOUNDARY


def _lingering(h: Harness) -> None:
    h.session.start_drain()
    assert h.session.state is LINGER


def _closed(h: Harness) -> None:
    h.session.connection_lost()
    assert h.session.state is CLOSED


def _aborted(h: Harness) -> None:
    h.session.abort()
    assert h.session.state is CLOSED


TEST_BUDGET = 64  # bytes; the LIMIT scenarios run against a read budget this small
OVER_BUDGET = (TEST_BUDGET + 1).to_bytes(4, "big")  # a frame header no budget room can hold

SCENARIOS: dict[tuple[State, Trigger], Callable[[Harness], None]] = {
    (OPEN, Trigger.DRAIN): lambda h: (_open_with_pending(h), h.session.start_drain()),
    (OPEN, Trigger.PEER_EOF): lambda h: (_open_with_pending(h), h.session.eof_received()),
    (OPEN, Trigger.BAD_INPUT): lambda h: (
        _open_with_pending(h), h.session.data_received(b"\xff\xff\xff\xff")),
    (OPEN, Trigger.LIMIT): lambda h: h.session.data_received(OVER_BUDGET),
    (OPEN, Trigger.IDLE): lambda h: h.clock.advance(IDLE_TIMEOUT_S),
    (OPEN, Trigger.REFUSED): lambda h: h.session.refuse(ClientNotAllowed("not listed")),
    (OPEN, Trigger.ABORT): lambda h: h.session.abort(),
    (OPEN, Trigger.LOST): lambda h: h.session.connection_lost(),
    (CLOSING_AT_BOUNDARY, Trigger.DRAIN): lambda h: (_closing(h), h.session.start_drain()),
    (CLOSING_AT_BOUNDARY, Trigger.PEER_EOF): lambda h: (_closing(h), h.session.eof_received()),
    (CLOSING_AT_BOUNDARY, Trigger.BAD_INPUT): lambda h: (
        _closing(h), h.session.data_received(b"\xff\xff\xff\xff")),
    (CLOSING_AT_BOUNDARY, Trigger.LIMIT): lambda h: (
        _closing(h), h.session.data_received(OVER_BUDGET)),
    (CLOSING_AT_BOUNDARY, Trigger.BOUNDARY): lambda h: (_closing(h), h.answer(0)),
    (CLOSING_AT_BOUNDARY, Trigger.ABORT): lambda h: (_closing(h), h.session.abort()),
    (CLOSING_AT_BOUNDARY, Trigger.LOST): lambda h: (_closing(h), h.session.connection_lost()),
    (LINGER, Trigger.DRAIN): lambda h: (_lingering(h), h.session.start_drain()),
    (LINGER, Trigger.PEER_EOF): lambda h: (_lingering(h), h.session.eof_received()),
    (LINGER, Trigger.LINGER_OVER): lambda h: (_lingering(h), h.clock.advance(LINGER_S)),
    (LINGER, Trigger.TRANSPORT_LINGERS): lambda h: (
        setattr(h.transport, "eof_capable", False), h.session.start_drain()),
    (LINGER, Trigger.ABORT): lambda h: (_lingering(h), h.session.abort()),
    (LINGER, Trigger.LOST): lambda h: (_lingering(h), h.session.connection_lost()),
    (CLOSED, Trigger.DRAIN): lambda h: (_closed(h), h.session.start_drain()),
    (CLOSED, Trigger.ABORT): lambda h: (_closed(h), h.session.abort()),
    (CLOSED, Trigger.LOST): lambda h: (_aborted(h), h.session.connection_lost()),
}

TABLE = [(before, trigger) for before, row in TRANSITIONS.items() for trigger in row]


@pytest.mark.parametrize(("before", "trigger"), TABLE, ids=[f"{b.name}-{t.name}" for b, t in TABLE])
def test_every_transition_of_the_table_is_reachable(before: State, trigger: Trigger) -> None:
    scenario = SCENARIOS.get((before, trigger))
    assert scenario is not None, f"no scenario drives {before.name} --{trigger.name}-->"
    h = Harness(budget=ReadBudget(TEST_BUDGET)) if trigger is Trigger.LIMIT else Harness()
    scenario(h)
    assert h.saw(before, trigger), h.transitions


def test_the_scenarios_name_no_transition_the_table_lacks() -> None:
    assert sorted(SCENARIOS, key=str) == sorted(TABLE, key=str)


def test_abort_resets_a_connection_closed_but_not_yet_gone_and_not_a_lost_one() -> None:
    h = Harness()
    h.session.start_drain()
    h.clock.advance(LINGER_S)  # closed; the transport may still be flushing to a slow reader
    h.session.abort()
    assert h.transport.actions == ["write_eof", "close", "abort"]
    h2 = Harness()
    h2.session.connection_lost()
    h2.session.abort()
    assert h2.transport.actions == []


def test_a_closed_session_ignores_the_client_fin() -> None:
    h = Harness()
    h.session.abort()
    assert h.session.eof_received() is True
    assert h.session.state is CLOSED
    assert h.transport.actions == ["abort"]


# -- drain -------------------------------------------------------------------------------------


def test_drain_at_a_boundary_sends_fin_then_lingers_until_the_client_fin() -> None:
    h = Harness()
    h.session.start_drain()
    assert h.transport.actions == ["write_eof"]
    assert h.session.state is LINGER
    h.session.data_received(encode_frame(b"late"))  # discarded: after our FIN
    assert h.payloads == []
    h.session.eof_received()
    assert h.transport.actions == ["write_eof", "close"]
    assert h.session.state is CLOSED
    assert h.clock.pending_timers == 0


def test_drain_keeps_serving_requests_written_before_the_boundary() -> None:
    h = Harness()
    h.send(b"a")
    h.session.start_drain()
    h.send(b"b")  # the client had not seen the FIN yet: still accepted and answered
    h.answer(0)
    assert not h.transport.eof_written
    h.answer(1)
    assert h.frames_out() == [b"a", b"b"]
    assert h.transport.actions[-1] == "write_eof"
    assert h.session.state is LINGER


def test_drain_mid_frame_waits_for_the_frame_then_answers_it_before_fin() -> None:
    h = Harness()
    frame = encode_frame(b"half-and-half")
    h.session.data_received(frame[:6])
    h.session.start_drain()
    assert h.session.state is CLOSING_AT_BOUNDARY
    assert not h.transport.eof_written  # mid-frame is not a boundary
    h.session.data_received(frame[6:])
    assert h.payloads == [b"half-and-half"]
    h.answer(0)
    assert h.frames_out() == [b"half-and-half"]
    assert h.transport.eof_written


def test_drain_mid_frame_with_a_stalled_client_ends_with_read_timeout() -> None:
    h = Harness()
    h.session.data_received(encode_frame(b"never finished")[:6])
    h.session.start_drain()
    h.clock.advance(READ_TIMEOUT_S)
    assert h.error_codes_out() == ["READ_TIMEOUT"]
    assert h.transport.eof_written
    assert h.session.state is LINGER


def test_linger_expiry_closes_a_connection_whose_client_never_sends_fin() -> None:
    h = Harness()
    h.session.start_drain()
    h.clock.advance(LINGER_S * 0.9)
    assert not h.transport.closed
    h.clock.advance(LINGER_S * 0.1)
    assert h.transport.closed
    assert h.session.state is CLOSED


def test_lingering_reads_again_even_if_reading_was_paused() -> None:
    h = Harness(saturated=True)
    assert not h.transport.reading
    h.session.start_drain()
    assert h.transport.reading  # read (and discard) until the client's FIN
    h.session.set_queue_pressure(False)  # no longer counted: nothing to resume
    h.session.pause_writing()  # nor paused again while lingering
    assert h.transport.reading
    assert h.session.paused_for == ()


# -- end of input ------------------------------------------------------------------------------


def test_eof_at_a_boundary_answers_what_is_pending_then_closes_without_linger() -> None:
    h = Harness()
    h.send(b"a", b"b")
    assert h.session.eof_received() is True
    assert h.session.state is CLOSING_AT_BOUNDARY
    h.answer(0)
    assert not h.transport.closed
    h.answer(1)
    assert h.frames_out() == [b"a", b"b"]
    assert h.transport.actions[-1] == "close"
    assert not h.transport.eof_written  # both FINs would cross: the client already sent its
    assert h.session.state is CLOSED
    assert h.clock.pending_timers == 0


def test_eof_with_a_partial_frame_is_truncated_frame_after_the_pending_answers() -> None:
    h = Harness()
    h.session.data_received(encode_frame(b"whole") + encode_frame(b"cut short")[:7])
    h.session.eof_received()
    assert h.transport.actions == []  # the error waits for "whole"'s answer
    h.answer(0)
    assert h.error_codes_out() == ["answer", "TRUNCATED_FRAME"]
    assert h.transport.closed


def test_error_is_written_after_every_pending_answer() -> None:
    h = Harness()
    h.session.data_received(encode_frames([b"a", b"b"]) + (0x7FFF_FFF0).to_bytes(4, "big"))
    assert h.payloads == [b"a", b"b"]  # read whole before the bad length: accepted
    assert h.session.state is CLOSING_AT_BOUNDARY
    h.session.data_received(encode_frame(b"c"))  # after bad input: discarded
    assert h.payloads == [b"a", b"b"]
    h.answer(1)
    assert h.transport.actions == []
    h.answer(0)
    assert h.error_codes_out() == ["answer", "answer", "FRAME_TOO_LARGE"]
    assert h.transport.eof_written
    assert h.session.state is LINGER


def test_bad_input_with_nothing_pending_is_answered_at_once() -> None:
    h = Harness(max_frame_bytes=100)
    h.session.data_received((101).to_bytes(4, "big"))
    assert h.error_codes_out() == ["FRAME_TOO_LARGE"]
    assert h.transport.actions == ["write", "write_eof"]
    h.session.eof_received()
    assert h.transport.closed


# -- timeouts ----------------------------------------------------------------------------------


def test_idle_timeout_closes_a_connection_with_nothing_in_flight() -> None:
    h = Harness()
    h.clock.advance(IDLE_TIMEOUT_S - 1)
    h.send(b"a")  # activity: the idle period starts again from its answer
    h.clock.advance(IDLE_TIMEOUT_S * 2)  # busy, not idle, however long it takes
    assert h.session.state is OPEN
    h.answer(0)
    h.clock.advance(IDLE_TIMEOUT_S - 1)
    assert h.session.state is OPEN
    h.clock.advance(1)
    assert h.transport.eof_written
    assert h.session.state is LINGER
    assert h.frames_out() == [b"a"]  # an idle close is a FIN, not an error


def test_the_idle_timer_is_not_re_armed_per_answer() -> None:
    h = Harness()
    for i in range(50):
        h.send(b"r")
        h.answer(i)
        h.clock.advance(1.0)
    # One timer, set when the connection opened, still stands: answers only move the deadline.
    assert h.clock.pending_timers == 1
    assert h.clock.next_deadline() == pytest.approx(1000.0 + IDLE_TIMEOUT_S)
    h.clock.advance(IDLE_TIMEOUT_S - 50)  # fires, finds the real deadline later, re-arms
    assert h.session.state is OPEN
    assert h.clock.pending_timers == 1


def test_a_partial_frame_held_past_read_timeout_is_read_timeout() -> None:
    h = Harness()
    h.session.data_received(encode_frame(b"slow")[:5])
    h.clock.advance(READ_TIMEOUT_S - 0.1)
    assert h.transport.actions == []
    h.clock.advance(0.1)
    assert h.error_codes_out() == ["READ_TIMEOUT"]
    assert h.transport.eof_written


def test_the_read_timeout_counts_from_the_start_of_the_current_frame() -> None:
    h = Harness()
    stream = encode_frames([b"one", b"two"])
    h.session.data_received(stream[:5])  # "one" begins
    h.clock.advance(READ_TIMEOUT_S - 1)
    h.session.data_received(stream[5:12])  # "one" completes, "two" begins
    h.clock.advance(READ_TIMEOUT_S - 1)
    assert h.session.state is OPEN
    h.clock.advance(1)
    assert h.session.state is CLOSING_AT_BOUNDARY  # "two" timed out; "one" is still owed
    h.answer(0)
    assert h.error_codes_out() == ["answer", "READ_TIMEOUT"]


# -- pausing -----------------------------------------------------------------------------------


def test_pause_bits_pause_once_and_resume_when_the_last_clears() -> None:
    h = Harness()
    h.session.pause_writing()
    h.session.set_queue_pressure(True)
    assert h.transport.actions == ["pause_reading"]
    assert h.session.paused_for == ("write_blocked", "queue_saturated")
    h.session.resume_writing()
    assert h.transport.actions == ["pause_reading"]
    h.session.set_queue_pressure(False)
    assert h.transport.actions == ["pause_reading", "resume_reading"]
    assert h.session.paused_for == ()
    h.session.set_queue_pressure(False)  # not paused for it: nothing to do
    assert h.transport.actions == ["pause_reading", "resume_reading"]


def test_a_session_opened_under_queue_pressure_starts_paused() -> None:
    h = Harness(saturated=True)
    assert h.transport.actions == ["pause_reading"]
    assert h.session.paused_for == ("queue_saturated",)


def test_max_pipelined_pauses_reading_and_half_of_it_resumes() -> None:
    h = Harness(max_pipelined=4)
    h.send(b"0", b"1", b"2")
    assert h.transport.reading
    h.send(b"3")
    assert not h.transport.reading
    assert h.session.paused_for == ("pipeline_full",)
    h.answer(0)
    assert not h.transport.reading  # 3 pending: above half the cap
    h.answer(1)
    assert h.transport.reading  # 2 pending
    assert h.frames_out() == [b"0", b"1"]


# -- the two bugs ------------------------------------------------------------------------------


def test_max_pipelined_holds_within_one_read() -> None:
    # One write of 10,000 frames used to be accepted whole, far past max_pipelined.
    h = Harness(max_pipelined=128)
    payloads = [f"r{i}".encode() for i in range(10_000)]
    h.session.data_received(encode_frames(payloads))
    assert len(h.submitted) == 128  # the rest wait in the decoder, not accepted
    assert not h.transport.reading
    answered = 0
    for _ in range(10_000):  # bounded: every round answers at least one request
        if answered == len(payloads):
            break
        while answered < len(h.submitted):
            h.answer(answered)
            answered += 1
        h.clock.advance(0)  # the held frames are taken from a timer due at once
    assert h.payloads == payloads
    assert h.max_pending <= 128
    assert h.frames_out() == payloads
    assert h.transport.reading
    assert h.session.statistics()["buffered_bytes"] == 0


def test_held_frames_are_taken_only_once_half_the_cap_is_answered() -> None:
    h = Harness(max_pipelined=8)
    h.session.data_received(encode_frames([b"x"] * 20))
    assert len(h.submitted) == 8
    for i in range(3):
        h.answer(i)
    h.clock.advance(0)
    assert len(h.submitted) == 8  # 5 pending: above half
    h.answer(3)
    assert len(h.submitted) == 8  # not from inside the answer's callback...
    h.clock.advance(0)
    assert len(h.submitted) == 12  # ...but from the timer: back up to the cap
    assert not h.transport.reading


@pytest.mark.parametrize("pause", ["queue", "write"])
def test_held_frames_wait_while_reading_is_also_paused_for_backpressure(pause: str) -> None:
    h = Harness(max_pipelined=2)
    h.session.data_received(encode_frames([b"1", b"2", b"3", b"4"]))
    if pause == "queue":
        h.session.set_queue_pressure(True)
    else:
        h.session.pause_writing()
    h.answer(0)
    h.answer(1)
    h.clock.advance(1.0)
    assert h.payloads == [b"1", b"2"]  # held frames are not admitted under backpressure
    if pause == "queue":
        h.session.set_queue_pressure(False)
    else:
        h.session.resume_writing()
    h.clock.advance(0)
    assert h.payloads == [b"1", b"2", b"3", b"4"]


def test_read_timeout_does_not_run_while_the_router_pauses_reading() -> None:
    # A partial frame held while the router paused reading used to time out: the client was
    # told READ_TIMEOUT for the router's own pause and lost its remaining requests.
    h = Harness(max_pipelined=2)
    stream = encode_frames([b"a", b"b", b"third"])
    h.session.data_received(stream[:-3])  # "a", "b" whole; "third" begun; 2 pending: paused
    assert not h.transport.reading
    h.clock.advance(READ_TIMEOUT_S * 5)
    assert h.session.state is OPEN
    h.answer(0)  # 1 pending: reading resumes, and the client's clock restarts now
    assert h.transport.reading
    h.clock.advance(READ_TIMEOUT_S - 1)
    h.session.data_received(stream[-3:])
    assert h.payloads == [b"a", b"b", b"third"]
    h.answer(1)
    h.answer(2)
    assert h.frames_out() == [b"a", b"b", b"third"]


@pytest.mark.parametrize("pause", ["queue", "write"])
def test_read_and_idle_timeouts_stop_while_backpressure_pauses_reading(pause: str) -> None:
    h = Harness()
    h.session.data_received(encode_frame(b"partial")[:6])
    if pause == "queue":
        h.session.set_queue_pressure(True)
    else:
        h.session.pause_writing()
    h.clock.advance(IDLE_TIMEOUT_S * 2)
    assert h.session.state is OPEN
    assert h.transport.actions == ["pause_reading"]
    if pause == "queue":
        h.session.set_queue_pressure(False)
    else:
        h.session.resume_writing()
    h.clock.advance(READ_TIMEOUT_S - 0.5)
    assert h.session.state is OPEN
    h.clock.advance(0.5)  # reading again for read_timeout_s: now it is the client's delay
    assert h.error_codes_out() == ["READ_TIMEOUT"]


def test_held_frames_then_eof_are_all_answered_before_truncated_frame() -> None:
    h = Harness(max_pipelined=4)
    payloads = [bytes([i]) for i in range(10)]
    h.session.data_received(encode_frames(payloads) + encode_frame(b"cut")[:5])
    h.session.eof_received()
    answered = 0
    for _ in range(20):
        if h.transport.closed:
            break
        while answered < len(h.submitted):
            h.answer(answered)
            answered += 1
        h.clock.advance(0)
    assert h.payloads == payloads
    assert h.error_codes_out() == ["answer"] * 10 + ["TRUNCATED_FRAME"]
    assert h.transport.closed


def test_held_frames_are_served_through_a_drain_before_fin() -> None:
    h = Harness(max_pipelined=2)
    h.session.data_received(encode_frames([b"1", b"2", b"3", b"4", b"5"]))
    h.session.start_drain()
    answered = 0
    for _ in range(10):
        if h.transport.eof_written:
            break
        while answered < len(h.submitted):
            assert not h.transport.eof_written
            h.answer(answered)
            answered += 1
        h.clock.advance(0)
    assert h.frames_out() == [b"1", b"2", b"3", b"4", b"5"]
    assert h.session.state is LINGER


def test_an_oversize_length_behind_held_frames_is_found_when_they_are_taken() -> None:
    h = Harness(max_pipelined=2, max_frame_bytes=100)
    h.session.data_received(encode_frames([b"1", b"2", b"3"]) + (101).to_bytes(4, "big"))
    assert h.payloads == [b"1", b"2"]
    h.answer(0)
    h.answer(1)
    h.clock.advance(0)
    assert h.payloads == [b"1", b"2", b"3"]
    h.answer(2)
    assert h.error_codes_out() == ["answer"] * 3 + ["FRAME_TOO_LARGE"]


# -- closing -----------------------------------------------------------------------------------


def test_abort_resets_and_later_answers_are_not_written() -> None:
    h = Harness()
    h.send(b"a", b"b")
    h.session.abort()
    assert h.transport.actions == ["abort"]
    assert h.session.unanswered == 2
    h.answer(0)
    h.answer(1)
    assert h.transport.actions == ["abort"]
    assert h.session.unanswered == 0
    assert h.clock.pending_timers == 0


def test_a_lost_connection_cancels_its_timer_and_writes_nothing() -> None:
    h = Harness()
    h.send(b"a")
    h.session.connection_lost()
    assert h.clock.pending_timers == 0
    h.answer(0)
    assert h.transport.actions == []
    h.session.data_received(encode_frame(b"b"))
    assert h.payloads == [b"a"]


def test_answers_given_inside_submit_during_a_drain_do_not_send_fin_mid_read() -> None:
    # The dispatcher may answer inside submit (no backend). The first such answer empties the
    # pending list while later frames of the same read are still to be accepted: the boundary
    # is only after the whole read (the transport refuses writes after FIN).
    h = Harness(answer_at_once=NoBackend("none"))
    stream = encode_frames([b"a", b"b", b"c"])
    h.session.data_received(stream[:3])
    h.session.start_drain()  # mid-frame: not a boundary yet
    assert not h.transport.eof_written
    h.session.data_received(stream[3:])
    assert h.payloads == [b"a", b"b", b"c"]
    assert h.error_codes_out() == ["NO_BACKEND"] * 3
    assert h.transport.eof_written
    assert h.session.state is LINGER


def test_statistics_and_repr_describe_the_session() -> None:
    h = Harness(max_pipelined=1)
    h.send(b"a")
    stats = h.session.statistics()
    assert stats["state"] == "open"
    assert stats["unanswered"] == 1
    assert stats["paused_for"] == ("pipeline_full",)
    assert "unanswered=1" in repr(h.session) and "pipeline_full" in repr(h.session)


# -- the property: any split of the stream, same requests, same answers ------------------------


@settings(deadline=None, max_examples=150)
@given(
    payloads=st.lists(st.binary(max_size=40), max_size=30),
    max_pipelined=st.integers(1, 5),
    data=st.data(),
)
def test_any_split_of_the_stream_submits_the_same_payloads_in_order(
    payloads: list[bytes], max_pipelined: int, data: st.DataObject,
) -> None:
    stream = encode_frames(payloads)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=20), label="cuts"))
    chunks = [stream[a:b] for a, b in itertools.pairwise([0, *cuts, len(stream)])]
    h = Harness(max_pipelined=max_pipelined)
    rng = data.draw(st.randoms(use_true_random=False), label="answer order")
    answered: set[int] = set()
    for _ in range(10 * (len(chunks) + len(payloads)) + 10):  # bounded
        if not chunks and len(answered) == len(payloads):
            break
        if chunks and h.transport.reading:
            h.session.data_received(chunks.pop(0))
        else:  # paused, or all sent: answer something, in any order, then let timers run
            open_ = [i for i in range(len(h.submitted)) if i not in answered]
            if open_:
                i = rng.choice(open_)
                answered.add(i)
                h.answer(i)
            h.clock.advance(0)
        assert h.session.unanswered <= max_pipelined
    assert h.payloads == payloads
    assert h.frames_out() == payloads
    h.session.eof_received()
    assert h.transport.closed
    assert h.session.state is CLOSED


# -- refusing a connection; TLS transports -----------------------------------------------------


def test_a_refused_connection_gets_the_error_frame_then_fin_and_nothing_is_accepted() -> None:
    h = Harness()
    h.session.refuse(ClientNotAllowed("client certificate is not on the allow-list"))
    assert h.error_codes_out() == ["CLIENT_NOT_ALLOWED"]
    assert h.transport.actions == ["write", "write_eof"]
    assert h.session.state is LINGER
    h.send(b"sent before it read the refusal")
    assert h.submitted == []  # discarded while lingering
    h.session.eof_received()
    assert h.session.state is CLOSED
    assert h.transport.actions[-1] == "close"


def test_a_tls_transport_closes_at_the_boundary_at_once_instead_of_lingering() -> None:
    h = Harness()
    h.transport.eof_capable = False
    h.send(b"a")
    h.session.start_drain()
    assert h.session.state is CLOSING_AT_BOUNDARY  # "a" is still unanswered
    assert "close" not in h.transport.actions
    h.answer(0)
    assert h.frames_out() == [b"a"]
    # close() is TLS's half-close (close_notify, then the transport reads until the client's):
    # no write_eof, no linger timer of the session's own.
    assert h.transport.actions[-1] == "close"
    assert "write_eof" not in h.transport.actions
    assert h.session.state is CLOSED
    assert h.session.statistics()["timer_at"] is None


def test_a_refused_tls_connection_writes_the_error_frame_before_close() -> None:
    h = Harness()
    h.transport.eof_capable = False
    h.session.refuse(ClientNotAllowed("no client certificate was presented"))
    assert h.transport.actions == ["write", "close"]
    assert h.error_codes_out() == ["CLIENT_NOT_ALLOWED"]
