"""The backend directory: every backend the router knows, whatever its source, and the one
place that changes them at run time. The admin HTTP API (``/v1/backends``), the gRPC
``inference_router.v1.Registry`` service, its AnyServe-compatible ``RegisterModel`` and the
replica manager all call it, so the four ways in share one set of rules.

Sources: ``static`` backends come from the config file (``Fleet`` keeps them in the data
plane's ``Registry``); ``api``, ``registered`` and ``managed`` ones are records in the
``RegistryStore`` (memory, or etcd shared by many routers). The directory follows the store's
watch and makes the data plane hold what the store holds:

- a record put joins the data plane at once, routable, then probed like any other (a record
  for the same id at the same address and protocol only changes its spec); one at an address
  a static backend holds is left out and logged (the config keeps its address);
- a record deleted (deregistered) or expired (lease not renewed) *drains*: no new requests,
  those in flight finish, then it is removed (``Registry.drain``);
- ``drained`` on a record (and a drain override on a static backend) keeps the backend a
  member, probed, but out of rotation (``Registry.set_drained``) until undrained.

Every mutation returns once the data plane has applied it (or after ``apply_timeout_s``,
for a shared store whose watch lags): a backend is routable when its registration answers,
and gets no new request once its deregistration answers.

Rules of identity: a backend's id defaults to its address. A registration replaces the
registration with its id or at its address (a backend that restarted registers again), but
never an ``api`` or ``static`` backend: their ids are ``BACKEND_EXISTS``, their addresses
``ADDRESS_CONFLICT``. An API backend (a registration with ``lease_ttl_s`` null) is new or
``BACKEND_EXISTS``.

States (``BackendState``): ``starting`` (a record not yet in the data plane), ``healthy``,
``unhealthy`` (its probes or passive health say so), ``draining`` (leaving, or drained by an
operator), ``removed`` (only in watch events: it has left).

Persistence: API backends (with their drain flag) and drain and weight overrides of static
backends are the desired state saved to ``state.file`` on every change and restored on
start; leased records are not (they register again on NOT_FOUND). A shared store (etcd)
keeps API backends itself, so the state file then holds only this router's overrides of its
static backends: a router's copy of a shared record is stale once another router changes or
deletes it, and restoring it would undo that change.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

import pydantic

from router.control.state import ApiBackend, DesiredState, DesiredStateStore, StaticOverride
from router.control.store import (
    BackendAddress,
    BackendId,
    BackendRecord,
    LabelKey,
    LabelValue,
    Model,
    RecordProtocol,
    RegistryStore,
    StoreEvent,
    record_protocol,
)
from router.core.config import Seconds
from router.core.errors import (
    AddressConflict,
    AddressNotAllowed,
    BackendExists,
    BackendIsStatic,
    BackendNotFound,
    InvalidInput,
    LeaseNotFound,
    RouterError,
    StoreUnavailable,
    quoted,
)
from router.core.types import MAX_MODEL_USE, MAX_REPORTED_MODELS, BackendSpec, Source
from router.dispatch.backends import Backend, Registry

log = logging.getLogger(__name__)

DEFAULT_LEASE_TTL_S = 10.0
# The most a mutation waits for the store's watch to bring its change back; a shared store
# whose watch is down still got the change, and the answer says so.
APPLY_TIMEOUT_S = 2.0
# Registration results, as counted in router_registrations_total{result}.
REGISTRATION_RESULTS = ("created", "replaced", "rejected", "failed")
HEARTBEAT_RESULTS = ("ok", "lease_not_found", "failed")
# Leases renewed by one batch at most: a request of about 1 MiB.
MAX_BATCH = 10_000
# A watcher of the directory reads at most this many events behind before it is dropped.
MAX_WATCH_BACKLOG = 4096

# Registry change reasons that come from the directory's own changes, not from health.
_OWN_REASONS = frozenset({"drained", "undrained", "draining"})

BackendState = Literal["starting", "healthy", "unhealthy", "draining", "removed"]
EventKind = Literal["joined", "changed", "left"]


class Registration(pydantic.BaseModel):
    """A backend joining: the body of ``POST /v1/backends`` and of gRPC ``Register``."""

    model_config = pydantic.ConfigDict(extra="forbid", frozen=True)

    id: BackendId | None = pydantic.Field(None, description="default: the address")
    address: BackendAddress
    protocol: RecordProtocol = "frames"
    models: tuple[Model, ...] = pydantic.Field(
        (), max_length=256, description='"name" (every version) or "name:version"')
    weight: int = pydantic.Field(1, ge=1, le=1000, strict=True)
    labels: dict[LabelKey, LabelValue] = pydantic.Field(default_factory=dict, max_length=64)
    lease_ttl_s: Seconds | None = pydantic.Field(
        DEFAULT_LEASE_TTL_S, description="renew within this many seconds (heartbeat); null: an "
        "API backend, kept (and persisted) until deleted")


class Registered(pydantic.BaseModel):
    """The answer to a registration or a heartbeat."""

    id: str
    lease_ttl_s: float | None
    heartbeat_interval_s: float | None = pydantic.Field(
        description="when to renew: a third of the lease TTL")


ModelUse = Annotated[int, pydantic.Field(ge=0, le=MAX_MODEL_USE, strict=True)]


class LoadReport(pydantic.BaseModel):
    """What a heartbeat may carry: the backend's own view of its load and models."""

    model_config = pydantic.ConfigDict(extra="forbid", frozen=True)

    inflight: int | None = pydantic.Field(None, ge=0, le=1_000_000_000, strict=True)
    loaded_models: tuple[Model, ...] | None = pydantic.Field(
        None, max_length=MAX_REPORTED_MODELS)
    model_use: dict[Model, ModelUse] | None = pydantic.Field(
        None, max_length=MAX_REPORTED_MODELS,
        description="model -> its requests at the backend now, running or waiting there, "
        "whichever router sent them (models with none may be left out): what lets several "
        "routers see each other's queues")

    def empty(self) -> bool:
        return self.inflight is None and self.loaded_models is None and self.model_use is None


class LeaseRenewal(LoadReport):
    """One lease of a batch (``PUT /v1/leases``): the backend's id and its report."""

    id: BackendId

    def report(self) -> LoadReport | None:
        if self.empty():
            return None
        return LoadReport(inflight=self.inflight, loaded_models=self.loaded_models,
                          model_use=self.model_use)


class LeaseBatch(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid", frozen=True)

    leases: tuple[LeaseRenewal, ...] = pydantic.Field(max_length=MAX_BATCH)


class LeaseBatchResult(pydantic.BaseModel):
    renewed: list[str]
    not_found: list[str] = pydantic.Field(description="register these again")


class WeightChange(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid", frozen=True)

    weight: int = pydantic.Field(ge=1, le=1000, strict=True)


class BackendInfo(pydantic.BaseModel):
    """One backend as the directory shows it."""

    id: str
    address: str
    protocol: RecordProtocol
    models: list[str]
    weight: int
    labels: dict[str, str]
    source: Source
    state: BackendState
    drained: bool
    lease_ttl_s: float | None
    inflight: int
    reported: LoadReport | None = pydantic.Field(
        None, description="the backend's last heartbeat report (this router's)")


class DirectoryList(pydantic.RootModel[list[BackendInfo]]):
    pass


@dataclass(frozen=True, slots=True)
class DirectoryEvent:
    """A change watchers hear: ``joined`` (a new id), ``changed`` (spec, drain flag, health),
    ``left`` (state ``removed``)."""

    kind: EventKind
    backend: BackendInfo


@dataclass(eq=False)
class _Watcher:
    queue: collections.deque[DirectoryEvent] = field(default_factory=collections.deque)
    wakeup: asyncio.Event = field(default_factory=asyncio.Event)
    overflowed: bool = False


class BackendDirectory:
    def __init__(
        self,
        registry: Registry,
        store: RegistryStore,
        backend_of: Callable[[BackendSpec], Backend],
        state_file: DesiredStateStore | None = None,
        apply_timeout_s: float = APPLY_TIMEOUT_S,
        allows: Callable[[str], bool] = lambda address: True,
    ) -> None:
        """``allows(address)``: whether a backend may register there
        (``RegistryConfig.allows``); replicas the router starts (source managed) are not
        asked."""
        self._registry = registry
        self._allows = allows
        self._store = store
        self._backend_of = backend_of
        self._state_file = state_file
        self._apply_timeout_s = apply_timeout_s
        self._records: dict[str, BackendRecord] = {}  # the store as its watch has told us
        self._joined: dict[str, Backend] = {}  # record id -> its member in the data plane
        self._leaving: dict[Backend, BackendRecord] = {}  # draining out, by record
        self._overrides: dict[str, StaticOverride] = {}  # static backend id -> override
        self._reports: dict[str, LoadReport] = {}
        # Told (id, report) of every heartbeat that carries one (the residency view).
        self._report_listeners: list[Callable[[str, LoadReport], None]] = []
        self._applied: dict[str, list[tuple[Callable[[], bool], asyncio.Future[None]]]] = {}
        self._watchers: set[_Watcher] = set()
        self._follow_task: asyncio.Task[None] | None = None
        self.registrations = dict.fromkeys(REGISTRATION_RESULTS, 0)
        self.heartbeats = dict.fromkeys(HEARTBEAT_RESULTS, 0)
        self.lease_expirations = 0
        registry.add_join_listener(self._static_joined)
        registry.add_leave_listener(self._left)
        registry.add_listener(self._health_changed)

    # -- start and stop -----------------------------------------------------------------------

    async def start(self) -> None:
        """Restore the saved state, then follow the store, and return once the data plane
        holds what the store holds: a router that starts on a shared store routes to its fleet
        from the first request. Static backends are in the registry already (the fleet
        started first), so their overrides apply now."""
        saved = self._state_file.load() if self._state_file is not None else DesiredState()
        self._overrides = dict(saved.static)
        for backend in list(self._registry):
            self._static_joined(backend)
        self._follow_task = asyncio.create_task(self._follow(), name="directory-follow")
        await self._wait_applied_all(await self._stored_ids())
        restored = self._restorable(saved)
        for api in restored:
            record = BackendRecord.parse({**api.model_dump(exclude={"drained"}), "source": "api",
                                          "drained": api.drained})
            await self._store.put(record)
        await self._wait_applied_all(api.id for api in restored)

    async def _stored_ids(self) -> list[str]:
        """The ids of the records in the store now; none when it cannot be reached (its watch
        brings them once it is back)."""
        try:
            return [record.id for record in await self._store.list()]
        except StoreUnavailable as exc:
            log.warning("registry: the store cannot be reached (%s); starting without its "
                        "backends, which join once it is back", exc.message)
            return []

    def _restorable(self, saved: DesiredState) -> tuple[ApiBackend, ...]:
        """The saved API backends to put back: none into a shared store, which has kept them
        (module docstring: persistence)."""
        if self._store.shared and saved.backends:
            log.warning("registry: %d API backends in the state file are not restored: the "
                        "shared store keeps API backends", len(saved.backends))
            return ()
        return saved.backends

    async def flush_state(self) -> None:
        """Wait for the state-file writes queued so far."""
        if self._state_file is not None:
            await self._state_file.flush()

    async def close(self) -> None:
        if self._follow_task is not None:
            self._follow_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._follow_task
        await self._store.close()
        await self.flush_state()
        for watcher in self._watchers:
            watcher.wakeup.set()

    # -- what the API calls -------------------------------------------------------------------

    async def register(self, registration: Registration, source: Source = "registered"
                       ) -> Registered:
        """Add a backend (``lease_ttl_s`` null: an API backend, source ``api``)."""
        try:
            result, registered = await self._register(registration, source)
        except RouterError as exc:
            self.registrations["rejected" if exc.fault == "client" else "failed"] += 1
            raise
        self.registrations[result] += 1
        return registered

    async def _register(self, registration: Registration, source: Source
                        ) -> tuple[str, Registered]:
        ttl = registration.lease_ttl_s
        if ttl is None and source == "registered":
            source = "api"
        backend_id = registration.id or registration.address
        record = BackendRecord.parse({
            **registration.model_dump(exclude={"id", "lease_ttl_s"}), "id": backend_id,
            "source": source,
        })
        if source != "managed" and not self._allows(record.address):
            raise AddressNotAllowed(f"{record.address} is outside registry.allowed_networks "
                                    "(or a unix socket while registry.allow_unix is off)")
        self._check_free(record, replaceable=ttl is not None)
        replaced = backend_id in self._records or any(
            r.address == record.address for r in self._records.values())
        lease_id = await self._store.put(record, ttl)
        stored = record.with_lease(lease_id, ttl)
        await self._wait_applied(backend_id, lambda: self._records.get(backend_id) == stored)
        if source == "api":
            self._save()
        log.info("backend %s (%s, %s) %s%s", quoted(backend_id), record.address, source,
                 "registered again" if replaced else "joined",
                 f", lease {ttl:g}s" if ttl is not None else "")
        return ("replaced" if replaced else "created"), _registered(backend_id, ttl)

    def _check_free(self, record: BackendRecord, *, replaceable: bool) -> None:
        """Refuse a record whose id or address belongs to a backend it may not replace."""
        for backend in self._registry:
            spec = backend.spec
            if spec.source != "static":
                continue
            if spec.address == record.address:
                raise AddressConflict(f"{record.address} is the address of backend "
                                      f"{quoted(spec.id)} of the config file")
            if spec.id == record.id:
                raise BackendExists(f"backend {quoted(record.id)} is in the config file")
        for other in self._records.values():
            mine = other.id == record.id
            if not mine and other.address != record.address:
                continue
            if replaceable and other.source == record.source:
                continue  # a backend registering again
            if mine:
                raise BackendExists(f"backend {quoted(record.id)} exists ({other.source}, at "
                                    f"{other.address})")
            raise AddressConflict(f"{record.address} is the address of backend "
                                  f"{quoted(other.id)} ({other.source})")

    async def heartbeat(self, backend_id: str, report: LoadReport | None = None) -> Registered:
        """Renew the lease of a registered backend; ``LeaseNotFound`` when it has none (it
        registers again)."""
        record = self._records.get(backend_id)
        try:
            if record is None or record.lease_id is None:
                raise LeaseNotFound(f"no lease for backend {quoted(backend_id)}: register again")
            if not await self._store.refresh(record.lease_id):
                raise LeaseNotFound(f"the lease of backend {quoted(backend_id)} has expired: "
                                    "register again")
        except LeaseNotFound:
            self.heartbeats["lease_not_found"] += 1
            raise
        except RouterError:
            self.heartbeats["failed"] += 1
            raise
        self.heartbeats["ok"] += 1
        if report is not None and backend_id in self._records:
            self._reports[backend_id] = report
            for listener in list(self._report_listeners):
                listener(backend_id, report)
        return _registered(backend_id, record.lease_ttl_s)

    async def heartbeat_many(self, renewals: Sequence[LeaseRenewal]) -> LeaseBatchResult:
        """Renew many leases in one call (a process that runs many backends sends one request
        per interval, not one per backend): each renewal as ``heartbeat``; the ids whose lease
        the router does not hold are listed, and those backends register again."""
        renewed, not_found = [], []
        for renewal in renewals:
            try:
                await self.heartbeat(renewal.id, renewal.report())
            except LeaseNotFound:
                not_found.append(renewal.id)
            else:
                renewed.append(renewal.id)
        return LeaseBatchResult(renewed=renewed, not_found=not_found)

    async def deregister(self, backend_id: str) -> BackendInfo:
        """Remove a registered, API or managed backend: it drains, then leaves."""
        if backend_id not in self._records:
            static = self._static(backend_id)  # BackendNotFound if none
            raise BackendIsStatic(f"backend {quoted(backend_id)} ({static.address}) is in the "
                                  "config file: remove it there and reload")
        record = self._records[backend_id]
        backend = self._joined.get(backend_id)
        await self._store.delete(backend_id)
        await self._wait_applied(backend_id, lambda: backend_id not in self._records)
        if record.source == "api":
            self._save()
        log.info("backend %s (%s) deregistered: draining", quoted(backend_id), record.address)
        info = self._info(record, backend)
        return info.model_copy(update={"state": "draining" if backend in self._leaving
                                       else "removed"})

    async def set_drained(self, backend_id: str, drained: bool) -> BackendInfo:
        """An operator's drain (out of rotation, kept, probed) or undrain."""
        return await self._change(backend_id, drained=drained)

    async def set_weight(self, backend_id: str, weight: int) -> BackendInfo:
        return await self._change(backend_id, weight=weight)

    async def _change(self, backend_id: str, **change: Any) -> BackendInfo:
        record = self._records.get(backend_id)
        if record is None:
            backend = self._static(backend_id)
            override = self._overrides.get(backend_id, StaticOverride())
            self._overrides[backend_id] = override.model_copy(update=change)
            self._apply_override(backend)
            self._save()
            return self._static_info(backend)
        stored = await self._store.update(record.model_copy(update=change))
        if stored is None:
            raise BackendNotFound(f"backend {quoted(backend_id)} has just left")
        await self._wait_applied(backend_id, lambda: self._records.get(backend_id) == stored)
        if stored.source == "api":
            self._save()
        return self.get(backend_id)

    def _static(self, backend_id: str) -> Backend:
        """The static backend with ``backend_id``; ``BackendNotFound`` if none."""
        for backend in self._registry:
            if backend.spec.id == backend_id and backend.spec.source == "static":
                return backend
        raise BackendNotFound(f"no backend has the id {quoted(backend_id)}")

    def list(self) -> list[BackendInfo]:
        """Every backend: static, then records, then those leaving (``draining`` until what
        is in flight on them has finished)."""
        static = [self._static_info(b) for b in self._registry if b.spec.source == "static"]
        records = [self._info(r, self._joined.get(r.id)) for r in self._records.values()]
        return static + records + [self._info(r, b, "draining") for b, r in
                                   self._leaving.items() if r.id not in self._records]

    def get(self, backend_id: str) -> BackendInfo:
        record = self._records.get(backend_id)
        if record is not None:
            return self._info(record, self._joined.get(backend_id))
        for backend, left in self._leaving.items():
            if left.id == backend_id:
                return self._info(left, backend, "draining")
        return self._static_info(self._static(backend_id))

    def add_report_listener(self, listener: Callable[[str, LoadReport], None]) -> None:
        """``listener(id, report)`` on every heartbeat of a backend that carries a report."""
        self._report_listeners.append(listener)

    def reported(self, backend_id: str) -> LoadReport | None:
        """The last heartbeat report of a backend (for the affinity policy)."""
        return self._reports.get(backend_id)

    async def watch(self) -> AsyncIterator[DirectoryEvent]:
        """Every backend now (``joined``), then each change. A watcher that falls
        ``MAX_WATCH_BACKLOG`` events behind is ended (``InvalidInput``-free: it just stops,
        and the caller watches again)."""
        watcher = _Watcher()
        for info in self.list():
            watcher.queue.append(DirectoryEvent("joined", info))
        self._watchers.add(watcher)
        try:
            while True:
                while watcher.queue:
                    yield watcher.queue.popleft()
                if watcher.overflowed or self._follow_task is None or self._follow_task.done():
                    return
                watcher.wakeup.clear()
                await watcher.wakeup.wait()
        finally:
            self._watchers.discard(watcher)

    # -- following the store ------------------------------------------------------------------

    async def _follow(self) -> None:
        async for event in self._store.watch():
            try:
                self._apply(event)
            except Exception:  # one bad record must not stop the router following its store
                log.exception("registry: could not apply %s of %s", event.kind,
                              quoted(event.record.id))
            self._wake(event.record.id)

    def _apply(self, event: StoreEvent) -> None:
        record = event.record
        old = self._records.get(record.id)
        if event.kind != "put":
            if old is None:
                return
            del self._records[record.id]
            self._reports.pop(record.id, None)
            if event.kind == "expired":
                self.lease_expirations += 1
                log.warning("backend %s (%s): lease expired, draining", quoted(record.id),
                            record.address)
            self._leave(record)
            return
        self._records[record.id] = record
        backend = self._joined.get(record.id)
        spec = record.to_spec()
        if backend is not None and (backend.address, backend.kind) == (spec.address,
                                                                       spec.protocol):
            self._registry.update(spec)
            self._registry.set_drained(spec.address, record.drained)
            self._publish("changed", record, backend)
            return
        if backend is not None:
            self._leave(old or record)
        self._join(record, spec, new_id=old is None)

    def _join(self, record: BackendRecord, spec: BackendSpec, *, new_id: bool) -> None:
        member = self._registry.get(spec.address)
        if member is not None:
            owner = self._owner(member)
            if owner is None:  # static: the config keeps its address
                log.warning("backend %s: %s is a backend of the config file; left out",
                            quoted(record.id), spec.address)
                self._publish("joined" if new_id else "changed", record, None)
                return
            # Another record had this address (a replacement whose delete has not come yet).
            self._joined.pop(owner, None)
            self._drain_member(member)
        backend = self._backend_of(spec)
        backend.drained = record.drained
        self._registry.add(backend)
        self._joined[record.id] = backend
        self._publish("joined" if new_id else "changed", record, backend)

    def _owner(self, backend: Backend) -> str | None:
        """The record id whose member ``backend`` is; None for a static backend."""
        for backend_id, joined in self._joined.items():
            if joined is backend:
                return backend_id
        return None

    def _leave(self, record: BackendRecord) -> None:
        backend = self._joined.pop(record.id, None)
        if backend is None:
            self._publish("left", record, None)
            return
        self._leaving[backend] = record
        self._publish("changed", record, backend, state="draining")
        self._drain_member(backend)  # may leave at once: _left publishes "left"

    def _drain_member(self, backend: Backend) -> None:
        if self._registry.get(backend.address) is backend:
            self._registry.drain(backend.address)

    def _left(self, backend: Backend) -> None:
        record = self._leaving.pop(backend, None)
        if record is not None:
            self._publish("left", record, backend, state="removed")

    def _static_joined(self, backend: Backend) -> None:
        if backend.spec.source == "static" and backend.spec.id in self._overrides:
            self._apply_override(backend)

    def _apply_override(self, backend: Backend) -> None:
        override = self._overrides.get(backend.spec.id, StaticOverride())
        self._registry.set_weight(backend.address, override.weight)
        self._registry.set_drained(backend.address, override.drained)

    def _health_changed(self, backend: Backend, reason: str) -> None:
        if not self._watchers or backend.draining or reason in _OWN_REASONS:
            return  # the directory's own changes publish themselves
        owner = self._owner(backend)
        if owner is not None and owner in self._records:
            self._publish("changed", self._records[owner], backend)
        elif backend.spec.source == "static" and self._registry.get(backend.address) is backend:
            self._broadcast(DirectoryEvent("changed", self._static_info(backend)))

    # -- waiting for the watch ----------------------------------------------------------------

    async def _wait_applied(self, backend_id: str, done: Callable[[], bool]) -> None:
        if done():
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._applied.setdefault(backend_id, []).append((done, future))
        try:
            await asyncio.wait_for(asyncio.shield(future), self._apply_timeout_s)
        except TimeoutError:
            log.warning("registry: the store's watch has not brought back the change of "
                        "backend %s within %gs; it applies when it does", quoted(backend_id),
                        self._apply_timeout_s)
        finally:
            waiting = self._applied.get(backend_id, [])
            with contextlib.suppress(ValueError):
                waiting.remove((done, future))
            if not waiting:
                self._applied.pop(backend_id, None)

    async def _wait_applied_all(self, backend_ids: Iterable[str]) -> None:
        """Wait until the watch has brought a record for each id, at most
        ``apply_timeout_s`` in all."""
        try:
            async with asyncio.timeout(self._apply_timeout_s):
                for backend_id in backend_ids:
                    await self._wait_applied(backend_id, _has(self._records, backend_id))
        except TimeoutError:
            log.warning("registry: the store's watch has not brought every record within %gs; "
                        "they join when it does", self._apply_timeout_s)

    def _wake(self, backend_id: str) -> None:
        for done, future in list(self._applied.get(backend_id, ())):
            if not future.done() and done():
                future.set_result(None)

    # -- views, events, persistence -----------------------------------------------------------

    def _info(self, record: BackendRecord, backend: Backend | None,
              state: BackendState | None = None) -> BackendInfo:
        return BackendInfo(
            id=record.id, address=record.address, protocol=record.protocol,
            models=list(record.models), weight=record.weight, labels=dict(record.labels),
            source=record.source, state=state or _state_of(backend), drained=record.drained,
            lease_ttl_s=record.lease_ttl_s, inflight=backend.inflight if backend else 0,
            reported=self._reports.get(record.id),
        )

    def _static_info(self, backend: Backend) -> BackendInfo:
        spec = backend.spec
        return BackendInfo(
            id=spec.id, address=spec.address, protocol=record_protocol(spec.protocol),
            models=list(spec.models), weight=backend.weight, labels=dict(spec.labels),
            source=spec.source, state=_state_of(backend), drained=backend.drained,
            lease_ttl_s=None, inflight=backend.inflight,
        )

    def _publish(self, kind: EventKind, record: BackendRecord, backend: Backend | None,
                 state: BackendState | None = None) -> None:
        if self._watchers:
            self._broadcast(DirectoryEvent(kind, self._info(record, backend, state)))

    def _broadcast(self, event: DirectoryEvent) -> None:
        for watcher in self._watchers:
            if len(watcher.queue) >= MAX_WATCH_BACKLOG:
                watcher.overflowed = True
            elif not watcher.overflowed:
                watcher.queue.append(event)
            watcher.wakeup.set()

    def desired_state(self) -> DesiredState:
        backends = () if self._store.shared else tuple(
            ApiBackend(id=r.id, address=r.address, protocol=r.protocol, models=r.models,
                       weight=r.weight, labels=dict(r.labels), drained=r.drained)
            for r in self._records.values() if r.source == "api")
        static = {k: v for k, v in self._overrides.items() if v != StaticOverride()}
        return DesiredState(backends=backends, static=static)

    def _save(self) -> None:
        if self._state_file is not None:
            self._state_file.save_async(self.desired_state())

    def counts(self) -> Iterator[tuple[BackendState, Source, int]]:
        """(state, source, how many) for router_backends."""
        tally = collections.Counter((b.state, b.source) for b in self.list())
        for (state, source), count in sorted(tally.items()):
            yield state, source, count

    def statistics(self) -> dict[str, Any]:
        return {"records": len(self._records), "joined": len(self._joined),
                "leaving": len(self._leaving), "watchers": len(self._watchers),
                "registrations": dict(self.registrations), "heartbeats": dict(self.heartbeats),
                "lease_expirations": self.lease_expirations,
                "store": self._store.statistics()}


def _registered(backend_id: str, ttl: float | None) -> Registered:
    return Registered(id=backend_id, lease_ttl_s=ttl,
                      heartbeat_interval_s=ttl / 3 if ttl is not None else None)


def _has(records: dict[str, BackendRecord], backend_id: str) -> Callable[[], bool]:
    return lambda: backend_id in records


def _state_of(backend: Backend | None) -> BackendState:
    if backend is None:
        return "starting"
    if backend.draining or backend.drained:
        return "draining"
    return "healthy" if backend.healthy else "unhealthy"


__all__ = ["BackendDirectory", "BackendInfo", "DirectoryEvent", "InvalidInput", "LoadReport",
           "Registered", "Registration", "WeightChange"]
