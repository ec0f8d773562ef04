"""The dispatcher over in-process fake backends and a manual clock: no sockets."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from router.balance.policies import SCAN_MAX, Snapshot, WeightedRandom, make_policy
from router.core.clock import ManualClock
from router.core.config import DispatchConfig, PoolConfig
from router.core.errors import BackendError, BackendTimeout, BackendUnavailable, UnknownModel
from router.core.types import BackendSpec
from router.dispatch.backends import Backend, Registry
from router.dispatch.request import Request
from router.dispatch.scheduler import Dispatcher
from router.dispatch.stats import DataPlaneStats
from router.health.ejection import PassiveEjection
from router.upstream.base import ReplySink
from router.upstream.pool import Pool

WAIT_S = 2.0  # bound on every await of the dispatcher; nothing here takes real time


class FakeService:
    """One fake backend process. ``mode``:

    * ``"live"``: answers with the payload reversed;
    * ``"dead"``: every request fails with BackendUnavailable (reset before any byte);
    * ``"slow"``: every request fails with BackendTimeout (not retryable);
    * ``"gated"``: requests wait until the test calls ``answer_all``;
    * ``"refused"``: every connect fails.
    """

    def __init__(self, mode: str = "live") -> None:
        self.mode = mode
        self.dials = 0
        self.requests = 0
        self.pending: list[tuple[bytes, asyncio.Future[bytes]]] = []
        self._pending_changed = asyncio.Event()

    async def dial(self) -> FakeConnection:
        self.dials += 1
        if self.mode == "refused":
            raise ConnectionRefusedError("connection refused")
        return FakeConnection(self)

    def answer_all(self) -> None:
        pending, self.pending = self.pending, []
        for payload, future in pending:
            future.set_result(payload[::-1])

    def fail_all(self) -> None:
        """Every pending request is reset before any response byte."""
        pending, self.pending = self.pending, []
        for _, future in pending:
            future.set_exception(BackendUnavailable("reset before any response byte"))

    async def wait_pending(self, count: int) -> None:
        while len(self.pending) < count:
            self._pending_changed.clear()
            await self._pending_changed.wait()

    def add_pending(self, payload: bytes, future: asyncio.Future[bytes]) -> None:
        self.pending.append((payload, future))
        self._pending_changed.set()


class FakeConnection:
    def __init__(self, service: FakeService) -> None:
        self._service = service
        self.is_closed = False

    def send(self, payload: bytes, sink: ReplySink, token: Any, timeout_s: float) -> None:
        service = self._service
        service.requests += 1
        future: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        if service.mode == "dead":
            future.set_exception(BackendUnavailable("connection reset before any response byte"))
        elif service.mode == "slow":
            future.set_exception(BackendTimeout(f"no answer within {timeout_s}s"))
        elif service.mode == "gated":
            service.add_pending(payload, future)
        else:
            future.set_result(payload[::-1])
        # Answer from the loop, as a real connection does (never from inside ``send``).
        future.add_done_callback(lambda f: sink(token, *_outcome(f)))

    def close(self) -> None:
        self.is_closed = True


def _outcome(future: asyncio.Future[bytes]) -> tuple[bytes | None, BackendError | None]:
    error = future.exception()
    if error is not None:
        assert isinstance(error, BackendError)
        return None, error
    return future.result(), None


class Collector:
    """The origin: records each answered request, once."""

    def __init__(self) -> None:
        self.done: list[Request] = []

    def request_done(self, request: Request) -> None:
        assert request not in self.done, "answered twice"
        self.done.append(request)


class Harness:
    def __init__(
        self, services: list[FakeService], settings: DispatchConfig, policy: str,
        max_connections: int = 8, panic_threshold: float = 0.0,
    ) -> None:
        self.clock = ManualClock()
        self.ejection = PassiveEjection(failure_threshold=3)
        self.registry = Registry(on_failure=self.ejection, panic_threshold=panic_threshold)
        self.backends: list[Backend] = []
        self.services = services
        limits = PoolConfig(max_connections=max_connections, pipeline_depth=1)
        for index, service in enumerate(services):
            pool = Pool(service.dial, limits, self.clock, f"b{index}")
            address = f"10.0.0.{index + 1}:9000"
            spec = BackendSpec(id=address, address=address)
            backend = Backend(spec, pool)
            self.registry.add(backend)
            self.backends.append(backend)
        self.stats = DataPlaneStats()
        self.dispatcher = Dispatcher(
            self.registry, make_policy(policy), settings, self.clock, self.stats,
            rng=random.Random(1234),
        )
        self.origin = Collector()

    def submit(self, payload: bytes) -> Request:
        request = Request(payload, self.origin, self.clock.now())
        self.dispatcher.submit(request)
        return request

    async def wait_zero(self) -> None:
        async with asyncio.timeout(WAIT_S):
            await self.dispatcher.wait_zero()


class Harnesses:
    """Builds harnesses; closes their dispatchers (the queue's timer) at the end."""

    def __init__(self) -> None:
        self._built: list[Harness] = []

    def __call__(
        self,
        services: list[FakeService],
        *,
        policy: str = "least_connections",
        max_connections: int = 8,
        panic_threshold: float = 0.0,
        **settings: Any,
    ) -> Harness:
        config = DispatchConfig(**{"queue_timeout_s": 5.0, "max_retries": 2, **settings})
        harness = Harness(services, config, policy, max_connections, panic_threshold)
        self._built.append(harness)
        return harness

    async def aclose(self) -> None:
        for harness in self._built:
            harness.dispatcher.close()


@pytest.fixture
async def make_harness() -> AsyncIterator[Harnesses]:
    harnesses = Harnesses()
    yield harnesses
    await harnesses.aclose()


def error_code(request: Request) -> str | None:
    return None if request.error is None else request.error.code


# -- the happy path ---------------------------------------------------------------------------


async def test_request_is_answered_with_the_backend_response(make_harness: Harnesses) -> None:
    h = make_harness([FakeService()])
    request = h.submit(b"hello")
    assert (h.stats.accepted, h.stats.inflight) == (1, 1)

    await h.wait_zero()

    assert h.origin.done == [request]
    assert request.response == b"olleh"
    assert request.error is None
    assert h.stats.statistics() == {
        "accepted": 1, "completed": 1, "errored": {}, "dropped": 0, "retried": 0, "inflight": 0,
    }  # fmt: skip
    assert h.backends[0].requests_total == 1


async def test_many_requests_reuse_pooled_connections(make_harness: Harnesses) -> None:
    service = FakeService()
    h = make_harness([service])
    requests = [h.submit(f"r{i}".encode()) for i in range(50)]
    await h.wait_zero()

    assert [r.response for r in requests] == [f"r{i}".encode()[::-1] for i in range(50)]
    assert h.stats.completed == 50
    assert service.dials <= 8  # bounded by the pool's max_connections


# -- retries and passive health ---------------------------------------------------------------


async def test_dead_backend_is_retried_around_then_marked_down(make_harness: Harnesses) -> None:
    dead_service, live_service = FakeService("dead"), FakeService("live")
    h = make_harness([dead_service, live_service], max_retries=2)
    dead, live = h.backends

    first = [h.submit(f"a{i}".encode()) for i in range(30)]
    await h.wait_zero()

    assert all(r.error is None for r in first), [r.error for r in first if r.error]
    assert [r.response for r in first] == [f"a{i}".encode()[::-1] for i in range(30)]
    assert h.stats.retried > 0
    assert h.stats.completed == 30
    assert h.stats.errored == {}
    assert not dead.healthy
    assert dead.failures_total >= h.ejection.failure_threshold
    assert live.healthy

    dead_attempts, retried = dead.requests_total, h.stats.retried
    later = [h.submit(f"b{i}".encode()) for i in range(20)]
    await h.wait_zero()

    assert all(r.response == r.payload[::-1] for r in later)
    assert dead.requests_total == dead_attempts  # straight to the live one
    assert h.stats.retried == retried


async def test_refused_connects_are_retried_and_leave_no_load_behind(
    make_harness: Harnesses,
) -> None:
    refused, live = FakeService("refused"), FakeService("live")
    h = make_harness([refused, live], policy="round_robin")
    requests = []
    for i in range(12):  # one at a time: each request to the refused one makes its own dial
        requests.append(h.submit(f"c{i}".encode()))
        await h.wait_zero()

    assert all(r.response == r.payload[::-1] for r in requests)
    assert refused.dials == 3  # failure_threshold, then it is marked down
    assert not h.backends[0].healthy
    # Least-connections reads ``inflight``: a leak here would starve a backend forever.
    assert [b.inflight for b in h.backends] == [0, 0]


async def test_one_refused_dial_moves_every_request_waiting_for_it(
    make_harness: Harnesses,
) -> None:
    """Requests waiting on a cold pool share its first dial; when it is refused they all go
    to another backend at once (each spends one retry), and the failure counts once."""
    refused, live = FakeService("refused"), FakeService("live")
    h = make_harness([refused, live], policy="round_robin")
    requests = [h.submit(f"c{i}".encode()) for i in range(12)]
    await h.wait_zero()

    assert all(r.response == r.payload[::-1] for r in requests)
    assert refused.dials == 1
    assert h.backends[0].consecutive_failures == 1
    assert h.stats.retried == 6
    assert [b.inflight for b in h.backends] == [0, 0]


async def test_no_retry_when_max_retries_is_zero(make_harness: Harnesses) -> None:
    services = [FakeService("dead"), FakeService("live")]
    h = make_harness(services, max_retries=0, policy="round_robin")
    to_dead = h.submit(b"x")  # round robin: the first goes to the first backend
    await h.wait_zero()
    assert error_code(to_dead) == "BACKEND_UNAVAILABLE"
    assert h.stats.retried == 0


async def test_timeout_is_not_retried(make_harness: Harnesses) -> None:
    slow, live = FakeService("slow"), FakeService("live")
    h = make_harness([slow, live], max_retries=2, policy="round_robin")
    request = h.submit(b"x")
    await h.wait_zero()
    assert error_code(request) == "BACKEND_TIMEOUT"
    assert live.requests == 0  # the slow backend may have acted on it
    assert h.stats.retried == 0
    assert h.stats.errored == {"BACKEND_TIMEOUT": 1}


async def test_all_backends_dead(make_harness: Harnesses) -> None:
    h = make_harness([FakeService("dead"), FakeService("dead")], max_retries=2)
    requests = [h.submit(f"{i}".encode()) for i in range(10)]
    await h.wait_zero()

    assert {error_code(r) for r in requests} <= {"BACKEND_UNAVAILABLE", "NO_BACKEND"}
    assert error_code(requests[0]) == "BACKEND_UNAVAILABLE"  # tried both before any was down
    assert sum(h.stats.errored.values()) == 10
    assert h.stats.completed == 0
    assert not any(b.healthy for b in h.backends)

    attempts = sum(s.requests for s in h.services)
    late = h.submit(b"late")
    await h.wait_zero()
    assert error_code(late) == "NO_BACKEND"  # both are marked down: nothing is tried
    assert sum(s.requests for s in h.services) == attempts
    assert h.stats.inflight == 0
    assert not h.registry.any_healthy()


async def test_no_backends_is_no_backend(make_harness: Harnesses) -> None:
    h = make_harness([])
    request = h.submit(b"x")
    await h.wait_zero()
    assert error_code(request) == "NO_BACKEND"
    assert h.stats.errored == {"NO_BACKEND": 1}
    assert h.origin.done == [request]


# -- the queue --------------------------------------------------------------------------------


async def test_queue_timeout_answers_overloaded(make_harness: Harnesses) -> None:
    service = FakeService("gated")
    h = make_harness([service], max_connections=1, queue_timeout_s=5.0)
    busy = h.submit(b"busy")  # holds the only connection: the rest wait
    async with asyncio.timeout(WAIT_S):
        await service.wait_pending(1)
    old = [h.submit(b"old1"), h.submit(b"old2")]
    h.clock.advance(3.0)
    young = h.submit(b"young")
    h.clock.advance(2.5)  # old ones waited 5.5 s, the young one 2.5 s: the timer fired once

    assert [error_code(r) for r in old] == ["OVERLOADED", "OVERLOADED"]
    assert h.origin.done == old
    assert not young.done
    assert h.stats.errored == {"OVERLOADED": 2}
    assert h.stats.inflight == 2  # busy and young
    assert h.dispatcher.statistics()["waiting"] == 1

    service.answer_all()  # busy answered: young goes out on the freed connection
    async with asyncio.timeout(WAIT_S):
        await service.wait_pending(1)
    service.answer_all()
    await h.wait_zero()
    assert (busy.response, young.response) == (b"ysub", b"gnuoy")


async def test_the_queue_deadline_is_stamped_once_at_acceptance(make_harness: Harnesses) -> None:
    """A request that moves while it waits (its backend went out of rotation, so it was placed
    again on another) keeps the deadline of its acceptance: with queue_timeout_s 5, requests
    accepted at t=0 are OVERLOADED at t=5, not 5 s after their last move."""
    a, b = FakeService("gated"), FakeService("gated")
    h = make_harness([a, b], policy="round_robin", max_connections=1, queue_timeout_s=5.0)
    busy = [h.submit(b"a0"), h.submit(b"b0")]
    async with asyncio.timeout(WAIT_S):
        await a.wait_pending(1)
        await b.wait_pending(1)
    waiting = [h.submit(b"a1"), h.submit(b"b1")]  # one waits on each backend
    h.clock.advance(4.0)
    h.backends[0].mark_down()  # a1 moves to the second backend's waiting list
    await yield_until(lambda: len(h.backends[1].waiting) == 2)
    assert not waiting[0].done
    h.clock.advance(1.5)  # t = 5.5: past the deadline stamped at t = 0

    assert [error_code(r) for r in waiting] == ["OVERLOADED", "OVERLOADED"]
    a.answer_all()
    b.answer_all()
    await h.wait_zero()
    assert [r.response for r in busy] == [b"0a", b"0b"]


async def test_saturation_is_signalled_and_cleared(make_harness: Harnesses) -> None:
    service = FakeService("gated")
    h = make_harness([service], max_connections=1, queue_size=2)
    pressure: list[bool] = []
    h.dispatcher.add_pressure_listener(pressure.append)

    h.submit(b"0")  # on the connection
    async with asyncio.timeout(WAIT_S):
        await service.wait_pending(1)
    h.submit(b"1")
    assert pressure == []
    h.submit(b"2")
    assert pressure == [True]
    assert h.dispatcher.saturated
    h.submit(b"3")  # past the soft bound: still kept, never discarded
    assert pressure == [True]

    for _ in range(4):
        async with asyncio.timeout(WAIT_S):
            await service.wait_pending(1)
        service.answer_all()
        await asyncio.sleep(0)  # the answer arrives from the loop
    await h.wait_zero()

    assert pressure == [True, False]
    assert not h.dispatcher.saturated
    assert h.stats.completed == 4


async def test_saturation_clears_when_queued_requests_expire(make_harness: Harnesses) -> None:
    # Queue full -> front doors stop reading. If the waiting requests then time out, nothing
    # waits: reading must resume, or no request ever arrives again.
    service = FakeService("gated")
    h = make_harness([service], max_connections=1, queue_size=2, queue_timeout_s=5.0)
    pressure: list[bool] = []
    h.dispatcher.add_pressure_listener(pressure.append)
    h.submit(b"0")
    async with asyncio.timeout(WAIT_S):
        await service.wait_pending(1)
    h.submit(b"1")
    h.submit(b"2")
    assert pressure == [True]
    h.clock.advance(6.0)

    assert h.stats.errored == {"OVERLOADED": 2}
    assert h.dispatcher.statistics()["waiting"] == 0
    assert not h.dispatcher.saturated
    assert pressure == [True, False]
    service.answer_all()
    await h.wait_zero()


async def test_wait_idle_returns_once_inflight_is_zero(make_harness: Harnesses) -> None:
    service = FakeService("gated")
    h = make_harness([service])
    async with asyncio.timeout(WAIT_S):
        await h.dispatcher.wait_zero()  # nothing accepted: returns at once

    a, b = h.submit(b"a"), h.submit(b"b")
    async with asyncio.timeout(WAIT_S):
        await service.wait_pending(2)
    idle = asyncio.create_task(h.dispatcher.wait_zero())
    await asyncio.sleep(0)  # let it start waiting (a yield, not a timed wait)
    assert not idle.done()
    assert h.stats.inflight == 2
    assert h.backends[0].inflight == 2

    service.answer_all()
    async with asyncio.timeout(WAIT_S):
        await idle
    assert (a.response, b.response) == (b"a", b"b")
    assert h.stats.inflight == 0
    assert h.backends[0].inflight == 0


def test_statistics_and_repr() -> None:
    h = Harness([FakeService()], DispatchConfig(queue_size=3), "round_robin")
    stats = h.dispatcher.statistics()
    assert stats["policy"] == "round_robin"
    assert (stats["waiting"], stats["queue_saturated"], stats["inflight"]) == (0, False, 0)
    assert "round_robin" in repr(h.dispatcher)


# -- parking on a full pool ------------------------------------------------------------------


async def yield_until(condition: Callable[[], bool], tries: int = 1000) -> None:
    """Yield to the loop (the fakes answer from it; no timed waits) until ``condition``."""
    for _ in range(tries):
        if condition():
            return
        await asyncio.sleep(0)
    raise AssertionError("condition not reached")


async def parked_count(h: Harness, count: int) -> None:
    """Yield to the loop (no timed waits) until ``count`` requests are parked."""
    for _ in range(200):
        if h.dispatcher.statistics()["waiting"] == count:
            return
        await asyncio.sleep(0)
    raise AssertionError(f"waiting {h.dispatcher.statistics()['waiting']}, expected {count}")


async def test_full_pool_parks_requests_and_each_answer_sends_the_next(
    make_harness: Harnesses,
) -> None:
    service = FakeService("gated")
    h = make_harness([service])  # 8 connections, one request each
    requests = [h.submit(f"p{i}".encode()) for i in range(12)]
    async with asyncio.timeout(WAIT_S):
        await service.wait_pending(8)
        await parked_count(h, 4)
    assert h.backends[0].inflight == 12  # parked requests count as load for the policy
    assert h.dispatcher.queue.waiting == 4

    service.answer_all()  # each answer frees room: a parked request goes out at once
    async with asyncio.timeout(WAIT_S):
        await service.wait_pending(4)
    assert h.dispatcher.statistics()["waiting"] == 0
    service.answer_all()
    await h.wait_zero()

    assert [r.response for r in requests] == [f"p{i}".encode()[::-1] for i in range(12)]
    assert service.dials == 8
    assert h.backends[0].inflight == 0
    assert h.dispatcher.queue.waiting == 0


async def test_parked_requests_count_toward_queue_size(make_harness: Harnesses) -> None:
    service = FakeService("gated")
    h = make_harness([service], queue_size=4)
    signals: list[bool] = []
    h.dispatcher.add_pressure_listener(signals.append)
    for i in range(12):
        h.submit(f"q{i}".encode())
    async with asyncio.timeout(WAIT_S):
        await service.wait_pending(8)
        await parked_count(h, 4)
    assert h.dispatcher.saturated and signals[-1] is True  # 4 waiting: stop reading

    service.answer_all()
    async with asyncio.timeout(WAIT_S):
        await service.wait_pending(4)
    assert not h.dispatcher.saturated and signals[-1] is False
    service.answer_all()
    await h.wait_zero()


async def test_parked_request_past_queue_timeout_is_overloaded(make_harness: Harnesses) -> None:
    service = FakeService("gated")
    h = make_harness([service], queue_timeout_s=5.0)
    requests = [h.submit(f"t{i}".encode()) for i in range(10)]
    async with asyncio.timeout(WAIT_S):
        await service.wait_pending(8)
        await parked_count(h, 2)
    h.clock.advance(6.0)
    service.answer_all()
    await h.wait_zero()

    assert [error_code(r) for r in requests[8:]] == ["OVERLOADED", "OVERLOADED"]
    assert all(r.response is not None for r in requests[:8])
    assert h.backends[0].inflight == 0


async def test_requests_parked_on_a_hung_backend_time_out_without_an_answer(
    make_harness: Harnesses,
) -> None:
    """No answer comes back from a hung backend, so nothing unparks: the queue deadline must
    still answer OVERLOADED after ``queue_timeout_s``, as for a queued request."""
    service = FakeService("gated")
    h = make_harness([service], queue_timeout_s=5.0)
    requests = [h.submit(f"h{i}".encode()) for i in range(10)]
    async with asyncio.timeout(WAIT_S):
        await service.wait_pending(8)
        await parked_count(h, 2)
    h.clock.advance(4.0)
    assert h.stats.errored == {}
    h.clock.advance(2.0)
    assert h.stats.errored == {"OVERLOADED": 2}

    assert [error_code(r) for r in requests[8:]] == ["OVERLOADED", "OVERLOADED"]
    assert not any(r.done for r in requests[:8])
    assert h.backends[0].inflight == 8 and h.dispatcher.queue.waiting == 0
    assert h.dispatcher.statistics()["waiting"] == 0
    service.answer_all()
    await h.wait_zero()


async def test_the_queue_deadline_timer_covers_parked_requests(make_harness: Harnesses) -> None:
    """The same through the dispatcher's own timer (50 ms of real time), not a direct call."""
    service = FakeService("gated")
    h = make_harness([service], queue_timeout_s=0.05)
    for i in range(8):
        h.submit(f"d{i}".encode())
    answered = asyncio.Event()

    class Waiting:
        def request_done(self, request: Request) -> None:
            answered.set()

    late = Request(b"late", Waiting(), h.clock.now())
    h.dispatcher.submit(late)
    async with asyncio.timeout(WAIT_S):
        await service.wait_pending(8)
        await parked_count(h, 1)
        h.clock.advance(1.0)
        await answered.wait()
    assert error_code(late) == "OVERLOADED"
    service.answer_all()
    await h.wait_zero()


async def test_parked_requests_move_to_another_backend_when_theirs_goes_down(
    make_harness: Harnesses,
) -> None:
    failing, live = FakeService("gated"), FakeService("live")
    h = make_harness([failing, live], policy="round_robin")
    h.backends[1].healthy = False  # everything goes to the first until it fails
    requests = [h.submit(f"m{i}".encode()) for i in range(10)]
    async with asyncio.timeout(WAIT_S):
        await failing.wait_pending(8)
        await parked_count(h, 2)
    h.backends[1].mark_up()
    failing.fail_all()  # 8 resets: retried elsewhere, the first backend is marked down
    await h.wait_zero()

    assert all(r.response == r.payload[::-1] for r in requests)
    assert not h.backends[0].healthy
    assert [b.inflight for b in h.backends] == [0, 0]
    assert h.dispatcher.queue.waiting == 0


@pytest.mark.parametrize("probe_ok", [True, False])
async def test_request_parked_while_every_connection_is_probed_goes_out_afterwards(
    make_harness: Harnesses, probe_ok: bool
) -> None:
    """With every connection out for a health probe, the pool lends none and may dial no more,
    so a request parks with nothing in flight whose answer would send it. The probes coming
    back (healthy: the connections are lent again; broken: they close and the pool may dial)
    must send it. (The 10,000-client run once ended with 21 requests parked for good.)"""
    service = FakeService("gated")
    h = make_harness([service])
    warm = [h.submit(f"w{i}".encode()) for i in range(8)]
    async with asyncio.timeout(WAIT_S):
        await service.wait_pending(8)
    service.answer_all()
    await yield_until(lambda: all(r.done for r in warm))
    service.mode = "live"
    pool = h.backends[0].pool
    probed = pool.take_idle_for_probe()
    assert len(probed) == 8 and not pool.can_dial()

    late = h.submit(b"late")
    await parked_count(h, 1)
    for slot in probed:
        pool.return_probed(slot, healthy=probe_ok)
    await h.wait_zero()

    assert late.response == b"etal"
    assert service.dials == (8 if probe_ok else 9)
    assert h.backends[0].inflight == 0 and h.dispatcher.queue.waiting == 0


async def test_a_full_backend_does_not_hold_up_requests_for_another(
    make_harness: Harnesses,
) -> None:
    """Parked requests wait on their backend, not in a worker: with round robin, half the
    traffic goes to a backend whose pool is full, and the other half must still flow."""
    stuck, live = FakeService("gated"), FakeService("live")
    h = make_harness([stuck, live], policy="round_robin")
    requests = [h.submit(f"r{i}".encode()) for i in range(40)]
    to_live = [r for r in requests if r.payload[1:].isdigit() and int(r.payload[1:]) % 2 == 1]
    await yield_until(lambda: all(r.done for r in to_live))
    assert all(r.response == r.payload[::-1] for r in to_live)
    assert h.dispatcher.statistics()["waiting"] == 12  # 20 for the stuck one: 8 sent, 12 wait

    def answer_and_check() -> bool:  # each answer frees room for a parked request
        stuck.answer_all()
        return all(r.done for r in requests)

    await yield_until(answer_and_check)
    assert all(r.response == r.payload[::-1] for r in requests)
    assert stuck.dials == 8 and h.dispatcher.queue.waiting == 0


# -- abandonment -----------------------------------------------------------------------------


async def test_late_answers_after_abandon_count_nothing(make_harness: Harnesses) -> None:
    """The drain's deadline abandons what is left and counts it dropped: a late answer or a
    late reset must not decrement in-flight or count the request a second time."""
    service = FakeService("gated")
    h = make_harness([service], max_retries=0)
    answered, reset = h.submit(b"late"), h.submit(b"reset")
    async with asyncio.timeout(WAIT_S):
        await service.wait_pending(2)

    assert h.dispatcher.abandon() == 2
    assert (h.stats.inflight, h.stats.dropped) == (0, 2)
    late_payload, late_future = service.pending[0]
    late_future.set_result(late_payload[::-1])
    service.pending[1][1].set_exception(BackendUnavailable("reset after the deadline"))
    service.pending.clear()
    await yield_until(lambda: answered.done and reset.done)

    assert h.stats.statistics() == {
        "accepted": 2, "completed": 0, "errored": {}, "dropped": 2, "retried": 0, "inflight": 0,
    }  # fmt: skip
    assert [b.inflight for b in h.backends] == [0]  # the backend's own load is still released
    service.mode = "live"
    fresh = h.submit(b"after")  # a request of the new epoch counts as usual
    await h.wait_zero()
    assert fresh.response == b"retfa" and h.stats.completed == 1


# -- panic: every backend out of rotation ----------------------------------------------------


async def test_with_every_backend_down_panic_tries_them_and_an_answer_brings_one_back(
    make_harness: Harnesses,
) -> None:
    """Below the panic threshold health is ignored: backends that came back serve at once
    instead of NO_BACKEND until the next probe, and an answer puts one back in rotation."""
    services = [FakeService("dead"), FakeService("dead")]
    h = make_harness(services, panic_threshold=0.5, max_retries=1)
    for i in range(8):
        h.submit(f"{i}".encode())
        await h.wait_zero()
    assert not any(b.healthy for b in h.backends)

    for service in services:
        service.mode = "live"
    back = [h.submit(f"back{i}".encode()) for i in range(4)]
    await h.wait_zero()

    assert [r.response for r in back] == [r.payload[::-1] for r in back]
    assert "NO_BACKEND" not in h.stats.errored
    assert all(b.healthy for b in h.backends)


async def test_panic_is_off_at_zero_and_above_the_threshold(make_harness: Harnesses) -> None:
    services = [FakeService("dead"), FakeService("live")]
    h = make_harness(services, panic_threshold=0.5, policy="round_robin")
    h.backends[0].mark_down("test")
    assert h.registry.candidates() == [h.backends[1]]  # 1 of 2 healthy: not below 0.5
    assert not h.registry.panicking()
    h.backends[1].mark_down("test")
    assert h.registry.candidates() == h.backends and h.registry.panicking()

    off = make_harness([FakeService("live")], panic_threshold=0.0)
    off.backends[0].mark_down("test")
    assert off.registry.candidates() == []
    request = off.submit(b"x")
    await off.wait_zero()
    assert error_code(request) == "NO_BACKEND"


# -- draining a backend, and new settings (a reload) -------------------------------------------


async def test_a_draining_backend_finishes_what_it_carries_then_leaves(
    make_harness: Harnesses,
) -> None:
    leaving, staying = FakeService("gated"), FakeService("live")
    h = make_harness([leaving, staying], policy="round_robin", max_connections=2)
    h.backends[1].healthy = False  # everything goes to the first: 2 in flight, 4 waiting
    first = [h.submit(f"a{i}".encode()) for i in range(6)]
    async with asyncio.timeout(WAIT_S):
        await leaving.wait_pending(2)
        await parked_count(h, 4)
    left: list[Backend] = []
    h.registry.add_leave_listener(left.append)
    h.backends[1].mark_up()

    h.registry.drain(h.backends[0].address)
    later = [h.submit(f"b{i}".encode()) for i in range(4)]
    await yield_until(lambda: sum(r.done for r in first + later) == 8)

    assert h.registry.draining() == [h.backends[0]] and left == []  # 2 still in flight there
    assert list(h.registry) == [h.backends[1]]
    assert staying.requests == 8  # the 4 waiting moved, and every new request went there
    leaving.answer_all()
    await h.wait_zero()

    assert [r.response for r in first + later] == [r.payload[::-1] for r in first + later]
    assert left == [h.backends[0]] and h.registry.draining() == []
    assert h.backends[0].upstream.closed and h.backends[0].inflight == 0
    assert h.stats.retried == 0 and h.stats.errored == {}
    assert h.backends[0].statistics()["state"] == "draining"


async def test_draining_an_idle_backend_leaves_at_once(make_harness: Harnesses) -> None:
    h = make_harness([FakeService(), FakeService()])
    left: list[Backend] = []
    h.registry.add_leave_listener(left.append)
    h.registry.drain(h.backends[0].address)
    assert left == [h.backends[0]] and h.registry.draining() == []
    assert h.backends[0].upstream.closed
    request = h.submit(b"x")
    await h.wait_zero()
    assert request.response == b"x" and h.backends[1].requests_total == 1


async def test_a_backend_may_join_at_an_address_that_is_still_draining(
    make_harness: Harnesses,
) -> None:
    old = FakeService("gated")
    h = make_harness([old])
    request = h.submit(b"old")
    async with asyncio.timeout(WAIT_S):
        await old.wait_pending(1)
    address = h.backends[0].address
    h.registry.drain(address)
    new = FakeService("live")
    h.registry.add(Backend(BackendSpec(id=address, address=address),
                           Pool(new.dial, PoolConfig(), h.clock, "new")))
    fresh = h.submit(b"new")
    await yield_until(lambda: fresh.done)
    old.answer_all()
    await h.wait_zero()
    assert (request.response, fresh.response) == (b"dlo", b"wen")
    assert (old.requests, new.requests) == (1, 1) and h.registry.draining() == []


async def test_a_new_weight_changes_the_split_of_new_requests(make_harness: Harnesses) -> None:
    services = [FakeService(), FakeService()]
    h = make_harness(services, policy="round_robin")
    for i in range(40):
        h.submit(f"{i}".encode())
        await h.wait_zero()
    assert [s.requests for s in services] == [20, 20]
    spec = h.backends[0].spec
    h.registry.update(BackendSpec(id=spec.id, address=spec.address, weight=3))
    for i in range(40):
        h.submit(f"{i}".encode())
        await h.wait_zero()
    assert [s.requests for s in services] == [20 + 30, 20 + 10]
    with pytest.raises(ValueError, match="another backend"):
        h.backends[0].update(BackendSpec(id="x", address="10.9.9.9:1"))


async def test_reconfigure_applies_to_requests_accepted_after_it(
    make_harness: Harnesses,
) -> None:
    service = FakeService("gated")
    h = make_harness([service], max_connections=1, queue_timeout_s=5.0)
    h.submit(b"busy")
    async with asyncio.timeout(WAIT_S):
        await service.wait_pending(1)
    before = h.submit(b"before")  # waits with the 5 s deadline it was accepted with
    h.dispatcher.reconfigure(DispatchConfig(queue_timeout_s=1.0, queue_size=2),
                             make_policy("random"))
    after = h.submit(b"after")
    assert h.dispatcher.statistics()["policy"] == "random"
    assert h.dispatcher.saturated  # 2 waiting reach the new queue_size
    h.clock.advance(1.5)
    assert error_code(after) == "OVERLOADED" and not before.done
    h.clock.advance(4.0)
    assert error_code(before) == "OVERLOADED"
    assert not h.dispatcher.saturated
    service.answer_all()
    await h.wait_zero()


async def test_a_new_panic_threshold_applies_at_once_through_every_view(
    make_harness: Harnesses,
) -> None:
    h = make_harness([FakeService(), FakeService()], panic_threshold=0.0)
    view = h.registry.view("tcp")
    h.backends[0].mark_down("test")
    assert view.candidates() == [h.backends[1]]  # the answer is cached per (kind, model)
    h.registry.panic_threshold = 1.0  # a reload: fewer than all healthy means all are tried
    assert view.candidates() == h.backends and view.panic_threshold == 1.0


def test_a_weight_or_health_change_reaches_the_cached_candidates_of_a_large_registry() -> None:
    # Policies keep the cumulative weights on the registry's candidate list (a Snapshot):
    # every change must give a new list, never stale weights.
    h = Harness([FakeService() for _ in range(SCAN_MAX + 4)], DispatchConfig(), "random")
    first = h.registry.candidates()
    assert isinstance(first, Snapshot) and h.registry.candidates() is first
    h.registry.set_weight(h.backends[0].address, 1000)
    weighted = h.registry.candidates()
    assert weighted is not first
    policy, rng = WeightedRandom(), random.Random(5)
    picks = [weighted[policy.choose(weighted, rng)] for _ in range(1000)]
    assert picks.count(h.backends[0]) >= 950  # 1000 / 1019 of the weight
    h.backends[0].mark_down("test")
    healthy = h.registry.candidates()
    assert h.backends[0] not in healthy and len(healthy) == SCAN_MAX + 3
    assert h.backends[0] not in {healthy[policy.choose(healthy, rng)] for _ in range(200)}


def _model_registry(count: int, models: int) -> Registry:
    registry, clock = Registry(), ManualClock()
    limits = PoolConfig(max_connections=1, pipeline_depth=1)
    for index in range(count):
        address = f"10.0.{index // 250}.{index % 250 + 1}:9000"
        spec = BackendSpec(id=address, address=address, protocol="grpc",
                           models=(f"m{index % models}",))
        registry.add(Backend(spec, Pool(FakeService().dial, limits, clock, address)))
    return registry


def _count_looks(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """How often ``Backend.serves`` is asked from now on: a look at one backend."""
    looked = [0]
    serves = Backend.serves

    def counted(backend: Backend, model: str) -> bool:
        looked[0] += 1
        return serves(backend, model)

    monkeypatch.setattr(Backend, "serves", counted)
    return looked


def test_a_known_model_is_checked_without_looking_at_every_backend(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # A gRPC request checks its model before it is placed: over 1,000 registered backends a
    # look at each per request costs more than the rest of the routing.
    registry = _model_registry(1000, 100)
    looked = _count_looks(monkeypatch)
    for _ in range(100):
        registry.check_model("m7", "grpc")
        assert len(registry.candidates((), "grpc", "m7")) == 10
    assert looked[0] <= 1000 * 2  # the first check and the first placement build the cache


def test_unknown_model_names_do_not_evict_the_known_ones(
        monkeypatch: pytest.MonkeyPatch) -> None:
    registry = _model_registry(20, 4)
    registry.check_model("m1", "grpc")
    looked = _count_looks(monkeypatch)
    for index in range(1100):  # more names than the cache holds keys
        with pytest.raises(UnknownModel):
            registry.check_model(f"nobody-{index}", "grpc")
    looked[0] = 0
    registry.check_model("m1", "grpc")
    assert looked[0] == 0


def test_the_model_cache_follows_joins_and_drains() -> None:
    registry = _model_registry(20, 20)
    registry.check_model("m3", "grpc")
    with pytest.raises(UnknownModel):
        registry.check_model("m20", "grpc")
    spec = BackendSpec(id="new:9000", address="10.9.9.9:9000", protocol="grpc", models=("m20",))
    registry.add(Backend(spec, Pool(FakeService().dial, PoolConfig(), ManualClock(), "new")))
    registry.check_model("m20", "grpc")  # joined: known at once
    registry.drain("10.0.0.4:9000")  # the only backend of m3
    with pytest.raises(UnknownModel):
        registry.check_model("m3", "grpc")
