"""The prober for gRPC backends: ``grpc.health.v1.Health/Check`` over their channels.

``plan`` closes the channels idle for ``idle_timeout_s`` (probes do not count as use), then
picks every backend out of rotation and every backend with an open channel: a healthy backend
with no open channel is not dialled just to be probed.

``probe`` asks Check for the whole server (service ""). SERVING is SERVING, and so is
UNIMPLEMENTED: the backend answered and has no health service. Any other status it reports
(NOT_SERVING, SERVICE_UNKNOWN) is NOT_SERVING: the backend says so itself, so it goes out at
once. Any other failure is NO_ANSWER. With ``connect_only`` (probe = "connect") the channel
only has to connect.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import grpc
from grpc_health.v1 import health_pb2

from router.dispatch.backends import Backend
from router.health.probe import ProbeResult
from router.upstream.grpc_channels import GrpcChannels

HEALTH_CHECK = "/grpc.health.v1.Health/Check"
_SERVING = health_pb2.HealthCheckResponse.SERVING


class GrpcHealthProber:
    def __init__(
        self, channels: GrpcChannels, timeout_s: float, *, connect_only: bool = False
    ) -> None:
        self._channels = channels
        self._timeout_s = timeout_s
        self._connect_only = connect_only

    async def plan(self, backends: Sequence[Backend]) -> Sequence[Backend]:
        await self._channels.close_idle(backends)
        return [b for b in backends if not b.healthy or self._channels.has_channel(b)]

    async def probe(self, backend: Backend) -> ProbeResult:
        channel = self._channels.probe_channel(backend)
        timeout = self._timeout_s
        try:
            if self._connect_only:
                async with asyncio.timeout(timeout):
                    await channel.channel_ready()
                return ProbeResult.serving("its channel connected")
            check = channel.unary_unary(
                HEALTH_CHECK,
                request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
                response_deserializer=health_pb2.HealthCheckResponse.FromString,
            )
            reply = await check(health_pb2.HealthCheckRequest(service=""), timeout=timeout)
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.UNIMPLEMENTED:
                return ProbeResult.serving("answered (it has no grpc.health service)")
            return ProbeResult.no_answer(f"grpc.health Check failed: {exc.code().name}")
        except TimeoutError:
            return ProbeResult.no_answer(f"no connection within {timeout}s")
        if reply.status == _SERVING:
            return ProbeResult.serving("grpc.health says SERVING")
        status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
        return ProbeResult.not_serving(f"grpc.health says {status}")

    def __repr__(self) -> str:
        mode = "connect" if self._connect_only else "check"
        return f"GrpcHealthProber({mode}, timeout_s={self._timeout_s})"
