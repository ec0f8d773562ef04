"""The admin API of a multi-process router: one address that speaks for every router process.

The supervisor serves the configured admin address; each router process it runs serves its own
admin API on a loopback port. Requests here fan out to the processes concurrently:

- ``/metrics``: every process's metrics in one exposition, each sample labelled
  ``process="<index>"`` (sum over the label for the router as a whole), plus the supervisor's own
  ``router_processes`` and ``router_process_restarts_total``; its own admin requests are in
  ``router_admin_requests_total`` with ``process="supervisor"``.
- ``/healthz``: 200 while the supervisor runs, listing each process and whether it is alive.
- ``/readyz``: 200 only while not draining and every process answers ready.
- ``/backends``: each process's backend list, every entry tagged with its ``process``.
- ``/backends/{id}``: the entry of the first process (by index) that knows the id, tagged.
- ``/stats``: each process's ``/stats`` under its index.
- ``/v1/...`` (the directory): a change goes to every live process, a read to the first;
  the answer is the first process's, or the first error. The processes' admin APIs take
  changes only with a token the supervisor generates and keeps (``child_token``).
- ``POST /admin/reload``: the supervisor's reload (it validates, then every process reloads
  on SIGHUP); each process's own outcome is in its ``router_config_reloads_total``.

A process that does not answer within ``timeout_s`` is reported as such, never waited on.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector, CollectorRegistry
from prometheus_client.samples import Sample

from router.control.admin import AdminAuth, admin_app, reload_response, start_app
from router.control.admin_routes import INSTANCE_ROUTES, V1_ROUTES
from router.control.api import json_response
from router.control.instances.api import unsupported_handlers
from router.core.config_diff import ReloadOutcome
from router.core.errors import BackendNotFound, StoreUnavailable, quoted
from router.lifecycle.state import Lifecycle
from router.tls.context import ServerTls


@dataclass(frozen=True, slots=True)
class ProcessInfo:
    index: int
    pid: int | None
    alive: bool
    restarts: int
    admin_url: str | None  # None while (re)starting


def merge_metrics(expositions: Iterable[tuple[str, str]]) -> list[Metric]:
    """Families from several Prometheus text expositions, each sample labelled with the
    ``process`` it came from; families of the same name are merged."""
    families: dict[str, Metric] = {}
    for process, text in expositions:
        for family in text_string_to_metric_families(text):
            merged = families.get(family.name)
            if merged is None:
                merged = Metric(family.name, family.documentation, family.type, family.unit)
                families[family.name] = merged
            merged.samples.extend(
                Sample(s.name, {**s.labels, "process": process}, s.value, s.timestamp, s.exemplar)
                for s in family.samples
            )
    return list(families.values())


class _Fixed(Collector):
    def __init__(self, metrics: list[Metric]) -> None:
        self._metrics = metrics

    def collect(self) -> Iterable[Metric]:
        return self._metrics


class FederatedAdmin:
    def __init__(
        self,
        processes: Callable[[], list[ProcessInfo]],
        lifecycle: Lifecycle,
        reload: Callable[[], Awaitable[ReloadOutcome]],
        auth: AdminAuth,
        reload_certificates: Callable[[], list[str]],
        tls: ServerTls | None = None,
        timeout_s: float = 2.0,
        child_token: str | None = None,
    ) -> None:
        """``child_token``: the bearer token the processes' admin APIs take changes with."""
        self._processes = processes
        self._child_token = child_token
        self._reload = reload
        self.auth = auth
        self.tls = tls
        self._lifecycle = lifecycle
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._session: aiohttp.ClientSession | None = None
        self._runner: web.AppRunner | None = None
        self._app, errors = admin_app(
            metrics=self._get_metrics, healthz=self._get_healthz, readyz=self._get_readyz,
            backends=self._get_backends, backend=self._get_backend, stats=self._get_stats,
            reload=self._post_reload, auth=auth, reload_certificates=reload_certificates,
            v1={**{route.name: self._forward for route in V1_ROUTES},
                # Each process would run its own replicas: instances need one process.
                **unsupported_handlers([route.name for route in INSTANCE_ROUTES])},
        )
        self._own_requests = CollectorRegistry(auto_describe=False)
        self._own_requests.register(errors.collector())

    async def start(self, host: str, port: int) -> tuple[str, int]:
        self._session = aiohttp.ClientSession(timeout=self._timeout)
        context = self.tls.context if self.tls is not None else None
        self._runner, bound = await start_app(self._app, host, port, context)
        return bound

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
        if self._session is not None:
            await self._session.close()

    async def _fetch(self, info: ProcessInfo, path: str) -> tuple[int, bytes] | None:
        """(status, body) from one process, or None if it is down or did not answer."""
        if self._session is None or info.admin_url is None or not info.alive:
            return None
        try:
            async with self._session.get(info.admin_url + path) as response:
                return response.status, await response.read()
        except (aiohttp.ClientError, TimeoutError):
            return None

    async def _forward(self, request: web.Request) -> web.Response:
        """A ``/v1`` request, sent to every live process (each holds its own directory unless
        they share etcd, where a repeated registration replaces itself): the answer of the
        first process, unless another one's is an error, which then is the answer."""
        body = await request.read()
        headers = {"Content-Type": request.headers.get("Content-Type", "application/json")}
        if self._child_token is not None:  # this request passed our own AdminAuth
            headers["Authorization"] = f"Bearer {self._child_token}"
        infos = [info for info in self._processes() if info.alive and info.admin_url]
        if request.method == "GET":
            infos = infos[:1]
        answers = await asyncio.gather(*(self._send(info, request.method, request.path_qs,
                                                    body, headers) for info in infos))
        got = [answer for answer in answers if answer is not None]
        if not got:
            raise StoreUnavailable("no router process answered")
        status, payload = max(got, key=lambda answer: answer[0] >= 400)
        return web.Response(status=status, body=payload, content_type="application/json")

    async def _send(self, info: ProcessInfo, method: str, path: str, body: bytes,
                    headers: dict[str, str]) -> tuple[int, bytes] | None:
        if self._session is None or info.admin_url is None:
            return None
        try:
            async with self._session.request(method, info.admin_url + path, data=body,
                                             headers=headers) as response:
                return response.status, await response.read()
        except (aiohttp.ClientError, TimeoutError):
            return None

    async def _fan_out(self, path: str) -> list[tuple[ProcessInfo, tuple[int, bytes] | None]]:
        infos = self._processes()
        answers = await asyncio.gather(*(self._fetch(info, path) for info in infos))
        return list(zip(infos, answers, strict=True))

    async def _get_metrics(self, request: web.Request) -> web.Response:
        answers = await self._fan_out("/metrics")
        texts = [(str(info.index), body.decode()) for info, got in answers if got is not None
                 for status, body in [got] if status == 200]
        # The supervisor's own admin requests join the processes' families of the same name.
        texts.append(("supervisor", generate_latest(self._own_requests).decode()))
        metrics = merge_metrics(texts)
        metrics.extend(self._own_metrics())
        registry = CollectorRegistry(auto_describe=False)
        registry.register(_Fixed(metrics))
        return web.Response(body=generate_latest(registry),
                            headers={"Content-Type": CONTENT_TYPE_LATEST})

    def _own_metrics(self) -> list[Metric]:
        infos = self._processes()
        alive = Metric("router_processes", "Router processes by state", "gauge")
        alive.add_sample("router_processes", {"state": "alive"},
                         float(sum(1 for i in infos if i.alive)))
        alive.add_sample("router_processes", {"state": "configured"}, float(len(infos)))
        restarts = Metric("router_process_restarts", "Router processes restarted after an "
                          "unexpected exit", "counter")
        restarts.add_sample("router_process_restarts_total", {},
                            float(sum(i.restarts for i in infos)))
        return [alive, restarts]

    async def _get_healthz(self, request: web.Request) -> web.Response:
        return json_response({"status": "ok", "processes": [
            {"index": i.index, "pid": i.pid, "alive": i.alive, "restarts": i.restarts}
            for i in self._processes()
        ]})

    async def _get_readyz(self, request: web.Request) -> web.Response:
        if self._lifecycle.draining:
            return json_response({"ready": False, "reason": "draining"}, status=503)
        answers = await self._fan_out("/readyz")
        not_ready = [info.index for info, got in answers if got is None or got[0] != 200]
        if not_ready:
            return json_response({"ready": False, "reason": f"processes not ready: {not_ready}"},
                         status=503)
        return json_response({"ready": True, "processes": len(answers)})

    async def _get_backends(self, request: web.Request) -> web.Response:
        merged: list[dict[str, Any]] = []
        for info, got in await self._fan_out("/backends"):
            if got is not None and got[0] == 200:
                merged.extend({**entry, "process": info.index} for entry in orjson.loads(got[1]))
        return json_response(merged)

    async def _get_backend(self, request: web.Request) -> web.Response:
        wanted = request.match_info["id"]
        for info, got in await self._fan_out("/backends"):
            if got is not None and got[0] == 200:
                for entry in orjson.loads(got[1]):
                    if entry["id"] == wanted:
                        return json_response({**entry, "process": info.index})
        raise BackendNotFound(f"no backend has the id {quoted(wanted)}")

    async def _get_stats(self, request: web.Request) -> web.Response:
        processes = []
        for info, got in await self._fan_out("/stats"):
            stats = orjson.loads(got[1]) if got is not None and got[0] == 200 else None
            processes.append({"index": info.index, "pid": info.pid, "alive": info.alive,
                              "restarts": info.restarts, "stats": stats})
        return json_response({"phase": self._lifecycle.phase.value, "processes": processes})

    async def _post_reload(self, request: web.Request) -> web.Response:
        return reload_response(await self._reload())
