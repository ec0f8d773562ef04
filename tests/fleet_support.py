"""Real routers sharing one etcd, the backends that register with them, and client traffic, for
the end-to-end tests of a shared fleet (``tests/test_etcd_fleet.py``).

- ``Fleet`` starts router processes (``python -m router serve --config``) on one etcd and one
  key prefix, with an admin token, and echo backend processes; it stops all of them.
- ``Agent`` is the registering side of one backend, as a model server runs it beside its
  listener: it registers through the first router that answers, renews its lease every
  ``heartbeat_interval_s`` through the router it last reached, moves to the next router when
  that one cannot be reached, keeping its id and lease (the lease lives in etcd, so every
  router on the prefix renews it), and registers again only on LEASE_NOT_FOUND. A STORE_
  UNAVAILABLE answer (etcd away) keeps the lease too: the next heartbeat tries again.
- ``Traffic`` sends frames through one router at a steady pace and counts the answers.

The routers run in other processes, so a wait for their state polls their admin API
(``until``), bounded in time, as a client outside the router would.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import sys
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import tomli_w

from router.client.frames import ConnectionLost, ErrorReply, FrameClient
from router.control.launcher import LaunchedProcess, launch
from router.protocol.announce import Banner, parse_banner, ready_port
from tests.etcd_support import EtcdServer
from tests.support import BASE_CONFIG, REPO_ROOT

TOKEN = "fleet-test-token"
READY_TIMEOUT_S = 20.0  # a router on a loaded 2-core machine has taken several seconds
STOP_TIMEOUT_S = 5.0
POLL_S = 0.02
CALL_TIMEOUT_S = 5.0  # one admin call: a heartbeat while etcd is away takes etcd_timeout_s
TRAFFIC_PAUSE_S = 0.02
REQUEST_TIMEOUT_S = 5.0


async def until(check: Callable[[], Awaitable[bool] | bool], within_s: float) -> float:
    """Poll ``check`` (a plain or an async function) until it holds; the seconds it took.
    ``TimeoutError`` after ``within_s``."""
    started = time.monotonic()
    async with asyncio.timeout(within_s):
        while True:
            held = check()
            if await held if inspect.isawaitable(held) else held:
                return time.monotonic() - started
            await asyncio.sleep(POLL_S)


@dataclass
class RouterProcess:
    proc: LaunchedProcess[Banner]
    name: str
    stderr: Path
    session: aiohttp.ClientSession

    @property
    def admin_url(self) -> str:
        return self.proc.ready.admin_url

    @property
    def listen(self) -> tuple[str, int]:
        return self.proc.ready.listen

    async def backend(self, backend_id: str) -> dict[str, Any] | None:
        """This router's view of one backend (``GET /v1/backends/{id}``); None: unknown."""
        async with self.session.get(f"{self.admin_url}/v1/backends/{backend_id}") as resp:
            if resp.status == 404:
                return None
            assert resp.status == 200, await resp.text()
            found: dict[str, Any] = await resp.json()
            return found

    async def state(self, backend_id: str) -> str:
        """The backend's state here; ``removed`` once this router no longer knows it."""
        info = await self.backend(backend_id)
        return "removed" if info is None else str(info["state"])

    async def metric(self, name: str) -> float:
        """The sum of a metric's samples in ``GET /metrics`` (0 when it has none)."""
        async with self.session.get(f"{self.admin_url}/metrics") as resp:
            text = await resp.text()
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.startswith((name + " ", name + "{")))

    async def request(self, path: str, method: str = "POST",
                      body: dict[str, Any] | None = None) -> tuple[int, Any]:
        """An authorized admin call: (status, JSON body)."""
        async with self.session.request(
            method, f"{self.admin_url}{path}", json=body,
            headers={"Authorization": f"Bearer {TOKEN}"},
        ) as resp:
            return resp.status, await resp.json()

    def kill(self) -> None:
        self.proc.kill()


@dataclass
class EchoProcess:
    proc: LaunchedProcess[int]
    served_file: Path

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.proc.ready}"

    def served(self) -> list[str]:
        """The payloads it has answered, in order."""
        if not self.served_file.exists():
            return []
        return self.served_file.read_text().split()

    async def kill(self) -> None:
        self.proc.kill()
        await self.proc.stop(STOP_TIMEOUT_S)


class Agent:
    """The registering side of one backend (module docstring: what it does on each answer)."""

    def __init__(self, routers: list[RouterProcess], registration: dict[str, Any]) -> None:
        self._routers = routers
        self._registration = registration
        self._current = 0
        self._task: asyncio.Task[None] | None = None
        self.backend_id = ""
        self.interval_s = 0.0
        self.registered_via: list[str] = []  # router names, one per registration
        self.heartbeats: Counter[tuple[str, int]] = Counter()  # (router name, status)

    @property
    def via(self) -> RouterProcess:
        return self._routers[self._current]

    async def start(self) -> None:
        await self._register()
        self._task = asyncio.create_task(self._renew(), name=f"agent {self.backend_id}")

    async def stop(self) -> None:
        """Stop renewing, without deregistering: what a backend killed with SIGKILL does."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _register(self) -> None:
        status, body = await self._call("POST", "/v1/backends", self._registration)
        assert status == 201, body
        self.backend_id = body["id"]
        self.interval_s = body["heartbeat_interval_s"]
        self.registered_via.append(self.via.name)

    async def _renew(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                status, _ = await self._call("PUT", f"/v1/backends/{self.backend_id}/lease", {})
            except ConnectionError:
                continue  # no router answered: the next beat tries them all again
            self.heartbeats[self.via.name, status] += 1
            if status == 404:
                await self._register()

    async def _call(self, method: str, path: str, body: dict[str, Any]) -> tuple[int, Any]:
        """Through the current router, else the next ones in turn (it moves to the one that
        answers)."""
        for step in range(len(self._routers)):
            index = (self._current + step) % len(self._routers)
            try:
                async with asyncio.timeout(CALL_TIMEOUT_S):
                    answer = await self._routers[index].request(path, method, body)
            except (aiohttp.ClientConnectionError, TimeoutError):
                continue
            self._current = index
            return answer
        raise ConnectionError(f"no router answered {method} {path}")


@dataclass(eq=False)
class Traffic:
    """Frames through one router, one at a time, until stopped: what came back."""

    router: RouterProcess
    answered: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    _task: asyncio.Task[None] | None = None
    _stop: asyncio.Event = field(default_factory=asyncio.Event)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"traffic via {self.router.name}")

    async def stop(self) -> None:
        self._stop.set()
        if self._task is not None:
            async with asyncio.timeout(REQUEST_TIMEOUT_S * 2):
                await self._task

    async def _run(self) -> None:
        client = await FrameClient.connect(*self.router.listen)
        try:
            for n in range(1_000_000):  # bounded by the test's stop
                if self._stop.is_set():
                    return
                payload = f"{self.router.name}-traffic-{n}".encode()
                try:
                    async with asyncio.timeout(REQUEST_TIMEOUT_S):
                        answer = await client.request(payload)
                except ErrorReply as exc:
                    self.errors[exc.code] += 1
                except (ConnectionLost, TimeoutError) as exc:
                    self.errors[type(exc).__name__] += 1
                    return
                else:
                    if answer == payload:
                        self.answered += 1
                    else:
                        self.errors["wrong answer"] += 1
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), TRAFFIC_PAUSE_S)
        finally:
            await client.close()


class Fleet:
    """Routers on one etcd prefix and echo backends, all stopped by ``close``."""

    def __init__(self, etcd: EtcdServer, tmp_path: Path, session: aiohttp.ClientSession) -> None:
        self.etcd = etcd
        self._tmp = tmp_path
        self._session = session
        self._prefix = f"/test-fleet/{uuid.uuid4().hex}/"
        (tmp_path / "token").write_text(TOKEN)
        self._routers: list[RouterProcess] = []
        self._backends: list[EchoProcess] = []
        self._agents: list[Agent] = []
        self._traffic: list[Traffic] = []

    def config(self) -> dict[str, Any]:
        return {
            **BASE_CONFIG,
            "admin": {"listen": "127.0.0.1:0", "token_file": str(self._tmp / "token")},
            "registry": {"store": "etcd", "etcd_endpoints": [self.etcd.endpoint],
                         "etcd_prefix": self._prefix, "etcd_timeout_s": 1.0,
                         "etcd_reconnect_backoff_max_s": 0.5},
        }

    @property
    def token_file(self) -> Path:
        return self._tmp / "token"

    async def router(self, name: str, extra: dict[str, Any] | None = None) -> RouterProcess:
        """A router on the fleet's etcd; ``extra``: config keys by section, over the fleet's
        (its registry and admin sections stay)."""
        config = self.config()
        for section, keys in (extra or {}).items():
            if section not in ("registry", "admin"):
                config[section] = {**config.get(section, {}), **keys}
        path = self._tmp / f"{name}.toml"
        path.write_bytes(tomli_w.dumps(config).encode())
        stderr = self._tmp / f"{name}.stderr"
        proc = await launch(
            [sys.executable, "-m", "router", "serve", "--config", str(path)], parse_banner,
            stderr=stderr, cwd=REPO_ROOT, ready_timeout_s=READY_TIMEOUT_S,
            env={"PYTHONPATH": str(REPO_ROOT), "ROUTER_LOG_DIR": str(self._tmp / "logs"),
                 "PATH": "/usr/bin:/bin"},
        )
        router = RouterProcess(proc, name, stderr, self._session)
        self._routers.append(router)
        return router

    async def routers(self, *names: str) -> list[RouterProcess]:
        return list(await asyncio.gather(*(self.router(name) for name in names)))

    async def echo(self, name: str) -> EchoProcess:
        served = self._tmp / f"{name}.served"
        proc = await launch(
            [sys.executable, "-m", "backends.echo", "--port", "0", "--record-ids", str(served)],
            ready_port, cwd=REPO_ROOT, env={"PYTHONPATH": str(REPO_ROOT), "PATH": "/usr/bin:/bin"},
            ready_timeout_s=READY_TIMEOUT_S,
        )
        backend = EchoProcess(proc, served)
        self._backends.append(backend)
        return backend

    async def agent(self, backend: EchoProcess, routers: list[RouterProcess],
                    lease_ttl_s: float, **fields: Any) -> Agent:
        """A registered backend: ``routers`` in the order its agent tries them."""
        agent = Agent(routers, {"address": backend.address, "lease_ttl_s": lease_ttl_s,
                                **fields})
        await agent.start()
        self._agents.append(agent)
        return agent

    def traffic(self, router: RouterProcess) -> Traffic:
        traffic = Traffic(router)
        traffic.start()
        self._traffic.append(traffic)
        return traffic

    async def close(self) -> None:
        for traffic in self._traffic:
            with contextlib.suppress(Exception):  # the test has failed already if this raises
                await traffic.stop()
        for agent in self._agents:
            await agent.stop()
        for process in [*(r.proc for r in self._routers), *(b.proc for b in self._backends)]:
            process.kill()
            await process.stop(STOP_TIMEOUT_S)


@contextlib.asynccontextmanager
async def fleet_on(etcd: EtcdServer, tmp_path: Path) -> AsyncIterator[Fleet]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=CALL_TIMEOUT_S)) as s:
        fleet = Fleet(etcd, tmp_path, s)
        try:
            yield fleet
        finally:
            await fleet.close()
