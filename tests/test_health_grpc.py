"""The grpc.health prober through the monitor, against in-process gRPC servers on 127.0.0.1.

The channels' idle clock is a ``ManualClock``; the only waits are gRPC calls to a local server
(each bounded by the probe timeout).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from router.core.clock import ManualClock
from router.core.config import HealthConfig
from router.dispatch.backends import Registry
from router.health.monitor import HealthMonitor, make_probers
from router.upstream.grpc_channels import GrpcChannels
from tests.fakes import make_backend

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
IDLE_TIMEOUT_S = 60.0


class HealthServer:
    def __init__(self, server: grpc.aio.Server, port: int,
                 servicer: health.aio.HealthServicer | None) -> None:
        self.server, self.port, self.servicer = server, port, servicer

    async def set(self, status: int) -> None:
        assert self.servicer is not None
        await self.servicer.set("", status)


Servers = Callable[..., Awaitable[HealthServer]]


@pytest.fixture
async def health_server() -> AsyncIterator[Servers]:
    """Factory: a started gRPC server on 127.0.0.1, with a grpc.health service SERVING "" (or
    with none, ``with_health=False``)."""
    started: list[grpc.aio.Server] = []

    async def start(with_health: bool = True) -> HealthServer:
        server = grpc.aio.server()
        servicer = None
        if with_health:
            servicer = health.aio.HealthServicer()
            health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
            await servicer.set("", SERVING)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        started.append(server)
        return HealthServer(server, port, servicer)

    yield start
    for server in started:
        await server.stop(None)


class Setup:
    def __init__(self, port: int, probe: str = "frame") -> None:
        self.clock = ManualClock()
        self.channels = GrpcChannels(
            self.clock, max_message_bytes=1 << 20, idle_timeout_s=IDLE_TIMEOUT_S
        )
        config = HealthConfig(probe=probe, timeout_s=0.5)  # type: ignore[arg-type]
        self.registry = Registry()
        self.backend = make_backend(f"127.0.0.1:{port}", "grpc")
        self.registry.add(self.backend)
        self.reasons: list[str] = []
        self.registry.add_listener(lambda b, reason: self.reasons.append(reason))
        self.monitor = HealthMonitor(
            self.registry, make_probers(config, self.channels), config, self.clock
        )

    def stat(self, key: str) -> int:
        return self.monitor.statistics()[key]

    async def close(self) -> None:
        await self.channels.close_all()


async def test_not_serving_takes_a_backend_out_at_once_and_serving_brings_it_back(
    health_server: Servers,
) -> None:
    server = await health_server()
    s = Setup(server.port)
    try:
        await s.monitor.check_all()  # healthy, no open channel: not dialled to be probed
        assert s.stat("probes_sent") == 0 and s.channels.statistics()["open"] == 0

        s.channels.channel(s.backend)  # traffic opened a channel
        await s.monitor.check_all()
        assert s.stat("probes_sent") == 1 and s.backend.healthy

        await server.set(NOT_SERVING)
        await s.monitor.check_all()
        assert not s.backend.healthy
        assert s.stat("marked_down") == 1

        await server.set(SERVING)
        await s.monitor.check_all()
        assert s.backend.healthy
        assert s.stat("marked_up") == 1
        assert s.reasons == ["grpc.health says NOT_SERVING", "grpc.health says SERVING"]
    finally:
        await s.close()


async def test_a_backend_without_a_health_service_counts_as_serving(
    health_server: Servers,
) -> None:
    server = await health_server(with_health=False)
    s = Setup(server.port)
    s.backend.mark_down("operator")
    try:
        await s.monitor.check_all()
        assert s.backend.healthy
        assert s.reasons[-1] == "answered (it has no grpc.health service)"
        assert s.stat("probes_failed") == 0
    finally:
        await s.close()


async def test_no_answer_keeps_a_backend_out_and_one_in(dead_port: int) -> None:
    s = Setup(dead_port)
    try:
        s.channels.channel(s.backend)
        await s.monitor.check_all()
        assert s.backend.healthy  # passive ejection takes it out, not one lost probe
        s.backend.mark_down("operator")
        await s.monitor.check_all()
        assert not s.backend.healthy
        assert s.stat("probes_failed") == 2 and s.stat("probes_sent") == 2
        assert s.reasons == ["operator"]
    finally:
        await s.close()


async def test_probes_do_not_keep_a_channel_open(health_server: Servers) -> None:
    server = await health_server()
    s = Setup(server.port)
    try:
        s.channels.channel(s.backend)  # used once, now
        s.clock.advance(IDLE_TIMEOUT_S / 2)
        await s.monitor.check_all()  # probed over it: not a use
        assert s.stat("probes_sent") == 1
        s.clock.advance(IDLE_TIMEOUT_S / 2)

        await s.monitor.check_all()  # idle since the use: closed, and then nothing to probe

        assert s.channels.statistics() == {"open": 0, "opened": 1, "closed": 1}
        assert s.stat("probes_sent") == 1 and s.backend.healthy
    finally:
        await s.close()


async def test_connect_probe_only_needs_the_channel_to_connect(
    health_server: Servers, dead_port: int
) -> None:
    server = await health_server(with_health=False)
    s, dead = Setup(server.port, probe="connect"), Setup(dead_port, probe="connect")
    try:
        for setup in (s, dead):
            setup.backend.mark_down("operator")
            await setup.monitor.check_all()
        assert s.backend.healthy and s.reasons[-1] == "its channel connected"
        assert not dead.backend.healthy and dead.stat("probes_failed") == 1
    finally:
        await s.close()
        await dead.close()
