"""The admin HTTP API on aiohttp, in the router's own event loop.

GET /metrics (Prometheus text), /healthz (process alive), /readyz (200 while ``Readiness``
says ready: not draining and some backend of any protocol in rotation; 503 with the reason
otherwise, from the first moment of a drain), /backends (JSON from each backend's
``statistics()``), /stats (the data plane's counters).

POST /admin/reload reads the config again and applies it, as SIGHUP does: 200
``{"reloaded": true, "changes": [...]}``; an invalid file is 400 ``{"reloaded": false,
"error": ..., "code": "VALIDATION_ERROR", "problems": [...]}`` (the problems are
``check-config``'s), a change that needs a restart 409 with code ``RESTART_REQUIRED``.
"""

from __future__ import annotations

import socket
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import CollectorRegistry

from router.core.config_diff import ReloadOutcome
from router.core.errors import ConfigError
from router.dispatch.backends import Registry
from router.lifecycle.readiness import Readiness


def json_response(body: Any, status: int = 200) -> web.Response:
    return web.Response(
        body=orjson.dumps(body, option=orjson.OPT_INDENT_2),
        status=status,
        content_type="application/json",
    )


async def start_app(app: web.Application, host: str, port: int
                    ) -> tuple[web.AppRunner, tuple[str, int]]:
    """Serve ``app`` in this event loop; return its runner and the bound address."""
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    # Bind the socket ourselves so port 0 works and the bound port is known.
    sock = socket.create_server((host, port), reuse_port=False)
    await web.SockSite(runner, sock).start()
    sockname = sock.getsockname()
    return runner, (str(sockname[0]), int(sockname[1]))


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def admin_app(*, metrics: Handler, healthz: Handler, readyz: Handler, backends: Handler,
              stats: Handler, reload: Handler) -> web.Application:
    """The admin API's routes, in one table: one router process and the federation over
    several serve the same paths. GET reads; POST changes the router."""
    routes = (
        ("GET", "/metrics", metrics),
        ("GET", "/healthz", healthz),
        ("GET", "/readyz", readyz),
        ("GET", "/backends", backends),
        ("GET", "/stats", stats),
        ("POST", "/admin/reload", reload),
    )
    app = web.Application()
    for method, path, handler in routes:
        app.router.add_route(method, path, handler)
    return app


def reload_response(outcome: ReloadOutcome) -> web.Response:
    """The answer to POST /admin/reload."""
    error = outcome.error
    if error is None:
        return json_response({"reloaded": True, "changes": list(outcome.changes)})
    problems = error.problems if isinstance(error, ConfigError) else [error.message]
    return json_response(
        {"reloaded": False, "error": error.message, "code": error.code, "problems": problems},
        status=error.http_status,
    )


class AdminServer:
    def __init__(
        self,
        registry: Registry,
        metrics: CollectorRegistry,
        readiness: Readiness,
        stats: Callable[[], dict[str, Any]],
        reload: Callable[[], Awaitable[ReloadOutcome]],
    ) -> None:
        self._registry = registry
        self._reload = reload
        self._metrics = metrics
        self._readiness = readiness
        self._stats = stats
        self._runner: web.AppRunner | None = None
        self._app = admin_app(
            metrics=self._get_metrics, healthz=self._get_healthz, readyz=self._get_readyz,
            backends=self._get_backends, stats=self._get_stats, reload=self._post_reload,
        )

    async def start(self, host: str, port: int) -> tuple[str, int]:
        self._runner, bound = await start_app(self._app, host, port)
        return bound

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _get_metrics(self, request: web.Request) -> web.Response:
        return web.Response(
            body=generate_latest(self._metrics), headers={"Content-Type": CONTENT_TYPE_LATEST}
        )

    async def _get_healthz(self, request: web.Request) -> web.Response:
        return json_response({"status": "ok"})

    async def _get_readyz(self, request: web.Request) -> web.Response:
        reason = self._readiness.not_ready_because()
        if reason is not None:
            return json_response({"ready": False, "reason": reason}, status=503)
        return json_response({"ready": True})

    async def _get_backends(self, request: web.Request) -> web.Response:
        return json_response(self._registry.statistics())

    async def _get_stats(self, request: web.Request) -> web.Response:
        return json_response(self._stats())

    async def _post_reload(self, request: web.Request) -> web.Response:
        return reload_response(await self._reload())
