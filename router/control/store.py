"""The registry store: where backend records live, with their leases, and how routers learn of
changes.

A ``BackendRecord`` is who a backend is (the control plane's side of ``BackendSpec``) plus the
lease that keeps it, when it has one. A ``RegistryStore`` keeps records by id:

- ``put(record, lease_ttl_s)`` stores it; with a TTL the record is *leased* and goes away by
  itself unless ``refresh(lease_id)`` renews it within the TTL. A put replaces, never
  duplicates: a record with the same id is overwritten (its old lease dropped), and a record
  under another id at the same address is deleted, so a backend that registers again after a
  restart has one record.
- ``refresh`` answers False for a lease it does not know or that has expired: the caller says
  NOT_FOUND and the backend registers again (that is how backends find a restarted router).
- ``watch()`` is an async iterator of ``StoreEvent``: first the current records, as ``put``
  events (the snapshot as of its first ``__anext__``), then every change: ``put``, ``delete``
  (deleted or replaced by address), ``expired`` (lease not renewed). A consumer that applies
  the events in order holds the store's records. A slow consumer never makes the store buffer
  without bound: past ``MAX_PENDING_EVENTS`` its queue is dropped and its next read gets the
  *differences* between what it was told and what the store now holds (``changes``), the
  same resync a watch of etcd performs after losing its connection.

Every method returns within a bounded time and raises only ``RouterError`` subclasses:
``StoreUnavailable`` (the store cannot be reached or is closed), ``StoreFull``
(``registry.max_backends``), ``InvalidInput``. Two stores: ``MemoryStore`` here (one router;
leases on the injected ``Clock``) and ``EtcdStore`` in ``etcd_store`` (many routers).
"""

from __future__ import annotations

import asyncio
import random
from collections import deque
from collections.abc import AsyncGenerator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Annotated, Any, Literal, Protocol, get_args

import orjson
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, model_validator

from router.core.clock import Clock, Timer
from router.core.config import (
    MAX_DURATION_S,
    Int,
    ModelName,
    RegistryConfig,
    Seconds,
    check_unix_address,
    is_unix_address,
    parse_host_port,
)
from router.core.errors import InvalidInput, StoreFull, StoreUnavailable, quoted
from router.core.types import BackendSpec, Source
from router.core.types import Protocol as SpecProtocol

if TYPE_CHECKING:
    from router.control.etcd_store import EtcdStore

LeaseId = int
RecordProtocol = Literal["frames", "grpc"]  # "frames": the length-prefixed protocol
EventKind = Literal["put", "delete", "expired"]

# The one place a record's protocol meets the data plane's spelling of it.
_SPEC_PROTOCOL: dict[RecordProtocol, SpecProtocol] = {"frames": "tcp", "grpc": "grpc"}
_RECORD_PROTOCOL: dict[SpecProtocol, RecordProtocol] = {v: k for k, v in _SPEC_PROTOCOL.items()}



def record_protocol(protocol: SpecProtocol) -> RecordProtocol:
    """A data-plane protocol as records, the API and the state file spell it."""
    return _RECORD_PROTOCOL[protocol]


# A watcher's queue holds this many events before it is dropped for a resync: far more than
# a burst of registrations between two reads of a consumer that keeps up.
MAX_PENDING_EVENTS = 1024
# The largest etcd lease id (int64); memory leases are drawn from the same range.
MAX_LEASE_ID = 2**63 - 1


def check_backend_address(value: str) -> str:
    """``HOST:PORT`` (port 1-65535) or ``unix:/absolute/path``; returned unchanged."""
    if is_unix_address(value):
        return check_unix_address(value)
    if parse_host_port(value)[1] == 0:
        raise ValueError(f"port 0 names no backend, got {quoted(value)}")
    return value


BackendAddress = Annotated[
    str, AfterValidator(check_backend_address),
    Field(json_schema_extra={"format": "HOST:PORT or unix:/path"}),
]
# Ids are keys in etcd and path segments of the admin API: printable, no spaces.
BackendId = Annotated[str, Field(min_length=1, max_length=256, pattern=r"^[^\s\x00-\x1f\x7f]+$")]
LabelKey = Annotated[str, Field(min_length=1, max_length=128, pattern=r"^[^\s\x00-\x1f\x7f]+$")]
LabelValue = Annotated[str, Field(max_length=256)]
Model = Annotated[ModelName, Field(max_length=256)]


class BackendRecord(BaseModel):
    """One backend as the registry stores it: frozen (a change is a new record), validated on
    construction. ``labels`` is never mutated after construction."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    id: BackendId
    address: BackendAddress
    protocol: RecordProtocol = "frames"
    models: tuple[Model, ...] = Field((), max_length=256)
    weight: Int = Field(1, ge=1, le=1000)
    labels: dict[LabelKey, LabelValue] = Field(default_factory=dict, max_length=64)
    source: Source = "static"
    # Out of rotation by an operator's drain (admin API), kept until undrained or removed.
    drained: bool = False
    lease_id: Int | None = Field(None, ge=1, le=MAX_LEASE_ID)
    lease_ttl_s: Seconds | None = None

    @model_validator(mode="after")
    def _lease_whole(self) -> BackendRecord:
        if (self.lease_id is None) != (self.lease_ttl_s is None):
            raise ValueError("lease_id and lease_ttl_s are set together or not at all")
        return self

    @classmethod
    def parse(cls, data: Mapping[str, Any]) -> BackendRecord:
        """Validate a mapping; ``InvalidInput`` names every field that is wrong."""
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise InvalidInput(_problems(exc)) from None

    @classmethod
    def from_json(cls, data: bytes) -> BackendRecord:
        """The record ``to_json`` wrote. Fields this version does not know are ignored: routers
        of two versions share one etcd during a rolling upgrade."""
        try:
            raw = orjson.loads(data)
        except orjson.JSONDecodeError as exc:
            raise InvalidInput(f"not JSON: {exc}") from None
        if not isinstance(raw, dict):
            raise InvalidInput("not a JSON object")
        return cls.parse({k: v for k, v in raw.items() if k in cls.model_fields})

    def to_json(self) -> bytes:
        return orjson.dumps(self.model_dump(mode="json"))

    def to_spec(self) -> BackendSpec:
        return BackendSpec(
            id=self.id, address=self.address, protocol=_SPEC_PROTOCOL[self.protocol],
            models=self.models, weight=self.weight, labels=tuple(sorted(self.labels.items())),
            source=self.source,
        )

    @classmethod
    def from_spec(cls, spec: BackendSpec, *, lease_id: LeaseId | None = None,
                  lease_ttl_s: float | None = None) -> BackendRecord:
        return cls.parse({
            "id": spec.id, "address": spec.address, "protocol": _RECORD_PROTOCOL[spec.protocol],
            "models": spec.models, "weight": spec.weight, "labels": dict(spec.labels),
            "source": spec.source, "lease_id": lease_id, "lease_ttl_s": lease_ttl_s,
        })

    def with_lease(self, lease_id: LeaseId | None, lease_ttl_s: float | None) -> BackendRecord:
        return self.parse({**self.model_dump(), "lease_id": lease_id, "lease_ttl_s": lease_ttl_s})


def _problems(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        where = "".join(f"[{item}]" if isinstance(item, int) else
                        " (key)" if item == "[key]" else f".{item!s}" for item in err["loc"])
        where = where.lstrip(".") or "(record)"
        why = "unknown field" if err["type"] == "extra_forbidden" else err["msg"]
        parts.append(f"{where}: {why}")
    return "; ".join(parts)


def check_lease_ttl(lease_ttl_s: float | None) -> None:
    if lease_ttl_s is not None and not 0 < lease_ttl_s <= MAX_DURATION_S:
        raise InvalidInput(f"lease_ttl_s: must be > 0 and at most {MAX_DURATION_S:.0f}, "
                            f"got {lease_ttl_s!r}")


def check_same_address(old: BackendRecord, new: BackendRecord) -> None:
    if (new.address, new.protocol) != (old.address, old.protocol):
        raise InvalidInput(f"backend {quoted(old.id)} is at {old.address} ({old.protocol}): an "
                           "update cannot move it (register it again)")


@dataclass(frozen=True, slots=True)
class StoreEvent:
    """One change: ``record`` is the record put, or the one that went away."""

    kind: EventKind
    record: BackendRecord


EVENT_KINDS: tuple[EventKind, ...] = get_args(EventKind)


def changes(told: Mapping[str, BackendRecord],
            now: Mapping[str, BackendRecord]) -> list[StoreEvent]:
    """The events that turn the records a watcher was told (``told``) into the records the
    store holds (``now``): deletes first (so an address freed by a replacement is free before
    the record that took it arrives), then every record new or different."""
    events = [StoreEvent("delete", record) for key, record in told.items() if key not in now]
    events += [StoreEvent("put", record) for key, record in now.items() if told.get(key) != record]
    return events


def apply(view: dict[str, BackendRecord], event: StoreEvent) -> None:
    """Apply one event to a watcher's view of the records."""
    if event.kind == "put":
        view[event.record.id] = event.record
    else:
        view.pop(event.record.id, None)


class RegistryStore(Protocol):
    """What the registry keeps its records in (module docstring: the contract)."""

    # Whether the records outlive this router and other routers change them (etcd): then the
    # store, not this router's state file, is where API backends are kept.
    shared: bool

    async def put(self, record: BackendRecord, lease_ttl_s: float | None = None) -> LeaseId | None:
        """Store ``record`` (its own lease fields are ignored); leased when ``lease_ttl_s`` is
        given. Returns the new lease id, or None."""
        ...

    async def refresh(self, lease_id: LeaseId) -> bool:
        """Renew a lease for its TTL; False if the lease is unknown or expired."""
        ...

    async def update(self, record: BackendRecord) -> BackendRecord | None:
        """Replace the record with ``record.id`` by ``record`` under the lease it already has
        (a drain flag, a weight); None if there is none (deleted, expired). Its address
        cannot change (``InvalidInput``): that is a new registration."""
        ...

    async def delete(self, backend_id: str) -> bool:
        """Delete a record (and drop its lease); False if there was none."""
        ...

    async def get(self, backend_id: str) -> BackendRecord | None: ...

    async def list(self) -> tuple[BackendRecord, ...]: ...

    def watch(self) -> AsyncGenerator[StoreEvent, None]:
        """The snapshot, then every change; ends only when the store is closed (or the consumer
        closes it: ``aclose()``)."""
        ...

    async def close(self) -> None:
        """End every watch and release connections. Leases are not revoked: in a shared store
        they belong to the backends, which go on renewing them through other routers."""
        ...

    def statistics(self) -> dict[str, Any]: ...


# -- the in-memory store -------------------------------------------------------------------------


@dataclass(eq=False, slots=True)
class _Lease:
    id: LeaseId
    backend_id: str
    ttl_s: float
    deadline: float
    timer: Timer | None = None


@dataclass(eq=False)
class _Watcher:
    """One ``watch()``: what it was told, and the events it has not read yet."""

    told: dict[str, BackendRecord] = field(default_factory=dict)
    pending: deque[StoreEvent] = field(default_factory=deque)
    resync: bool = True  # the first read is the snapshot: the changes from nothing
    closed: bool = False
    wakeup: asyncio.Event = field(default_factory=asyncio.Event)


class MemoryStore:
    """Records in this process; leases expire on the injected clock.

    A lease keeps one timer. ``refresh`` only moves the lease's deadline (1,000 heartbeats a
    second set no timers); when the timer fires before the deadline it is set again for it.
    Memory is bounded: at most ``max_backends`` records and leases, and per watcher its view
    (at most the records) and ``max_pending_events`` events.
    """

    shared = False

    def __init__(self, clock: Clock, *, max_backends: int = 10_000,
                 max_pending_events: int = MAX_PENDING_EVENTS,
                 rng: random.Random | None = None) -> None:
        self._clock = clock
        self._max_backends = max_backends
        self._max_pending = max_pending_events
        self._rng = rng or random.SystemRandom()  # lease ids unguessable, unique across restarts
        self._records: dict[str, BackendRecord] = {}
        self._by_address: dict[str, str] = {}
        self._leases: dict[LeaseId, _Lease] = {}
        self._watchers: set[_Watcher] = set()
        self._closed = False
        self._counts = dict.fromkeys(
            ("puts", "updates", "replaced", "deletes", "expirations", "refreshes",
             "refreshes_unknown", "watch_overflows"), 0)

    # -- the RegistryStore methods (none awaits: each is one synchronous step) -----------------

    async def put(self, record: BackendRecord, lease_ttl_s: float | None = None) -> LeaseId | None:
        self._check_open()
        check_lease_ttl(lease_ttl_s)
        same_id = self._records.get(record.id)
        other_id = self._by_address.get(record.address)
        other = None if other_id in (None, record.id) else other_id
        size = len(self._records) + (same_id is None) - (other is not None)
        if size > self._max_backends:
            raise StoreFull(f"the store holds {self._max_backends} backends "
                            "(registry.max_backends)")
        lease = self._new_lease(record.id, lease_ttl_s) if lease_ttl_s is not None else None
        stored = record.with_lease(lease.id if lease else None, lease_ttl_s)
        if other is not None:
            self._remove(other, "delete")
            self._counts["replaced"] += 1
        if same_id is not None:
            self._drop_lease(same_id.lease_id)
            del self._by_address[same_id.address]
        self._records[record.id] = stored
        self._by_address[record.address] = record.id
        self._counts["puts"] += 1
        self._publish(StoreEvent("put", stored))
        return lease.id if lease else None

    async def refresh(self, lease_id: LeaseId) -> bool:
        self._check_open()
        lease = self._leases.get(lease_id)
        if lease is None:
            self._counts["refreshes_unknown"] += 1
            return False
        lease.deadline = self._clock.now() + lease.ttl_s
        self._counts["refreshes"] += 1
        return True

    async def update(self, record: BackendRecord) -> BackendRecord | None:
        self._check_open()
        old = self._records.get(record.id)
        if old is None:
            return None
        check_same_address(old, record)
        stored = record.with_lease(old.lease_id, old.lease_ttl_s)
        if stored != old:
            self._records[record.id] = stored
            self._counts["updates"] += 1
            self._publish(StoreEvent("put", stored))
        return stored

    async def delete(self, backend_id: str) -> bool:
        self._check_open()
        if backend_id not in self._records:
            return False
        self._remove(backend_id, "delete")
        self._counts["deletes"] += 1
        return True

    async def get(self, backend_id: str) -> BackendRecord | None:
        self._check_open()
        return self._records.get(backend_id)

    async def list(self) -> tuple[BackendRecord, ...]:
        self._check_open()
        return tuple(self._records.values())

    def watch(self) -> AsyncGenerator[StoreEvent, None]:
        self._check_open()
        watcher = _Watcher()
        self._watchers.add(watcher)  # now, so nothing between this call and the first read is lost
        return self._events(watcher)

    async def close(self) -> None:
        self._closed = True
        for lease in self._leases.values():
            if lease.timer is not None:
                lease.timer.cancel()
        self._leases.clear()
        for watcher in self._watchers:
            watcher.closed = True
            watcher.wakeup.set()
        self._watchers.clear()

    def statistics(self) -> dict[str, Any]:
        return {"store": "memory", "records": len(self._records), "leases": len(self._leases),
                "watches": len(self._watchers), "closed": self._closed, **self._counts}

    def __repr__(self) -> str:
        return (f"MemoryStore(records={len(self._records)}, leases={len(self._leases)}, "
                f"watches={len(self._watchers)})")

    # -- inside --------------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise StoreUnavailable("the registry store is closed")

    def _new_lease(self, backend_id: str, ttl_s: float) -> _Lease:
        lease_id = self._rng.randint(1, MAX_LEASE_ID)
        while lease_id in self._leases:
            lease_id = self._rng.randint(1, MAX_LEASE_ID)
        lease = _Lease(lease_id, backend_id, ttl_s, self._clock.now() + ttl_s)
        self._leases[lease_id] = lease
        self._arm(lease)
        return lease

    def _arm(self, lease: _Lease) -> None:
        lease.timer = self._clock.call_at(lease.deadline, lambda: self._lease_due(lease))

    def _lease_due(self, lease: _Lease) -> None:
        if self._leases.get(lease.id) is not lease:
            return  # dropped since
        if self._clock.now() < lease.deadline:
            self._arm(lease)  # refreshed since the timer was set
            return
        self._counts["expirations"] += 1
        self._remove(lease.backend_id, "expired")

    def _drop_lease(self, lease_id: LeaseId | None) -> None:
        lease = self._leases.pop(lease_id, None) if lease_id is not None else None
        if lease is not None and lease.timer is not None:
            lease.timer.cancel()

    def _remove(self, backend_id: str, kind: EventKind) -> None:
        record = self._records.pop(backend_id)
        del self._by_address[record.address]
        self._drop_lease(record.lease_id)
        self._publish(StoreEvent(kind, record))

    def _publish(self, event: StoreEvent) -> None:
        for watcher in self._watchers:
            if watcher.resync:
                pass  # its next read computes the changes, this one included
            elif len(watcher.pending) >= self._max_pending:
                watcher.pending.clear()
                watcher.resync = True
                self._counts["watch_overflows"] += 1
            else:
                watcher.pending.append(event)
            watcher.wakeup.set()

    async def _events(self, watcher: _Watcher) -> AsyncGenerator[StoreEvent, None]:
        try:
            while True:
                if watcher.resync:  # closed too: what changed since it last read is not lost
                    watcher.pending.extend(changes(watcher.told, self._records))
                    watcher.resync = False
                if watcher.pending:
                    event = watcher.pending.popleft()
                    apply(watcher.told, event)
                    yield event
                    continue
                if watcher.closed:
                    return
                watcher.wakeup.clear()
                await watcher.wakeup.wait()
        finally:
            self._watchers.discard(watcher)


def open_store(config: RegistryConfig, clock: Clock) -> MemoryStore | EtcdStore:
    """The store ``[registry]`` names."""
    if config.store == "memory":
        return MemoryStore(clock, max_backends=config.max_backends)
    from router.control.etcd_store import EtcdStore  # aetcd and its gRPC stubs only when used

    return EtcdStore.from_config(config)
