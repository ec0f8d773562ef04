"""The dispatcher's forwarded requests (what the gRPC front door submits), without a network.

A forward function stands in for the gRPC call: it records which backend the dispatcher chose
and the test reports the outcome with ``attempt_done``, as ``forward.Call`` does.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator

import pytest

from router.balance.policies import make_policy
from router.core.clock import MonotonicClock
from router.core.config import DispatchConfig, PoolConfig
from router.core.errors import BackendTimeout, BackendUnavailable, Cancelled, NoBackend, Overloaded
from router.core.types import BackendSpec, Protocol
from router.dispatch.backends import Backend, Registry
from router.dispatch.request import Request
from router.dispatch.scheduler import Dispatcher
from router.dispatch.stats import DataPlaneStats
from router.upstream.base import Upstream
from router.upstream.frame_connection import make_dialer
from router.upstream.grpc_limiter import GrpcCallLimiter
from router.upstream.pool import Pool

WAIT_S = 2.0


class Origin:
    def __init__(self) -> None:
        self.done: list[Request] = []
        self.changed = asyncio.Event()

    def request_done(self, request: Request) -> None:
        self.done.append(request)
        self.changed.set()


class Forwards:
    """The forward function: remembers (request, backend) per attempt."""

    def __init__(self) -> None:
        self.attempts: list[tuple[Request, Backend]] = []
        self.changed = asyncio.Event()

    def __call__(self, request: Request) -> None:
        assert request.backend is not None
        self.attempts.append((request, request.backend))
        self.changed.set()

    async def wait(self, count: int) -> None:
        async with asyncio.timeout(WAIT_S):
            while len(self.attempts) < count:
                self.changed.clear()
                await self.changed.wait()


def _backend(port: int, kind: Protocol = "grpc", models: tuple[str, ...] = ("m",),
             call_limit: int = 256) -> Backend:
    address = f"127.0.0.1:{port}"
    upstream: Upstream
    if kind == "grpc":
        upstream = GrpcCallLimiter(call_limit, address)
    else:
        clock = MonotonicClock(asyncio.get_running_loop)
        upstream = Pool(make_dialer("127.0.0.1", port, 1024), PoolConfig(), clock)
    spec = BackendSpec(id=address, address=address, protocol=kind, models=models)
    return Backend(spec, upstream)


@pytest.fixture
async def setup() -> AsyncIterator[tuple[Dispatcher, Registry]]:
    registry = Registry()
    dispatcher = Dispatcher(
        registry, make_policy("round_robin"),
        DispatchConfig(queue_size=8, queue_timeout_s=0.2, max_retries=1),
        MonotonicClock(asyncio.get_running_loop), DataPlaneStats(), random.Random(1),
    )
    yield dispatcher, registry
    dispatcher.close()


def _request(origin: Origin, forwards: Forwards, model: str | None = "m") -> Request:
    return Request(b"x", origin, MonotonicClock.now(), kind="grpc", model=model,
                   forward=forwards)


async def test_forwarded_request_goes_to_a_backend_of_its_kind_serving_its_model(
    setup: tuple[Dispatcher, Registry],
) -> None:
    dispatcher, registry = setup
    for backend in (_backend(1, kind="tcp"), _backend(2, models=("other",)), _backend(3)):
        registry.add(backend)
    origin, forwards = Origin(), Forwards()
    request = _request(origin, forwards)
    dispatcher.submit(request)
    await forwards.wait(1)
    assert forwards.attempts[0][1].spec.port == 3
    assert forwards.attempts[0][1].inflight == 1
    dispatcher.attempt_done(request, b"answer", None)
    assert origin.done == [request] and request.response == b"answer"
    stats = dispatcher.stats
    assert (stats.accepted, stats.completed, stats.inflight) == (1, 1, 0)
    assert registry.get("127.0.0.1:3").inflight == 0  # type: ignore[union-attr]


async def test_unavailable_is_retried_on_another_backend_within_the_budget(
    setup: tuple[Dispatcher, Registry],
) -> None:
    dispatcher, registry = setup
    registry.add(_backend(1))
    registry.add(_backend(2))
    origin, forwards = Origin(), Forwards()
    request = _request(origin, forwards)
    dispatcher.submit(request)
    await forwards.wait(1)
    dispatcher.attempt_done(request, None, BackendUnavailable("reset"))
    await forwards.wait(2)
    first, second = forwards.attempts[0][1], forwards.attempts[1][1]
    assert first is not second
    dispatcher.attempt_done(request, None, BackendUnavailable("reset again"))  # budget: 1 retry
    assert isinstance(request.error, BackendUnavailable)
    assert (dispatcher.stats.retried, first.failures_total, second.failures_total) == (1, 1, 1)


async def test_timeouts_count_against_the_backend_but_a_cancel_does_not(
    setup: tuple[Dispatcher, Registry],
) -> None:
    dispatcher, registry = setup
    backend = _backend(1)
    registry.add(backend)
    origin, forwards = Origin(), Forwards()
    for error in (BackendTimeout("slow"), Cancelled("gone")):
        request = _request(origin, forwards)
        dispatcher.submit(request)
        await forwards.wait(len(origin.done) + 1)
        dispatcher.attempt_done(request, None, error)
        assert request.error is error  # not retried
    assert backend.failures_total == 1
    assert dispatcher.stats.errored == {"BACKEND_TIMEOUT": 1, "CANCELLED": 1}


async def test_no_backend_for_the_model(setup: tuple[Dispatcher, Registry]) -> None:
    dispatcher, registry = setup
    registry.add(_backend(1, models=("other",)))
    origin = Origin()
    request = _request(origin, Forwards())
    dispatcher.submit(request)
    assert isinstance(request.error, NoBackend)


async def test_a_backend_at_its_call_limit_makes_requests_wait_then_overload(
    setup: tuple[Dispatcher, Registry],
) -> None:
    dispatcher, registry = setup
    registry.add(_backend(1, call_limit=1))
    origin, forwards = Origin(), Forwards()
    first, second, third = (_request(origin, forwards) for _ in range(3))
    for request in (first, second):
        dispatcher.submit(request)
    await forwards.wait(1)
    assert len(forwards.attempts) == 1  # the second waits for capacity
    dispatcher.attempt_done(first, b"1", None)
    await forwards.wait(2)  # ... and gets it as soon as the first is done
    assert forwards.attempts[1][0] is second
    dispatcher.submit(third)  # the backend is busy with the second past queue_timeout_s
    async with asyncio.timeout(WAIT_S):
        while third.error is None:
            origin.changed.clear()
            await origin.changed.wait()
    assert isinstance(third.error, Overloaded)
    dispatcher.attempt_done(second, b"2", None)
    assert dispatcher.stats.statistics()["inflight"] == 0
