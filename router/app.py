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
from router.control.admin import AdminServer
from router.control.metrics import RouterCollector
from router.control.spawner import Spawner
from router.core.clock import Clock, MonotonicClock
from router.core.config import BackendConfig, RouterConfig, parse_host_port, substitute
from router.dispatch.backends import Backend, Registry
from router.dispatch.scheduler import Dispatcher, DispatchSettings
from router.dispatch.stats import DataPlaneStats, GrpcStats
from router.frontdoor.grpc.server import GrpcFrontDoor, GrpcSettings
from router.frontdoor.tcp.server import TcpFrontDoor
from router.health.grpc import GrpcHealthChecker
from router.health.monitor import HealthChecker, ProbeSettings
from router.lifecycle.drain import DrainableFrontDoor, DrainCoordinator, DrainReport
from router.upstream.frame_connection import make_dialer
from router.upstream.grpc_channels import GrpcChannels
from router.upstream.pool import Pool, PoolLimits

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
        self.registry = Registry()
        self.spawner = Spawner(log_dir=log_dir)
        d = config.dispatch
        self.dispatcher = Dispatcher(
            self.registry,
            make_policy(d.policy),
            DispatchSettings(d.workers, d.queue_size, d.queue_timeout_s, d.request_timeout_s,
                             d.max_retries),
            self.clock,
            self.stats,
        )
        self.front_door = TcpFrontDoor(self.dispatcher, config.listener, config.drain, self.clock)
        p = config.pool
        probes = ProbeSettings(p.probe, p.probe_interval_s, p.probe_timeout_s)
        # Each checker probes its own kind: frames for TCP backends, grpc.health for gRPC.
        self.health = HealthChecker(self.registry.view("tcp"), probes)
        g = config.grpc
        self.grpc_stats = GrpcStats()
        self.grpc_channels = GrpcChannels(
            self.clock, max_message_bytes=g.max_message_bytes, idle_timeout_s=p.idle_timeout_s,
            reconnect_max_s=p.probe_interval_s,
        )
        self.grpc_health = GrpcHealthChecker(self.registry.view("grpc"), self.grpc_channels, probes)
        self.grpc_front: GrpcFrontDoor | None = None
        front_doors: list[DrainableFrontDoor] = [self.front_door]
        if g.listen is not None:
            self.grpc_front = GrpcFrontDoor(
                self.dispatcher, self.registry, self.grpc_channels, self.clock,
                GrpcSettings(g.max_message_bytes, d.request_timeout_s, config.drain.linger_s),
                self.grpc_stats,
            )
            front_doors.append(self.grpc_front)
        self.drain = DrainCoordinator(
            front_doors, self.dispatcher, config.drain.shutdown_grace_s, self.clock
        )
        self.metrics = CollectorRegistry()
        self.metrics.register(
            RouterCollector(
                self.stats, self.registry, lambda: self.dispatcher.queue.waiting,
                grpc=self.grpc_stats if self.grpc_front is not None else None,
            )
        )
        self.admin = AdminServer(
            self.registry, self.metrics, lambda: self.drain.draining, self.statistics
        )
        self.bound: BoundAddresses | None = None

    async def _add_backend(self, spec: BackendConfig) -> Backend:
        host, port = parse_host_port(spec.address)
        if spec.command:
            spawned = await self.spawner.spawn(substitute(spec.command, port))
            port = spawned.port
        p = self.config.pool
        address = f"{host}:{port}"
        pool = Pool(
            make_dialer(host, port, self.config.listener.max_frame_bytes),
            PoolLimits(p.max_connections, p.connect_timeout_s, p.idle_timeout_s, p.max_lifetime_s,
                       p.pipeline_depth),
            self.clock,
            name=address,
        )
        grpc = spec.protocol == "grpc"
        backend = Backend(host, port, pool, weight=spec.weight, models=spec.models,
                          failure_threshold=p.failure_threshold, kind=spec.protocol,
                          call_limit=self.config.grpc.max_calls_per_backend if grpc else 0)
        self.registry.add(backend)
        return backend

    async def start(self) -> BoundAddresses:
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
            workers = group.create_task(self.dispatcher.run(), name="workers")
            health = group.create_task(self.health.run(), name="health")
            grpc_health = group.create_task(self.grpc_health.run(), name="grpc-health")
            report = await self.drain.wait_and_drain(stop)
            workers.cancel()
            health.cancel()
            grpc_health.cancel()
        return report

    async def close(self) -> None:
        self.front_door.stop_accepting()
        if self.grpc_front is not None:
            await self.grpc_front.close()
        await self.grpc_channels.close_all()
        self.registry.close()
        await self.admin.close()
        await self.spawner.stop_all()

    def statistics(self) -> dict[str, Any]:
        return {
            "dispatch": self.dispatcher.statistics(),
            "listener": self.front_door.statistics(),
            "grpc": self.grpc_front.statistics() if self.grpc_front is not None else None,
            "grpc_health": self.grpc_health.statistics(),
            "health": self.health.statistics(),
            "draining": self.drain.draining,
            "spawned": self.spawner.statistics(),
        }

    def __repr__(self) -> str:
        return f"RouterApp(bound={self.bound}, backends={len(self.registry)})"
