"""The read budget (router.protocol.budget) alone, and shared by TcpSessions: no sockets, a
ManualClock, hypothesis over sequences of charges and releases."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from test_tcp_session import READ_TIMEOUT_S, Harness

from router.core.clock import ManualClock
from router.protocol.budget import Outcome, ReadBudget
from router.protocol.frames import encode_frame, encode_frames
from router.protocol.session import CLOSING_AT_BOUNDARY, LINGER, OPEN


class Member:
    """Records the budget's callbacks."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.events: list[str] = []

    def budget_granted(self) -> None:
        self.events.append("granted")

    def budget_shed(self) -> None:
        self.events.append("shed")

    def __repr__(self) -> str:
        return f"Member({self.name})"


# -- the budget alone --------------------------------------------------------------------------


def test_a_frame_that_fits_is_charged_whole_and_released() -> None:
    budget = ReadBudget(1000)
    a = Member("a")
    assert budget.charge(a, 600, 10) is Outcome.GRANTED
    assert budget.used == 600  # the whole frame, not the 10 bytes read so far
    budget.release(a)
    assert budget.used == 0
    assert budget.statistics()["peak_bytes"] == 600


def test_a_frame_that_does_not_fit_waits_holding_what_it_read_and_is_granted_later() -> None:
    budget = ReadBudget(1000)
    a, b = Member("a"), Member("b")
    assert budget.charge(a, 600, 10) is Outcome.GRANTED
    assert budget.charge(b, 600, 50) is Outcome.WAITING
    assert budget.used == 650
    budget.release(a)
    assert b.events == ["granted"]
    assert budget.used == 600
    assert budget.statistics()["waits_total"] == 1


def test_waiting_frames_needing_the_least_room_go_first_and_only_while_they_fit() -> None:
    budget = ReadBudget(1000)
    big, large, small, tiny = Member("big"), Member("large"), Member("small"), Member("tiny")
    assert budget.charge(big, 890, 1) is Outcome.GRANTED
    assert budget.charge(large, 800, 1) is Outcome.WAITING
    assert budget.charge(small, 300, 1) is Outcome.WAITING
    assert budget.charge(tiny, 100, 1) is Outcome.GRANTED  # fits beside big: no queueing
    budget.release(big)
    assert (small.events, large.events) == (["granted"], [])  # 100 + 300 leave no room for 800
    budget.release(small)
    assert large.events == ["granted"]
    assert budget.used == 900


def test_a_frame_larger_than_the_budget_is_too_large() -> None:
    budget = ReadBudget(1000)
    assert budget.charge(Member("a"), 1001, 4) is Outcome.TOO_LARGE
    assert budget.used == 0
    assert budget.statistics()["too_large_total"] == 1


def test_over_the_limit_the_largest_holder_that_is_no_admitted_frame_is_shed() -> None:
    budget = ReadBudget(1000)
    admitted, heavy, light, newcomer = Member("a"), Member("h"), Member("l"), Member("n")
    assert budget.charge(admitted, 500, 1) is Outcome.GRANTED
    assert budget.charge(heavy, 600, 300) is Outcome.WAITING
    assert budget.charge(light, 600, 100) is Outcome.WAITING
    assert budget.used == 900
    assert budget.charge(newcomer, 600, 150) is Outcome.WAITING  # 1050: over, shed "h"
    assert heavy.events == ["shed"]
    assert budget.used == 750
    budget.release(admitted)  # 250 used: "n" needs the least more (450), then "l" can't fit
    assert (light.events, newcomer.events) == ([], ["granted"])
    assert budget.used == 700
    assert budget.statistics()["shed_total"] == 1


def test_the_caller_itself_may_be_shed_and_is_told_by_the_return_value() -> None:
    budget = ReadBudget(1000)
    admitted, member = Member("a"), Member("m")
    budget.charge(admitted, 900, 1)
    assert budget.charge(member, 600, 200) is Outcome.SHED
    assert member.events == [] and budget.used == 900


def test_held_back_bytes_are_charged_as_they_are_and_never_refused() -> None:
    budget = ReadBudget(1000)
    admitted, held = Member("a"), Member("h")
    budget.charge(admitted, 900, 1)
    assert budget.charge(held, 0, 50) is Outcome.GRANTED
    assert budget.used == 950


def test_the_caller_granted_by_room_it_freed_is_told_by_the_return_value() -> None:
    budget = ReadBudget(1000)
    member = Member("m")
    assert budget.charge(member, 900, 1) is Outcome.GRANTED
    assert budget.charge(member, 800, 1) is Outcome.GRANTED  # its next frame replaces it
    assert budget.used == 800 and member.events == []


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(
    st.integers(0, 5),  # member
    st.sampled_from(["frame", "held", "release"]),
    st.integers(1, 1200),  # frame size
    st.integers(0, 400),  # bytes held
), max_size=60))
def test_invariants_hold_for_any_sequence(ops: list[tuple[int, str, int, int]]) -> None:
    """``used`` is the sum of what the live members hold; admitted frames never exceed the
    limit; no waiting frame fits; the limit is exceeded by at most the last charge, and only
    while nothing sheddable is left; callbacks agree with the state."""
    limit = 1000
    budget = ReadBudget(limit)
    members = [Member(str(i)) for i in range(6)]
    charge: dict[int, int] = {}  # member -> bytes it holds, as the test sees it
    waiting: dict[int, int] = {}  # member -> size of its waiting frame
    admitted: dict[int, int] = {}
    for index, op, size, held in ops:
        member = members[index]
        for m in members:
            m.events.clear()
        charge.pop(index, None)
        waiting.pop(index, None)
        admitted.pop(index, None)
        if op == "release":
            budget.release(member)
        else:
            held = min(held, size - 1)
            frame = size if op == "frame" else 0
            outcome = budget.charge(member, frame, held)
            if outcome is Outcome.GRANTED:
                charge[index] = frame or held
                if frame:
                    admitted[index] = frame
            elif outcome is Outcome.WAITING:
                charge[index], waiting[index] = held, frame
            else:
                assert outcome in (Outcome.TOO_LARGE, Outcome.SHED)
                assert outcome is Outcome.SHED or frame > limit
        for i, m in enumerate(members):
            for event in m.events:
                assert i != index, "the caller is told by the return value"
                if event == "granted":
                    assert i in waiting
                    admitted[i] = charge[i] = waiting.pop(i)
                else:
                    assert i in waiting or (i in charge and i not in admitted)
                    charge.pop(i)
                    waiting.pop(i, None)
        assert budget.used == sum(charge.values())
        assert sum(admitted.values()) <= limit
        for i, frame in waiting.items():
            assert budget.used - charge[i] + frame > limit, "a waiting frame that fits"
        sheddable = [i for i in charge if i not in admitted]
        if budget.used > limit:
            assert not sheddable
        stats = budget.statistics()
        assert stats["frames_waiting"] == len(waiting)
        assert stats["frames_admitted"] == len(admitted)


# -- shared by sessions ------------------------------------------------------------------------


def sessions(count: int, limit: int, **config: object) -> tuple[ReadBudget, list[Harness]]:
    budget = ReadBudget(limit)
    clock = ManualClock()
    return budget, [Harness(budget=budget, clock=clock, **config) for _ in range(count)]


def test_whole_frames_in_one_read_never_touch_the_budget() -> None:
    budget, (h,) = sessions(1, 1024)
    for i in range(50):
        h.send(b"x" * i)
        h.answer(i)
    assert budget.statistics()["peak_bytes"] == 0
    assert h.session.statistics()["budget_claim"] == 0


def test_a_frame_that_does_not_fit_pauses_its_connection_until_room_frees() -> None:
    budget, (a, b) = sessions(2, 1500)
    frame_a, frame_b = encode_frame(b"a" * 996), encode_frame(b"b" * 996)  # 1000 bytes each
    a.session.data_received(frame_a[:100])
    assert a.transport.reading and budget.used == 1000
    b.session.data_received(frame_b[:100])
    assert not b.transport.reading
    assert b.session.paused_for == ("read_budget",)
    assert budget.used == 1100  # b is charged only what it read
    a.session.data_received(frame_a[100:])
    assert a.payloads == [b"a" * 996]
    assert b.transport.reading and budget.used == 1000  # b's whole frame now
    b.session.data_received(frame_b[100:])
    assert b.payloads == [b"b" * 996]
    assert budget.used == 0


def test_a_waiting_frame_has_no_read_timeout_until_it_is_admitted() -> None:
    budget, (a, b) = sessions(2, 1500)
    a.session.data_received(encode_frame(b"a" * 996)[:10])
    b.session.data_received(encode_frame(b"b" * 996)[:10])
    a.clock.advance(READ_TIMEOUT_S)  # a's own frame times out, b was not being read
    assert a.error_codes_out() == ["READ_TIMEOUT"]
    assert b.error_codes_out() == [] and b.transport.reading  # a's release admitted b
    b.clock.advance(READ_TIMEOUT_S)
    assert b.error_codes_out() == ["READ_TIMEOUT"]
    assert budget.used == 0


def test_a_frame_larger_than_the_budget_is_frame_too_large() -> None:
    budget, (h,) = sessions(1, 1024)
    h.session.data_received(encode_frame(b"x" * 2000)[:300])
    assert h.error_codes_out() == ["FRAME_TOO_LARGE"]
    assert h.session.state is LINGER
    assert h.session.statistics()["buffered_bytes"] == 0  # dropped, not kept until close
    assert budget.used == 0


def test_the_connection_holding_the_most_unadmitted_bytes_is_shed_with_overloaded() -> None:
    budget, (a, heavy, light, late) = sessions(4, 2000)
    a.session.data_received(encode_frame(b"a" * 1196)[:10])  # admitted: 1200
    heavy.session.data_received(encode_frame(b"h" * 996)[:500])  # waits, holding 500
    light.session.data_received(encode_frame(b"l" * 996)[:200])  # waits, holding 200
    assert budget.used == 1900
    late.session.data_received(encode_frame(b"z" * 996)[:150])  # 2050: over
    assert heavy.error_codes_out() == ["OVERLOADED"]
    assert heavy.session.state is LINGER and heavy.transport.reading
    assert budget.used == 1550
    assert (light.session.state, late.session.state) == (OPEN, OPEN)
    assert a.payloads == [] and a.transport.reading


def test_held_back_frames_are_charged_until_they_are_taken() -> None:
    budget, (h,) = sessions(1, 10_000, max_pipelined=2)
    data = encode_frames([b"%d" % i for i in range(6)])
    h.session.data_received(data)
    assert len(h.payloads) == 2
    assert budget.used == len(data) - 2 * 5  # four frames of 5 bytes held back
    h.answer(0)
    h.answer(1)
    h.clock.advance(0)  # taken from the timer due at once
    assert len(h.payloads) == 4 and budget.used == 10
    h.answer(2)
    h.answer(3)
    h.clock.advance(0)
    assert len(h.payloads) == 6 and budget.used == 0


def test_a_lost_or_aborted_connection_gives_its_frame_back() -> None:
    budget, (a, b, c) = sessions(3, 1500)
    a.session.data_received(encode_frame(b"a" * 996)[:10])
    b.session.data_received(encode_frame(b"b" * 996)[:10])
    c.session.data_received(encode_frame(b"c" * 996)[:10])
    assert (b.transport.reading, c.transport.reading) == (False, False)
    a.session.connection_lost()
    assert b.transport.reading and not c.transport.reading
    b.session.abort()
    assert c.transport.reading
    assert budget.used == 1000


def test_refusing_a_connection_writes_the_error_then_fin_and_reads_nothing() -> None:
    from router.core.errors import ConnectionLimit

    _, (h,) = sessions(1, 1024)
    h.session.refuse(ConnectionLimit("over listener.max_connections=1"))
    assert h.error_codes_out() == ["CONNECTION_LIMIT"]
    assert h.transport.actions == ["write", "write_eof"]
    h.send(b"ignored")
    assert h.payloads == []
    assert h.session.state is LINGER


def test_a_drain_mid_frame_waiting_for_the_budget_closes_once_it_is_read() -> None:
    _, (a, b) = sessions(2, 1500)
    frame_b = encode_frame(b"b" * 996)
    a.session.data_received(encode_frame(b"a" * 996)[:10])
    b.session.data_received(frame_b[:10])
    b.session.start_drain()
    assert b.session.state is CLOSING_AT_BOUNDARY and not b.transport.eof_written
    a.session.connection_lost()
    b.session.data_received(frame_b[10:])
    b.answer(0)
    assert b.frames_out() == [b"b" * 996]
    assert b.transport.eof_written
