"""The backend's side of a lease, without I/O: when ``router.client.lease.LeaseSchedule``
registers, heartbeats and retries, and how ``Backoff`` grows, on a ``ManualClock``."""

from __future__ import annotations

import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from router.client.lease import Backoff, Lease, LeaseSchedule, Step
from router.core.clock import ManualClock

LEASE = Lease("b1", lease_ttl_s=9.0, heartbeat_interval_s=3.0)


def _schedule(clock: ManualClock, *, backoff: Backoff | None = None,
              heartbeat_interval_s: float | None = None) -> LeaseSchedule:
    return LeaseSchedule(clock.now(), lease_ttl_s=9.0, rng=random.Random(7), backoff=backoff,
                         heartbeat_interval_s=heartbeat_interval_s)


def _holding(clock: ManualClock, *, backoff: Backoff | None = None,
             heartbeat_interval_s: float | None = None) -> LeaseSchedule:
    schedule = _schedule(clock, backoff=backoff, heartbeat_interval_s=heartbeat_interval_s)
    assert schedule.registered(clock.now(), LEASE) == "holding"
    return schedule


def test_it_registers_at_once_then_heartbeats_every_interval() -> None:
    clock = ManualClock()
    schedule = _schedule(clock)
    assert schedule.next_step() == Step("register", clock.now())
    assert schedule.state == "registering"
    start = clock.now()
    assert schedule.registered(clock.now(), LEASE) == "holding"
    for beat in range(1, 4):
        assert schedule.next_step() == Step("heartbeat", start + 3.0 * beat)
        clock.advance(3.0)
        assert schedule.renewed(clock.now()) is None  # holding still: nothing to log
    assert schedule.counts == {"registered": 1, "renewed": 3, "lease_lost": 0, "failed": 0}


def test_the_interval_is_the_callers_else_the_routers_else_a_third_of_the_ttl() -> None:
    clock = ManualClock()
    assert _schedule(clock).interval_s == 3.0
    assert _holding(clock).interval_s == 3.0
    schedule = _schedule(clock)
    schedule.registered(clock.now(), Lease("b1", 9.0, heartbeat_interval_s=2.0))
    assert schedule.interval_s == 2.0
    asked = _holding(clock, heartbeat_interval_s=1.5)
    assert asked.interval_s == 1.5
    assert asked.next_step() == Step("heartbeat", clock.now() + 1.5)


@pytest.mark.parametrize("interval", [0.0, -1.0, 9.0, 12.0])
def test_a_heartbeat_interval_must_fit_in_the_ttl(interval: float) -> None:
    with pytest.raises(ValueError, match="heartbeat_interval_s"):
        LeaseSchedule(0.0, lease_ttl_s=9.0, heartbeat_interval_s=interval)


def test_lease_not_found_registers_again_now() -> None:
    clock = ManualClock()
    schedule = _holding(clock)
    clock.advance(3.0)
    assert schedule.lease_lost(clock.now()) == "registering"
    assert schedule.next_step() == Step("register", clock.now())
    assert schedule.registered(clock.now(), LEASE) == "holding"
    assert schedule.next_step() == Step("heartbeat", clock.now() + 3.0)


def test_a_router_that_is_down_is_retried_with_growing_capped_delays() -> None:
    clock = ManualClock()
    schedule = LeaseSchedule(clock.now(), lease_ttl_s=30.0, rng=random.Random(1),
                             backoff=Backoff(initial_s=0.2, max_s=5.0, jitter=0.0))
    changes = []
    delays = []
    for _ in range(8):
        step = schedule.next_step()
        assert step.action == "register"
        clock.advance(step.at - clock.now())
        changes.append(schedule.failed(clock.now(), "ECONNREFUSED"))
        delays.append(schedule.next_step().at - clock.now())
    # Logged once: the first failure changes the state, the others do not.
    assert changes == ["unreachable"] + [None] * 7
    assert delays == pytest.approx([0.2, 0.4, 0.8, 1.6, 3.2, 5.0, 5.0, 5.0])
    assert schedule.failures == 8 and schedule.last_error == "ECONNREFUSED"
    assert schedule.registered(clock.now(), LEASE) == "holding"
    assert schedule.failures == 0 and schedule.last_error is None


def test_retries_are_at_most_one_heartbeat_interval_apart() -> None:
    clock = ManualClock()
    schedule = _holding(clock, backoff=Backoff(initial_s=1.0, max_s=60.0, jitter=0.0))
    clock.advance(3.0)
    delays = []
    for _ in range(4):
        schedule.failed(clock.now(), "timeout")
        delays.append(schedule.next_step().at - clock.now())
    assert delays == pytest.approx([1.0, 2.0, 3.0, 3.0])


def test_a_failed_heartbeat_is_retried_as_one_until_the_ttl_has_passed() -> None:
    clock = ManualClock()
    schedule = _holding(clock, backoff=Backoff(initial_s=1.0, max_s=1.0, jitter=0.0))
    renewed_at = clock.now()
    clock.advance(3.0)
    actions = []
    while clock.now() - renewed_at < 11.0:
        schedule.failed(clock.now(), "503")
        step = schedule.next_step()
        actions.append((round(clock.now() - renewed_at), step.action))
        clock.advance(step.at - clock.now())
    # Renewed at 0 with a 9 s TTL: from 9 s on the router has dropped the lease anyway.
    assert actions == [(3, "heartbeat"), (4, "heartbeat"), (5, "heartbeat"), (6, "heartbeat"),
                       (7, "heartbeat"), (8, "heartbeat"), (9, "register"), (10, "register")]


def test_a_renewal_after_failures_is_a_change_back_to_holding() -> None:
    clock = ManualClock()
    schedule = _holding(clock)
    clock.advance(3.0)
    assert schedule.failed(clock.now(), "reset") == "unreachable"
    clock.advance(schedule.next_step().at - clock.now())
    assert schedule.renewed(clock.now()) == "holding"
    assert schedule.next_step() == Step("heartbeat", clock.now() + 3.0)


def test_a_refusal_is_its_own_state_and_still_retried() -> None:
    clock = ManualClock()
    schedule = _schedule(clock, backoff=Backoff(initial_s=0.5, max_s=0.5, jitter=0.0))
    assert schedule.failed(clock.now(), "401 UNAUTHORIZED", permanent=True) == "refused"
    assert schedule.failed(clock.now(), "401 UNAUTHORIZED", permanent=True) is None
    assert schedule.next_step() == Step("register", clock.now() + 0.5)
    assert schedule.failed(clock.now(), "ECONNREFUSED") == "unreachable"
    assert schedule.failed(clock.now(), "403 FORBIDDEN", permanent=True) == "refused"


def test_statistics_say_where_it_stands() -> None:
    clock = ManualClock()
    schedule = _holding(clock)
    clock.advance(3.0)
    schedule.failed(clock.now(), "reset")
    stats = schedule.statistics()
    assert stats["state"] == "unreachable" and stats["backend_id"] == "b1"
    assert stats["failures_in_a_row"] == 1 and stats["last_error"] == "reset"
    assert stats["next"] == "heartbeat" and stats["failed"] == 1
    assert "unreachable" in repr(schedule)


@given(failures=st.integers(1, 10_000), seed=st.integers(0, 2**32),
       cap=st.one_of(st.none(), st.floats(0.0, 100.0)))
def test_a_backoff_delay_is_never_a_tight_loop_and_never_past_its_cap(
        failures: int, seed: int, cap: float | None) -> None:
    backoff = Backoff(initial_s=0.2, max_s=5.0, jitter=0.5, min_s=0.05)
    delay = backoff.delay(failures, random.Random(seed), cap)
    ceiling = min(0.2 * 2.0 ** min(failures - 1, 64), 5.0, cap if cap is not None else 5.0)
    # Jitter 0.5 draws from the upper half below the ceiling; min_s is the floor of both.
    assert max(0.05, ceiling * 0.5) <= delay <= max(0.05, ceiling)


@pytest.mark.parametrize("kwargs", [
    {"min_s": 0.0}, {"initial_s": 10.0, "max_s": 5.0}, {"multiplier": 0.5}, {"jitter": 1.0},
])
def test_a_backoff_that_could_spin_or_shrink_is_refused(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError, match="backoff needs"):
        Backoff(**kwargs)


def test_retry_numbers_count_from_one() -> None:
    with pytest.raises(ValueError, match="counts from 1"):
        Backoff().delay(0, random.Random())
