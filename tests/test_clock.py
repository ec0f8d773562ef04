"""The injected clocks: ManualClock's timers, and MonotonicClock's conversion to loop delays."""

from __future__ import annotations

import asyncio
import time

import pytest

from router.core.clock import Callback, ManualClock, MonotonicClock, Timer


def test_advance_runs_due_timers_in_deadline_order_at_their_deadline() -> None:
    clock = ManualClock(start=100.0)
    seen: list[tuple[str, float]] = []
    clock.call_at(103.0, lambda: seen.append(("c", clock.now())))
    clock.call_at(101.0, lambda: seen.append(("a", clock.now())))
    clock.call_at(102.0, lambda: seen.append(("b", clock.now())))
    clock.call_at(110.0, lambda: seen.append(("late", clock.now())))
    assert clock.advance(5.0) == 3
    assert seen == [("a", 101.0), ("b", 102.0), ("c", 103.0)]
    assert clock.now() == 105.0
    assert clock.pending_timers == 1
    assert clock.next_deadline() == 110.0


def test_equal_deadlines_run_in_the_order_they_were_set() -> None:
    clock = ManualClock(start=0.0)
    seen: list[int] = []
    for i in range(5):
        clock.call_at(1.0, lambda i=i: seen.append(i))
    clock.advance(1.0)
    assert seen == [0, 1, 2, 3, 4]


def test_a_timer_set_by_a_callback_runs_if_it_falls_within_the_span() -> None:
    clock = ManualClock(start=0.0)
    seen: list[float] = []

    def first() -> None:
        seen.append(clock.now())
        clock.call_at(clock.now() + 1.0, second)  # due at 3.0: inside the span
        clock.call_at(clock.now() + 10.0, lambda: seen.append(-1.0))  # at 12.0: outside

    def second() -> None:
        seen.append(clock.now())

    clock.call_at(2.0, first)
    clock.advance(4.0)
    assert seen == [2.0, 3.0]
    assert clock.now() == 4.0
    assert clock.next_deadline() == 12.0


def test_cancelled_timers_do_not_run_and_cancel_after_firing_is_harmless() -> None:
    clock = ManualClock(start=0.0)
    seen: list[str] = []
    keep = clock.call_at(1.0, lambda: seen.append("keep"))
    drop = clock.call_at(1.0, lambda: seen.append("drop"))
    drop.cancel()
    assert clock.pending_timers == 1
    clock.advance(2.0)
    keep.cancel()
    assert seen == ["keep"]
    assert clock.pending_timers == 0
    assert clock.next_deadline() is None


def test_advance_zero_runs_what_is_due_now_and_a_past_deadline_does_not_move_time_back() -> None:
    clock = ManualClock(start=50.0)
    seen: list[float] = []
    clock.call_at(50.0, lambda: seen.append(clock.now()))
    clock.call_at(10.0, lambda: seen.append(clock.now()))  # already past when set
    assert clock.advance(0) == 2
    assert seen == [50.0, 50.0]
    assert clock.now() == 50.0


@pytest.mark.parametrize("seconds", [-0.001, float("nan")])
def test_time_does_not_go_backwards(seconds: float) -> None:
    clock = ManualClock(start=1.0)
    with pytest.raises(ValueError):
        clock.advance(seconds)
    assert clock.now() == 1.0


def test_a_timer_that_re_arms_at_the_same_instant_forever_is_reported() -> None:
    clock = ManualClock(start=0.0)

    def again() -> None:
        clock.call_at(clock.now(), again)

    clock.call_at(0.0, again)
    with pytest.raises(RuntimeError, match="timer loop"):
        clock.advance(1.0)


class _RecordingLoop:
    def __init__(self) -> None:
        self.delays: list[float] = []

    def call_later(self, delay: float, callback: Callback, /) -> Timer:
        self.delays.append(delay)
        return ManualClock().call_at(0.0, callback)


def test_monotonic_clock_turns_a_deadline_into_a_delay_on_the_loop() -> None:
    loop = _RecordingLoop()
    clock = MonotonicClock(lambda: loop)
    assert clock.now is time.monotonic  # the builtin itself: read several times per request
    before = time.monotonic()
    clock.call_at(before + 5.0, lambda: None)
    clock.call_at(before - 5.0, lambda: None)  # already past: at once, not a negative delay
    assert len(loop.delays) == 2
    assert 4.0 < loop.delays[0] <= 5.0
    assert loop.delays[1] == 0.0


async def test_monotonic_clock_timers_fire_on_the_running_loop() -> None:
    clock = MonotonicClock(asyncio.get_running_loop)
    fired = asyncio.Event()
    cancelled_fired = asyncio.Event()
    clock.call_at(clock.now() + 0.02, fired.set)
    clock.call_at(clock.now() + 0.005, cancelled_fired.set).cancel()  # due first
    async with asyncio.timeout(5):
        await fired.wait()
    assert not cancelled_fired.is_set()
