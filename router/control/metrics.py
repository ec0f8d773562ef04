"""Prometheus exposition of the data-plane counters, built only when /metrics is scraped."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from router.balance.affinity import LOAD_SECONDS_BUCKETS, AffinityPolicy
from router.balance.policies import ConsistentHashBounded
from router.control.access_log import JsonLinesAccessLog
from router.control.admin import AdminAuth
from router.control.directory import BackendDirectory
from router.control.instances.manager import InstanceManager
from router.control.instances.replica import REPLICA_STATES
from router.control.state import StateFile
from router.core import build
from router.dispatch.backends import Registry
from router.dispatch.scheduler import Dispatcher
from router.dispatch.stats import DataPlaneStats, GrpcStats
from router.tls.context import ServerTls


class RouterCollector(Collector):
    """Reads the plain counters at scrape time."""

    def __init__(
        self,
        stats: DataPlaneStats,
        registry: Registry,
        queue_depth: Callable[[], int],
        extra: Callable[[], dict[str, float]] | None = None,
        grpc: GrpcStats | None = None,
        limits: Callable[[], Mapping[str, Any]] | None = None,
        access_log: JsonLinesAccessLog | None = None,
    ) -> None:
        """``limits``: the TCP front door's ``limit_statistics``."""
        self._stats = stats
        self._access_log = access_log
        self._grpc = grpc
        self._limits = limits
        self._registry = registry
        self._queue_depth = queue_depth
        self._extra = extra

    def collect(self) -> Iterator[Metric]:
        s = self._stats
        info = GaugeMetricFamily(
            "router_build_info", "1, labelled with the version and the build: compiled (the "
            "hot modules are mypyc extension modules) or pure.", labels=["version", "build"])
        info.add_metric([build.version(), build.build()], 1)
        yield info
        yield CounterMetricFamily(
            "router_requests_accepted", "Requests whose whole frame was read.", value=s.accepted
        )
        yield CounterMetricFamily(
            "router_requests_completed", "Requests answered by a backend.", value=s.completed
        )
        errored = CounterMetricFamily(
            "router_requests_errored", "Requests answered with a router error.", labels=["code"]
        )
        for code, count in sorted(s.errored.items()):
            errored.add_metric([code], count)
        yield errored
        yield CounterMetricFamily(
            "router_requests_dropped", "Accepted requests never answered.", value=s.dropped
        )
        yield CounterMetricFamily(
            "router_requests_retried", "Attempts retried on another backend.", value=s.retried
        )
        yield GaugeMetricFamily(
            "router_inflight_requests", "Accepted, not yet answered.", value=s.inflight
        )
        yield GaugeMetricFamily(
            "router_queue_depth", "Accepted requests waiting for a backend connection.",
            value=self._queue_depth()
        )
        hist = HistogramMetricFamily(
            "router_request_duration_seconds", "Accept-to-answer latency.", unit=""
        )
        hist.add_metric([], s.latency.cumulative(), sum_value=s.latency.total_s)
        yield hist
        yield from self._backend_metrics()
        if self._grpc is not None:
            yield from self._grpc_metrics(self._grpc)
        if self._limits is not None:
            yield from self._limit_metrics(self._limits())
        if self._access_log is not None:
            lines = CounterMetricFamily(
                "router_access_log_lines", "Access log lines by outcome.", labels=["outcome"]
            )
            lines.add_metric(["written"], self._access_log.written)
            lines.add_metric(["dropped"], self._access_log.dropped)
            yield lines
        if self._extra is not None:
            for name, value in self._extra().items():
                yield GaugeMetricFamily(name, name.replace("_", " "), value=value)

    @staticmethod
    def _grpc_metrics(grpc: GrpcStats) -> Iterator[Metric]:
        calls = CounterMetricFamily(
            "router_grpc_requests", "gRPC calls by method and status code.",
            labels=["method", "code"],
        )
        for method, codes in sorted(grpc.calls.items()):
            for code, count in sorted(codes.items()):
                calls.add_metric([method, code], count)
        yield calls
        hist = HistogramMetricFamily(
            "router_grpc_request_duration_seconds", "gRPC call durations, start to status."
        )
        hist.add_metric([], grpc.latency.cumulative(), sum_value=grpc.latency.total_s)
        yield hist

    @staticmethod
    def _limit_metrics(limits: Mapping[str, Any]) -> Iterator[Metric]:
        refused = CounterMetricFamily(
            "router_connections_refused", "Client connections refused over a limit.",
            labels=["limit"],
        )
        for limit, count in sorted(limits["connections_refused"].items()):
            refused.add_metric([limit], count)
        yield refused
        yield GaugeMetricFamily(
            "router_connections_open", "Client connections counted against "
            "listener.max_connections.", value=limits["counted_connections"],
        )
        yield CounterMetricFamily(
            "router_answer_writes", "Writes of answers to client connections (a write carries "
            "every answer ready for one connection).", value=limits["answer_writes"],
        )
        budget = limits["read_budget"]
        yield GaugeMetricFamily(
            "router_read_budget_bytes", "Bytes of partly read frames held (admitted frames "
            "whole).", value=budget["used_bytes"],
        )
        yield GaugeMetricFamily(
            "router_read_budget_limit_bytes", "listener.max_buffered_bytes.",
            value=budget["limit_bytes"],
        )
        yield GaugeMetricFamily(
            "router_read_budget_waiting_frames", "Frames waiting for room in the read budget.",
            value=budget["frames_waiting"],
        )
        events = CounterMetricFamily(
            "router_read_budget_events", "Frames that waited for room, were refused as larger "
            "than the budget, or were shed.", labels=["event"],
        )
        for event, key in (("waited", "waits_total"), ("too_large", "too_large_total"),
                           ("shed", "shed_total")):
            events.add_metric([event], budget[key])
        yield events

    def _backend_metrics(self) -> Iterator[Metric]:
        labels = ["backend"]
        families: dict[str, GaugeMetricFamily | CounterMetricFamily] = {
            "inflight": GaugeMetricFamily(
                "router_backend_inflight_requests", "In flight per backend.", labels=labels
            ),
            "requests": CounterMetricFamily(
                "router_backend_requests", "Attempts per backend.", labels=labels
            ),
            "failures": CounterMetricFamily(
                "router_backend_failures", "Failed attempts per backend.", labels=labels
            ),
            "healthy": GaugeMetricFamily(
                "router_backend_healthy", "1 if the backend is in rotation.", labels=labels
            ),
            "open": GaugeMetricFamily(
                "router_backend_pool_open_connections", "Open pooled connections.", labels=labels
            ),
            "idle": GaugeMetricFamily(
                "router_backend_pool_idle_connections", "Idle pooled connections.", labels=labels
            ),
        }
        for backend in self._registry:
            label = [backend.address]
            families["inflight"].add_metric(label, backend.inflight)
            families["requests"].add_metric(label, backend.requests_total)
            families["failures"].add_metric(label, backend.failures_total)
            families["healthy"].add_metric(label, 1.0 if backend.healthy else 0.0)
            if backend.pool is not None:  # frame backends; gRPC ones multiplex one channel
                pool = backend.pool.statistics()
                families["open"].add_metric(label, pool["open"])
                families["idle"].add_metric(label, pool["idle"])
        yield from families.values()
        yield GaugeMetricFamily(
            "router_backends_draining", "Backends removed from rotation, waiting for what is "
            "in flight on them before they leave.", value=len(self._registry.draining()),
        )


class ReloadCollector(Collector):
    """``router_config_reloads_total{result}``: reloads by outcome (ok, invalid,
    restart_required, failed)."""

    def __init__(self, counts: Mapping[str, int]) -> None:
        self._counts = counts

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(
            "router_config_reloads", "Config reloads (SIGHUP, POST /admin/reload) by result.",
            labels=["result"],
        )
        for result, count in self._counts.items():
            family.add_metric([result], count)
        yield family


class SecurityCollector(Collector):
    """TLS and admin authentication counters, by listener ("tcp", "grpc", "admin")."""

    def __init__(self, tls: Mapping[str, ServerTls], admin_auth: AdminAuth | None) -> None:
        self._tls = tls
        self._admin_auth = admin_auth

    def collect(self) -> Iterator[Metric]:
        labels = ["listener"]
        handshakes = CounterMetricFamily(
            "router_tls_handshake_failures", "TLS handshakes that failed (untrusted, expired "
            "or missing client certificate, plaintext to a TLS port).", labels=labels,
        )
        refused = CounterMetricFamily(
            "router_tls_clients_refused", "Clients (gRPC: calls) refused: certificate outside "
            "the allow-list, or none.", labels=labels,
        )
        reloads = CounterMetricFamily(
            "router_tls_reloads", "Certificate reloads (SIGHUP) by result.",
            labels=["listener", "result"],
        )
        for name, tls in sorted(self._tls.items()):
            handshakes.add_metric([name], tls.handshake_failures)
            refused.add_metric([name], tls.refused)
            reloads.add_metric([name, "ok"], tls.reloads)
            reloads.add_metric([name, "failed"], tls.reload_failures)
        yield from (handshakes, refused, reloads)
        if self._admin_auth is not None:
            admin = CounterMetricFamily(
                "router_admin_requests_refused", "Admin API requests refused, by code "
                "(UNAUTHORIZED, FORBIDDEN, CLIENT_NOT_ALLOWED).", labels=["code"],
            )
            for code, count in sorted(self._admin_auth.refused.items()):
                admin.add_metric([code], count)
            yield admin


class DirectoryCollector(Collector):
    """The directory's backends by state and source, and its registration, heartbeat, lease
    and state-file counters."""

    def __init__(self, directory: BackendDirectory, state_file: StateFile | None) -> None:
        self._directory = directory
        self._state_file = state_file

    def collect(self) -> Iterator[Metric]:
        d = self._directory
        backends = GaugeMetricFamily(
            "router_backends", "Backends by state and source.", labels=["state", "source"])
        for state, source, count in d.counts():
            backends.add_metric([state, source], count)
        yield backends
        registrations = CounterMetricFamily(
            "router_registrations", "Registrations (HTTP, gRPC, AnyServe) by result.",
            labels=["result"])
        for result, count in d.registrations.items():
            registrations.add_metric([result], count)
        yield registrations
        heartbeats = CounterMetricFamily(
            "router_heartbeats", "Lease renewals by result (lease_not_found: the backend "
            "registers again).", labels=["result"])
        for result, count in d.heartbeats.items():
            heartbeats.add_metric([result], count)
        yield heartbeats
        yield CounterMetricFamily(
            "router_lease_expirations", "Leases not renewed in time: the backend drained.",
            value=d.lease_expirations)
        saves = CounterMetricFamily(
            "router_state_saves", "Writes of the state file by result.", labels=["result"])
        stats = self._state_file.statistics() if self._state_file is not None else None
        saves.add_metric(["ok"], stats["saves_ok"] if stats else 0)
        saves.add_metric(["failed"], stats["saves_failed"] if stats else 0)
        yield saves


class ModelCollector(Collector):
    """Model routing: requests by model and outcome (hit, load, waited), the loads and
    evictions the policy caused, measured load times, and placements by policy and reason.
    Only the keyed policies have samples; the families are there whatever the policy."""

    def __init__(self, dispatcher: Dispatcher) -> None:
        self._dispatcher = dispatcher

    def collect(self) -> Iterator[Metric]:
        # Every policy the routes use (the default, the listeners', the model groups'): each
        # one's decisions are counted under its own name, summed over its objects.
        policies = self._dispatcher.routes.policies()
        requests = CounterMetricFamily(
            "router_model_requests", "Requests by model and outcome: hit (loaded there, "
            "started at once), load (sent where it had to be loaded), waited.",
            labels=["model", "outcome"])
        decisions = CounterMetricFamily(
            "router_route_decisions", "Placements of the keyed policies by reason.",
            labels=["policy", "reason"])
        hist = HistogramMetricFamily(
            "router_model_load_seconds", "Measured model load times (a load's answer time "
            "less the model's service time).")
        outcomes: Counter[tuple[str, str]] = Counter()
        reasons: Counter[tuple[str, str]] = Counter()
        loads = evictions = 0
        buckets = [0] * (len(LOAD_SECONDS_BUCKETS) + 1)
        seconds = 0.0
        affinities = [p for p in policies if isinstance(p, AffinityPolicy)]
        for affinity in affinities:
            for model, numbers in affinity.numbers().items():
                for outcome in ("hit", "load", "waited"):
                    outcomes[model, outcome] += numbers.outcomes.get(outcome, 0)
            for reason, count in affinity.reasons.items():
                reasons[affinity.name, reason] += count
            loads, evictions = loads + affinity.loads, evictions + affinity.evictions
            buckets = [a + b for a, b in zip(buckets, affinity.load_buckets, strict=True)]
            seconds += affinity.load_seconds_sum
        for policy in policies:
            if isinstance(policy, ConsistentHashBounded):
                reasons[policy.name, "first"] += policy.placed - policy.spilled
                reasons[policy.name, "spill"] += policy.spilled
        for (model, outcome), count in outcomes.items():
            requests.add_metric([model, outcome], count)
        for (name, reason), count in sorted(reasons.items()):
            decisions.add_metric([name, reason], count)
        if affinities:
            counts, running = [], 0
            for bound, count in zip(LOAD_SECONDS_BUCKETS, buckets, strict=False):
                running += count
                counts.append((str(bound), float(running)))
            counts.append(("+Inf", float(running + buckets[-1])))
            hist.add_metric([], counts, sum_value=seconds)
        yield requests
        yield decisions
        yield CounterMetricFamily("router_model_loads", "Model loads the router's placements "
                                  "caused (a request sent where its model was absent).",
                                  value=loads)
        yield CounterMetricFamily("router_model_evictions", "Models the router predicted "
                                  "evicted to make room for a load.", value=evictions)
        yield hist
class InstanceCollector(Collector):
    """The replica manager: instances created, deleted and active, restarts by instance and
    reason, failed health checks by instance, and each replica's state (1 for the state it
    is in, 0 for the others, so a series never disappears while its replica exists)."""

    def __init__(self, manager: InstanceManager) -> None:
        self._manager = manager

    def collect(self) -> Iterator[Metric]:
        m = self._manager
        yield CounterMetricFamily("router_instances_created", "Instances added through the "
                                  "admin API.", value=m.created)
        yield CounterMetricFamily("router_instances_deleted", "Instances deleted through the "
                                  "admin API.", value=m.deleted)
        yield GaugeMetricFamily("router_instances_active", "Managed instances.", value=m.active)
        restarts = CounterMetricFamily(
            "router_instance_restarts", "Replica restarts by instance and reason (exited, "
            "health, startup, requested).", labels=["instance", "reason"])
        for (instance, reason), count in sorted(m.restarts.items()):
            restarts.add_metric([instance, reason], count)
        yield restarts
        failures = CounterMetricFamily(
            "router_instance_health_check_failures", "Failed health checks of replicas, by "
            "instance.", labels=["instance"])
        for instance, count in sorted(m.health_failures.items()):
            failures.add_metric([instance], count)
        yield failures
        states = GaugeMetricFamily(
            "router_instance_state", "1 for the state each replica is in.",
            labels=["instance", "replica", "state"])
        for replica in m.replicas():
            for state in REPLICA_STATES:
                states.add_metric([replica.instance.name, str(replica.index), state],
                                  1.0 if replica.state == state else 0.0)
        yield states
