"""Channels to gRPC backends, and their health checks.

``GrpcChannels`` keeps one ``grpc.aio`` channel per gRPC backend: created on first use, shared
by every call to that backend (HTTP/2 multiplexes them over one connection), and closed by
``close_idle`` once the backend has carried nothing for ``idle_timeout_s``. Unary callables are
cached per method, since building one costs about as much as a small call's Python overhead.

``GrpcHealthChecker`` is the gRPC counterpart of ``health.HealthChecker`` (which probes with
length-prefixed frames). Each pass, for every gRPC backend that is out of rotation or has an
open channel, it asks ``grpc.health.v1.Health/Check`` (probe "frame"; "connect" only waits for
the channel to connect). SERVING, or UNIMPLEMENTED (the backend answered but has no health
service), brings a backend back; NOT_SERVING takes it out at once, since the backend says so
itself. A probe that fails does nothing more, as for TCP: requests that fail mark a backend
down (``failure_threshold``). A healthy backend with no open channel is not dialled just to be
probed. Probes do not count as use, so a channel that only carries probes still goes idle.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import Any

import grpc
from grpc_health.v1 import health_pb2

from router.clock import Clock
from router.health import ProbeSettings
from router.registry import Backend, Registry

log = logging.getLogger(__name__)

HEALTH_CHECK = "/grpc.health.v1.Health/Check"


def channel_options(max_message_bytes: int, reconnect_max_s: float) -> list[tuple[str, Any]]:
    return [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
        # The router retries on another backend itself, within its own budget.
        ("grpc.enable_retries", 0),
        # Its own subchannel per channel, so closing one never touches another's connection.
        ("grpc.use_local_subchannel_pool", 1),
        # gRPC's default backoff grows to 120 s; a restarted backend should be found by the
        # next probe (probe_interval_s), not minutes later.
        ("grpc.initial_reconnect_backoff_ms", 100),
        ("grpc.min_reconnect_backoff_ms", 100),
        ("grpc.max_reconnect_backoff_ms", int(reconnect_max_s * 1000)),
    ]


@dataclass(eq=False)
class _Entry:
    channel: grpc.aio.Channel
    last_used: float
    unary: dict[str, grpc.aio.UnaryUnaryMultiCallable] = field(default_factory=dict)


class GrpcChannels:
    def __init__(
        self, clock: Clock, *, max_message_bytes: int, idle_timeout_s: float,
        reconnect_max_s: float = 2.0,
    ) -> None:
        self._clock = clock
        self._options = channel_options(max_message_bytes, reconnect_max_s)
        self._idle_timeout_s = idle_timeout_s
        self._entries: dict[str, _Entry] = {}
        self.opened = 0
        self.closed = 0

    def _entry(self, backend: Backend, *, use: bool = True) -> _Entry:
        entry = self._entries.get(backend.address)
        now = self._clock.now()
        if entry is None:
            channel = grpc.aio.insecure_channel(backend.address, options=self._options)
            entry = self._entries[backend.address] = _Entry(channel, now)
            self.opened += 1
        elif use:
            entry.last_used = now
        return entry

    def channel(self, backend: Backend) -> grpc.aio.Channel:
        return self._entry(backend).channel

    def unary(self, backend: Backend, method: str) -> grpc.aio.UnaryUnaryMultiCallable:
        """A raw-bytes unary callable for ``method`` on ``backend``'s channel."""
        entry = self._entry(backend)
        callable_ = entry.unary.get(method)
        if callable_ is None:
            callable_ = entry.unary[method] = entry.channel.unary_unary(method)
        return callable_

    def probe_channel(self, backend: Backend) -> grpc.aio.Channel:
        """The backend's channel, opened if need be, without counting as use."""
        return self._entry(backend, use=False).channel

    def has_channel(self, backend: Backend) -> bool:
        return backend.address in self._entries

    async def close_idle(self, backends: list[Backend]) -> int:
        """Close the channels of backends with nothing in flight for ``idle_timeout_s``."""
        deadline = self._clock.now() - self._idle_timeout_s
        idle = [
            b for b in backends
            if (e := self._entries.get(b.address)) and b.inflight == 0 and e.last_used <= deadline
        ]
        for backend in idle:
            await self._close(backend.address)
        return len(idle)

    async def _close(self, address: str) -> None:
        entry = self._entries.pop(address, None)
        if entry is not None:
            self.closed += 1
            await entry.channel.close()

    async def close_all(self) -> None:
        for address in list(self._entries):
            await self._close(address)

    def statistics(self) -> dict[str, int]:
        return {"open": len(self._entries), "opened": self.opened, "closed": self.closed}

    def __repr__(self) -> str:
        return f"GrpcChannels(open={len(self._entries)})"


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
