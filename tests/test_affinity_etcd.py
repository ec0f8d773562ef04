"""Two affinity routers sharing one fleet through a real etcd make the same placement
choices: ``backends.modelsim`` processes register through one router and send each
heartbeat, with the models they hold, to both (``--report-to``); requests for one model
sequence alternate between the routers, one at a time. Before each request both routers'
dry runs (``GET /v1/debug/route``) must name the same backend for the same reason, and at the
end each model has been loaded once in the whole fleet: a second router adds no loads. (The
dry runs wait for both views to agree and to count no request of the other router at any
backend: with one request at a time, such a count is a report taken while the last request
ran, which the next heartbeat clears.)

Every wait is bounded; the module takes about 10 s on 2 loaded cores.
"""

from __future__ import annotations

import asyncio
import json
import random
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

__all__ = ["etcd_server"]  # the fixture, used by name

LOAD_MS, SERVICE_MS = 100, 5
BACKENDS, SLOTS, MODELS, REQUESTS = 3, 2, 5, 24  # 5 models fit the 6 slots: one load each
AFFINITY: dict[str, Any] = {
    "listener": {"keyed": True},
    "dispatch": {"policy": "affinity"},
    "pool": {"max_connections": 1, "pipeline_depth": 1},
    "affinity": {"model_slots": SLOTS, "load_time_s": LOAD_MS / 1000,
                 "service_time_s": SERVICE_MS / 1000, "min_residency_s": 0.2},
}
LEASE_TTL_S = 1.0  # etcd's shortest here: a heartbeat, with its report, every 0.33 s
AGREE_WITHIN_S = 5.0  # a heartbeat to each router, on a loaded machine
STOP_TIMEOUT_S = 5.0


async def modelsim(tmp_path: Path, name: str, register: RouterProcess, also: RouterProcess,
                   token: Path) -> LaunchedProcess[int]:
    return await launch(
        [sys.executable, "-m", "backends.modelsim", "--port", "0", "--slots", str(SLOTS),
         "--load-ms", str(LOAD_MS), "--service-ms", str(SERVICE_MS),
         "--stats", str(tmp_path / f"{name}.json"), "--register", register.admin_url,
         "--report-to", also.admin_url, "--lease-ttl", str(LEASE_TTL_S),
         "--token-file", str(token)],
        ready_port, cwd=REPO_ROOT, stderr=tmp_path / f"{name}.stderr",
        env={"PYTHONPATH": str(REPO_ROOT), "PATH": "/usr/bin:/bin"}, ready_timeout_s=20.0)


async def get(router: RouterProcess, path: str) -> Any:
    async with router.session.get(f"{router.admin_url}{path}") as response:
        assert response.status == 200, await response.text()
        return await response.json()


async def residency(router: RouterProcess) -> dict[str, tuple[list[str], list[str]]]:
    """model -> (backends holding it loaded, backends loading it), as this router sees it."""
    return {m["model"]: (m["holders"], m["loading"]) for m in await get(router, "/v1/models")
            if m["holders"] or m["loading"]}


async def agree(routers: list[RouterProcess], model: str) -> bool:
    first, second = await asyncio.gather(*(residency(r) for r in routers))
    routes = await asyncio.gather(*(get(r, f"/v1/debug/route?model={model}") for r in routers))
    return first == second and not any(c["foreign"] for route in routes
                                       for c in route["candidates"])


async def healthy(router: RouterProcess) -> int:
    return sum(1 for b in await get(router, "/v1/backends") if b["state"] == "healthy")


async def test_two_routers_on_one_etcd_place_a_model_sequence_alike(
    etcd_server: Any, tmp_path: Path
) -> None:
    async with fleet_on(etcd_server, tmp_path) as fleet:
        routers = [await fleet.router("r1", AFFINITY), await fleet.router("r2", AFFINITY)]
        backends = [await modelsim(tmp_path, f"b{i}", routers[0], routers[1], fleet.token_file)
                    for i in range(BACKENDS)]
        try:
            for router in routers:
                await until(lambda r=router: _all_healthy(r), AGREE_WITHIN_S)
            clients = [await FrameClient.connect(*r.listen) for r in routers]
            rng = random.Random(14)
            sequence = [f"m{rng.randrange(MODELS)}" for _ in range(REQUESTS)]
            for i, model in enumerate(sequence):
                await until(lambda m=model: agree(routers, m), AGREE_WITHIN_S)
                dry = [await get(r, f"/v1/debug/route?model={model}") for r in routers]
                assert dry[0]["choice"] == dry[1]["choice"], (i, model, dry)
                assert dry[0]["reason"] == dry[1]["reason"], (i, model, dry)
                async with asyncio.timeout(REQUEST_TIMEOUT_S):
                    body = await clients[i % 2].request(encode_keyed(model, str(i).encode()))
                assert body == str(i).encode()
            for client in clients:
                await client.close()
        finally:
            for process in backends:
                process.send_signal(signal.SIGTERM)  # each writes its stats file on the way out
                await process.stop(STOP_TIMEOUT_S)
        stats = [json.loads((tmp_path / f"b{i}.json").read_text()) for i in range(BACKENDS)]
        assert sum(s["requests"] for s in stats) == REQUESTS
        # Each model loaded once in the fleet, whichever router its requests went through.
        assert sum(s["loads"] for s in stats) == len(set(sequence)), stats
        assert sum(s["evictions"] for s in stats) == 0


async def _all_healthy(router: RouterProcess) -> bool:
    return await healthy(router) == BACKENDS
