"""The scheduler with a keyed policy (the real affinity policy) over fake backends and a
manual clock: every placement's token is told its start and its end exactly once, whether the
request is answered, retried elsewhere, moved off a backend or expires waiting."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator

import pytest

from router.balance.affinity import AffinityPolicy, AffinitySettings
from router.balance.policies import ConsistentHashBounded
from router.balance.residency import LOADED, ResidencyView
from router.core.clock import ManualClock
from router.core.config import DispatchConfig, PoolConfig
from router.core.types import BackendSpec
from router.dispatch.backends import Backend, Registry
from router.dispatch.request import Request
from router.dispatch.scheduler import Dispatcher
from router.dispatch.stats import DataPlaneStats
from router.upstream.pool import Pool
from tests.test_dispatch_unit import Collector, FakeService

WAIT_S = 2.0


class Answers(Collector):
    """The origin: records each answer once, and wakes whoever waits for one."""

    def __init__(self) -> None:
        super().__init__()
        self._answered = asyncio.Event()

    def request_done(self, request: Request) -> None:
        super().request_done(request)
        self._answered.set()

    async def wait_for(self, request: Request) -> None:
        async with asyncio.timeout(WAIT_S):
            while request not in self.done:
                self._answered.clear()
                await self._answered.wait()


class Fleet:
    def __init__(self, services: list[FakeService], queue_timeout_s: float = 5.0,
                 policy: str = "affinity") -> None:
        self.clock = ManualClock()
        self.registry = Registry()
        self.view = ResidencyView(default_slots=2, default_concurrency=1)
        self.affinity = AffinityPolicy(self.view, AffinitySettings(), self.clock.now)
        self.backends: list[Backend] = []
        for index, service in enumerate(services):
            address = f"10.0.0.{index + 1}:9000"
            pool = Pool(service.dial, PoolConfig(max_connections=1, pipeline_depth=1),
                        self.clock, address)
            backend = Backend(BackendSpec(id=f"b{index}", address=address, models=("*",)), pool)
            self.registry.add(backend)
            self.backends.append(backend)
        self.origin = Answers()
        chosen = self.affinity if policy == "affinity" else ConsistentHashBounded()
        self.dispatcher = Dispatcher(
            self.registry, chosen, DispatchConfig(queue_timeout_s=queue_timeout_s),
            self.clock, DataPlaneStats(), rng=random.Random(5),
        )

    def submit(self, model: str | None, route_key: str | None = None) -> Request:
        request = Request(b"x", self.origin, self.clock.now(), model=model)
        request.route_key = route_key
        self.dispatcher.submit(request)
        return request

    async def wait_zero(self) -> None:
        async with asyncio.timeout(WAIT_S):
            await self.dispatcher.wait_zero()

    def in_flight(self) -> int:
        return int(self.affinity.statistics()["placements_in_flight"])


@pytest.fixture
async def fleets() -> AsyncIterator[list[Fleet]]:
    built: list[Fleet] = []
    yield built
    for fleet in built:
        fleet.dispatcher.close()


async def test_answered_requests_leave_the_model_loaded_where_they_ran(
    fleets: list[Fleet],
) -> None:
    fleet = Fleet([FakeService(), FakeService()])
    fleets.append(fleet)
    requests = [fleet.submit("m") for _ in range(10)]
    await fleet.wait_zero()
    assert all(r.response == b"x" for r in requests) and all(r.placement is None for r in requests)
    assert fleet.in_flight() == 0
    holders = fleet.view.holders("m")
    assert holders and all(r.state == LOADED and r.inflight == 0 for r in holders.values())
    reasons = fleet.affinity.reasons
    assert reasons["load"] >= 1 and sum(reasons.values()) == 10


async def test_a_retried_request_is_forgotten_on_the_backend_that_failed(
    fleets: list[Fleet],
) -> None:
    dead, live = FakeService("dead"), FakeService()
    fleet = Fleet([dead, live])
    fleets.append(fleet)
    requests = [fleet.submit(f"m{i}") for i in range(6)]
    await fleet.wait_zero()
    assert all(r.response == b"x" for r in requests)
    assert fleet.in_flight() == 0
    assert fleet.view.models_of("b0") == {}  # no load there was ever answered
    assert set(fleet.view.models_of("b1")) <= {f"m{i}" for i in range(6)}
    assert fleet.dispatcher.stats.retried >= 1


async def test_requests_that_expire_waiting_end_their_placements(fleets: list[Fleet]) -> None:
    gated = FakeService("gated")
    fleet = Fleet([gated], queue_timeout_s=1.0)
    fleets.append(fleet)
    first = fleet.submit("m")
    async with asyncio.timeout(WAIT_S):
        await gated.wait_pending(1)
    waiting = [fleet.submit("m") for _ in range(3)]  # behind the first: pool of one
    assert fleet.in_flight() == 4
    fleet.clock.advance(1.5)
    assert all(r.error is not None and r.error.code == "OVERLOADED" for r in waiting)
    assert fleet.in_flight() == 1  # only the first, still running
    gated.answer_all()
    await fleet.wait_zero()
    assert first.response == b"x"[::-1] and fleet.in_flight() == 0


async def test_requests_moved_off_a_backend_marked_down_are_placed_again(
    fleets: list[Fleet],
) -> None:
    gated, live = FakeService("gated"), FakeService()
    fleet = Fleet([gated, live])
    fleets.append(fleet)
    fleet.view.report("b0", ["m"], fleet.clock.now())  # m is warm on b0: it takes m
    running = fleet.submit("m")
    async with asyncio.timeout(WAIT_S):
        await gated.wait_pending(1)
    queued = fleet.submit("m")  # waits for b0 (a load on b1 costs more than the wait)
    assert queued.placement is not None and fleet.in_flight() == 2
    fleet.backends[0].mark_down("probe failed")  # out of rotation: its waiting requests move
    await fleet.origin.wait_for(queued)
    assert queued.response == b"x"[::-1]
    assert "m" in fleet.view.models_of("b1")
    gated.answer_all()
    await fleet.wait_zero()
    assert fleet.in_flight() == 0 and running.response is not None


async def test_consistent_hash_bounded_keeps_a_route_key_on_one_backend(
    fleets: list[Fleet],
) -> None:
    fleet = Fleet([FakeService() for _ in range(4)], policy="hash")
    fleets.append(fleet)
    for _ in range(12):
        fleet.submit("m", route_key="user-42")
        await fleet.wait_zero()  # one at a time: never over the bound
    served = [b.requests_total for b in fleet.backends]
    assert sorted(served) == [0, 0, 0, 12]


