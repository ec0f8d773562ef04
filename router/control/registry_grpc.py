"""The admin gRPC listener (``admin.grpc_listen``): the backend directory over gRPC.

Services:

- ``inference_router.v1.Registry`` (``router/protocol/proto/registry.proto``): ``Register``,
  ``Heartbeat``, ``Deregister``, ``List`` and the server stream ``Watch``, each one call of the
  ``BackendDirectory``, so the rules are those of ``/v1/backends`` (the HTTP API): the same
  validation, replacement, lease and drain semantics and the same error codes;
- AnyServe's ``anyserve.WorkerManagement`` (``control.anyserve``), also served alone and
  without credentials on ``admin.anyserve_listen`` when that is set.

Credentials are the admin API's, decided by the one ``AdminAuth.check``: every call but
``List`` and ``Watch`` mutates and needs them; those two do too when ``grpc_listen`` is not a
loopback address. With ``admin.tls`` the listener speaks TLS with the admin's certificate
(reloaded with it); with its ``client_ca_file`` (and ``require_client_cert``, the default) a
client certificate is required and the allow-list decides, otherwise the caller sends
``authorization: Bearer TOKEN`` metadata (``admin.token_file``).

Errors: a ``RouterError`` becomes its ``grpc_status``, its message the details and its stable
code the ``x-router-error`` trailer, as the gRPC front door answers; anything else is logged
and answered INTERNAL with ``INTERNAL_ERROR``. Every call is counted by method and code
(``statistics``).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, NoReturn, TypeAlias, TypeVar

import grpc

from router.control.admin import AdminAuth
from router.control.anyserve import AnyServeWorkers, LeaseKeeper, WorkerManagementService
from router.control.api import validated
from router.control.directory import (
    BackendDirectory,
    BackendInfo,
    LoadReport,
    Registered,
    Registration,
)
from router.core.config import AdminConfig, is_loopback, parse_host_port
from router.core.errors import ROUTER_ERROR_HEADER, InternalError, InvalidInput, RouterError
from router.protocol.proto import anyserve_worker_management_pb2_grpc as anyserve_grpc
from router.protocol.proto import registry_pb2 as pb
from router.protocol.proto import registry_pb2_grpc as pb_grpc
from router.tls.context import ServerTls
from router.tls.grpc_credentials import server_credentials
from router.tls.identity import PeerIdentity

log = logging.getLogger(__name__)

Context: TypeAlias = grpc.aio.ServicerContext
T = TypeVar("T")
# The app's way of starting a listener: (config key, address, start) -> the bound address;
# it reports an address that cannot be bound with the key.
Listen = Callable[[str, str, Callable[[str, int], Awaitable[tuple[str, int]]]],
                  Awaitable[tuple[str, int]]]
AUTHORIZATION = "authorization"  # gRPC metadata keys are lower case
# How long close() lets calls in progress finish; a Watch stream is cancelled then.
CLOSE_GRACE_S = 1.0


class CallGuard:
    """What every call on one listener goes through: the credentials check (none when
    ``auth`` is None: the AnyServe listener), then the mapping of errors to statuses, and the
    count by method and code."""

    def __init__(self, auth: AdminAuth | None, tls: ServerTls | None, *,
                 reads_need_credentials: bool) -> None:
        self._auth = auth
        self._tls = tls
        self._reads_need_credentials = reads_need_credentials
        self.calls: collections.Counter[tuple[str, str]] = collections.Counter()

    async def unary(self, context: Context, method: str, call: Callable[[], Awaitable[T]], *,
                    mutating: bool) -> T:
        """The answer of ``call()``, once the caller is let in; a failure as a status."""
        async with self._served(context, method, mutating):
            return await call()
        raise AssertionError("_served swallowed a failure")  # pragma: no cover

    async def stream(self, context: Context, method: str, items: Callable[[], AsyncIterator[T]],
                     *, mutating: bool) -> AsyncIterator[T]:
        """The messages of ``items()``, once the caller is let in; a failure as a status."""
        async with self._served(context, method, mutating):
            async for item in items():
                yield item

    @contextlib.asynccontextmanager
    async def _served(self, context: Context, method: str, mutating: bool
                      ) -> AsyncIterator[None]:
        """Lets the caller in, turns what fails inside into the call's status (``_abort``
        raises, so nothing is swallowed) and counts the call by method and code."""
        code = "OK"
        try:
            self._authorize(context, mutating)
            yield
        except RouterError as error:
            code = error.code
            await _abort(context, error)
        except asyncio.CancelledError:
            code = "CANCELLED"  # the client went away, or the listener closed
            raise
        except Exception:
            code = InternalError.code
            await _abort(context, _internal(method))
        finally:
            self.calls[(method, code)] += 1

    def _authorize(self, context: Context, mutating: bool) -> None:
        if self._auth is None:
            return
        identity = None
        if self._tls is not None:
            identity = PeerIdentity.from_auth_context(context.auth_context())
        refused = self._auth.check(
            identity, _metadata(context, AUTHORIZATION),
            needs_credentials=mutating or self._reads_need_credentials,
        )
        if refused is not None:
            self._auth.refused[refused.code] += 1
            raise refused

    def statistics(self) -> dict[str, int]:
        return {f"{method} {code}": n for (method, code), n in sorted(self.calls.items())}


async def _abort(context: Context, error: RouterError) -> NoReturn:
    await context.abort(grpc.StatusCode[error.grpc_status], error.message,
                        ((ROUTER_ERROR_HEADER, error.code),))
    raise AssertionError("context.abort returned")  # pragma: no cover


def _internal(method: str) -> InternalError:
    """A failure nobody chose (a bug): logged with its traceback, answered without it."""
    log.exception("admin gRPC: %s failed", method)
    return InternalError("the router failed to answer this call; its log has the cause")


def _metadata(context: Context, key: str) -> str | None:
    for name, value in context.invocation_metadata() or ():
        if name == key:
            return value if isinstance(value, str) else value.decode(errors="replace")
    return None


# -- messages <-> the directory's models ---------------------------------------------------------


def registration_of(message: pb.Registration) -> Registration:
    data: dict[str, Any] = {
        "address": message.address, "protocol": message.protocol or "frames",
        "models": tuple(message.models), "labels": dict(message.labels),
    }
    if message.HasField("id"):
        data["id"] = message.id
    if message.HasField("weight"):
        data["weight"] = message.weight
    if message.leaseless:
        if message.HasField("lease_ttl_s"):
            raise InvalidInput("lease_ttl_s: a leaseless registration has no lease TTL")
        data["lease_ttl_s"] = None
    elif message.HasField("lease_ttl_s"):
        data["lease_ttl_s"] = message.lease_ttl_s
    return validated(Registration, data)


def report_of(message: pb.LoadReport) -> LoadReport:
    data: dict[str, Any] = {}
    if message.HasField("inflight"):
        data["inflight"] = message.inflight
    if message.HasField("loaded_models"):
        data["loaded_models"] = tuple(message.loaded_models.models)
    if message.HasField("model_use"):
        data["model_use"] = dict(message.model_use.use)
    return validated(LoadReport, data)


def registered_message(registered: Registered) -> pb.Registered:
    return pb.Registered(id=registered.id, lease_ttl_s=registered.lease_ttl_s,
                         heartbeat_interval_s=registered.heartbeat_interval_s)


def report_message(report: LoadReport) -> pb.LoadReport:
    message = pb.LoadReport(inflight=report.inflight)
    if report.loaded_models is not None:
        message.loaded_models.SetInParent()  # set, even empty
        message.loaded_models.models.extend(report.loaded_models)
    if report.model_use is not None:
        message.model_use.SetInParent()  # set, even empty
        message.model_use.use.update(report.model_use)
    return message


def info_message(info: BackendInfo) -> pb.BackendInfo:
    return pb.BackendInfo(
        id=info.id, address=info.address, protocol=info.protocol, models=info.models,
        weight=info.weight, labels=info.labels, source=info.source, state=info.state,
        drained=info.drained, lease_ttl_s=info.lease_ttl_s, inflight=max(info.inflight, 0),
        reported=report_message(info.reported) if info.reported is not None else None,
    )


class RegistryService:
    """``inference_router.v1.Registry``: each method one call of the directory."""

    def __init__(self, directory: BackendDirectory, guard: CallGuard) -> None:
        self._directory = directory
        self._guard = guard

    async def Register(self, request: pb.Registration, context: Context) -> pb.Registered:
        async def call() -> pb.Registered:
            return registered_message(await self._directory.register(registration_of(request)))

        return await self._guard.unary(context, "Register", call, mutating=True)

    async def Heartbeat(self, request: pb.HeartbeatRequest, context: Context
                        ) -> pb.Registered:
        async def call() -> pb.Registered:
            report = report_of(request.report) if request.HasField("report") else None
            return registered_message(await self._directory.heartbeat(request.id, report))

        return await self._guard.unary(context, "Heartbeat", call, mutating=True)

    async def Deregister(self, request: pb.DeregisterRequest, context: Context
                         ) -> pb.BackendInfo:
        async def call() -> pb.BackendInfo:
            return info_message(await self._directory.deregister(request.id))

        return await self._guard.unary(context, "Deregister", call, mutating=True)

    async def List(self, request: pb.ListRequest, context: Context) -> pb.ListResponse:
        async def call() -> pb.ListResponse:
            return pb.ListResponse(backends=[info_message(i) for i in self._directory.list()])

        return await self._guard.unary(context, "List", call, mutating=False)

    async def Watch(self, request: pb.WatchRequest, context: Context
                    ) -> AsyncIterator[pb.WatchEvent]:
        async def events() -> AsyncIterator[pb.WatchEvent]:
            async for event in self._directory.watch():
                yield pb.WatchEvent(kind=event.kind, backend=info_message(event.backend))

        async for message in self._guard.stream(context, "Watch", events, mutating=False):
            yield message


# -- the listeners ---------------------------------------------------------------------------------


class GrpcListener:
    """One grpc.aio server on one address, with the services ``add`` puts on it."""

    def __init__(self, name: str, add: Callable[[grpc.aio.Server], None],
                 tls: ServerTls | None) -> None:
        self.name = name  # the config key of its address, for errors and logs
        self._add = add
        self._tls = tls
        self._server: grpc.aio.Server | None = None

    async def start(self, host: str, port: int) -> tuple[str, int]:
        # grpc reports a port in use as a RuntimeError after logging C-level lines of its own:
        # try the address first, for the kernel's own reason (an OSError).
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        socket.create_server((host, port), family=family).close()
        server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
        self._add(server)
        address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        try:
            if self._tls is not None:
                bound = server.add_secure_port(address, server_credentials(self._tls))
            else:
                bound = server.add_insecure_port(address)
        except RuntimeError as exc:
            raise OSError(str(exc)) from None
        await server.start()
        self._server = server
        log.info("%s: gRPC on %s:%d%s", self.name, host, bound,
                 " (TLS)" if self._tls is not None else "")
        return host, bound

    async def close(self, grace_s: float = CLOSE_GRACE_S) -> None:
        if self._server is not None:
            await self._server.stop(grace_s)
            self._server = None


class AdminGrpc:
    """The admin gRPC listener and the AnyServe one, as ``admin`` configures them (either,
    both or neither), and the keeper of the AnyServe workers' leases while any of them
    serves. ``start`` returns the bound addresses in that order (None: not configured)."""

    def __init__(self, config: AdminConfig, directory: BackendDirectory, auth: AdminAuth,
                 tls: ServerTls | None) -> None:
        self.workers = AnyServeWorkers(directory)
        self.keeper = LeaseKeeper(directory)
        self._addresses = (config.grpc_listen, config.anyserve_listen)
        self.guards: dict[str, CallGuard] = {}
        self._listeners: list[GrpcListener | None] = [None, None]
        if config.grpc_listen is not None:
            guard = self.guards["admin.grpc_listen"] = CallGuard(
                auth, tls,
                reads_need_credentials=not is_loopback(parse_host_port(config.grpc_listen)[0]))
            registry = RegistryService(directory, guard)
            anyserve = WorkerManagementService(self.workers, guard)

            def add_admin(server: grpc.aio.Server) -> None:
                # The generated functions build each method's handler from the .proto; they
                # carry no type hints.
                pb_grpc.add_RegistryServicer_to_server(  # type: ignore[no-untyped-call]
                    registry, server)
                anyserve_grpc.add_WorkerManagementServicer_to_server(  # type: ignore[no-untyped-call]
                    anyserve, server)

            self._listeners[0] = GrpcListener("admin.grpc_listen", add_admin, tls)
        if config.anyserve_listen is not None:
            open_guard = self.guards["admin.anyserve_listen"] = CallGuard(
                None, None, reads_need_credentials=False)
            anyserve_open = WorkerManagementService(self.workers, open_guard)

            def add_anyserve(server: grpc.aio.Server) -> None:
                anyserve_grpc.add_WorkerManagementServicer_to_server(  # type: ignore[no-untyped-call]
                    anyserve_open, server)

            self._listeners[1] = GrpcListener("admin.anyserve_listen", add_anyserve, None)

    async def start(self, listen: Listen
                    ) -> tuple[tuple[str, int] | None, tuple[str, int] | None]:
        """Start each configured listener through ``listen``; then the keeper."""
        bound: list[tuple[str, int] | None] = [None, None]
        for i, (listener, address) in enumerate(zip(self._listeners, self._addresses,
                                                     strict=True)):
            if listener is not None and address is not None:
                bound[i] = await listen(listener.name, address, listener.start)
        if any(listener is not None for listener in self._listeners):
            self.keeper.start()
        return bound[0], bound[1]

    async def close(self) -> None:
        """Stop the listeners (calls in progress get ``CLOSE_GRACE_S``), then the keeper."""
        for listener in self._listeners:
            if listener is not None:
                await listener.close()
        await self.keeper.close()

    def statistics(self) -> dict[str, Any]:
        return {"calls": {name: guard.statistics() for name, guard in self.guards.items()},
                "anyserve": self.workers.statistics(), "keeper": self.keeper.statistics()}

    def __repr__(self) -> str:
        served = [listener.name for listener in self._listeners if listener is not None]
        return f"AdminGrpc({', '.join(served) or 'off'})"
