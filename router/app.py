"""The composition root: builds every part from a ``RouterConfig`` and owns their lifecycle."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prometheus_client.registry import CollectorRegistry

from router.balance.policies import make_policy
from router.control.access_log import JsonLinesAccessLog
from router.control.admin import AdminServer
from router.control.metrics import RouterCollector
from router.control.spawner import Spawner
from router.core.clock import Clock, MonotonicClock
from router.core.config import BackendConfig, RouterConfig, parse_host_port, substitute
from router.core.types import BackendSpec
from router.dispatch.backends import Backend, Registry
from router.dispatch.scheduler import Dispatcher
from router.dispatch.stats import DataPlaneStats, GrpcStats
from router.frontdoor.grpc.server import GrpcFrontDoor
from router.frontdoor.tcp.server import TcpFrontDoor
from router.health.ejection import PassiveEjection
from router.health.monitor import HealthMonitor, make_probers
from router.lifecycle.drain import DrainableFrontDoor, DrainCoordinator, DrainReport
from router.lifecycle.readiness import Readiness
from router.lifecycle.state import Lifecycle
from router.upstream.base import Upstream
from router.upstream.frame_connection import make_dialer
from router.upstream.grpc_channels import GrpcChannels
from router.upstream.grpc_limiter import GrpcCallLimiter
from router.upstream.pool import Pool

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class BoundAddresses:
    listen: tuple[str, int]
    admin: tuple[str, int]
    grpc: tuple[str, int] | None = None


class RouterApp:
    def __init__(
        self, config: RouterConfig, clock: Clock | None = None, log_dir: Path | None = None
    ) -> None:
        self.config = config
        self.clock = clock or MonotonicClock(asyncio.get_running_loop)
        self.stats = DataPlaneStats()
        self.ejection = PassiveEjection(config.health.failure_threshold)
        self.registry = Registry(
            on_failure=self.ejection, panic_threshold=config.health.panic_threshold
        )
        self.spawner = Spawner(log_dir=log_dir)
        a = config.access_log
        self.access_log = (
            JsonLinesAccessLog(a.path, a.buffer_lines) if a.path is not None else None
        )
        d = config.dispatch
        self.dispatcher = Dispatcher(
            self.registry, make_policy(d.policy), d, self.clock, self.stats,
            access_log=self.access_log,
        )
        self.lifecycle = Lifecycle()
        self.front_door = TcpFrontDoor(
            self.dispatcher, config.listener, config.drain, self.clock, self.lifecycle
        )
        g = config.grpc
        self.grpc_stats = GrpcStats()
        self.grpc_channels = GrpcChannels(
            self.clock, max_message_bytes=g.max_message_bytes,
            idle_timeout_s=g.channel_idle_timeout_s, reconnect_max_s=g.reconnect_backoff_max_s,
        )
        # One monitor; each protocol's prober: frames (or connects) for TCP, grpc.health for gRPC.
        self.health = HealthMonitor(
            self.registry, make_probers(config.health, self.grpc_channels), config.health,
            self.clock, ejection=self.ejection,
        )
        self.readiness = Readiness(self.registry, self.lifecycle)
        self.grpc_front: GrpcFrontDoor | None = None
        front_doors: list[DrainableFrontDoor] = [self.front_door]
        if g.listen is not None:
            self.grpc_front = GrpcFrontDoor(
                self.dispatcher, self.registry, self.grpc_channels, self.clock,
                g, d.request_timeout_s, config.drain.linger_s, self.grpc_stats,
                self.readiness, self.lifecycle, self.access_log,
            )
            front_doors.append(self.grpc_front)
        self.drain = DrainCoordinator(
            front_doors, self.dispatcher, self.lifecycle, config.drain.shutdown_grace_s,
            self.clock,
        )
        self.metrics = CollectorRegistry()
        self.metrics.register(
            RouterCollector(
                self.stats, self.registry, lambda: self.dispatcher.queue.waiting,
                grpc=self.grpc_stats if self.grpc_front is not None else None,
                access_log=self.access_log,
            )
        )
        self.admin = AdminServer(self.registry, self.metrics, self.readiness, self.statistics)
        self.bound: BoundAddresses | None = None

    async def _add_backend(self, entry: BackendConfig) -> Backend:
        host, port = parse_host_port(entry.address)
        if entry.command:
            spawned = await self.spawner.spawn(substitute(entry.command, port))
            port = spawned.port
        address = f"{host}:{port}"
        spec = BackendSpec(
            id=address, address=address, protocol=entry.protocol, models=entry.models,
            weight=entry.weight, source="static",
        )
        upstream: Upstream
        if spec.protocol == "grpc":
            upstream = GrpcCallLimiter(self.config.grpc.max_calls_per_backend, address)
        else:
            dial = make_dialer(host, port, self.config.listener.max_frame_bytes)
            upstream = Pool(dial, self.config.pool, self.clock, name=address)
        backend = Backend(spec, upstream)
        self.registry.add(backend)
        return backend

    async def start(self) -> BoundAddresses:
        if self.access_log is not None:
            self.access_log.start()  # OSError: the file cannot be opened
        for spec in self.config.backends:
            await self._add_backend(spec)
        lst = self.config.listener
        host, port = parse_host_port(lst.listen)
        listen = await self.front_door.start(
            host, port, backlog=lst.backlog, reuse_port=lst.reuse_port
        )
        grpc_bound = None
        if self.grpc_front is not None and self.config.grpc.listen is not None:
            grpc_host, grpc_port = parse_host_port(self.config.grpc.listen)
            grpc_bound = await self.grpc_front.start(
                grpc_host, grpc_port, reuse_port=lst.reuse_port
            )
        admin = await self.admin.start(*parse_host_port(self.config.admin.listen))
        self.bound = BoundAddresses(listen, admin, grpc_bound)
        return self.bound

    async def run(self, stop: Awaitable[object]) -> DrainReport:
        """Start, serve until ``stop`` resolves, drain, and release everything."""
        try:
            await self.start()
            return await self.serve(stop)
        finally:
            await self.close()

    async def serve(self, stop: Awaitable[object]) -> DrainReport:
        async with asyncio.TaskGroup() as group:
            health = group.create_task(self.health.run(), name="health")
            report = await self.drain.wait_and_drain(stop)
            health.cancel()
        return report

    async def close(self) -> None:
        self.front_door.stop_accepting()
        if self.grpc_front is not None:
            await self.grpc_front.close()
        await self.grpc_channels.close_all()
        self.registry.close()
        self.dispatcher.close()
        await self.admin.close()
        await self.spawner.stop_all()
        if self.access_log is not None:
            await asyncio.to_thread(self.access_log.close)  # the last lines, then the file

    def statistics(self) -> dict[str, Any]:
        return {
            "dispatch": self.dispatcher.statistics(),
            "listener": self.front_door.statistics(),
            "grpc": self.grpc_front.statistics() if self.grpc_front is not None else None,
            "health": self.health.statistics(),
            "phase": self.lifecycle.phase.value,
            "spawned": self.spawner.statistics(),
            "access_log": self.access_log.statistics() if self.access_log is not None else None,
        }

    def __repr__(self) -> str:
        return f"RouterApp(bound={self.bound}, backends={len(self.registry)})"
