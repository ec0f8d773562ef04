"""``listener.processes = N``: several router processes on one port, as real processes."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import orjson
from prometheus_client.parser import text_string_to_metric_families

from router.client.frames import FrameClient
from router.control.federation import merge_metrics
from router.control.launcher import LaunchedProcess, launch
from router.protocol.announce import Banner, parse_banner
from tests.conftest import EchoBackend
from tests.support import REPO_ROOT

WAIT_S = 20.0  # bound on every wait; a router process starts in well under a second


@dataclass
class Supervised:
    proc: LaunchedProcess[Banner]
    host: str
    port: int
    admin: str
    stderr_path: Path

    async def get(self, path: str) -> tuple[int, Any]:
        async with aiohttp.ClientSession() as session, session.get(self.admin + path) as resp:
            body = await resp.read()
            if resp.content_type == "application/json":
                return resp.status, orjson.loads(body)
            return resp.status, body.decode()


@contextlib.asynccontextmanager
async def supervised_router(
    backend: EchoBackend, tmp_path: Path, processes: int = 2, extra: tuple[str, ...] = ()
) -> AsyncIterator[Supervised]:
    stderr_path = tmp_path / "router.stderr"
    proc = await launch(
        [sys.executable, "-m", "router", "serve", "--processes", str(processes),
         "--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0", "--backend", backend.address,
         "--shutdown-grace", "10", *extra],
        parse_banner, stderr=stderr_path, cwd=REPO_ROOT, ready_timeout_s=WAIT_S,
        env={"PYTHONPATH": str(REPO_ROOT), "ROUTER_LOG_DIR": str(tmp_path / "logs"),
             "PATH": "/usr/bin:/bin"},
    )
    try:
        host, port = proc.ready.listen
        yield Supervised(proc, host, port, proc.ready.admin_url, stderr_path)
    finally:
        await proc.stop(WAIT_S)


async def test_a_registration_through_the_supervisor_reaches_every_process(
    echo_backend: Callable[..., EchoBackend], tmp_path: Path
) -> None:
    token = tmp_path / "token"
    token.write_text("sv-token")
    static, registered = echo_backend(), echo_backend()
    async with supervised_router(static, tmp_path,
                                 extra=("--admin-token-file", str(token))) as router:
        headers = {"Authorization": "Bearer sv-token"}
        async with aiohttp.ClientSession(headers=headers) as session:
            async with session.post(router.admin + "/v1/backends", json={
                    "address": registered.address, "lease_ttl_s": 30}) as resp:
                assert resp.status == 201, await resp.text()
            async with session.put(router.admin + f"/v1/backends/{registered.address}/lease",
                                   json={}) as resp:
                assert resp.status == 200
            async with session.post(router.admin + f"/v1/backends/{static.address}/drain",
                                    ) as resp:
                assert resp.status == 200
            async with session.put(router.admin + "/v1/backends/nobody/lease",
                                   json={}) as resp:
                assert (resp.status, (await resp.json())["code"]) == (404, "LEASE_NOT_FOUND")
        status, backends = await router.get("/backends")
        by_process = sorted((b["process"], b["address"], b["drained"]) for b in backends)
        assert by_process == sorted([(i, a, a == static.address) for i in (0, 1)
                                     for a in (static.address, registered.address)])
        clients = [await FrameClient.connect(router.host, router.port) for _ in range(8)]
        async with asyncio.timeout(WAIT_S):  # every process routes to the registered one
            answers = await asyncio.gather(*(c.request(b"r%d" % i)
                                             for i, c in enumerate(clients)))
        assert answers == [b"r%d" % i for i in range(8)]
        status, after = await router.get("/backends")
        assert status == 200
        served = {b["address"]: 0 for b in after}
        for b in after:
            served[b["address"]] += b["requests_total"]
        assert served == {static.address: 0, registered.address: 8}
        for client in clients:
            await client.close()


def per_process(metrics_text: str, sample_name: str) -> dict[str, float]:
    found: dict[str, float] = {}
    for family in text_string_to_metric_families(metrics_text):
        for sample in family.samples:
            if sample.name == sample_name:
                found[sample.labels["process"]] = sample.value
    return found


async def test_processes_share_the_port_and_the_admin_api_speaks_for_all(
    echo_backend: Callable[..., EchoBackend], tmp_path: Path
) -> None:
    async with supervised_router(echo_backend(), tmp_path) as router:
        clients = [await FrameClient.connect(router.host, router.port) for _ in range(16)]
        async with asyncio.timeout(WAIT_S):
            answers = await asyncio.gather(
                *(c.request(f"c{i}".encode()) for i, c in enumerate(clients))
            )
        assert answers == [f"c{i}".encode() for i in range(16)]

        status, text = await router.get("/metrics")
        assert status == 200
        completed = per_process(text, "router_requests_completed_total")
        # The kernel spreads 16 connections over both (all on one: p = 2 * 2**-16).
        assert set(completed) == {"0", "1"} and all(v > 0 for v in completed.values())
        assert sum(completed.values()) == 16
        assert 'router_processes{state="alive"} 2.0' in text  # the supervisor's own

        status, ready = await router.get("/readyz")
        assert (status, ready["ready"]) == (200, True)
        status, backends = await router.get("/backends")
        assert status == 200 and sorted(b["process"] for b in backends) == [0, 1]
        status, health = await router.get("/healthz")
        assert [p["alive"] for p in health["processes"]] == [True, True]
        status, one = await router.get(f"/backends/{backends[0]['id']}")
        assert (status, one["id"], one["process"]) == (200, backends[0]["id"], 0)
        status, missing = await router.get("/backends/nobody")
        assert (status, missing["code"]) == (404, "BACKEND_NOT_FOUND")
        # Each process would run its own replicas: the replica manager needs one process.
        status, refused = await router.get("/v1/instances")
        assert (status, refused["code"]) == (501, "NOT_SUPPORTED")
        status, text = await router.get("/metrics")
        requests = {(s.labels["process"], s.labels["route"], s.labels["code"]): s.value
                    for f in text_string_to_metric_families(text) for s in f.samples
                    if s.name == "router_admin_requests_total"}
        assert requests[("supervisor", "/backends/{id}", "404")] == 1
        assert requests[("supervisor", "/readyz", "200")] == 1
        assert requests[("0", "/readyz", "200")] == 1  # the fan-out, counted by each process
        for client in clients:
            await client.close()


async def test_sigterm_drains_every_process_with_nothing_dropped(
    echo_backend: Callable[..., EchoBackend], tmp_path: Path
) -> None:
    async with supervised_router(echo_backend("--delay-ms", "300"), tmp_path) as router:
        clients = [await FrameClient.connect(router.host, router.port) for _ in range(8)]
        pending = [c.send(f"in flight {i}".encode()) for i, c in enumerate(clients)]
        async with asyncio.timeout(WAIT_S):
            # Every request is accepted (read whole) before the signal: wait for the counters.
            while True:
                _, text = await router.get("/metrics")
                if sum(per_process(text, "router_requests_accepted_total").values()) == 8:
                    break
                await asyncio.sleep(0.02)  # another process: no event to await
        router.proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(WAIT_S):
            answers = await asyncio.gather(*pending)
            returncode = await router.proc.wait()
        assert answers == [f"in flight {i}".encode() for i in range(8)]
        assert returncode == 0, router.stderr_path.read_text()
        for client in clients:
            await client.close()


async def test_a_killed_process_is_restarted(
    echo_backend: Callable[..., EchoBackend], tmp_path: Path
) -> None:
    async with supervised_router(echo_backend(), tmp_path) as router:
        _, health = await router.get("/healthz")
        victim = health["processes"][0]["pid"]
        os.kill(victim, signal.SIGKILL)
        async with asyncio.timeout(WAIT_S):
            while True:  # the restart waits 1 s (backoff), then a fresh process starts
                _, health = await router.get("/healthz")
                first = health["processes"][0]
                if first["restarts"] == 1 and first["alive"] and first["pid"] != victim:
                    break
                await asyncio.sleep(0.05)  # another process: no event to await
            status, _ = await router.get("/readyz")
            while status != 200:
                await asyncio.sleep(0.05)
                status, _ = await router.get("/readyz")
        _, text = await router.get("/metrics")
        assert "router_process_restarts_total 1.0" in text
        client = await FrameClient.connect(router.host, router.port)
        async with asyncio.timeout(WAIT_S):
            assert await client.request(b"still served") == b"still served"
        await client.close()


def test_merge_metrics_labels_each_process_and_keeps_families_whole() -> None:
    one = (
        "# HELP router_requests_completed_total Requests answered\n"
        "# TYPE router_requests_completed_total counter\n"
        "router_requests_completed_total 3.0\n"
        "# HELP lat Latency\n# TYPE lat histogram\n"
        'lat_bucket{le="0.1"} 1.0\nlat_bucket{le="+Inf"} 3.0\nlat_count 3.0\nlat_sum 0.5\n'
    )
    two = one.replace(" 3.0\n", " 4.0\n", 1)
    merged = {m.name: m for m in merge_metrics([("0", one), ("1", two)])}

    completed = merged["router_requests_completed"]
    assert completed.type == "counter"
    assert [(s.labels, s.value) for s in completed.samples] == [
        ({"process": "0"}, 3.0), ({"process": "1"}, 4.0)
    ]
    latency = merged["lat"]
    assert latency.type == "histogram"
    assert {s.labels["process"] for s in latency.samples} == {"0", "1"}
    assert len(latency.samples) == 8
