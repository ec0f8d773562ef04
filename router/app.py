"""The composition root: builds every part from a ``RouterConfig`` and owns their lifecycle.

TLS: every listener's ``ServerTls`` and every backend's ``BackendTls`` are built here, when the
app is made, so a certificate that cannot be loaded is a ``ConfigError`` before anything
listens; ``reload_certificates`` re-reads all of them (SIGHUP).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prometheus_client.registry import CollectorRegistry

from router.balance.policies import make_policy
from router.control.admin import AdminAuth, AdminServer
from router.control.metrics import RouterCollector, SecurityCollector
from router.control.spawner import Spawner
from router.core.clock import Clock, MonotonicClock
from router.core.config import (
    BackendConfig,
    RouterConfig,
    ServerTlsConfig,
    parse_host_port,
    substitute,
)
from router.core.errors import ConfigError
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
from router.tls.context import BackendTls, ServerTls
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


def _server_tls(config: ServerTlsConfig | None, key: str, alpn: tuple[str, ...] = ()
                ) -> ServerTls | None:
    return ServerTls(config, key, alpn=alpn) if config is not None else None


class RouterApp:
    def __init__(
        self, config: RouterConfig, clock: Clock | None = None, log_dir: Path | None = None
    ) -> None:
        self.config = config
        # Listener name (the metrics label) -> its TLS; raises ConfigError for unusable files.
        self.server_tls: dict[str, ServerTls] = {
            name: tls for name, tls in (
                ("tcp", _server_tls(config.listener.tls, "listener.tls")),
                ("grpc", _server_tls(config.grpc.tls, "grpc.tls")),
                ("admin", _server_tls(config.admin.tls, "admin.tls", ("http/1.1",))),
            ) if tls is not None
        }
        self.backend_tls: dict[str, BackendTls] = {}  # backend address -> its TLS
        self.clock = clock or MonotonicClock(asyncio.get_running_loop)
        self.stats = DataPlaneStats()
        self.ejection = PassiveEjection(config.health.failure_threshold)
        self.registry = Registry(
            on_failure=self.ejection, panic_threshold=config.health.panic_threshold
        )
        self.spawner = Spawner(log_dir=log_dir)
        d = config.dispatch
        self.dispatcher = Dispatcher(
            self.registry, make_policy(d.policy), d, self.clock, self.stats
        )
        self.lifecycle = Lifecycle()
        self.front_door = TcpFrontDoor(
            self.dispatcher, config.listener, config.drain, self.clock, self.lifecycle,
            self.server_tls.get("tcp"),
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
                self.readiness, self.lifecycle, self.server_tls.get("grpc"),
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
            )
        )
        admin_tls = self.server_tls.get("admin")
        self.admin = AdminServer(
            self.registry, self.metrics, self.readiness, self.statistics,
            AdminAuth(config.admin, admin_tls), self.reload_certificates, admin_tls,
        )
        self.metrics.register(SecurityCollector(self.server_tls, self.admin.auth))
        self.bound: BoundAddresses | None = None

    async def _add_backend(self, entry: BackendConfig, key: str = "backends") -> Backend:
        host, port = parse_host_port(entry.address)
        tls_config = self.config.tls_of(entry)
        tls = None
        if tls_config is not None:
            tls_key = f"{key}.tls" if entry.tls is not None else "backend_tls"
            tls = BackendTls(tls_config, tls_key, host)
        if entry.command:
            spawned = await self.spawner.spawn(substitute(entry.command, port))
            port = spawned.port
        address = f"{host}:{port}"
        if tls is not None:
            self.backend_tls[address] = tls
        spec = BackendSpec(
            id=address, address=address, protocol=entry.protocol, models=entry.models,
            weight=entry.weight, source="static",
        )
        upstream: Upstream
        if spec.protocol == "grpc":
            upstream = GrpcCallLimiter(self.config.grpc.max_calls_per_backend, address)
            if tls is not None:
                self.grpc_channels.use_tls(address, tls)
        else:
            dial = make_dialer(host, port, self.config.listener.max_frame_bytes, tls)
            upstream = Pool(dial, self.config.pool, self.clock, name=address)
        backend = Backend(spec, upstream)
        self.registry.add(backend)
        return backend

    async def start(self) -> BoundAddresses:
        for i, spec in enumerate(self.config.backends):
            await self._add_backend(spec, f"backends[{i}]")
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

    def reload_certificates(self) -> list[str]:
        """Re-read every certificate, key, CA and the admin token (SIGHUP). New handshakes
        use the new files; open connections go on. Returns the problems (each one's files
        stay as they were), logged too."""
        problems: list[str] = []
        reloadable: list[ServerTls | BackendTls | AdminAuth] = [
            *self.server_tls.values(), *self.backend_tls.values(), self.admin.auth,
        ]
        for part in reloadable:
            try:
                part.reload()
            except ConfigError as exc:
                problems += exc.problems
        for problem in problems:
            log.error("certificate reload: %s (the running one stays)", problem)
        if not problems:
            log.info("certificates reloaded (%d listeners, %d backends)",
                     len(self.server_tls), len(self.backend_tls))
        return problems

    def statistics(self) -> dict[str, Any]:
        return {
            "dispatch": self.dispatcher.statistics(),
            "listener": self.front_door.statistics(),
            "grpc": self.grpc_front.statistics() if self.grpc_front is not None else None,
            "health": self.health.statistics(),
            "phase": self.lifecycle.phase.value,
            "spawned": self.spawner.statistics(),
        }

    def __repr__(self) -> str:
        return f"RouterApp(bound={self.bound}, backends={len(self.registry)})"
