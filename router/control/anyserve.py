"""AnyServe's worker management (``anyserve.WorkerManagement``) over the backend directory.

AnyServe (github.com/simpx/anyserve) runs model code in worker processes that announce
themselves to its ingress: at start a worker calls ``RegisterModel(model_name, model_version,
worker_address, worker_id)`` on the ingress's management port, once per model, then serves
on a unix socket, to which the ingress forwards each request as a 4-byte big-endian length and
a serialized KServe ``ModelInferRequest`` (the answer: a length and a ``ModelInferResponse``),
one request per connection. That is the router's frames protocol, so the router takes the
same calls and routes frames to the worker:

- ``RegisterModel``: the worker is the record with id ``worker_id`` (the address when empty)
  at ``worker_address`` (AnyServe's workers send ``unix:///path``, read as ``unix:/path``),
  protocol ``frames``, source ``registered``, label ``registered_by = anyserve``, serving the
  models it has registered at that address (``name``; ``name:version`` with a version). Each
  call registers again with the union, which replaces the record without a drain. A call
  from another address is the worker started again elsewhere: its record starts afresh.
- ``UnregisterModel``: the model leaves the record, and the last one deregisters the worker
  (it drains). ``success = false`` when the worker does not serve it, as AnyServe answers.
- ``Heartbeat(worker_id, model_names)``: renews the lease and reports ``model_names`` (when
  there are some) as the loaded models; ``healthy`` is whether the router routes to the
  worker now. An unknown worker gets ``healthy = false`` (AnyServe's ingress answers true
  whatever it knows), which tells a worker that looks to register again.

Errors are statuses with ``x-router-error``, as every admin gRPC call's (``registry_grpc``).

Leases: AnyServe's ingress keeps a registration until ``UnregisterModel`` or until it stops;
its workers never renew anything (its ``Heartbeat`` is a stub that answers healthy, and they
do not call it) and never register again. So the router holds their leases for them:
``LeaseKeeper`` renews the lease of every record labelled ``registered_by = anyserve`` every
third of its TTL for as long as the router runs, whatever the worker's health. A worker the
probes find down is out of rotation, not forgotten, and is routed again once they find it up;
were its lease left to expire it would be lost for good. The lease still ends the records with
the routers, as the registry of an AnyServe ingress ends with it: they are not persisted, a
restarted router has none, and in a shared etcd store they expire once no router renews them.
A worker that is gone for good is removed with ``UnregisterModel``, ``Registry.Deregister``
or ``DELETE /v1/backends/{worker_id}``.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from router.control.api import validated
from router.control.directory import (
    DEFAULT_LEASE_TTL_S,
    BackendDirectory,
    BackendInfo,
    LoadReport,
    Registration,
)
from router.core.errors import BackendNotFound, LeaseNotFound, RouterError, quoted
from router.core.types import UNIX_SCHEME
from router.protocol.proto import anyserve_worker_management_pb2 as pb

if TYPE_CHECKING:
    from router.control.registry_grpc import CallGuard, Context

log = logging.getLogger(__name__)

LABEL = ("registered_by", "anyserve")  # on every record RegisterModel makes
LEASE_TTL_S = DEFAULT_LEASE_TTL_S
RENEW_INTERVAL_S = LEASE_TTL_S / 3  # as a backend renewing its own lease would
# AnyServe's workers write unix://ABSOLUTE_PATH (a gRPC target); records spell unix:/PATH.
_UNIX_URI = "unix://"


def record_address(worker_address: str) -> str:
    """The record address of an AnyServe ``worker_address``: ``unix:///p`` -> ``unix:/p``;
    anything else unchanged (the directory validates it)."""
    if worker_address.startswith(_UNIX_URI + "/"):
        return UNIX_SCHEME + worker_address[len(_UNIX_URI):]
    return worker_address


def model_key(name: str, version: str) -> str:
    """AnyServe's model and version as a record's model: ``name`` or ``name:version``."""
    return f"{name}:{version}" if version else name


def is_anyserve(info: BackendInfo) -> bool:
    return info.source == "registered" and info.labels.get(LABEL[0]) == LABEL[1]


class AnyServeWorkers:
    """The three calls over the directory (the module docstring says what each does). One
    lock serializes them: each reads a worker's models, then registers the new set."""

    def __init__(self, directory: BackendDirectory) -> None:
        self._directory = directory
        self._lock = asyncio.Lock()
        self.counts: collections.Counter[str] = collections.Counter()

    async def register_model(self, request: pb.RegisterModelRequest
                             ) -> pb.RegisterModelResponse:
        model = model_key(request.model_name, request.model_version)
        address = record_address(request.worker_address)
        backend_id = request.worker_id or address
        async with self._lock:
            current = self._worker(backend_id)
            models = tuple(current.models) if current and current.address == address else ()
            if model not in models:
                models += (model,)
            await self._register(backend_id, address, models)
        self.counts["models_registered"] += 1
        log.info("AnyServe worker %s (%s) registered %s", quoted(backend_id), address,
                 quoted(model))
        return pb.RegisterModelResponse(success=True, message="Model registered successfully")

    async def unregister_model(self, request: pb.UnregisterModelRequest
                               ) -> pb.UnregisterModelResponse:
        model = model_key(request.model_name, request.model_version)
        async with self._lock:
            current = self._worker(request.worker_id)
            if current is None or model not in current.models:
                return pb.UnregisterModelResponse(success=False, message="Model not found")
            rest = tuple(m for m in current.models if m != model)
            if rest:
                await self._register(current.id, current.address, rest)
            else:
                await self._directory.deregister(current.id)
        self.counts["models_unregistered"] += 1
        log.info("AnyServe worker %s unregistered %s%s", quoted(current.id), quoted(model),
                 "" if rest else ": it serves nothing more and drains")
        return pb.UnregisterModelResponse(success=True,
                                          message="Model unregistered successfully")

    async def heartbeat(self, request: pb.HeartbeatRequest) -> pb.HeartbeatResponse:
        current = self._worker(request.worker_id)
        if current is None:
            self.counts["heartbeats_unknown"] += 1
            return pb.HeartbeatResponse(healthy=False)
        # No names: a bare renewal (proto3 cannot tell "none loaded" from "not said").
        report = validated(LoadReport, {"loaded_models": tuple(request.model_names)}
                           ) if request.model_names else None
        try:
            await self._directory.heartbeat(current.id, report)
        except LeaseNotFound:  # gone since we looked
            self.counts["heartbeats_unknown"] += 1
            return pb.HeartbeatResponse(healthy=False)
        self.counts["heartbeats"] += 1
        return pb.HeartbeatResponse(healthy=self._directory.get(current.id).state == "healthy")

    def _worker(self, backend_id: str) -> BackendInfo | None:
        """The AnyServe worker's record with ``backend_id``, if there is one."""
        try:
            info = self._directory.get(backend_id)
        except BackendNotFound:
            return None
        return info if is_anyserve(info) else None

    async def _register(self, backend_id: str, address: str, models: tuple[str, ...]) -> None:
        registration = validated(Registration, {
            "id": backend_id, "address": address, "protocol": "frames", "models": models,
            "labels": dict([LABEL]), "lease_ttl_s": LEASE_TTL_S,
        })
        await self._directory.register(registration)

    def statistics(self) -> dict[str, int]:
        return dict(self.counts)


class WorkerManagementService:
    """``anyserve.WorkerManagement`` on one listener: the calls of ``AnyServeWorkers``
    through that listener's guard (credentials, or none on ``admin.anyserve_listen``)."""

    def __init__(self, workers: AnyServeWorkers, guard: CallGuard) -> None:
        self._workers = workers
        self._guard = guard

    async def RegisterModel(self, request: pb.RegisterModelRequest, context: Context
                            ) -> pb.RegisterModelResponse:
        return await self._guard.unary(context, "RegisterModel",
                                       lambda: self._workers.register_model(request),
                                       mutating=True)

    async def UnregisterModel(self, request: pb.UnregisterModelRequest, context: Context
                              ) -> pb.UnregisterModelResponse:
        return await self._guard.unary(context, "UnregisterModel",
                                       lambda: self._workers.unregister_model(request),
                                       mutating=True)

    async def Heartbeat(self, request: pb.HeartbeatRequest, context: Context
                        ) -> pb.HeartbeatResponse:
        return await self._guard.unary(context, "AnyServeHeartbeat",
                                       lambda: self._workers.heartbeat(request), mutating=True)


class LeaseKeeper:
    """Renews the leases of AnyServe workers' records (module docstring: why) every
    ``interval_s``, in its own task between ``start`` and ``close``."""

    def __init__(self, directory: BackendDirectory, interval_s: float = RENEW_INTERVAL_S,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep) -> None:
        self._directory = directory
        self._interval_s = interval_s
        self._sleep = sleep
        self._task: asyncio.Task[None] | None = None
        self.passes = 0
        self.renewals = 0
        self.failures = 0

    async def renew(self) -> int:
        """One pass: renew every AnyServe record's lease; returns how many were renewed. A
        record gone meanwhile is skipped; a store that fails is tried again next pass."""
        renewed = 0
        for info in self._directory.list():
            if not is_anyserve(info):
                continue
            try:
                await self._directory.heartbeat(info.id)
            except LeaseNotFound:
                continue
            except RouterError as exc:
                self.failures += 1
                log.warning("AnyServe worker %s: lease not renewed (%s); next try in %gs",
                            quoted(info.id), exc.message, self._interval_s)
                continue
            renewed += 1
        self.passes += 1
        self.renewals += renewed
        return renewed

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="anyserve-leases")

    async def _run(self) -> None:
        while True:
            await self._sleep(self._interval_s)
            try:
                await self.renew()
            except Exception:  # a bug in one pass must not leave every worker to expire
                self.failures += 1
                log.exception("AnyServe workers: a lease renewal pass failed")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    def statistics(self) -> dict[str, Any]:
        return {"passes": self.passes, "renewals": self.renewals, "failures": self.failures,
                "running": self._task is not None and not self._task.done()}

    def __repr__(self) -> str:
        return f"LeaseKeeper(every {self._interval_s:g}s, renewals={self.renewals})"
