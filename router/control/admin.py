"""The admin HTTP API on aiohttp, in the router's own event loop.

The routes are declared once in ``admin_routes`` (served through ``api.build_app``, which also
answers /openapi.json and turns every failure into a JSON error). GET /metrics (Prometheus
text), /healthz (process alive), /readyz (200 while ``Readiness`` says ready: not draining and
some backend of any protocol in rotation; 503 with the reason otherwise, from the first moment
of a drain), /backends (JSON from each backend's ``statistics()``), /backends/{id} (one of
them, 404 BACKEND_NOT_FOUND), /stats (the data plane's counters).

POST /admin/reload reads the config again and applies it, as SIGHUP does: 200
``{"reloaded": true, "changes": [...]}``; an invalid file is 400 ``{"reloaded": false,
"error": ..., "code": "VALIDATION_ERROR", "problems": [...], "timestamp": ...}`` (the problems are
``check-config``'s), a change that needs a restart 409 with code ``RESTART_REQUIRED``.
POST /admin/reload-certificates re-reads only the certificates, keys, CAs and the token (200, or
422 with the problems, the running files kept); /admin/reload does that too.

Who may call what is decided once, in ``AdminAuth``'s middleware, for every route however it
was added:

- a mutating request (POST, PUT, PATCH, DELETE) needs credentials: a verified client
  certificate (``admin.tls.client_ca_file``) that the allow-list lets in, or the bearer token of
  ``admin.token_file`` (``Authorization: Bearer TOKEN``, compared in constant time);
- a read needs them too when the admin listener is not on a loopback address, except /healthz
  and /readyz, which orchestrators probe without credentials and which reveal nothing;
- a client certificate outside the allow-list is refused on every path.

Refusals are JSON ``{"error": ..., "code": ..., "timestamp": ...}``: 401 UNAUTHORIZED without
credentials (with ``WWW-Authenticate: Bearer``), 403 FORBIDDEN for a wrong token, 403
CLIENT_NOT_ALLOWED for a certificate outside the allow-list; each is counted by code.
"""

from __future__ import annotations

import collections
import hmac
import socket
import ssl
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import CollectorRegistry

from router.control import admin_routes
from router.control.api import (
    MUTATING_METHODS,
    PROBE_PATHS,
    ApiErrors,
    Handler,
    build_app,
    error_response,
    json_response,
    timestamp,
)
from router.control.directory import BackendDirectory
from router.control.directory_api import directory_handlers
from router.control.instances.api import instance_handlers, unsupported_handlers
from router.control.instances.manager import InstanceManager
from router.core.config import AdminConfig, is_loopback, parse_host_port
from router.core.config_diff import ReloadOutcome
from router.core.errors import (
    BackendNotFound,
    ConfigError,
    Forbidden,
    RouterError,
    Unauthorized,
    quoted,
)
from router.dispatch.backends import Registry
from router.lifecycle.readiness import Readiness
from router.tls.context import ServerTls
from router.tls.identity import PeerIdentity


def read_token(path: str) -> bytes:
    try:
        token = Path(path).read_bytes().strip()
    except OSError as exc:
        raise ConfigError([f"admin.token_file: cannot read {quoted(path)}: {exc.strerror}"]
                          ) from None
    if not token:
        raise ConfigError([f"admin.token_file: {quoted(path)} is empty"])
    return token


class AdminAuth:
    """The admin API's one authorization check (see the module docstring)."""

    def __init__(self, config: AdminConfig, tls: ServerTls | None) -> None:
        self._token_file = config.token_file
        self._token = read_token(config.token_file) if config.token_file is not None else None
        self._tls = tls
        self._reads_need_credentials = not is_loopback(parse_host_port(config.listen)[0])
        self.refused: collections.Counter[str] = collections.Counter()

    def reload(self) -> None:
        """Re-read the token file (SIGHUP); on failure the running token stays."""
        if self._token_file is not None:
            self._token = read_token(self._token_file)

    def refusal(self, request: web.Request) -> RouterError | None:
        identity = None
        if self._tls is not None and request.transport is not None:
            identity = PeerIdentity.from_peercert(request.transport.get_extra_info("peercert"))
        needs_credentials = request.method in MUTATING_METHODS or (
            self._reads_need_credentials and request.path not in PROBE_PATHS
        )
        return self.check(identity, request.headers.get("Authorization"),
                          needs_credentials=needs_credentials)

    def check(self, identity: PeerIdentity | None, authorization: str | None, *,
              needs_credentials: bool) -> RouterError | None:
        """The one decision behind every admin listener (HTTP here, gRPC in
        ``registry_grpc``): a verified client certificate (``identity``) outside the
        allow-list is refused, one inside it is enough; otherwise, when the call needs
        credentials, the bearer token (``authorization``: "Bearer TOKEN") decides."""
        if self._tls is not None and identity is not None:
            refused = self._tls.refusal(identity)
            if refused is not None:
                return refused
            return None
        if not needs_credentials:
            return None
        return self._check_token(authorization)

    def _check_token(self, header: str | None) -> RouterError | None:
        scheme, _, token = (header or "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return Unauthorized("this endpoint needs a bearer token (Authorization: Bearer "
                                "TOKEN, admin.token_file) or an allowed client certificate")
        if self._token is None or not hmac.compare_digest(token.strip().encode(), self._token):
            return Forbidden("the bearer token is not the one in admin.token_file")
        return None

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        error = self.refusal(request)
        if error is None:
            return await handler(request)
        self.refused[error.code] += 1
        response = error_response(error)
        if isinstance(error, Unauthorized):
            response.headers["WWW-Authenticate"] = 'Bearer realm="inference-router admin"'
        return response

    def statistics(self) -> dict[str, Any]:
        return {"token": self._token is not None, "refused": dict(self.refused)}


async def start_app(app: web.Application, host: str, port: int,
                    ssl_context: ssl.SSLContext | None = None,
                    ) -> tuple[web.AppRunner, tuple[str, int]]:
    """Serve ``app`` in this event loop (over TLS with ``ssl_context``); return its runner
    and the bound address."""
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    # Bind the socket ourselves so port 0 works and the bound port is known.
    sock = socket.create_server((host, port), reuse_port=False)
    await web.SockSite(runner, sock, ssl_context=ssl_context).start()
    sockname = sock.getsockname()
    return runner, (str(sockname[0]), int(sockname[1]))


def admin_app(*, metrics: Handler, healthz: Handler, readyz: Handler, backends: Handler,
              backend: Handler, stats: Handler, reload: Handler, auth: AdminAuth,
              reload_certificates: Callable[[], list[str]], v1: Mapping[str, Handler],
              ) -> tuple[web.Application, ApiErrors]:
    """The routes of ``admin_routes.ALL_ROUTES`` behind the error middleware, then ``auth``:
    one router process and the federation over several serve the same table (``v1``: the
    handlers of ``V1_ROUTES`` and ``INSTANCE_ROUTES``)."""
    document = json_response(admin_routes.document())

    async def get_openapi(request: web.Request) -> web.Response:
        return web.Response(body=document.body, content_type="application/json")

    async def post_reload_certificates(request: web.Request) -> web.Response:
        problems = reload_certificates()
        return json_response({"reloaded": not problems, "problems": problems},
                             status=422 if problems else 200)

    handlers = {"metrics": metrics, "healthz": healthz, "readyz": readyz, "backends": backends,
                "backend": backend, "stats": stats, "openapi": get_openapi, "reload": reload,
                "reload_certificates": post_reload_certificates, **v1}
    return build_app(admin_routes.ALL_ROUTES, handlers, [auth.middleware])


def reload_response(outcome: ReloadOutcome) -> web.Response:
    """The answer to POST /admin/reload."""
    error = outcome.error
    if error is None:
        return json_response({"reloaded": True, "changes": list(outcome.changes)})
    problems = error.problems
    return json_response(
        {"reloaded": False, "error": error.message, "code": error.code, "problems": problems,
         "timestamp": timestamp()},
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
        auth: AdminAuth,
        reload_certificates: Callable[[], list[str]],
        directory: BackendDirectory,
        tls: ServerTls | None = None,
        instances: InstanceManager | None = None,
        models: Mapping[str, Handler] | None = None,
    ) -> None:
        """``instances``: the replica manager; without one, its routes answer
        NOT_SUPPORTED. ``models``: the handlers of /v1/models and /v1/debug/route
        (``control.models_api.model_handlers``); without them they answer NOT_SUPPORTED."""
        self._registry = registry
        self._reload = reload
        self.auth = auth
        self.tls = tls
        self._metrics = metrics
        self._readiness = readiness
        self._stats = stats
        self._runner: web.AppRunner | None = None
        self._app, errors = admin_app(
            metrics=self._get_metrics, healthz=self._get_healthz, readyz=self._get_readyz,
            backends=self._get_backends, backend=self._get_backend, stats=self._get_stats,
            reload=self._post_reload, auth=auth, reload_certificates=reload_certificates,
            v1={**directory_handlers(directory), **(
                instance_handlers(instances) if instances is not None
                else unsupported_handlers([r.name for r in admin_routes.INSTANCE_ROUTES])),
                **(models or unsupported_handlers(["v1_models", "v1_debug_route"]))},
        )
        metrics.register(errors.collector())

    async def start(self, host: str, port: int) -> tuple[str, int]:
        context = self.tls.context if self.tls is not None else None
        self._runner, bound = await start_app(self._app, host, port, context)
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

    async def _get_backend(self, request: web.Request) -> web.Response:
        wanted = request.match_info["id"]
        for entry in self._registry.statistics():
            if entry["id"] == wanted:
                return json_response(entry)
        raise BackendNotFound(f"no backend has the id {quoted(wanted)}")

    async def _get_stats(self, request: web.Request) -> web.Response:
        return json_response(self._stats())

    async def _post_reload(self, request: web.Request) -> web.Response:
        return reload_response(await self._reload())
