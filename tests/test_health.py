"""The health monitor and passive ejection against fake probers: no sockets, no sleeps.

Backends are real ``Backend`` records over pools whose dialer is never called (the fake
probers do not dial); every transition of a backend's state is driven by one ``check_all()``
or by ``record_failure()``, and read back from the backend, the monitor's ``statistics()`` and
its log.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

import pytest

from router.core.clock import ManualClock
from router.core.config import HealthConfig
from router.core.types import Protocol
from router.dispatch.backends import Backend, Registry
from router.health.ejection import PassiveEjection
from router.health.monitor import HealthMonitor
from router.health.probe import Prober, ProbeResult
from tests import fakes

CONFIG = HealthConfig(interval_s=2.0, timeout_s=1.0, failure_threshold=3)
LOGGER = "router.health.monitor"


def make_backend(index: int, kind: Protocol = "tcp") -> Backend:
    return fakes.make_backend(f"10.0.0.{index}:9000", kind)


class FakeProber:
    """Answers each backend with the result set for its address; records what it was asked.
    ``skip`` holds the addresses ``plan`` leaves out; ``gate``, when set, holds every probe
    until it is set."""

    def __init__(self) -> None:
        self.answers: dict[str, ProbeResult] = {}
        self.skip: set[str] = set()
        self.plans: list[list[str]] = []
        self.probed: list[str] = []
        self.gate: asyncio.Event | None = None

    async def plan(self, backends: Sequence[Backend]) -> Sequence[Backend]:
        self.plans.append([b.address for b in backends])
        return [b for b in backends if b.address not in self.skip]

    async def probe(self, backend: Backend) -> ProbeResult:
        self.probed.append(backend.address)
        if self.gate is not None:
            await self.gate.wait()
        return self.answers[backend.address]


SERVING = ProbeResult.serving("answered a frame probe")
NOT_SERVING = ProbeResult.not_serving("grpc.health says NOT_SERVING")
NO_ANSWER = ProbeResult.no_answer("connect failed: refused")


class Setup:
    def __init__(self, *kinds: str, probers: dict[str, Prober] | None = None) -> None:
        self.clock = ManualClock()
        self.ejection = PassiveEjection(CONFIG.failure_threshold)
        self.registry = Registry(on_failure=self.ejection)
        self.backends = [make_backend(i + 1, kind) for i, kind in enumerate(kinds)]
        for backend in self.backends:
            self.registry.add(backend)
        self.tcp, self.grpc = FakeProber(), FakeProber()
        if probers is None:
            probers = {"tcp": self.tcp, "grpc": self.grpc}
        self.monitor = HealthMonitor(
            self.registry, probers, CONFIG, self.clock, ejection=self.ejection
        )


def eject(backend: Backend) -> None:
    for _ in range(CONFIG.failure_threshold):
        backend.record_failure()
    assert not backend.healthy


# -- applying probe results: every (state, answer) pair ----------------------------------------


@pytest.mark.parametrize(
    ("start_up", "answer", "end_up", "counted"),
    [
        (False, SERVING, True, "marked_up"),
        (True, SERVING, True, None),
        (True, NOT_SERVING, False, "marked_down"),
        (False, NOT_SERVING, False, None),
        (True, NO_ANSWER, True, "probes_failed"),
        (False, NO_ANSWER, False, "probes_failed"),
    ],
)
async def test_each_answer_in_each_state(
    start_up: bool, answer: ProbeResult, end_up: bool, counted: str | None
) -> None:
    s = Setup("tcp")
    [backend] = s.backends
    if not start_up:
        backend.mark_down("operator")
    heard: list[tuple[bool, str]] = []
    s.registry.add_listener(lambda b, reason: heard.append((b.healthy, reason)))
    s.tcp.answers[backend.address] = answer

    await s.monitor.check_all()

    assert backend.healthy is end_up
    assert heard == ([(end_up, answer.reason)] if start_up is not end_up else [])
    stats = s.monitor.statistics()
    assert stats["probes_sent"] == 1
    for key in ("marked_up", "marked_down", "probes_failed"):
        assert stats[key] == (1 if key == counted else 0), (key, stats)


async def test_back_in_rotation_clears_the_failure_streak() -> None:
    s = Setup("tcp")
    [backend] = s.backends
    eject(backend)
    s.tcp.answers[backend.address] = SERVING

    await s.monitor.check_all()

    assert backend.healthy and backend.consecutive_failures == 0
    backend.record_failure()  # a new streak starts from one, not from three
    assert backend.healthy


# -- choosing the prober and the backends to probe -----------------------------------------------


async def test_each_protocol_gets_its_own_prober_and_plan() -> None:
    s = Setup("tcp", "grpc", "tcp", "grpc")
    tcp1, grpc2, tcp3, grpc4 = s.backends
    for backend in s.backends:
        (s.tcp if backend.kind == "tcp" else s.grpc).answers[backend.address] = SERVING
    s.grpc.skip = {grpc4.address}  # e.g. healthy and no open channel

    await s.monitor.check_all()

    assert s.tcp.plans == [[tcp1.address, tcp3.address]]
    assert s.grpc.plans == [[grpc2.address, grpc4.address]]
    assert sorted(s.tcp.probed) == [tcp1.address, tcp3.address]
    assert s.grpc.probed == [grpc2.address]
    assert s.monitor.statistics()["probes_sent"] == 3


async def test_a_protocol_without_a_prober_is_left_alone() -> None:
    s = Setup("tcp", "grpc", probers={})
    s.backends[1].mark_down("operator")
    await s.monitor.check_all()
    assert s.tcp.plans == [] and s.grpc.plans == []
    assert not s.backends[1].healthy


async def test_a_probe_counts_as_sent_while_it_is_in_flight() -> None:
    s = Setup("tcp")
    [backend] = s.backends
    backend.mark_down("operator")
    s.tcp.answers[backend.address] = SERVING
    s.tcp.gate = asyncio.Event()
    task = asyncio.ensure_future(s.monitor.check_all())
    for _ in range(10):  # a few steps of the pass, until the probe waits on the gate
        await asyncio.sleep(0)

    assert s.monitor.statistics()["probes_sent"] == 1
    assert not backend.healthy and not task.done()
    s.tcp.gate.set()
    async with asyncio.timeout(5):
        await task
    assert backend.healthy


# -- passive ejection ------------------------------------------------------------------------------


def test_the_threshold_th_consecutive_failure_ejects_once() -> None:
    s = Setup("tcp")
    [backend] = s.backends
    heard: list[str] = []
    s.registry.add_listener(lambda b, reason: heard.append(reason))
    backend.record_failure()
    backend.record_failure()
    assert backend.healthy
    backend.record_failure()
    assert not backend.healthy
    for _ in range(5):
        backend.record_failure()  # already out: no second ejection
    assert heard == ["ejected after 3 consecutive failures"]
    assert s.ejection.ejected == 1 and s.monitor.statistics()["ejected"] == 1


def test_a_success_resets_the_streak() -> None:
    s = Setup("tcp")
    [backend] = s.backends
    for _ in range(10):
        backend.record_failure()
        backend.record_failure()
        backend.record_success()
    assert backend.healthy
    assert (backend.failures_total, backend.requests_total) == (20, 30)
    assert s.ejection.ejected == 0


def test_a_removed_backend_is_no_longer_judged() -> None:
    s = Setup("tcp")
    [backend] = s.backends
    s.registry.remove(backend.address)
    eject_attempts = CONFIG.failure_threshold + 1
    for _ in range(eject_attempts):
        backend.record_failure()
    assert backend.healthy and s.ejection.ejected == 0


def test_the_threshold_must_be_positive() -> None:
    with pytest.raises(ValueError, match="failure_threshold"):
        PassiveEjection(0)


# -- logging: one INFO line per change, none per probe ---------------------------------------------


async def test_a_flap_logs_one_line_per_change_and_none_per_probe(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="router")
    s = Setup("tcp", "grpc")
    tcp, grpc = s.backends
    s.tcp.answers[tcp.address] = SERVING
    s.grpc.answers[grpc.address] = SERVING
    await s.monitor.check_all()  # both up at start and still up: no change, nothing logged
    assert caplog.records == []

    eject(tcp)  # down: ejected
    await s.monitor.check_all()  # back after a probe
    s.grpc.answers[grpc.address] = NOT_SERVING
    await s.monitor.check_all()  # the gRPC backend says NOT_SERVING
    await s.monitor.check_all()  # still NOT_SERVING: no change
    s.grpc.answers[grpc.address] = NO_ANSWER
    await s.monitor.check_all()  # no answer while out: no change
    s.grpc.answers[grpc.address] = SERVING
    await s.monitor.check_all()  # back
    tcp.mark_down("removed by an operator")

    lines = [(r.name, r.levelno, r.getMessage()) for r in caplog.records]
    assert lines == [
        (LOGGER, logging.INFO,
         f"tcp backend {tcp.address} out of rotation: ejected after 3 consecutive failures"),
        (LOGGER, logging.INFO, f"tcp backend {tcp.address} back in rotation: {SERVING.reason}"),
        (LOGGER, logging.INFO,
         f"grpc backend {grpc.address} out of rotation: {NOT_SERVING.reason}"),
        (LOGGER, logging.INFO, f"grpc backend {grpc.address} back in rotation: {SERVING.reason}"),
        (LOGGER, logging.INFO,
         f"tcp backend {tcp.address} out of rotation: removed by an operator"),
    ]
    assert s.monitor.statistics()["probes_sent"] == 12  # two backends, six passes


# -- the periodic loop -----------------------------------------------------------------------------


class Stop(Exception):
    """Raised by the fake sleep to end ``run`` after a bounded number of passes."""


async def test_run_starts_a_pass_every_interval_on_the_clock() -> None:
    s = Setup("tcp")
    [backend] = s.backends
    backend.mark_down("operator")
    s.tcp.answers[backend.address] = NO_ANSWER
    pass_lengths = iter([0.5, 0.0, 3.0, 0.25])  # the third overruns the 2 s interval
    waits: list[float] = []
    started: list[float] = []

    async def probe(b: Backend) -> ProbeResult:
        started.append(s.clock.now())
        s.clock.advance(next(pass_lengths))
        return NO_ANSWER

    async def sleep(seconds: float) -> None:
        waits.append(seconds)
        if len(waits) == 4:
            raise Stop
        s.clock.advance(seconds)

    s.tcp.probe = probe  # type: ignore[method-assign]
    monitor = HealthMonitor(s.registry, {"tcp": s.tcp}, CONFIG, s.clock, sleep=sleep)
    with pytest.raises(Stop):
        await monitor.run()

    assert waits == [1.5, 2.0, 0.0, 1.75]
    assert [t - started[0] for t in started] == [0.0, 2.0, 4.0, 7.0]


def test_statistics_and_repr() -> None:
    s = Setup("tcp")
    assert s.monitor.statistics() == {
        "passes": 0, "probes_sent": 0, "probes_failed": 0, "marked_up": 0, "marked_down": 0,
        "ejected": 0,
    }
    assert repr(s.monitor) == "HealthMonitor(grpc,tcp, every 2.0s)"
    assert "ejected=0" in repr(s.ejection)

