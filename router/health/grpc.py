"""The gRPC prober: ``grpc.health.v1.Health/Check`` against gRPC backends.

Each pass, for every gRPC backend that is out of rotation or has an open channel, it asks
``grpc.health.v1.Health/Check`` (probe "frame"; "connect" only waits for the channel to
connect). SERVING, or UNIMPLEMENTED (the backend answered but has no health service), brings a
backend back; NOT_SERVING takes it out at once, since the backend says so itself. A probe that
fails does nothing more: requests that fail mark a backend down (``failure_threshold``). A
healthy backend with no open channel is not dialled just to be probed.
"""

from __future__ import annotations

import asyncio
import logging

import grpc
from grpc_health.v1 import health_pb2

from router.dispatch.backends import Backend, Registry
from router.health.monitor import ProbeSettings
from router.upstream.grpc_channels import GrpcChannels

log = logging.getLogger(__name__)

HEALTH_CHECK = "/grpc.health.v1.Health/Check"


class GrpcHealthChecker:
    def __init__(
        self, registry: Registry, channels: GrpcChannels, settings: ProbeSettings
    ) -> None:
        self._registry = registry  # a view of the gRPC backends
        self._channels = channels
        self._settings = settings
        self.probes_sent = 0
        self.probes_failed = 0
        self.marked_up = 0
        self.marked_down = 0

    async def run(self) -> None:
        """Check every gRPC backend each interval, until cancelled."""
        while True:
            await self.check_all()
            await asyncio.sleep(self._settings.interval_s)

    async def check_all(self) -> None:
        backends = list(self._registry)
        await self._channels.close_idle(backends)
        async with asyncio.TaskGroup() as group:
            for backend in backends:
                if not backend.healthy or self._channels.has_channel(backend):
                    group.create_task(self.check_backend(backend))

    async def check_backend(self, backend: Backend) -> None:
        serving = await self._probe(backend)
        if serving is True and not backend.healthy:
            backend.mark_up()
            self.marked_up += 1
            log.info("gRPC backend %s is back in rotation", backend.address)
        elif serving is False and backend.healthy:
            backend.mark_down()
            self.marked_down += 1
            log.warning("gRPC backend %s reports NOT_SERVING: out of rotation", backend.address)

    async def _probe(self, backend: Backend) -> bool | None:
        """True: serving; False: the backend says it is not; None: no answer."""
        self.probes_sent += 1
        channel = self._channels.probe_channel(backend)
        timeout = self._settings.timeout_s
        try:
            if self._settings.mode == "connect":
                async with asyncio.timeout(timeout):
                    await channel.channel_ready()
                return True
            check = channel.unary_unary(
                HEALTH_CHECK,
                request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
                response_deserializer=health_pb2.HealthCheckResponse.FromString,
            )
            reply = await check(health_pb2.HealthCheckRequest(service=""), timeout=timeout)
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.UNIMPLEMENTED:
                return True
            self.probes_failed += 1
            return None
        except TimeoutError:
            self.probes_failed += 1
            return None
        serving: bool = reply.status == health_pb2.HealthCheckResponse.SERVING
        return serving

    def statistics(self) -> dict[str, int]:
        return {
            "probes_sent": self.probes_sent,
            "probes_failed": self.probes_failed,
            "marked_up": self.marked_up,
            "marked_down": self.marked_down,
        }

    def __repr__(self) -> str:
        return f"GrpcHealthChecker({self._settings.mode}, every {self._settings.interval_s}s)"
