"""The health monitor: one periodic pass over every backend, whatever its protocol.

A pass (``check_all``) gives each prober the backends of its protocol (``probers``, keyed by
``Backend.kind``; see ``router.health.probe`` for the contract), probes the backends it picks,
all at once, and applies each answer: SERVING brings a backend out of rotation back,
NOT_SERVING takes one in rotation out, NO_ANSWER changes nothing (passive ejection takes a
failing backend out; one lost probe does not). ``run`` repeats the pass every
``HealthConfig.interval_s``, measured on the injected clock from the start of each pass.

Every change of a backend's state, whoever made it (a probe here, passive ejection, an
operator), reaches the monitor through the registry's listeners and is logged once, at INFO,
with its reason. Probes themselves are not logged.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence

from router.core.clock import Clock
from router.core.config import HealthConfig
from router.dispatch.backends import Backend, Registry
from router.health.ejection import PassiveEjection
from router.health.frame import ConnectProber, FrameProber
from router.health.grpc import GrpcHealthProber
from router.health.probe import Prober, ProbeResult, ProbeStatus
from router.upstream.grpc_channels import GrpcChannels

log = logging.getLogger(__name__)


def make_probers(config: HealthConfig, channels: GrpcChannels) -> dict[str, Prober]:
    """The prober for each backend protocol, as ``config.probe`` asks."""
    frame = config.probe == "frame"
    return {
        "tcp": FrameProber(config.timeout_s) if frame else ConnectProber(),
        "grpc": GrpcHealthProber(channels, config.timeout_s, connect_only=not frame),
    }


class HealthMonitor:
    def __init__(
        self,
        registry: Registry,
        probers: Mapping[str, Prober],
        config: HealthConfig,
        clock: Clock,
        *,
        ejection: PassiveEjection | None = None,
        sleep: Callable[[float], Awaitable[object]] = asyncio.sleep,
    ) -> None:
        self._registry = registry
        self._probers = dict(probers)
        self._interval_s = config.interval_s
        self._clock = clock
        self._ejection = ejection
        self._sleep = sleep
        self.passes = 0  # completed by run()
        self.probes_sent = 0
        self.probes_failed = 0
        self.marked_up = 0
        self.marked_down = 0
        registry.add_listener(self._log_change)

    def reconfigure(self, probers: Mapping[str, Prober], config: HealthConfig) -> None:
        """New probers and interval (a reload), from the next pass on."""
        self._probers = dict(probers)
        self._interval_s = config.interval_s

    async def run(self) -> None:
        """A pass every ``interval_s``, until cancelled; a pass that overruns is followed by
        the next at once."""
        while True:
            started = self._clock.now()
            await self.check_all()
            self.passes += 1
            await self._sleep(max(0.0, started + self._interval_s - self._clock.now()))

    async def check_all(self) -> None:
        """One pass over every backend that has a prober for its protocol."""
        by_kind: dict[str, list[Backend]] = {}
        for backend in self._registry:
            if backend.kind in self._probers:
                by_kind.setdefault(backend.kind, []).append(backend)
        async with asyncio.TaskGroup() as group:
            for kind, backends in by_kind.items():
                group.create_task(self._check_kind(self._probers[kind], backends))

    async def _check_kind(self, prober: Prober, backends: Sequence[Backend]) -> None:
        due = await prober.plan(backends)
        async with asyncio.TaskGroup() as group:
            for backend in due:
                group.create_task(self._check(prober, backend))

    async def _check(self, prober: Prober, backend: Backend) -> None:
        self.probes_sent += 1  # counted as it starts, so the count shows a probe in flight
        self._apply(backend, await prober.probe(backend))

    def _apply(self, backend: Backend, result: ProbeResult) -> None:
        if result.status is ProbeStatus.NO_ANSWER:
            self.probes_failed += 1
        elif result.status is ProbeStatus.SERVING:
            if not backend.healthy:
                self.marked_up += 1
                backend.mark_up(result.reason)
        elif backend.healthy:
            self.marked_down += 1
            backend.mark_down(result.reason)

    def _log_change(self, backend: Backend, reason: str) -> None:
        if backend.draining:
            return  # the fleet logs joins, drains and leaves
        state = "back in rotation" if backend.healthy and not backend.drained else \
            "out of rotation"
        log.info("%s backend %s %s: %s", backend.kind, backend.address, state, reason)

    def statistics(self) -> dict[str, int]:
        return {
            "passes": self.passes,
            "probes_sent": self.probes_sent,
            "probes_failed": self.probes_failed,
            "marked_up": self.marked_up,
            "marked_down": self.marked_down,
            "ejected": self._ejection.ejected if self._ejection is not None else 0,
        }

    def __repr__(self) -> str:
        kinds = ",".join(sorted(self._probers))
        return f"HealthMonitor({kinds}, every {self._interval_s}s)"
