"""Two real routers sharing one fleet through one real etcd (``registry.store = "etcd"``, one
key prefix per test), real echo backends registering over HTTP through either router
(``tests.fleet_support``: processes, the registering agent, client traffic):

- a backend registered with one router is routed by the other within a second, and an
  operator's drain through one router drains it on both;
- a backend killed with SIGKILL stops renewing its lease: it leaves both routers;
- a router killed with SIGKILL: the other keeps routing, and the backends that heartbeated
  through the dead one renew the same lease through the survivor (no new registration); a
  router started again routes to the fleet from its first request, and one stopped cleanly
  leaves the records and leases in place;
- etcd killed and started again on the same data directory and port: both routers route on
  their last view while it is away, a registration meanwhile is refused with
  STORE_UNAVAILABLE, and once it is back the leases are still there and a new registration
  reaches both routers.

Every wait is bounded; the module takes about 25 s on 2 loaded cores.
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

from router.client.frames import FrameClient
from tests.etcd_support import EtcdServer, etcd_server
from tests.fleet_support import REQUEST_TIMEOUT_S, Agent, RouterProcess, Traffic, fleet_on, until

__all__ = ["etcd_server"]  # the fixture, used by name

log = logging.getLogger(__name__)

SEEN_WITHIN_S = 1.0  # the promise: registered through one router, routed by all within 1 s
# etcd's shortest lease here (tests.etcd_support); it goes within 1 s of its last renewal
# plus etcd's expiry check (every 500 ms). The margin covers a loaded machine.
SHORT_LEASE_S = 1.0
EXPIRY_WITHIN_S = 5.0
# A lease that outlives a heartbeat refused while etcd restarts (heartbeats every 0.67 s).
LEASE_S = 2.0
ETCD_AWAY_S = 3.0  # longer than LEASE_S: the routers' view must not depend on the leases
RESYNC_WITHIN_S = 5.0  # the watch's backoff (at most 0.5 s here), a reconnect, a list
WITHIN_S = 5.0  # anything else that takes a few round trips


async def answer(router: RouterProcess, payload: bytes) -> bytes:
    client = await FrameClient.connect(*router.listen)
    try:
        async with asyncio.timeout(REQUEST_TIMEOUT_S):
            return await client.request(payload)
    finally:
        await client.close()


async def everywhere(routers: list[RouterProcess], backend_id: str, state: str,
                     within_s: float) -> float:
    """Seconds until every router shows ``backend_id`` in ``state``."""
    async def check() -> bool:
        states = await asyncio.gather(*(r.state(backend_id) for r in routers))
        return all(s == state for s in states)

    return await until(check, within_s)


async def flowing(*traffic: Traffic, more: int = 5) -> None:
    """Wait until each stream has had ``more`` answers beyond what it has now."""
    marks = [t.answered + more for t in traffic]
    await until(lambda: all(t.answered >= m for t, m in zip(traffic, marks, strict=True)),
                WITHIN_S)


async def stop_cleanly(*traffic: Traffic) -> None:
    for t in traffic:
        await t.stop()
        assert (t.router.name, dict(t.errors)) == (t.router.name, {})
        assert t.answered > 0


async def test_a_backend_registered_through_either_router_is_routed_by_both(
    etcd_server: EtcdServer, tmp_path: Path,
) -> None:
    async with fleet_on(etcd_server, tmp_path) as fleet:
        a, b = await fleet.routers("a", "b")
        e1, e2 = await asyncio.gather(fleet.echo("e1"), fleet.echo("e2"))

        one = await fleet.agent(e1, [a], LEASE_S, id="e1")
        seen_s = await everywhere([b], "e1", "healthy", SEEN_WITHIN_S)
        log.info("registered through router a, routable by router b after %.3f s", seen_s)
        assert await answer(b, b"through-b") == b"through-b"
        assert e1.served() == ["through-b"]

        await fleet.agent(e2, [b], LEASE_S, id="e2")
        seen_s = await everywhere([a], "e2", "healthy", SEEN_WITHIN_S)
        log.info("registered through router b, routable by router a after %.3f s", seen_s)

        # An operator's drain is on the shared record: one router drains it for both.
        status, body = await a.request("/v1/backends/e2/drain")
        assert (status, body["drained"]) == (200, True)
        await everywhere([a, b], "e2", "draining", SEEN_WITHIN_S)
        status, body = await b.request("/v1/backends/e2/undrain")
        assert (status, body["drained"]) == (200, False)
        await everywhere([a, b], "e2", "healthy", SEEN_WITHIN_S)

        # e1 deregisters through the other router: it leaves both.
        await one.stop()
        status, body = await b.request("/v1/backends/e1", "DELETE")
        assert (status, body["id"]) == (202, "e1")
        await everywhere([a, b], "e1", "removed", SEEN_WITHIN_S)
        payloads = [f"after-{n}".encode() for n in range(10)]
        assert [await answer(a, p) for p in payloads] == payloads
        assert e1.served() == ["through-b"]
        assert e2.served() == [p.decode() for p in payloads]


async def test_a_killed_backend_leaves_both_routers_when_its_lease_expires(
    etcd_server: EtcdServer, tmp_path: Path,
) -> None:
    async with fleet_on(etcd_server, tmp_path) as fleet:
        a, b = await fleet.routers("a", "b")
        e1, e2 = await asyncio.gather(fleet.echo("e1"), fleet.echo("e2"))
        doomed = await fleet.agent(e1, [a], SHORT_LEASE_S, id="e1")
        await fleet.agent(e2, [b], LEASE_S, id="e2")
        for backend_id in ("e1", "e2"):
            await everywhere([a, b], backend_id, "healthy", SEEN_WITHIN_S)
        traffic = fleet.traffic(a), fleet.traffic(b)
        await flowing(*traffic)

        # SIGKILL: the backend and its agent die together, nothing deregisters.
        await doomed.stop()
        await e1.kill()
        gone_s = await everywhere([a, b], "e1", "removed", EXPIRY_WITHIN_S)
        log.info("lease of %.0f s not renewed: gone from both routers %.3f s after the kill",
                 SHORT_LEASE_S, gone_s)
        for router in (a, b):
            assert await router.metric("router_lease_expirations_total") == 1
            assert await router.state("e2") == "healthy"
        await flowing(*traffic)
        await stop_cleanly(*traffic)  # requests on e1 when it died went to e2


async def test_when_a_router_dies_the_other_routes_and_renews_the_same_leases(
    etcd_server: EtcdServer, tmp_path: Path,
) -> None:
    async with fleet_on(etcd_server, tmp_path) as fleet:
        a, b = await fleet.routers("a", "b")
        e1 = await fleet.echo("e1")
        agent = await fleet.agent(e1, [a, b], SHORT_LEASE_S, id="e1")
        await everywhere([b], "e1", "healthy", SEEN_WITHIN_S)
        traffic = fleet.traffic(b)
        await flowing(traffic)

        a.kill()
        async with asyncio.timeout(WITHIN_S):
            await a.proc.wait()
        # Four heartbeats through b: more than a lease's TTL since the last one through a.
        await until(lambda: agent.heartbeats["b", 200] >= 4, WITHIN_S)
        assert agent.registered_via == ["a"]  # the same id and lease throughout
        assert agent.heartbeats["b", 404] == 0
        assert await b.state("e1") == "healthy"
        assert await b.metric("router_lease_expirations_total") == 0
        await flowing(traffic)
        await stop_cleanly(traffic)

        # A router that starts on the shared store knows the fleet before it answers.
        again = await fleet.router("a-again")
        assert await answer(again, b"first") == b"first"
        assert await again.state("e1") == "healthy"
        # A router that stops cleanly leaves the records and leases to the backends.
        again.proc.terminate()
        async with asyncio.timeout(WITHIN_S * 2):
            assert await again.proc.wait() == 0
        beats = agent.heartbeats["b", 200]
        await until(lambda: agent.heartbeats["b", 200] >= beats + 2, WITHIN_S)
        assert await b.state("e1") == "healthy"
        assert agent.registered_via == ["a"]


def heartbeats(agents: list[Agent], status: int) -> int:
    """Heartbeats the agents had answered with ``status``, through any router."""
    return sum(n for agent in agents for (_, s), n in agent.heartbeats.items() if s == status)


async def test_etcd_restarted_routers_route_on_their_last_view_then_resync(
    etcd_server: EtcdServer, tmp_path: Path,
) -> None:
    async with fleet_on(etcd_server, tmp_path) as fleet:
        a, b = await fleet.routers("a", "b")
        e1, e2, e3 = await asyncio.gather(fleet.echo("e1"), fleet.echo("e2"), fleet.echo("e3"))
        agents = [await fleet.agent(e1, [a, b], LEASE_S, id="e1"),
                  await fleet.agent(e2, [b, a], LEASE_S, id="e2")]
        for backend_id in ("e1", "e2"):
            await everywhere([a, b], backend_id, "healthy", SEEN_WITHIN_S)
        traffic = fleet.traffic(a), fleet.traffic(b)
        await flowing(*traffic)

        await etcd_server.kill()
        away_since = time.monotonic()
        new = {"id": "e3", "address": e3.address, "lease_ttl_s": LEASE_S}
        status, body = await a.request("/v1/backends", "POST", new)
        assert (status, body["code"]) == (503, "STORE_UNAVAILABLE"), body
        # etcd stays away longer than a lease: the routers go on with what they know.
        await asyncio.sleep(ETCD_AWAY_S - (time.monotonic() - away_since))
        for router in (a, b):
            assert [await router.state(i) for i in ("e1", "e2", "e3")] == [
                "healthy", "healthy", "removed"]
        await flowing(*traffic)
        assert heartbeats(agents, 503) > 0  # refused meanwhile; the agents kept their leases

        await etcd_server.start()
        renewed = heartbeats(agents, 200)
        await until(lambda: heartbeats(agents, 200) >= renewed + 2, RESYNC_WITHIN_S)
        status, body = await a.request("/v1/backends", "POST", new)
        assert status == 201, body
        seen_s = await everywhere([b], "e3", "healthy", RESYNC_WITHIN_S)
        log.info("after etcd's restart, registered through a, routable by b after %.3f s",
                 seen_s)
        for router in (a, b):  # the leases survived etcd's restart
            assert [await router.state(i) for i in ("e1", "e2")] == ["healthy", "healthy"]
            assert await router.metric("router_lease_expirations_total") == 0
        assert [agent.registered_via for agent in agents] == [["a"], ["b"]]
        await flowing(*traffic)
        await stop_cleanly(*traffic)
