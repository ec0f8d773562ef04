"""The pool and the health monitor against fake connections and a manual clock: no sockets."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from router.core.clock import ManualClock
from router.core.config import HealthConfig, PoolConfig
from router.core.errors import BackendError, BackendUnavailable
from router.core.types import BackendSpec
from router.dispatch.backends import Backend, Registry
from router.health.ejection import PassiveEjection
from router.health.monitor import HealthMonitor, make_probers
from router.upstream.base import ReplySink
from router.upstream.grpc_channels import GrpcChannels
from router.upstream.pool import Dialer, Pool, Slot

LIMITS = PoolConfig(
    max_connections=4, connect_timeout_s=1.0, idle_timeout_s=10.0, max_lifetime_s=100.0,
    pipeline_depth=1,
)


class FakeConnection:
    """Answers every request at once: ``b""`` (a good probe reply) or ``fail``'s error."""

    def __init__(self, name: str, *, fail: bool = False) -> None:
        self.name = name
        self.fail = fail
        self.closed = 0
        self.requests: list[bytes] = []

    @property
    def is_closed(self) -> bool:
        return self.closed > 0

    def send(self, payload: bytes, sink: ReplySink, token: Any, timeout_s: float) -> None:
        self.requests.append(payload)
        if self.fail:
            sink(token, None, BackendUnavailable(f"{self.name} reset"))
        else:
            sink(token, b"", None)

    def close(self) -> None:
        self.closed += 1

    def __repr__(self) -> str:
        return f"FakeConnection({self.name}, closed={self.closed})"


class FakeDialer:
    """Counts dials; hands out fresh FakeConnections, or raises ``error`` when set."""

    def __init__(self, *, fail_requests: bool = False) -> None:
        self.dials = 0
        self.error: BaseException | None = None
        self.fail_requests = fail_requests
        self.connections: list[FakeConnection] = []

    async def __call__(self) -> FakeConnection:
        self.dials += 1
        if self.error is not None:
            raise self.error
        conn = FakeConnection(f"c{self.dials}", fail=self.fail_requests)
        self.connections.append(conn)
        return conn


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
def dialer() -> FakeDialer:
    return FakeDialer()


@pytest.fixture
def pool(dialer: FakeDialer, clock: ManualClock) -> Pool:
    return Pool(dialer, LIMITS, clock, name="b1")


def make_pool(dialer: Dialer, clock: ManualClock, **limits: Any) -> Pool:
    return Pool(dialer, LIMITS.model_copy(update=limits), clock, name="b1")


class RoomEvents:
    """Records a pool's ``on_room`` reports."""

    def __init__(self, pool: Pool) -> None:
        self.events: list[BackendError | None] = []
        self._changed = asyncio.Event()
        pool.on_room = self._record

    def _record(self, error: BackendError | None) -> None:
        self.events.append(error)
        self._changed.set()

    async def wait(self, count: int) -> None:
        async with asyncio.timeout(1):
            while len(self.events) < count:
                self._changed.clear()
                await self._changed.wait()


async def yield_to_loop() -> None:
    """Let ready tasks run up to their next await (a yield, not a timed wait)."""
    await asyncio.sleep(0)


def conn(slot: Slot) -> FakeConnection:
    assert isinstance(slot.connection, FakeConnection)
    return slot.connection


# -- borrowing and returning ----------------------------------------------------------------


async def test_acquire_dials_when_empty(pool: Pool, dialer: FakeDialer) -> None:
    slot = await pool.acquire()
    assert dialer.dials == 1
    stats = pool.statistics()
    assert (stats["open"], stats["idle"], stats["borrowed"], stats["dialed"]) == (1, 0, 1, 1)
    assert slot.uses == 1


async def test_try_acquire_on_empty_pool_returns_none(pool: Pool, dialer: FakeDialer) -> None:
    assert pool.try_acquire() is None
    assert dialer.dials == 0


async def test_release_then_reuse_is_lifo(pool: Pool, dialer: FakeDialer) -> None:
    a = await pool.acquire()
    b = await pool.acquire()
    pool.release(a)
    pool.release(b)
    assert pool.statistics()["idle"] == 2

    assert pool.try_acquire() is b  # most recently released first
    assert pool.try_acquire() is a
    assert pool.try_acquire() is None
    assert dialer.dials == 2
    assert a.uses == 2


async def test_idle_slot_past_idle_timeout_is_closed_on_try_acquire(
    pool: Pool, clock: ManualClock
) -> None:
    slot = await pool.acquire()
    pool.release(slot)
    clock.advance(9.9)
    assert pool.try_acquire() is slot  # not yet idle for 10 s
    pool.release(slot)  # idle_since restarts here
    clock.advance(10.0)

    assert pool.try_acquire() is None
    assert conn(slot).closed == 1
    stats = pool.statistics()
    assert (stats["open"], stats["idle"], stats["closed_idle_timeout"]) == (0, 0, 1)


async def test_expire_closes_idle_slots_past_idle_timeout(pool: Pool, clock: ManualClock) -> None:
    old, fresh = await pool.acquire(), await pool.acquire()
    pool.release(old)
    clock.advance(6.0)
    pool.release(fresh)
    assert pool.expire() == 0
    clock.advance(4.0)  # old idle for 10 s, fresh for 4 s

    assert pool.expire() == 1
    assert conn(old).closed == 1
    assert conn(fresh).closed == 0
    assert pool.statistics()["open"] == 1
    assert pool.try_acquire() is fresh


async def test_probes_do_not_refresh_idle_since(pool: Pool, clock: ManualClock) -> None:
    """The C++ router reset the idle stamp on every probe, so idle connections never closed."""
    slot = await pool.acquire()
    pool.release(slot)
    for _ in range(4):  # probed every 2 s, up to 8 s idle
        clock.advance(2.0)
        assert pool.expire() == 0
        [probed] = pool.take_idle_for_probe()
        assert probed is slot
        pool.return_probed(probed, healthy=True)
    assert conn(slot).closed == 0
    clock.advance(2.0)  # 10 s since the last real release

    assert pool.expire() == 1
    assert conn(slot).closed == 1
    assert pool.statistics()["closed_idle_timeout"] == 1


async def test_unhealthy_probe_closes_the_connection(pool: Pool) -> None:
    slot = await pool.acquire()
    pool.release(slot)
    [probed] = pool.take_idle_for_probe()
    pool.return_probed(probed, healthy=False)
    assert conn(slot).closed == 1
    assert pool.statistics()["open"] == 0


async def test_connection_past_max_lifetime_is_retired_on_release(
    pool: Pool, clock: ManualClock, dialer: FakeDialer
) -> None:
    slot = await pool.acquire()
    clock.advance(100.0)  # ages while carrying a request
    assert conn(slot).closed == 0  # the request in flight is not cut off

    pool.release(slot)

    assert conn(slot).closed == 1
    assert pool.try_acquire() is None
    stats = pool.statistics()
    assert (stats["open"], stats["closed_max_lifetime"]) == (0, 1)
    assert await pool.acquire() is not slot
    assert dialer.dials == 2


async def test_idle_connection_past_max_lifetime_is_expired(
    pool: Pool, clock: ManualClock
) -> None:
    slot = await pool.acquire()
    for _ in range(11):  # busy every 9 s, so never idle for 10 s, but 99 s old
        clock.advance(9.0)
        pool.release(slot)
        assert pool.try_acquire() is slot
    pool.release(slot)
    clock.advance(1.0)  # 100 s old, 1 s idle
    assert pool.expire() == 1
    assert pool.statistics()["closed_max_lifetime"] == 1


async def test_release_not_reusable_closes(pool: Pool) -> None:
    slot = await pool.acquire()
    pool.release(slot, reusable=False)
    assert conn(slot).closed == 1
    stats = pool.statistics()
    assert (stats["open"], stats["idle"], stats["closed_broken"]) == (0, 0, 1)


async def test_release_of_a_closed_connection_does_not_reuse_it(pool: Pool) -> None:
    slot = await pool.acquire()
    conn(slot).close()  # the peer reset it while borrowed
    pool.release(slot)
    assert pool.try_acquire() is None
    assert pool.statistics()["open"] == 0


# -- the connection limit ---------------------------------------------------------------------


async def test_never_exceeds_max_connections(dialer: FakeDialer, clock: ManualClock) -> None:
    pool = make_pool(dialer, clock, max_connections=2)
    a = await pool.acquire()
    b = await pool.acquire()
    assert pool.try_acquire() is None
    pool.grow(5)  # five waiting: no room to dial
    await yield_to_loop()
    assert dialer.dials == 2
    with pytest.raises(BackendUnavailable, match="no room"):
        await pool.acquire()

    pool.release(a)
    assert pool.try_acquire() is a
    assert pool.statistics()["open"] == 2
    pool.release(a)
    pool.release(b)


async def test_grow_dials_one_first_then_for_every_waiting_request(
    dialer: FakeDialer, clock: ManualClock
) -> None:
    pool = make_pool(dialer, clock, max_connections=3)
    room = RoomEvents(pool)
    pool.grow(5)  # cold: one dial goes first
    assert pool.statistics()["dialing"] == 1
    await room.wait(1)
    assert room.events == [None] and dialer.dials == 1

    pool.grow(5)  # warm now: up to max_connections
    await room.wait(3)
    assert dialer.dials == 3
    assert pool.statistics()["open"] == 3
    slots = [pool.try_acquire() for _ in range(3)]
    assert all(slot is not None for slot in slots)
    assert pool.try_acquire() is None


async def test_grow_counts_dials_in_progress_and_pipeline_depth(
    dialer: FakeDialer, clock: ManualClock
) -> None:
    pool = make_pool(dialer, clock, max_connections=8, pipeline_depth=4)
    room = RoomEvents(pool)
    pool.grow(1)
    await room.wait(1)
    pool.grow(9)  # nine waiting at four per connection: three connections
    pool.grow(9)  # asked again before they finish: nothing more
    await room.wait(4)
    assert dialer.dials == 4


async def test_a_retired_connection_frees_capacity_to_grow(
    dialer: FakeDialer, clock: ManualClock
) -> None:
    pool = make_pool(dialer, clock, max_connections=1)
    room = RoomEvents(pool)
    a = await pool.acquire()
    pool.grow(1)
    assert dialer.dials == 1  # full

    pool.release(a, reusable=False)
    assert pool.can_dial()
    pool.grow(1)
    await room.wait(1)
    fresh = pool.try_acquire()
    assert fresh is not None and fresh is not a
    assert dialer.dials == 2
    assert pool.statistics()["open"] == 1


async def test_close_cancels_dials_without_counting_a_failure_or_leaking_capacity(
    clock: ManualClock,
) -> None:
    never = asyncio.Event()

    async def hang() -> FakeConnection:
        await never.wait()
        raise AssertionError("unreachable")

    pool = Pool(hang, LIMITS, clock, name="b1")
    room = RoomEvents(pool)
    pool.grow(1)
    await yield_to_loop()
    pool.close()
    await room.wait(1)  # the closing itself: waiting requests must move elsewhere
    await yield_to_loop()
    stats = pool.statistics()
    assert (stats["open"], stats["dialing"], stats["dial_failed"]) == (0, 0, 0)


# -- dial failures ---------------------------------------------------------------------------


async def test_failed_dial_raises_backend_unavailable_and_frees_capacity(
    dialer: FakeDialer, clock: ManualClock
) -> None:
    pool = make_pool(dialer, clock, max_connections=1)
    dialer.error = ConnectionRefusedError(111, "Connection refused")

    with pytest.raises(BackendUnavailable):
        await pool.acquire()
    stats = pool.statistics()
    assert (stats["open"], stats["dialing"], stats["dial_failed"]) == (0, 0, 1)

    dialer.error = None
    slot = await pool.acquire()  # the one allowed connection is available again
    assert pool.statistics()["open"] == 1
    assert conn(slot).closed == 0


async def test_failed_background_dial_reports_its_error_and_frees_capacity(
    dialer: FakeDialer, clock: ManualClock
) -> None:
    pool = make_pool(dialer, clock, max_connections=1)
    room = RoomEvents(pool)
    dialer.error = ConnectionRefusedError(111, "Connection refused")
    pool.grow(3)
    await room.wait(1)

    assert isinstance(room.events[0], BackendUnavailable)
    assert "refused" in room.events[0].message
    assert pool.stalled and pool.can_dial()
    stats = pool.statistics()
    assert (stats["open"], stats["dialing"], stats["dial_failed"]) == (0, 0, 1)


async def test_connect_timeout_is_backend_unavailable(clock: ManualClock) -> None:
    never = asyncio.Event()

    async def hang() -> FakeConnection:
        await never.wait()
        raise AssertionError("unreachable")

    pool = Pool(hang, LIMITS.model_copy(update={"connect_timeout_s": 0.05}), clock, name="b1")
    async with asyncio.timeout(2):
        with pytest.raises(BackendUnavailable, match="timed out"):
            await pool.acquire()
    stats = pool.statistics()
    assert (stats["open"], stats["dialing"], stats["dial_failed"]) == (0, 0, 1)


# -- expire_all and close --------------------------------------------------------------------


async def test_expire_all_retires_idle_now_and_borrowed_on_release(pool: Pool) -> None:
    idle, borrowed = await pool.acquire(), await pool.acquire()
    pool.release(idle)

    pool.expire_all()

    assert conn(idle).closed == 1
    assert conn(borrowed).closed == 0  # its request finishes
    assert pool.statistics()["open"] == 1
    pool.release(borrowed)
    assert conn(borrowed).closed == 1
    assert pool.statistics()["open"] == 0
    fresh = await pool.acquire()
    pool.release(fresh)
    assert pool.try_acquire() is fresh  # new generation is reused normally


async def test_close_reports_room_and_lends_nothing_more(
    dialer: FakeDialer, clock: ManualClock
) -> None:
    pool = make_pool(dialer, clock, max_connections=1)
    room = RoomEvents(pool)
    slot = await pool.acquire()

    pool.close()
    assert room.events == [None]  # requests waiting on it must move elsewhere
    assert pool.closed and pool.try_acquire() is None
    pool.release(slot)
    assert conn(slot).closed == 1
    assert pool.statistics()["open"] == 0
    with pytest.raises(BackendUnavailable):
        await pool.acquire()
    pool.grow(1)
    assert dialer.dials == 1


def test_repr_and_statistics_do_not_need_a_loop(dialer: FakeDialer, clock: ManualClock) -> None:
    pool = make_pool(dialer, clock)
    assert "b1" in repr(pool)
    assert pool.statistics()["max_connections"] == LIMITS.max_connections


# -- the frame and connect probers, through the health monitor --------------------------------

HEALTH = HealthConfig(probe="frame", interval_s=2.0, timeout_s=1.0, failure_threshold=3)


def make_backend(dialer: FakeDialer, clock: ManualClock, **limits: float) -> Backend:
    spec = BackendSpec(id="10.0.0.1:9000", address="10.0.0.1:9000")
    return Backend(spec, make_pool(dialer, clock, **limits))


def monitor_of(backend: Backend, clock: ManualClock, config: HealthConfig = HEALTH
               ) -> HealthMonitor:
    """A monitor over a registry holding only ``backend``, with passive ejection."""
    ejection = PassiveEjection(config.failure_threshold)
    registry = Registry(on_failure=ejection)
    registry.add(backend)
    probers = make_probers(config, GrpcChannels(clock, max_message_bytes=1, idle_timeout_s=1))
    return HealthMonitor(registry, probers, config, clock, ejection=ejection)


async def borrow_and_return(backend: Backend, count: int = 1) -> list[Slot]:
    slots = [await backend.pool.acquire() for _ in range(count)]
    for slot in slots:
        backend.pool.release(slot)
    return slots


async def test_a_pass_probes_idle_connections(clock: ManualClock) -> None:
    dialer = FakeDialer()
    backend = make_backend(dialer, clock)
    [slot] = await borrow_and_return(backend)
    monitor = monitor_of(backend, clock)

    await monitor.check_all()

    assert conn(slot).requests == [b""]
    assert conn(slot).closed == 0
    assert monitor.statistics() == {
        "passes": 0, "probes_sent": 1, "probes_failed": 0, "marked_up": 0, "marked_down": 0,
        "ejected": 0,
    }
    assert backend.pool.try_acquire() is slot


async def test_a_healthy_backend_with_nothing_idle_is_not_dialled_to_be_probed(
    clock: ManualClock,
) -> None:
    dialer = FakeDialer()
    backend = make_backend(dialer, clock)
    monitor = monitor_of(backend, clock)

    await monitor.check_all()

    assert dialer.dials == 0
    assert monitor.statistics()["probes_sent"] == 0
    assert backend.healthy


async def test_failed_probe_closes_the_connection(clock: ManualClock) -> None:
    dialer = FakeDialer(fail_requests=True)
    backend = make_backend(dialer, clock)
    [slot] = await borrow_and_return(backend)
    monitor = monitor_of(backend, clock)

    await monitor.check_all()

    assert conn(slot).closed == 1
    assert backend.pool.statistics()["open"] == 0
    assert monitor.statistics()["probes_failed"] == 1
    assert backend.healthy  # one lost probe takes nothing out of rotation


async def test_probed_connection_still_times_out_through_the_monitor(clock: ManualClock) -> None:
    backend = make_backend(FakeDialer(), clock, idle_timeout_s=10.0)
    [slot] = await borrow_and_return(backend)
    monitor = monitor_of(backend, clock)
    for _ in range(4):
        clock.advance(HEALTH.interval_s)
        await monitor.check_all()
    assert conn(slot).closed == 0
    clock.advance(HEALTH.interval_s)

    await monitor.check_all()

    assert conn(slot).closed == 1
    assert monitor.statistics()["probes_sent"] == 4
    assert backend.pool.statistics()["closed_idle_timeout"] == 1


def mark_down(backend: Backend) -> None:
    for _ in range(3):
        backend.record_failure()
    assert not backend.healthy


async def test_a_pass_brings_a_down_backend_back(clock: ManualClock) -> None:
    dialer = FakeDialer()
    backend = make_backend(dialer, clock)
    monitor = monitor_of(backend, clock)
    mark_down(backend)

    await monitor.check_all()

    assert backend.healthy
    assert backend.consecutive_failures == 0
    assert monitor.statistics()["marked_up"] == 1
    assert monitor.statistics()["ejected"] == 1
    assert dialer.dials == 1
    assert dialer.connections[0].requests == [b""]  # probed before it counts as up
    assert backend.pool.statistics()["idle"] == 1  # the probed connection is kept for use


async def test_a_pass_keeps_a_backend_down_while_dialing_fails(clock: ManualClock) -> None:
    dialer = FakeDialer()
    dialer.error = ConnectionRefusedError(111, "Connection refused")
    backend = make_backend(dialer, clock)
    monitor = monitor_of(backend, clock)
    mark_down(backend)

    await monitor.check_all()

    assert not backend.healthy
    assert monitor.statistics()["marked_up"] == 0
    assert monitor.statistics()["probes_failed"] == 1
    assert backend.pool.statistics()["open"] == 0


async def test_a_pass_keeps_a_backend_down_when_its_probe_fails(
    clock: ManualClock,
) -> None:
    dialer = FakeDialer(fail_requests=True)
    backend = make_backend(dialer, clock)
    monitor = monitor_of(backend, clock)
    mark_down(backend)

    await monitor.check_all()

    assert not backend.healthy
    assert dialer.connections[0].closed == 1
    assert backend.pool.statistics()["open"] == 0


CONNECT = HealthConfig(probe="connect")


async def test_connect_probe_brings_a_down_backend_back_without_a_frame(
    clock: ManualClock,
) -> None:
    dialer = FakeDialer(fail_requests=True)  # it would fail a frame probe
    backend = make_backend(dialer, clock)
    monitor = monitor_of(backend, clock, CONNECT)
    mark_down(backend)

    await monitor.check_all()

    assert backend.healthy
    assert dialer.dials == 1
    assert dialer.connections[0].requests == []
    assert backend.pool.statistics()["idle"] == 1


async def test_connect_probe_leaves_idle_connections_of_a_healthy_backend_alone(
    clock: ManualClock,
) -> None:
    dialer = FakeDialer()
    backend = make_backend(dialer, clock, idle_timeout_s=10.0)
    [slot] = await borrow_and_return(backend)
    monitor = monitor_of(backend, clock, CONNECT)

    await monitor.check_all()
    assert conn(slot).requests == [] and monitor.statistics()["probes_sent"] == 0
    clock.advance(10.0)
    await monitor.check_all()  # still expires them

    assert conn(slot).closed == 1
    assert backend.pool.statistics()["closed_idle_timeout"] == 1


async def test_a_probe_cancelled_by_shutdown_leaks_no_connection(clock: ManualClock) -> None:
    backend = make_backend(FakeDialer(), clock)
    [first, second] = await borrow_and_return(backend, 2)
    conn(first).send = lambda *args: None  # type: ignore[method-assign]  # never answers
    conn(second).send = lambda *args: None  # type: ignore[method-assign]
    monitor = monitor_of(backend, clock)
    task = asyncio.ensure_future(monitor.check_all())
    for _ in range(10):  # a few steps of the pass, until its probe is in flight
        await yield_to_loop()
    assert monitor.statistics()["probes_sent"] == 1
    assert backend.pool.statistics()["idle"] == 0  # both taken out for probing

    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task

    assert backend.pool.statistics()["open"] == 0
    assert conn(first).closed == 1 and conn(second).closed == 1


# -- pipelining (pipeline_depth > 1) ----------------------------------------------------------


async def test_pipelining_lends_a_busy_connection_with_room_before_an_idle_one(
    dialer: FakeDialer, clock: ManualClock
) -> None:
    pool = make_pool(dialer, clock, pipeline_depth=3)
    first = await pool.acquire()
    second = await pool.acquire()
    assert second is first  # shared, not a second dial
    pool.release(first)
    pool.release(second)  # idle again
    busy = await pool.acquire()
    spare = await pool.acquire()
    assert (busy is spare, dialer.dials) == (True, 1)

    third = pool.try_acquire()
    assert third is busy and busy.active == 3
    assert pool.try_acquire() is None  # full at the depth: the next request needs a dial
    fourth = await pool.acquire()
    assert fourth is not busy and dialer.dials == 2
    stats = pool.statistics()
    assert (stats["open"], stats["sharing"], stats["pipeline_depth"]) == (2, 1, 3)


async def test_pipelined_connection_gets_room_back_and_goes_idle_when_all_are_answered(
    dialer: FakeDialer, clock: ManualClock
) -> None:
    pool = make_pool(dialer, clock, pipeline_depth=2)
    slot = await pool.acquire()
    assert pool.try_acquire() is slot
    assert pool.try_acquire() is None  # full
    pool.release(slot)
    assert slot.active == 1
    assert pool.try_acquire() is slot  # room again
    pool.release(slot)
    clock.advance(3.0)
    pool.release(slot)
    assert (slot.active, slot.idle_since, pool.statistics()["idle"]) == (0, clock.now(), 1)


async def test_pipelined_connection_past_max_lifetime_finishes_its_requests_then_closes(
    dialer: FakeDialer, clock: ManualClock
) -> None:
    pool = make_pool(dialer, clock, pipeline_depth=4)
    slot = await pool.acquire()
    assert pool.try_acquire() is slot
    clock.advance(100.0)
    assert pool.try_acquire() is None  # too old to take new requests
    assert conn(slot).closed == 0  # ... but the two in flight are not cut off
    pool.release(slot)
    assert conn(slot).closed == 0
    pool.release(slot)
    assert conn(slot).closed == 1
    stats = pool.statistics()
    assert (stats["open"], stats["closed_max_lifetime"]) == (0, 1)


async def test_broken_pipelined_connection_is_closed_at_once_and_counted_once(
    dialer: FakeDialer, clock: ManualClock
) -> None:
    pool = make_pool(dialer, clock, pipeline_depth=4)
    slot = await pool.acquire()
    assert pool.try_acquire() is slot
    assert pool.try_acquire() is slot
    pool.release(slot, reusable=False)  # the others on it fail too: closed now
    assert conn(slot).closed >= 1
    assert pool.try_acquire() is None
    pool.release(slot, reusable=False)
    pool.release(slot, reusable=False)
    stats = pool.statistics()
    assert (stats["open"], stats["closed_broken"], stats["sharing"]) == (0, 1, 0)


async def test_pipelined_pool_never_exceeds_depth_or_max_connections(
    dialer: FakeDialer, clock: ManualClock
) -> None:
    pool = make_pool(dialer, clock, max_connections=2, pipeline_depth=3)
    slots = [await pool.acquire() for _ in range(6)]
    assert dialer.dials == 2
    assert sorted(s.active for s in {id(s): s for s in slots}.values()) == [3, 3]
    assert pool.try_acquire() is None  # 2 connections x 3 requests: the seventh has no room
    pool.grow(1)
    assert pool.statistics()["dialing"] == 0
    pool.release(slots[0])
    handed = pool.try_acquire()
    assert handed is slots[0] and handed.active == 3
    assert dialer.dials == 2


# -- the depth follows demand (max_pipeline_depth) --------------------------------------------


async def test_depth_grows_with_waiting_requests_once_every_connection_is_open(
    dialer: FakeDialer, clock: ManualClock
) -> None:
    pool = make_pool(dialer, clock, max_connections=2, pipeline_depth=3, max_pipeline_depth=8)
    slots = [await pool.acquire() for _ in range(6)]  # both connections full at depth 3
    assert pool.try_acquire() is None
    pool.grow(3)  # three more wait, and no connection may be dialled: 9 over 2 -> depth 5
    stats = pool.statistics()
    assert (stats["pipeline_depth"], stats["in_flight"], stats["dialing"]) == (5, 6, 0)
    # A connection filled at depth 3 takes new requests from its next answer on.
    assert pool.try_acquire() is None
    pool.release(slots[0])
    more = [pool.try_acquire() for _ in range(3)]
    assert more == [slots[0]] * 3 and slots[0].active == 5
    assert pool.try_acquire() is None  # at the new depth: full again
    pool.grow(100)  # a burst past the ceiling: deepened to max_pipeline_depth, not beyond
    assert pool.statistics()["pipeline_depth"] == 8
    assert dialer.dials == 2


async def test_depth_does_not_grow_while_connections_can_still_be_dialled(
    dialer: FakeDialer, clock: ManualClock
) -> None:
    pool = make_pool(dialer, clock, max_connections=4, pipeline_depth=2, max_pipeline_depth=16)
    room = RoomEvents(pool)
    [await pool.acquire() for _ in range(2)]  # one connection, full
    pool.grow(6)  # room for three more connections: dial them, keep the depth
    assert pool.statistics()["pipeline_depth"] == 2
    await room.wait(1)
    assert pool.statistics()["dialing"] == 0 and dialer.dials == 4


async def test_depth_falls_back_to_pipeline_depth_as_demand_falls(
    dialer: FakeDialer, clock: ManualClock
) -> None:
    pool = make_pool(dialer, clock, max_connections=1, pipeline_depth=2, max_pipeline_depth=64)
    slots = [await pool.acquire() for _ in range(2)]
    pool.grow(30)  # 32 wanted on one connection
    assert pool.statistics()["pipeline_depth"] == 32
    pool.release(slots.pop())  # its next answer lends the connection again
    slots += [pool.try_acquire() for _ in range(9)]  # ten in flight now, the rest not come
    assert all(slot is slots[0] for slot in slots) and slots[0].active == 10
    pool.expire()  # the pass after the burst: what it asked for still counts
    assert pool.statistics()["pipeline_depth"] == 32
    pool.expire()  # nothing waited since: down to the ten in flight
    assert pool.statistics()["pipeline_depth"] == 10
    for slot in slots[:9]:
        assert slot is not None
        pool.release(slot)
    pool.expire()
    pool.expire()
    stats = pool.statistics()
    assert (stats["pipeline_depth"], stats["in_flight"]) == (2, 1)  # never below the base
    assert pool.try_acquire() is slots[0]  # room at the base depth again


async def test_a_pool_of_depth_one_is_never_pipelined(
    dialer: FakeDialer, clock: ManualClock
) -> None:
    pool = make_pool(dialer, clock, max_connections=1, pipeline_depth=1, max_pipeline_depth=64)
    slot = await pool.acquire()
    pool.grow(50)
    stats = pool.statistics()
    assert (stats["pipeline_depth"], stats["max_pipeline_depth"]) == (1, 1)
    assert pool.try_acquire() is None and slot.active == 1
