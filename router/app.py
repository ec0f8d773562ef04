"""The composition root: builds every part from a ``RouterConfig`` and owns their lifecycle.

Reload (SIGHUP, ``POST /admin/reload``): the config source is read again and validated;
``config_diff.diff`` sorts the changes. One that needs a restart refuses the whole reload; so
does a new backend process that fails to start. Otherwise the live settings go to the parts
that hold them (``reconfigure``), for what starts from then on, and the fleet makes the
registry follow the new backends (join, change, drain). Reloads run one at a time.
TLS: every listener's ``ServerTls`` and every backend's ``BackendTls`` are built here, when the
app is made, so a certificate that cannot be loaded is a ``ConfigError`` before anything
listens; ``reload_certificates`` re-reads all of them (SIGHUP).
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import tempfile
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prometheus_client.registry import CollectorRegistry

from router.balance.affinity import AffinityPolicy, AffinitySettings
from router.balance.groups import PolicySpec, PolicyTable, build_table
from router.balance.policies import Policy, make_policy
from router.balance.residency import ResidencyView
from router.control.access_log import JsonLinesAccessLog
from router.control.admin import AdminAuth, AdminServer
from router.control.directory import BackendDirectory
from router.control.fleet import Fleet, Resolver, system_resolver
from router.control.instances.manager import InstanceManager
from router.control.metrics import (
    DirectoryCollector,
    InstanceCollector,
    ModelCollector,
    ReloadCollector,
    RouterCollector,
    SecurityCollector,
)
from router.control.models_api import ModelRouting, model_handlers
from router.control.registry_grpc import AdminGrpc
from router.control.residency import ResidencyFeed
from router.control.spawner import Spawner
from router.control.state import StateFile
from router.control.store import open_store
from router.core import config_diff
from router.core.clock import Clock, MonotonicClock
from router.core.config import BackendConfig, RouterConfig, ServerTlsConfig, parse_host_port
from router.core.config_diff import ReloadOutcome
from router.core.errors import (
    BackendError,
    ConfigError,
    InvalidInput,
    ListenFailed,
    RestartRequired,
    SpawnError,
)
from router.core.types import BackendSpec
from router.dispatch.backends import Backend, Registry
from router.dispatch.scheduler import Dispatcher
from router.dispatch.stats import DataPlaneStats, GrpcStats
from router.frontdoor.grpc.model_control import ModelController
from router.frontdoor.grpc.relay import RelayFrontDoor
from router.frontdoor.grpc.server import GrpcFrontDoor
from router.frontdoor.tcp.server import TcpFrontDoor
from router.health.ejection import PassiveEjection
from router.health.monitor import HealthMonitor, make_probers
from router.lifecycle.drain import DrainableFrontDoor, DrainCoordinator, DrainReport
from router.lifecycle.readiness import Readiness
from router.lifecycle.state import Lifecycle
from router.tls.context import BackendTls, ServerTls, reload_each
from router.upstream.base import Upstream
from router.upstream.frame_connection import make_dialer, make_unix_dialer
from router.upstream.grpc_channels import GrpcChannels
from router.upstream.grpc_limiter import GrpcCallLimiter
from router.upstream.h2_backend import H2Lifetime, H2Upstream, make_h2_dialer
from router.upstream.pool import Pool

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class BoundAddresses:
    listen: tuple[str, int]
    admin: tuple[str, int]
    grpc: tuple[str, int] | None = None
    admin_grpc: tuple[str, int] | None = None
    anyserve: tuple[str, int] | None = None


# Results of a reload, as counted in router_config_reloads_total{result}.
RELOAD_RESULTS = ("ok", "invalid", "restart_required", "failed")
def _server_tls(config: ServerTlsConfig | None, key: str, alpn: tuple[str, ...] = ()
                ) -> ServerTls | None:
    return ServerTls(config, key, alpn=alpn) if config is not None else None


class RouterApp:
    def __init__(
        self, config: RouterConfig, clock: Clock | None = None, log_dir: Path | None = None,
        source: Callable[[], RouterConfig] | None = None, resolver: Resolver = system_resolver,
    ) -> None:
        """``source`` reads the config again for a reload (it may raise ``ConfigError``);
        without one, a reload finds the config it started with."""
        self.config = config
        self._source = source or (lambda: self.config)
        # Listener name (the metrics label) -> its TLS; raises ConfigError for unusable files.
        self.server_tls: dict[str, ServerTls] = {
            name: tls for name, tls in (
                ("tcp", _server_tls(config.listener.tls, "listener.tls")),
                ("grpc", _server_tls(config.grpc.tls, "grpc.tls", ("h2",))),
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
        a = config.access_log
        self.access_log = (
            JsonLinesAccessLog(a.path, a.buffer_lines) if a.path is not None else None
        )
        d = config.dispatch
        # Which models each backend holds, for the affinity policy (kept across reloads).
        self.residency = ResidencyView(config.affinity.model_slots, config.affinity.concurrency)
        # The first affinity policy made: every later one (a model group's, a reload's)
        # shares its ledger of the work placed on each backend.
        self._affinity: AffinityPolicy | None = None
        self.dispatcher = Dispatcher(
            self.registry, build_table(config, self._policy), d, self.clock, self.stats,
            access_log=self.access_log,
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
        # Explicit model control's RepositoryModelLoad/Unload, on either engine.
        self.model_control = ModelController(self.grpc_channels, self.clock, d.request_timeout_s)
        self.grpc_front: GrpcFrontDoor | RelayFrontDoor | None = None
        front_doors: list[DrainableFrontDoor] = [self.front_door]
        if g.listen is not None and g.engine == "relay":
            self.grpc_front = relay = RelayFrontDoor(
                self.dispatcher, self.registry, self.clock, g, d.request_timeout_s,
                config.drain.linger_s, self.grpc_stats, self.readiness, self.lifecycle,
                self.server_tls.get("grpc"), self.access_log, self.model_control,
            )
            front_doors.append(relay)
            self.registry.add_join_listener(relay.health_changed)
        elif g.listen is not None:
            self.grpc_front = grpcio = GrpcFrontDoor(
                self.dispatcher, self.registry, self.grpc_channels, self.clock,
                g, d.request_timeout_s, config.drain.linger_s, self.grpc_stats,
                self.readiness, self.lifecycle, self.server_tls.get("grpc"), self.access_log,
                self.model_control,
            )
            front_doors.append(grpcio)
            # A backend that joins (reload, DNS) may make the router ready: tell the watchers.
            self.registry.add_join_listener(grpcio.health.changed)
        self.drain = DrainCoordinator(
            front_doors, self.dispatcher, self.lifecycle, config.drain.shutdown_grace_s,
            self.clock,
        )
        self.metrics = CollectorRegistry()
        self.metrics.register(
            RouterCollector(
                self.stats, self.registry, lambda: self.dispatcher.queue.waiting,
                grpc=self.grpc_stats if self.grpc_front is not None else None,
                limits=self.front_door.limit_statistics,
                access_log=self.access_log,
            )
        )
        self.reloads = dict.fromkeys(RELOAD_RESULTS, 0)
        self._reload_lock = asyncio.Lock()
        self.metrics.register(ReloadCollector(self.reloads))
        state_file = StateFile(config.state.file) if config.state.file is not None else None
        self.directory = BackendDirectory(
            self.registry, open_store(config.registry, self.clock), self._record_backend,
            state_file.part("backends", "static") if state_file is not None else None,
            allows=config.registry.allows,
        )
        self.metrics.register(DirectoryCollector(self.directory, state_file))
        self.residency_feed = ResidencyFeed(
            self.registry, self.residency, self.clock, self.grpc_channels,
            config.affinity.index_interval_s,
            active=lambda: any(isinstance(p, AffinityPolicy)
                               for p in self.dispatcher.routes.policies()),
        )
        self.directory.add_report_listener(self.residency_feed.reported)
        self.metrics.register(ModelCollector(self.dispatcher))
        self.instances = InstanceManager(
            config.manager, self.directory, self.clock, _instance_log_dir(log_dir),
            state_file.part("instances", "scaled") if state_file is not None else None,
        )
        self.metrics.register(InstanceCollector(self.instances))
        admin_tls = self.server_tls.get("admin")
        self.admin = AdminServer(
            self.registry, self.metrics, self.readiness, self.statistics, self.reload,
            AdminAuth(config.admin, admin_tls), self.reload_certificates, self.directory,
            admin_tls, self.instances,
            model_handlers(ModelRouting(self.dispatcher, self.residency, self.clock.now)),
        )
        self.metrics.register(SecurityCollector(self.server_tls, self.admin.auth))
        # admin.grpc_listen, admin.anyserve_listen: the directory over gRPC.
        self.admin_grpc = AdminGrpc(config.admin, self.directory, self.admin.auth, admin_tls)
        self.fleet = Fleet(self.registry, self._make_backend, self.spawner, self.clock,
                           resolver, release=self._release)
        self.bound: BoundAddresses | None = None

    def _policy(self, spec: PolicySpec) -> Policy:
        """The policy of ``spec`` (a listener's, a model group's or the default); the
        affinity policy reads the residency view."""
        a = self.config.affinity
        load_bound = spec.load_bound if spec.load_bound is not None else a.load_bound
        return make_policy(spec.name, lambda: self._affinity_policy(spec), load_bound)

    def _affinity_policy(self, spec: PolicySpec) -> AffinityPolicy:
        a = self.config.affinity
        settings = AffinitySettings(
            load_bound=spec.load_bound if spec.load_bound is not None else a.load_bound,
            min_residency_s=(spec.min_residency_s if spec.min_residency_s is not None
                             else a.min_residency_s),
            load_s=a.load_time_s, service_s=a.service_time_s,
            demand_window_s=a.demand_window_s,
        )
        policy = AffinityPolicy(self.residency, settings, self.clock.now, self._affinity)
        if self._affinity is None:
            self._affinity = policy
        return policy

    def _routes(self, new: RouterConfig) -> PolicyTable:
        """``new``'s policies per listener and model group; those whose spec is unchanged
        are the running objects, their state kept."""
        return build_table(new, self._policy, self.dispatcher.routes)

    def _make_backend(self, spec: BackendSpec, entry: BackendConfig, key: str) -> Backend:
        """The runtime record of a backend the config's ``entry`` (at ``key``) names."""
        tls_config = self.config.tls_of(entry)  # None for a unix socket (the config says so)
        tls = None
        if tls_config is not None:
            tls_key = f"{key}.tls" if entry.tls is not None else "backend_tls"
            tls = self.backend_tls[spec.address] = BackendTls(tls_config, tls_key, spec.host)
        return self.backend_of(spec, tls)

    def _record_backend(self, spec: BackendSpec) -> Backend:
        """The runtime record of a backend the directory adds (registered, API, managed):
        reached with ``[backend_tls]`` when it is on, except over a unix socket."""
        tls = None
        if self.config.backend_tls.enabled and not spec.is_unix:
            tls = BackendTls(self.config.backend_tls, "backend_tls", spec.host)
            self.backend_tls[spec.address] = tls
        return self.backend_of(spec, tls)

    def backend_of(self, spec: BackendSpec, tls: BackendTls | None = None) -> Backend:
        """The runtime record of ``spec``, whatever its source: an upstream of its protocol,
        over TCP (with ``tls``) or its unix socket (never TLS)."""
        if spec.is_unix and tls is not None:
            raise ValueError(f"{spec.address}: TLS over a unix socket is not supported")
        upstream: Upstream
        g = self.config.grpc
        if spec.protocol == "grpc" and g.engine == "relay":
            h2_dial = make_h2_dialer(
                None if spec.is_unix else spec.host, None if spec.is_unix else spec.port,
                spec.unix_path if spec.is_unix else None, tls=tls)
            upstream = H2Upstream(h2_dial, g.max_calls_per_backend, spec.address,
                                  max_connections=g.relay_connections_per_backend,
                                  lifetime=self._h2_lifetime(self.config))
            if tls is not None:  # its grpc.aio channel: probes, indexes, model control
                self.grpc_channels.use_tls(spec.address, tls)
        elif spec.protocol == "grpc":
            upstream = GrpcCallLimiter(self.config.grpc.max_calls_per_backend, spec.address)
            if tls is not None:
                self.grpc_channels.use_tls(spec.address, tls)
        else:
            max_frame = self.config.listener.max_frame_bytes
            def on_broken(error: BackendError) -> None:  # bytes nobody asked for, on no request
                pool.connection_failed(error)

            check = self.config.health.probe == "frame"
            if spec.is_unix:
                dial = make_unix_dialer(spec.unix_path, max_frame, on_broken, check=check)
            else:
                dial = make_dialer(spec.host, spec.port, max_frame, tls, on_broken, check=check)
            upstream = pool = Pool(dial, self.config.pool, self.clock, name=spec.address)
        return Backend(spec, upstream)

    async def _release(self, backend: Backend) -> None:
        """A backend has left: close its gRPC channel and forget its TLS, unless another
        joined at its address."""
        if self.registry.get(backend.address) is not None:
            return
        self.backend_tls.pop(backend.address, None)
        if backend.kind == "grpc":
            await self.grpc_channels.close_backend(backend.address)

    async def start(self) -> BoundAddresses:
        if self.access_log is not None:
            self.access_log.start()  # OSError: the file cannot be opened
        await self.fleet.start(self.config.backends)
        await self.directory.start()  # after the fleet: overrides of static backends apply
        await self.instances.start(self.config.instances)  # each replica ready, or failed
        lst = self.config.listener
        listen = await _listen("listener.listen", lst.listen, lambda host, port: (
            self.front_door.start(host, port, backlog=lst.backlog, reuse_port=lst.reuse_port)
        ))
        grpc_bound = None
        grpc_front = self.grpc_front
        if grpc_front is not None and self.config.grpc.listen is not None:
            async def start_grpc(host: str, port: int) -> tuple[str, int]:
                # grpc reports a port in use as a RuntimeError, after logging C-level lines of
                # its own: try the address first, for the kernel's own reason.
                socket.create_server((host, port), reuse_port=lst.reuse_port).close()
                try:
                    return await grpc_front.start(host, port, reuse_port=lst.reuse_port)
                except RuntimeError as exc:
                    raise OSError(str(exc)) from None

            grpc_bound = await _listen("grpc.listen", self.config.grpc.listen, start_grpc)
        admin = await _listen("admin.listen", self.config.admin.listen, self.admin.start)
        admin_grpc, anyserve = await self.admin_grpc.start(_listen)
        self.bound = BoundAddresses(listen, admin, grpc_bound, admin_grpc, anyserve)
        return self.bound

    # -- reload -------------------------------------------------------------------------------

    async def reload(self) -> ReloadOutcome:
        """Read the config source again and apply what changed, then re-read every certificate
        and key; never raises for a bad file (the outcome says why nothing changed). Logged and
        counted."""
        async with self._reload_lock:
            outcome = await self._reload()
            self.reload_certificates()  # rotated files are picked up on the same signal
        error = outcome.error
        if error is None:
            self.reloads["ok"] += 1
            log.info("config reloaded: %s", "; ".join(outcome.changes) or "nothing changed")
            return outcome
        result = ("invalid" if isinstance(error, InvalidInput) else
                  "restart_required" if isinstance(error, RestartRequired) else "failed")
        self.reloads[result] += 1
        problems = error.problems
        log.error("config reload refused, the running config stays: %s", "; ".join(problems))
        return outcome

    async def _reload(self) -> ReloadOutcome:
        try:
            new = await asyncio.to_thread(self._source)
        except ConfigError as exc:
            return ReloadOutcome(error=InvalidInput(exc.problems))
        old = self.config
        diff = config_diff.diff(old, new)
        if diff.restart:
            return ReloadOutcome(error=RestartRequired(list(diff.restart)))
        try:
            fresh = await self.fleet.prepare(new.backends, diff)
        except SpawnError as exc:
            return ReloadOutcome(error=exc)
        self.config = new  # new backends' pools and limiters are made from it
        self._reconfigure(old, new)
        self.fleet.commit(new.backends, diff, fresh)
        instances = await self.instances.reconfigure(new.instances)
        return ReloadOutcome((*diff.describe(old, new), *instances))

    def _reconfigure(self, old: RouterConfig, new: RouterConfig) -> None:
        """Hand the live settings (``config_diff.LIVE_KEYS``) to the parts that hold them."""
        d = new.dispatch
        self.dispatcher.reconfigure(d, self._routes(new))
        if isinstance(self.grpc_front, RelayFrontDoor):
            self.grpc_front.reconfigure(d.request_timeout_s)
        elif self.grpc_front is not None:
            self.grpc_front.forwarder.reconfigure(d.request_timeout_s)
        h = new.health
        self.ejection.failure_threshold = h.failure_threshold
        self.registry.panic_threshold = h.panic_threshold
        if h != old.health:
            self.health.reconfigure(make_probers(h, self.grpc_channels), h)
        max_calls = new.grpc.max_calls_per_backend
        calls_changed = max_calls != old.grpc.max_calls_per_backend
        for backend in [*self.registry, *self.registry.draining()]:
            upstream = backend.upstream
            if isinstance(upstream, Pool) and new.pool != old.pool:
                upstream.reconfigure(new.pool)
            elif isinstance(upstream, H2Upstream):
                lifetime = self._h2_lifetime(new)
                if calls_changed or lifetime != upstream.lifetime:
                    upstream.reconfigure(max_calls, lifetime)
            elif isinstance(upstream, GrpcCallLimiter) and calls_changed:
                upstream.reconfigure(max_calls)
        self.drain.grace_s = new.drain.shutdown_grace_s

    def _h2_lifetime(self, config: RouterConfig) -> H2Lifetime:
        """The relay's backend connections: the TCP pool's idle timeout and lifetime, the
        gRPC section's keepalive."""
        pool, g = config.pool, config.grpc
        return H2Lifetime(self.clock, pool.idle_timeout_s, pool.max_lifetime_s,
                          g.relay_keepalive_s, g.relay_keepalive_timeout_s)

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
            residency = group.create_task(self.residency_feed.run(), name="residency")
            report = await self.drain.wait_and_drain(stop)
            health.cancel()
            residency.cancel()
        return report

    async def close(self) -> None:
        await self.instances.close()  # its replicas deregister from the directory
        await self.admin_grpc.close()  # no call reaches the directory once it is closed
        await self.directory.close()
        await self.fleet.close()
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

    def reload_certificates(self) -> list[str]:
        """Re-read every certificate, key, CA and the admin token (SIGHUP). New handshakes
        use the new files; open connections go on. Returns the problems (each one's files
        stay as they were), logged too."""
        problems = reload_each(
            [*self.server_tls.values(), *self.backend_tls.values(), self.admin.auth]
        )
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
            "fleet": self.fleet.statistics(),
            "directory": self.directory.statistics(),
            "residency": self.residency_feed.statistics(),
            "model_control": self.model_control.statistics(),
            "instances": self.instances.statistics(),
            "admin_grpc": self.admin_grpc.statistics(),
            "reloads": dict(self.reloads),
            "access_log": self.access_log.statistics() if self.access_log is not None else None,
        }

    def __repr__(self) -> str:
        return f"RouterApp(bound={self.bound}, backends={len(self.registry)})"


def _instance_log_dir(log_dir: Path | None) -> Path:
    """Where replicas log unless manager.log_dir says: beside the router's own logs, or (a
    router without a log directory, as in tests) in a temporary directory of its own."""
    if log_dir is not None:
        return log_dir / "instances"
    return Path(tempfile.gettempdir()) / f"inference-router-{os.getpid()}" / "instances"


async def _listen(
    key: str, address: str, start: Callable[[str, int], Awaitable[tuple[str, int]]]
) -> tuple[str, int]:
    """Start a listener on ``address`` (config key ``key``); ``ListenFailed`` naming both and
    the cause if the address cannot be bound."""
    host, port = parse_host_port(address)
    try:
        return await start(host, port)
    except OSError as exc:
        raise ListenFailed.of(key, address, exc) from None
