"""Two affinity routers sharing backends see each other's requests there: the backends'
heartbeats carry each model's requests (``model_use``), and a router counts those that are
not its own. Real router processes on one etcd, real ``backends.modelsim`` processes.

Backend A holds p and x, backend B holds q and y (2 slots each, one worker). Router 1 sends a
request for x and then 4 for p: all go to A, x runs there and the p requests wait for its
worker. Router 2 is then asked for a new model n. Before router 1's requests, its dry run
loads n on A, evicting p (n is picked so that A ranks first for it); A would then evict p
while p's requests wait for it (only x has a worker on it) and load it again for them. Once
A's heartbeat has told router 2 of router 1's requests, router 2 loads n on B instead, and A
never evicts or reloads anything.

Every wait is bounded; the module takes about 10 s on 2 loaded cores.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys
from pathlib import Path
from typing import Any

from router.client.frames import FrameClient
from router.control.launcher import LaunchedProcess, launch
from router.protocol.announce import ready_port
from router.protocol.keyed import encode_keyed
from tests.etcd_support import etcd_server
from tests.fleet_support import REQUEST_TIMEOUT_S, RouterProcess, fleet_on, until
from tests.support import REPO_ROOT
from tests.test_affinity_etcd import STOP_TIMEOUT_S, get, residency

__all__ = ["etcd_server"]  # the fixture, used by name

LOAD_MS, SERVICE_MS = 1000, 500
WAITING = 4  # router 1's requests for p, waiting at A behind the one for x: 2.5 s in all
AFFINITY: dict[str, Any] = {
    "listener": {"keyed": True},
    "dispatch": {"policy": "affinity"},
    # Requests wait at the backend (pipelined), where its heartbeat counts them.
    "pool": {"max_connections": 1, "pipeline_depth": 16},
    # A churn guard far longer than the test: every load is alike to it (guarded), so which
    # backend loads a new model falls to the rendezvous rank, the same in both routers.
    "affinity": {"model_slots": 2, "load_time_s": LOAD_MS / 1000,
                 "service_time_s": SERVICE_MS / 1000, "min_residency_s": 100.0},
}
LEASE_TTL_S, HEARTBEAT_S = 1.0, 0.1
SEEN_WITHIN_S = 10.0  # a heartbeat to each router, on a loaded machine


async def modelsim(tmp_path: Path, name: str, routers: list[RouterProcess], token: Path,
                   preload: str) -> LaunchedProcess[int]:
    return await launch(
        [sys.executable, "-m", "backends.modelsim", "--port", "0", "--slots", "2",
         "--load-ms", str(LOAD_MS), "--service-ms", str(SERVICE_MS), "--preload", preload,
         "--stats", str(tmp_path / f"{name}.json"), "--register", routers[0].admin_url,
         "--report-to", routers[1].admin_url, "--lease-ttl", str(LEASE_TTL_S),
         "--heartbeat-interval", str(HEARTBEAT_S), "--token-file", str(token)],
        ready_port, cwd=REPO_ROOT, stderr=tmp_path / f"{name}.stderr",
        env={"PYTHONPATH": str(REPO_ROOT), "PATH": "/usr/bin:/bin"}, ready_timeout_s=20.0)


async def route(router: RouterProcess, model: str) -> dict[str, Any]:
    decision: dict[str, Any] = await get(router, f"/v1/debug/route?model={model}")
    return decision


def candidate(decision: dict[str, Any], backend: str) -> dict[str, Any]:
    return next(c for c in decision["candidates"] if c["backend"] == backend)


async def test_a_router_loads_where_it_evicts_no_model_the_other_routers_requests_wait_for(
    etcd_server: Any, tmp_path: Path
) -> None:
    async with fleet_on(etcd_server, tmp_path) as fleet:
        routers = [await fleet.router("r1", AFFINITY), await fleet.router("r2", AFFINITY)]
        backends = [await modelsim(tmp_path, "a", routers, fleet.token_file, "p,x"),
                    await modelsim(tmp_path, "b", routers, fleet.token_file, "q,y")]
        a, b = (f"127.0.0.1:{process.ready}" for process in backends)
        held: dict[str, tuple[list[str], list[str]]] = {
            "p": ([a], []), "q": ([b], []), "x": ([a], []), "y": ([b], [])}
        try:
            for router in routers:
                await until(lambda r=router: _holds(r, held), SEEN_WITHIN_S)
            first, second = routers
            # A model router 2 would load on A, evicting p (its least recently used there).
            for n in (f"n{i}" for i in range(64)):
                before = await route(second, n)
                if before["choice"] == a:
                    break
            assert before["choice"] == a, before
            # A load within the churn guard: p, A's least recently used model, would go.
            assert before["reason"] == "forced", before
            assert candidate(before, a)["can_load"] == "churn guard", before
            assert candidate(before, a)["foreign"] == 0

            # One connection: router 1 places them in order, and A gets them in order.
            client = await FrameClient.connect(*first.listen)
            sent = [asyncio.create_task(client.request(encode_keyed(model, body)))
                    for model, body in [("x", b"x"), *(("p", b"p%d" % i)
                                                       for i in range(WAITING))]]
            # Router 2 hears of them from A's heartbeats: one taken once the p requests were
            # there (the first one may count x's alone).
            await until(lambda: _foreign(second, n, a, WAITING), SEEN_WITHIN_S)
            after = await route(second, n)
            assert after["choice"] == b, after
            assert candidate(after, a)["can_load"] == "in use", after
            other = await FrameClient.connect(*second.listen)
            async with asyncio.timeout(REQUEST_TIMEOUT_S):
                assert await other.request(encode_keyed(n, b"n")) == b"n"
            async with asyncio.timeout(REQUEST_TIMEOUT_S):
                answers = await asyncio.gather(*sent)
            assert answers == [b"x", *(b"p%d" % i for i in range(WAITING))]
            for frames in (client, other):
                await frames.close()
        finally:
            for process in backends:
                process.send_signal(signal.SIGTERM)  # each writes its stats file on the way out
                await process.stop(STOP_TIMEOUT_S)
        stats_a, stats_b = (json.loads((tmp_path / f"{name}.json").read_text())
                            for name in ("a", "b"))
        # A served router 1's requests with the models it had: nothing evicted or reloaded.
        assert stats_a["models"].keys() == {"p", "x"}, stats_a["models"]
        assert (stats_a["misses"], stats_a["evictions"], stats_a["evicted_waiting"]) == (
            0, 0, 0), stats_a
        assert stats_b["models"][n] == {"requests": 1, "misses": 1, "loads": 1,
                                        "evictions": 0}, stats_b["models"]
        assert stats_b["evictions"] == 1  # q, its least recently used


async def _holds(router: RouterProcess, held: dict[str, tuple[list[str], list[str]]]) -> bool:
    return await residency(router) == held


async def _foreign(router: RouterProcess, model: str, backend: str, at_least: int) -> bool:
    return bool(candidate(await route(router, model), backend)["foreign"] >= at_least)
