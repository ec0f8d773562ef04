"""The fleet (router.control.fleet): config entries and DNS names kept in the registry, over an
injected resolver and a manual clock. No sockets, no sleeps."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from router.control.fleet import Fleet, join_host_port
from router.control.spawner import Spawner
from router.core.clock import ManualClock
from router.core.config import BackendConfig, RouterConfig, from_mapping
from router.core.config_diff import diff
from router.core.types import BackendSpec
from router.dispatch.backends import Backend, Registry
from tests.fakes import make_backend


class FakeDns:
    """Names to addresses, changed by the test; a missing name fails like getaddrinfo."""

    def __init__(self, **names: list[str]) -> None:
        self.names = names
        self.queries: list[str] = []

    async def __call__(self, host: str, port: int) -> list[str]:
        self.queries.append(host)
        if host not in self.names:
            raise OSError(f"[Errno -2] Name or service not known: {host!r}")
        return list(self.names[host])


class Setup:
    def __init__(self, dns: FakeDns) -> None:
        self.clock = ManualClock()
        self.registry = Registry()
        self.left: list[str] = []
        self.registry.add_leave_listener(lambda b: self.left.append(b.address))
        self.fleet = Fleet(self.registry, self._make, Spawner(), self.clock, resolver=dns)
        self.made: list[BackendSpec] = []

    def _make(self, spec: BackendSpec, entry: BackendConfig, key: str) -> Backend:
        self.made.append(spec)
        backend = make_backend(spec.address, spec.protocol, spec.models)
        backend.update(spec)
        return backend

    def addresses(self) -> list[str]:
        return [b.address for b in self.registry]

    async def advance(self, seconds: float) -> None:
        """Move the clock (due refreshes start their resolution task) and let the tasks run."""
        self.clock.advance(seconds)
        for _ in range(20):  # a fake resolution finishes within a few loop iterations
            await asyncio.sleep(0)


@pytest.fixture
async def setup() -> AsyncIterator[Callable[[FakeDns], Setup]]:
    made: list[Setup] = []

    def build(dns: FakeDns) -> Setup:
        made.append(Setup(dns))
        return made[-1]

    yield build
    for s in made:
        await s.fleet.close()


def cfg(*backends: dict[str, Any]) -> RouterConfig:
    return from_mapping({"backends": list(backends)}, "<t>")


async def test_a_name_becomes_one_backend_per_address_and_follows_dns(
    setup: Callable[[FakeDns], Setup], caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="router")
    dns = FakeDns(fleet=["10.0.0.1", "10.0.0.2"])
    s = setup(dns)
    config = cfg({"address": "fleet:9000", "weight": 2, "dns_refresh_s": 5})
    await s.fleet.start(config.backends)
    assert s.addresses() == ["10.0.0.1:9000", "10.0.0.2:9000"]
    assert {spec.weight for spec in s.made} == {2}
    assert s.made[0].labels == (("dns", "fleet:9000"),)

    dns.names["fleet"] = ["10.0.0.2", "fd00::3"]
    await s.advance(4.9)
    assert dns.queries == ["fleet"]  # not due yet
    await s.advance(0.2)
    assert dns.queries == ["fleet", "fleet"]
    assert s.addresses() == ["10.0.0.2:9000", "[fd00::3]:9000"]
    assert s.left == ["10.0.0.1:9000"]  # idle: drained and left at once
    assert "'fleet' resolves to 10.0.0.2:9000, [fd00::3]:9000" in caplog.text

    made = len(s.made)
    await s.advance(5.0)  # the same answer: nothing changes, nothing is logged again
    assert len(dns.queries) == 3 and len(s.made) == made
    assert caplog.text.count("resolves to") == 2


async def test_a_failed_resolution_keeps_the_addresses_and_is_logged_once_per_change(
    setup: Callable[[FakeDns], Setup], caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="router")
    dns = FakeDns(fleet=["10.0.0.1"])
    s = setup(dns)
    await s.fleet.start(cfg({"address": "fleet:9000", "dns_refresh_s": 1}).backends)
    del dns.names["fleet"]
    for _ in range(3):
        await s.advance(1.0)
    assert len(dns.queries) == 4
    assert s.addresses() == ["10.0.0.1:9000"] and s.left == []
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "backends[0]: cannot resolve 'fleet'" in warnings[0].getMessage()
    assert "keeping its 1 addresses" in warnings[0].getMessage()
    assert s.fleet.statistics()["names_failing"] == 1

    dns.names["fleet"] = ["10.0.0.1"]
    await s.advance(1.0)
    assert s.fleet.statistics()["names_failing"] == 0
    assert caplog.text.count("'fleet' resolves to 10.0.0.1:9000") == 2  # at start, and back


async def test_an_unresolvable_name_at_start_is_a_warning_and_joins_once_it_resolves(
    setup: Callable[[FakeDns], Setup], caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="router")
    dns = FakeDns()
    s = setup(dns)
    config = cfg({"address": "127.0.0.1:1"}, {"address": "later.test:9000", "dns_refresh_s": 2})
    await s.fleet.start(config.backends)
    assert s.addresses() == ["127.0.0.1:1"]
    [warning] = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert warning.getMessage().startswith("backends[1]: cannot resolve 'later.test'")
    assert "it has no backend until it resolves (retried every 2.0s)" in warning.getMessage()
    assert dns.queries == ["later.test"]  # an IP address is never resolved

    dns.names["later.test"] = ["10.1.1.1"]
    await s.advance(2.0)
    assert s.addresses() == ["127.0.0.1:1", "10.1.1.1:9000"]


async def test_a_reload_joins_updates_and_drains_the_entries(
    setup: Callable[[FakeDns], Setup],
) -> None:
    dns = FakeDns(fleet=["10.0.0.1", "10.0.0.2"])
    s = setup(dns)
    old = cfg({"address": "127.0.0.1:1"}, {"address": "127.0.0.1:2"},
              {"address": "fleet:9000", "dns_refresh_s": 60})
    await s.fleet.start(old.backends)
    new = cfg({"address": "127.0.0.1:2", "weight": 7}, {"address": "127.0.0.1:3"},
              {"address": "fleet:9000", "dns_refresh_s": 1})
    d = diff(old, new)
    fresh = await s.fleet.prepare(new.backends, d)
    assert s.addresses() == ["127.0.0.1:1", "127.0.0.1:2", "10.0.0.1:9000", "10.0.0.2:9000"]
    s.fleet.commit(new.backends, d, fresh)

    assert s.addresses() == ["127.0.0.1:2", "10.0.0.1:9000", "10.0.0.2:9000", "127.0.0.1:3"]
    assert s.left == ["127.0.0.1:1"]
    backend = s.registry.get("127.0.0.1:2")
    assert backend is not None and backend.weight == 7
    dns.names["fleet"] = ["10.0.0.2"]
    await s.advance(1.0)  # the new refresh interval took effect
    assert s.addresses() == ["127.0.0.1:2", "10.0.0.2:9000", "127.0.0.1:3"]


async def test_an_address_given_twice_is_kept_once_and_logged(
    setup: Callable[[FakeDns], Setup], caplog: pytest.LogCaptureFixture,
) -> None:
    dns = FakeDns(fleet=["127.0.0.1"])
    s = setup(dns)
    await s.fleet.start(cfg({"address": "127.0.0.1:9000"}, {"address": "fleet:9000"}).backends)
    assert s.addresses() == ["127.0.0.1:9000"]
    assert "backends[1]: backend 127.0.0.1:9000 is already given by backends[0]" in caplog.text


async def test_a_name_that_stops_resolving_to_an_address_drains_it_without_loss(
    setup: Callable[[FakeDns], Setup],
) -> None:
    """A backend that leaves DNS with a request in flight drains: it leaves only once that
    request is done (here: its attempt released by the test, as dispatch would)."""
    dns = FakeDns(fleet=["10.0.0.1", "10.0.0.2"])
    s = setup(dns)
    await s.fleet.start(cfg({"address": "fleet:9000", "dns_refresh_s": 1}).backends)
    busy = s.registry.get("10.0.0.1:9000")
    assert busy is not None
    busy.inflight = 1  # an attempt in progress
    dns.names["fleet"] = ["10.0.0.2"]
    await s.advance(1.0)
    assert s.addresses() == ["10.0.0.2:9000"] and s.registry.draining() == [busy]
    assert s.left == [] and not busy.upstream.closed
    busy.inflight = 0
    s.registry.settle(busy)
    assert s.left == ["10.0.0.1:9000"] and busy.upstream.closed


def test_ipv6_addresses_are_bracketed() -> None:
    assert join_host_port("::1", 80) == "[::1]:80"
    assert join_host_port("10.0.0.1", 80) == "10.0.0.1:80"
