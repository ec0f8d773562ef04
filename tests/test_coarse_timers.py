"""CoarseTimers: far deadlines share one underlying timer per bucket, fire at most a bucket
late and never early; near ones stay exact (ManualClock, no sleeping)."""

from __future__ import annotations

import logging

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from router.core.clock import ManualClock
from router.core.coarse_timers import CoarseTimers


def _timers() -> tuple[ManualClock, CoarseTimers]:
    clock = ManualClock(start=1000.0)
    return clock, CoarseTimers(clock, resolution_s=0.25, exact_below_s=1.0)


def test_far_timers_share_one_underlying_timer_and_fire_at_their_buckets_end():
    clock, timers = _timers()
    fired: list[tuple[str, float]] = []
    for i in range(1000):
        timers.call_at(1060.0 + i * 0.0001, lambda i=i: fired.append((f"t{i}", clock.now())))
    assert clock.pending_timers == 1 and timers.pending == 1000
    clock.advance(59.99)
    assert fired == []
    clock.advance(0.27)
    assert len(fired) == 1000
    assert all(1060.0 <= at <= 1060.25 for _, at in fired)
    assert clock.pending_timers == 0 and timers.pending == 0


def test_near_deadlines_go_to_the_clock_unchanged():
    clock, timers = _timers()
    fired: list[float] = []
    timers.call_at(1000.3, lambda: fired.append(clock.now()))
    assert timers.pending == 0 and clock.pending_timers == 1
    clock.advance(0.3)
    assert fired == [1000.3]


def test_a_cancelled_timer_does_not_fire_and_a_fired_one_ignores_cancel():
    clock, timers = _timers()
    fired: list[str] = []
    kept = timers.call_at(1005.0, lambda: fired.append("kept"))
    dropped = timers.call_at(1005.0, lambda: fired.append("dropped"))
    dropped.cancel()
    assert timers.pending == 1
    clock.advance(5.0)
    assert fired == ["kept"]
    kept.cancel()  # after it fired: nothing happens
    assert fired == ["kept"]


def test_an_earlier_bucket_rearms_the_underlying_timer():
    clock, timers = _timers()
    fired: list[str] = []
    timers.call_at(1030.0, lambda: fired.append("late"))
    timers.call_at(1002.0, lambda: fired.append("early"))
    assert clock.pending_timers == 1  # the one for 1030 was replaced by the one for 1002
    clock.advance(2.0)
    assert fired == ["early"]
    assert clock.next_deadline() == pytest.approx(1030.0)
    clock.advance(28.0)
    assert fired == ["early", "late"]


def test_a_failing_callback_does_not_stop_the_others(caplog: pytest.LogCaptureFixture):
    clock, timers = _timers()
    fired: list[str] = []

    def broken() -> None:
        raise RuntimeError("a bug in one connection")

    timers.call_at(1010.0, broken)
    timers.call_at(1010.0, lambda: fired.append("other"))
    with caplog.at_level(logging.ERROR, logger="router.core.coarse_timers"):
        clock.advance(10.0)
    assert fired == ["other"]
    assert "a bug in one connection" in caplog.text


def test_a_callback_may_set_the_next_timer():
    clock, timers = _timers()
    fired: list[float] = []

    def again() -> None:
        fired.append(clock.now())
        if len(fired) < 3:
            timers.call_at(clock.now() + 10.0, again)

    timers.call_at(1010.0, again)
    clock.advance(40.0)
    assert fired == [1010.0, 1020.0, 1030.0]
    assert clock.pending_timers == 0


def test_resolution_must_be_positive_and_at_most_the_exact_bound():
    clock = ManualClock()
    with pytest.raises(ValueError):
        CoarseTimers(clock, resolution_s=0.0)
    with pytest.raises(ValueError):
        CoarseTimers(clock, resolution_s=2.0, exact_below_s=1.0)


@settings(deadline=None, max_examples=200)
@given(st.lists(st.tuples(st.floats(0.0, 120.0), st.booleans()), max_size=40))
def test_every_timer_fires_once_never_early_and_at_most_a_bucket_late(delays):
    clock, timers = _timers()
    fired: dict[int, float] = {}
    handles = []
    for index, (delay, cancel) in enumerate(delays):
        handle = timers.call_at(clock.now() + delay,
                                lambda index=index: fired.setdefault(index, clock.now()))
        handles.append((handle, cancel))
    for handle, cancel in handles:
        if cancel:
            handle.cancel()
    clock.advance(121.0)
    expected = {i for i, (_, cancel) in enumerate(delays) if not cancel}
    assert set(fired) == expected
    for index in expected:
        due = 1000.0 + delays[index][0]
        assert due - 1e-9 <= fired[index] <= due + 0.25 + 1e-9
    assert clock.pending_timers == 0
