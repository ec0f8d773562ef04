"""The gRPC front door: a grpc.aio server that proxies any service, KServe v2 aware.

Methods, in the order gRPC looks them up:

1. registered: ``grpc.health.v1.Health`` (answered by the router, see ``RouterHealth``), the
   KServe methods of ``grpc.kserve`` (answered by the router, or routed by model) and server
   reflection (``grpc.reflection``: the router's own services);
2. everything else, any service and method name, through one generic handler: proxied as a
   bidirectional stream of raw messages, which carries unary and every streaming kind alike
   (the wire does not say which kind a method is). A call may pick its model group with the
   ``x-route-model`` header ("name" or "name:version"); without it any gRPC backend serves.

Every handler runs inside ``_observed``, which counts the call by method and status code
(``GrpcStats``) and turns errors into statuses: a ``RouterError`` into its ``grpc_status`` hint
(NO_BACKEND -> UNAVAILABLE, OVERLOADED -> RESOURCE_EXHAUSTED, UNKNOWN_MODEL -> NOT_FOUND,
MALFORMED_MESSAGE -> INVALID_ARGUMENT, DEADLINE_EXCEEDED, ...), with the error's code in the
``x-router-error`` trailer, and a relayed backend status into itself, with its details and
trailing metadata.

Admission, for calls that reach a backend: refused with UNAVAILABLE while draining, and with
RESOURCE_EXHAUSTED while the dispatch queue is at its bound (gRPC has no read to pause).
Before that, grpc core itself bounds connections (``grpc.max_connections``: one more is closed
at once), calls in progress (``grpc.max_concurrent_calls``: one more is answered
RESOURCE_EXHAUSTED without reaching a handler, so it carries no ``x-router-error`` and is not
counted in ``GrpcStats``) and streams per connection (``grpc.max_concurrent_streams``).

TLS (``grpc.tls``): gRPC's own TLS (ALPN ``h2``, TLS 1.2 and 1.3), with credentials that
fetch the newest certificate, key and client CA at each new handshake once
``ServerTls.reload`` has read new files (``server_credentials``); connections already up are
untouched. With an allow-list, every call's client certificate (the connection's auth context)
is checked first: a client outside it is answered PERMISSION_DENIED with CLIENT_NOT_ALLOWED in
``x-router-error``, and counted.

Drain: ``start_drain`` turns health and ServerReady to not serving and refuses new proxied
calls, while calls in flight go on; ``wait_all_closed`` returns once none is left, after
stopping the server (GOAWAY to every connection, ``linger_s`` for the last answers to go out);
``abort_all`` cancels what is still running at the drain deadline.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any, TypeAlias

import grpc
from grpc_health.v1 import health_pb2

from router.core.clock import Clock
from router.core.config import GrpcConfig
from router.core.errors import (
    ROUTER_ERROR_HEADER,
    Draining,
    Dropped,
    Overloaded,
    RouterError,
    UnknownService,
    quoted,
)
from router.dispatch.access import AccessEntry, AccessLog
from router.dispatch.backends import Backend, Registry
from router.dispatch.scheduler import Dispatcher
from router.dispatch.stats import GrpcStats
from router.frontdoor.grpc.forward import CALL_ENTRY, GrpcForwarder, RelayedStatus, ended_by
from router.frontdoor.grpc.kserve import ROUTED_BY_MODEL, KServeRouting
from router.frontdoor.grpc.kserve import SERVICE as KSERVE_SERVICE
from router.frontdoor.grpc.model_control import ModelController
from router.frontdoor.grpc.reflection import enable_reflection
from router.lifecycle.readiness import Readiness
from router.lifecycle.state import Lifecycle
from router.tls.context import ServerTls
from router.tls.grpc_credentials import server_credentials
from router.tls.identity import PeerIdentity
from router.upstream.grpc_channels import GrpcChannels

log = logging.getLogger(__name__)

HEALTH_SERVICE = "grpc.health.v1.Health"
ROUTE_MODEL_HEADER = "x-route-model"
_SERVING = health_pb2.HealthCheckResponse.SERVING
_NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING

Context: TypeAlias = grpc.aio.ServicerContext
Handler = Callable[[Any, Context], Awaitable[Any]]  # (request or request stream, context)


class RouterHealth:
    """``grpc.health.v1.Health`` for the router itself: SERVING for "" and the KServe service
    while ``is_ready()`` (``Readiness`` for gRPC backends); NOT_FOUND (Check) / SERVICE_UNKNOWN
    (Watch) for other names. Watchers get a new message whenever readiness may have changed
    (``changed``: a backend in or out of rotation, the drain), and only if it did."""

    SERVICES = frozenset({"", KSERVE_SERVICE})

    def __init__(self, is_ready: Callable[[], bool]) -> None:
        self._is_ready = is_ready
        self._change = asyncio.Event()
        self.watchers = 0

    def changed(self, backend: Backend | None = None, reason: str = "") -> None:
        self._change.set()
        self._change = asyncio.Event()

    def status(self, service: str) -> int:
        if service not in self.SERVICES:
            return int(health_pb2.HealthCheckResponse.SERVICE_UNKNOWN)
        return int(_SERVING if self._is_ready() else _NOT_SERVING)

    async def check(
        self, request: health_pb2.HealthCheckRequest, context: Context
    ) -> health_pb2.HealthCheckResponse:
        if request.service not in self.SERVICES:
            raise UnknownService(f"unknown service {quoted(request.service)}")
        return health_pb2.HealthCheckResponse(status=self.status(request.service))

    async def watch(self, request: health_pb2.HealthCheckRequest, context: Context) -> None:
        self.watchers += 1
        try:
            last = None
            while True:  # until the client goes away or the server stops
                change = self._change
                status = self.status(request.service)
                if status != last:
                    await context.write(health_pb2.HealthCheckResponse(status=status))
                    last = status
                await change.wait()
        finally:
            self.watchers -= 1


class _ProxyAll(grpc.GenericRpcHandler):  # type: ignore[misc]  # grpc ships no types
    """Any method not registered: a raw bidirectional stream to a backend."""

    def __init__(self, front_door: GrpcFrontDoor) -> None:
        self._front_door = front_door

    def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        method: str = details.method
        if method.startswith(f"/{HEALTH_SERVICE}/"):
            return None  # an unknown Health method: UNIMPLEMENTED, never proxied
        return self._front_door.proxy_handler(method)


class GrpcFrontDoor:
    def __init__(
        self, dispatcher: Dispatcher, registry: Registry, channels: GrpcChannels, clock: Clock,
        config: GrpcConfig, request_timeout_s: float, linger_s: float, stats: GrpcStats,
        readiness: Readiness, lifecycle: Lifecycle, tls: ServerTls | None = None,
        access_log: AccessLog | None = None, model_control: ModelController | None = None,
    ) -> None:
        self._dispatcher = dispatcher
        self.tls = tls
        # Checked on every call only when there is a list to check against.
        self._allow_list = tls if tls is not None and tls.allow_list.active else None
        self.access_log = access_log  # None: no access log, one check per call
        self._registry = registry
        self._channels = channels
        self._clock = clock
        self._config = config
        self._linger_s = linger_s
        self._lifecycle = lifecycle
        self.stats = stats
        self.forwarder = GrpcForwarder(dispatcher, channels, clock, request_timeout_s,
                                       model_control)
        self.kserve = KServeRouting(self.forwarder, registry, readiness)
        self.health = RouterHealth(lambda: readiness.ready("grpc"))
        registry.add_listener(self.health.changed)
        self._server: grpc.aio.Server | None = None
        self._stopped = False
        self._calls: set[asyncio.Task[Any]] = set()  # routed calls in progress, to cancel
        self.calls_total = 0

    # -- lifecycle ----------------------------------------------------------------------------

    async def start(self, host: str, port: int, *, reuse_port: bool = False) -> tuple[str, int]:
        config = self._config
        size = config.max_message_bytes
        server = grpc.aio.server(options=[
            ("grpc.max_send_message_length", size),
            ("grpc.max_receive_message_length", size),
            # gRPC sets SO_REUSEPORT unless told not to: two routers must not share a port
            # by accident, only when asked (--reuse-port, for rolling restarts).
            ("grpc.so_reuseport", 1 if reuse_port else 0),
            # The limits grpc core enforces before a call reaches Python (docs/operations.md,
            # Limits): connections, and calls per connection.
            ("grpc.max_allowed_incoming_connections", config.max_connections),
            ("grpc.max_concurrent_streams", config.max_concurrent_streams),
        ], maximum_concurrent_rpcs=config.max_concurrent_calls)
        server.add_registered_method_handlers(HEALTH_SERVICE, self._health_handlers())
        server.add_registered_method_handlers(KSERVE_SERVICE, self._kserve_handlers())
        enable_reflection(server, (HEALTH_SERVICE, KSERVE_SERVICE))
        server.add_generic_rpc_handlers([_ProxyAll(self)])
        address = f"{host}:{port}"
        if self.tls is None:
            bound = server.add_insecure_port(address)
        else:
            bound = server.add_secure_port(address, server_credentials(self.tls))
        if bound == 0:
            raise OSError(f"cannot listen for gRPC on {host}:{port}")
        await server.start()
        self._server = server
        return host, bound

    def start_drain(self) -> None:
        self.health.changed()  # watchers hear NOT_SERVING (readiness reads the lifecycle)

    async def wait_all_closed(self) -> None:
        """Once every accepted call is answered (the drain waited for that): GOAWAY, and
        ``linger_s`` for the last answers to go out."""
        await self._stop(self._linger_s)

    def abort_all(self) -> int:
        """Cancel every routed call still running; the drain counted them dropped."""
        calls = list(self._calls)
        for task in calls:
            task.cancel()
        return len(calls)

    async def close(self) -> None:
        await self._stop(None)
        await self._channels.close_all()

    async def _stop(self, grace: float | None) -> None:
        if self._server is not None and not self._stopped:
            self._stopped = True
            await self._server.stop(grace)

    # -- handlers -----------------------------------------------------------------------------

    def _health_handlers(self) -> dict[str, grpc.RpcMethodHandler]:
        request = health_pb2.HealthCheckRequest.FromString
        response = health_pb2.HealthCheckResponse.SerializeToString
        return {
            "Check": grpc.unary_unary_rpc_method_handler(
                partial(self._handle, f"/{HEALTH_SERVICE}/Check", self.health.check, False),
                request_deserializer=request, response_serializer=response,
            ),
            "Watch": grpc.unary_stream_rpc_method_handler(
                partial(self._handle, f"/{HEALTH_SERVICE}/Watch", self.health.watch, False),
                request_deserializer=request, response_serializer=response,
            ),
        }

    def _kserve_handlers(self) -> dict[str, grpc.RpcMethodHandler]:
        k = self.kserve
        unary: dict[str, tuple[Handler, bool]] = {  # name: (handler, routed to a backend)
            "ServerLive": (k.server_live, False), "ServerReady": (k.server_ready, False),
            "ModelReady": (k.model_ready, False), "ServerMetadata": (k.server_metadata, False),
            "RepositoryIndex": (k.repository_index, False),
            "ModelMetadata": (k.model_metadata, True), "TraceSetting": (k.trace_setting, True),
        }
        unary.update((name, (k.routed(name), True)) for name in ROUTED_BY_MODEL)
        handlers = {
            name: grpc.unary_unary_rpc_method_handler(
                partial(self._handle, f"/{KSERVE_SERVICE}/{name}", fn, routed)
            )
            for name, (fn, routed) in unary.items()
        }
        handlers["ModelStreamInfer"] = grpc.stream_stream_rpc_method_handler(partial(
            self._handle, f"/{KSERVE_SERVICE}/ModelStreamInfer", k.model_stream_infer, True
        ))
        return handlers

    def proxy_handler(self, method: str) -> grpc.RpcMethodHandler:
        """The generic handler: any method, as a stream, to the ``x-route-model`` group."""
        return grpc.stream_stream_rpc_method_handler(
            partial(self._handle, method, partial(self._relay, method), True)
        )

    async def _relay(self, method: str, requests: Any, context: Context) -> None:
        model = _route_model(context)
        if model is not None:
            self._registry.check_model(model, "grpc")
        await self.forwarder.relay_stream(method, context, model)

    # -- every call ---------------------------------------------------------------------------

    async def _handle(
        self, method: str, fn: Handler, routed: bool, request: Any, context: Context
    ) -> Any:
        """Run one call's handler ``fn``: count it by method and status, turn errors into
        statuses. A ``routed`` call (one that reaches a backend) must pass admission and is
        tracked for the drain. One coroutine for all of it: on a unary call every await
        resumes through each frame, so nesting costs on the hot path."""
        started = self._clock.now()
        code = "OK"
        task = asyncio.current_task() if routed else None
        entry = None
        if self.access_log is not None:
            entry = AccessEntry("grpc", _peer(context.peer()), method, bytes_in=_size(request))
            token = CALL_ENTRY.set(entry)  # seen by the forwarder, which fills in the backend
        try:
            if self._allow_list is not None:
                self._check_client(context, self._allow_list)
            if task is not None:
                self._calls.add(task)
                self.calls_total += 1
                if self._lifecycle.draining:
                    raise Draining("the router is draining; retry on another router")
                if self._dispatcher.saturated:
                    raise Overloaded("the dispatch queue is full")
            response = await fn(request, context)
            if entry is not None:
                entry.bytes_out += _size(response)
            return response
        except RelayedStatus as status:
            code = status.code.name
            await context.abort(status.code, status.details, status.trailing)
        except RouterError as error:
            code = error.grpc_status
            if entry is not None:
                entry.error = error.code
            await context.abort(
                grpc.StatusCode[error.grpc_status], error.message,
                ((ROUTER_ERROR_HEADER, error.code),),
            )
        except asyncio.CancelledError:
            if not self._lifecycle.abandoned:
                ended = ended_by(context)
                code = ended.grpc_status
                if entry is not None:
                    entry.error = ended.code
                raise
            # Cancelled by abort_all: the drain gave up on this call. Tell the client now
            # rather than leave it waiting for its deadline.
            if task is not None:
                task.uncancel()
            dropped = Dropped("the router stopped before answering")
            code = dropped.grpc_status
            if entry is not None:
                entry.error = dropped.code
            await context.abort(
                grpc.StatusCode[dropped.grpc_status], dropped.message,
                ((ROUTER_ERROR_HEADER, dropped.code),),
            )
        except Exception:
            code = "INTERNAL"
            log.exception("gRPC handler for %s failed", method)
            await context.abort(grpc.StatusCode.INTERNAL, "internal error in the router")
        finally:
            duration = self._clock.now() - started
            self.stats.count(method, code, duration)
            if task is not None:
                self._calls.discard(task)
            if entry is not None and self.access_log is not None:
                CALL_ENTRY.reset(token)
                entry.status, entry.duration_s = code, duration
                self.access_log.write(entry)
        raise AssertionError("context.abort returned")  # pragma: no cover

    @staticmethod
    def _check_client(context: Context, tls: ServerTls) -> None:
        refusal = tls.refusal(PeerIdentity.from_auth_context(context.auth_context()))
        if refusal is not None:
            log.info("refused %s: %s", context.peer(), refusal.message)
            raise refusal

    def statistics(self) -> dict[str, Any]:
        return {
            "tls": self.tls.statistics() if self.tls is not None else None,
            "calls_in_flight": len(self._calls),
            "calls_total": self.calls_total,
            "health_watchers": self.health.watchers,
            "phase": self._lifecycle.phase.value,
            "channels": self._channels.statistics(),
            "calls": self.stats.statistics(),
        }

    def __repr__(self) -> str:
        return f"GrpcFrontDoor(calls={len(self._calls)}, {self._lifecycle.phase.value})"


def _peer(peer: str | None) -> str | None:
    """gRPC's "ipv4:127.0.0.1:5000" / "ipv6:[::1]:5000" as the TCP front door writes it."""
    if not peer:
        return None
    scheme, sep, address = peer.partition(":")
    return address if sep and scheme in ("ipv4", "ipv6") else peer


def _size(message: Any) -> int:
    """Bytes of a unary message: raw bytes, or a protobuf message's encoded size (0 for a
    stream's iterator or None; a stream counts its messages as they pass)."""
    if isinstance(message, bytes):
        return len(message)
    byte_size = getattr(message, "ByteSize", None)
    return int(byte_size()) if callable(byte_size) else 0


def _route_model(context: Context) -> str | None:
    for key, value in context.invocation_metadata() or ():
        if key == ROUTE_MODEL_HEADER:
            return value if isinstance(value, str) else value.decode(errors="replace")
    return None
