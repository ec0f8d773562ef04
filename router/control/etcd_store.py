"""``EtcdStore``: the registry store in etcd, shared by every router that uses the same prefix.

Layout. Each record is the JSON of a ``BackendRecord`` at ``prefix + id``. A leased record is
attached to an etcd lease of its TTL (whole seconds, rounded up): etcd deletes the key when
the lease is not renewed, and every watcher sees the delete. The lease id lives in the key's
own metadata (``kv.lease``), which is what a reader trusts.

Delete, expiry and replacement must be told apart by every router, yet etcd reports both a
deleted key and an expired lease as the same DELETE. So a deliberate removal of a leased
record first overwrites it, in one transaction, with ``TOMBSTONE`` (kept on its lease), then
revokes the lease, which removes the tombstone. A watcher that sees a tombstone reports
``delete``; a DELETE of a key it still holds can then only be an expiry (for a leased record)
or a delete (for one without a lease). A tombstone left by a revoke that failed (etcd went
away in between) is invisible to ``get``/``list``/``watch``, goes with its lease's TTL, and is
revoked again by the next ``delete`` of that id.

A put reads the prefix and writes in one transaction guarded by the mod revisions it read of
every key it touches (its own and any record at the same address, which it replaces), retried
when another router changed one of them in between. Two routers putting the same address under
two new ids at the same instant can both succeed; the next put of either record removes the
other.

Watching. ``watch()`` lists the prefix (the snapshot), then watches it from the revision after
the list. When the stream fails (etcd gone, the revision compacted, the server ended it) the
consumer sees nothing: the iterator keeps its view, retries with a backoff that starts at
0.1 s and doubles up to ``reconnect_backoff_max_s`` (jittered, so routers do not return in
step), lists again, and emits the differences between its view and the listing as events.
A record gone when it resyncs is reported as ``delete``: the listing cannot tell why.
The watch stream is driven on aetcd's channel with the generated stub rather than aetcd's
``Watcher``, which never tells its callbacks when the server ends a stream without an error.

Every other method is one etcd operation bounded by ``timeout_s`` per endpoint: an operation
that cannot reach one endpoint tries the next, and one that fails on all raises
``StoreUnavailable``. ``put`` and ``delete`` are a few operations, bounded together by
``timeout_s`` times (endpoints + 2).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import random
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

import aetcd
import aetcd.rpc
import aetcd.utils
import grpc
import orjson

from router.control.store import (
    MAX_LEASE_ID,
    BackendRecord,
    LeaseId,
    StoreEvent,
    apply,
    changes,
    check_lease_ttl,
    check_same_address,
)
from router.core.config import RegistryConfig, parse_host_port
from router.core.errors import InvalidInput, StoreFull, StoreTimeout, StoreUnavailable, quoted

log = logging.getLogger(__name__)

TOMBSTONE = b'{"deleted":true}'
# A put retried this often loses to other routers changing the same keys every time.
PUT_ATTEMPTS = 8
FIRST_BACKOFF_S = 0.1
CHANNEL_OPTIONS = {
    # gRPC's own reconnect backoff grows to 120 s; a restarted etcd should be found in about
    # a second. (min_reconnect_backoff_ms stays at its default: it is also the time a connect
    # attempt may take.)
    "grpc.initial_reconnect_backoff_ms": 100,
    "grpc.max_reconnect_backoff_ms": 1000,
    # An operation waits (within timeout_s) for a channel that is reconnecting instead of
    # failing at once: gRPC shares one connection per address among channels, so right after
    # etcd returns every channel fails fast until the next reconnect attempt, up to 1 s later.
    "grpc.service_config": orjson.dumps(
        {"methodConfig": [{"name": [{}], "waitForReady": True}]}).decode(),
    # A watch can sit idle for hours: pings find a dead peer that sent no RST. etcd refuses
    # pings more often than every 5 s (--grpc-keepalive-min-time).
    "grpc.keepalive_time_ms": 10_000,
    "grpc.keepalive_timeout_ms": 5_000,
    # 10,000 records of a few hundred bytes list in a few MiB; gRPC's 4 MiB default is tight.
    "grpc.max_receive_message_length": 64 * 1024 * 1024,
}
# Builds transaction comparisons and operations; holds no connection.
_TX: Any = aetcd.Transactions()
_UNREACHABLE = (aetcd.ConnectionFailedError, aetcd.ConnectionTimeoutError, TimeoutError)


def lease_ttl_for_etcd(lease_ttl_s: float) -> int:
    """etcd grants leases in whole seconds: the TTL rounded up, at least 1."""
    return max(1, math.ceil(lease_ttl_s))


@dataclass(frozen=True, slots=True)
class _Entry:
    """One key under the prefix: a record, a tombstone (``record`` None, ``tombstone``), or a
    value that is neither (``record`` None): written by hand or by something else."""

    record: BackendRecord | None
    mod_revision: int
    lease: int
    tombstone: bool = False


@dataclass(frozen=True, slots=True)
class _Listing:
    revision: int
    entries: dict[str, _Entry]

    def records(self) -> dict[str, BackendRecord]:
        return {k: e.record for k, e in self.entries.items() if e.record is not None}


class _WatchLost(Exception):
    """The watch stream ended or failed; the watcher resyncs. Never leaves this module."""


class _Backoff:
    def __init__(self, max_s: float, rng: random.Random) -> None:
        self._max_s = max_s
        self._rng = rng
        self._next_s = FIRST_BACKOFF_S

    def next(self) -> float:
        delay = self._next_s * (0.8 + 0.4 * self._rng.random())
        self._next_s = min(self._max_s, self._next_s * 2)
        return min(delay, self._max_s)

    def reset(self) -> None:
        self._next_s = FIRST_BACKOFF_S


class EtcdStore:
    """The ``RegistryStore`` in etcd (module docstring: layout, watching, failures)."""

    shared = True  # etcd keeps the records on its disk; every router on the prefix changes them

    def __init__(self, endpoints: Sequence[str], *, prefix: str = "/inference-router/backends/",
                 timeout_s: float = 2.0, reconnect_backoff_max_s: float = 1.0,
                 max_backends: int = 10_000, rng: random.Random | None = None) -> None:
        if not endpoints:
            raise ValueError("an EtcdStore needs at least one endpoint")
        self._endpoints = [parse_host_port(endpoint) for endpoint in endpoints]
        self._prefix = prefix.encode()
        self._timeout_s = timeout_s
        self._backoff_max_s = reconnect_backoff_max_s
        self._max_backends = max_backends
        self._rng = rng or random.Random()
        self._clients: dict[int, aetcd.Client] = {}
        self._current = 0
        self._closed = asyncio.Event()
        self._calls: set[Any] = set()  # watch streams open now, cancelled by close()
        self._watches = 0
        self._counts = dict.fromkeys(
            ("puts", "put_retries", "updates", "replaced", "deletes", "refreshes",
             "refreshes_unknown", "operations_failed", "watch_losses", "resyncs",
             "resync_events", "malformed"), 0)

    @classmethod
    def from_config(cls, config: RegistryConfig) -> EtcdStore:
        return cls(config.etcd_endpoints, prefix=config.etcd_prefix,
                   timeout_s=config.etcd_timeout_s,
                   reconnect_backoff_max_s=config.etcd_reconnect_backoff_max_s,
                   max_backends=config.max_backends)

    # -- the RegistryStore methods -------------------------------------------------------------

    async def put(self, record: BackendRecord, lease_ttl_s: float | None = None) -> LeaseId | None:
        check_lease_ttl(lease_ttl_s)
        async with self._deadline(f"put {quoted(record.id)}"):
            return await self._put(record, lease_ttl_s)

    async def _put(self, record: BackendRecord, lease_ttl_s: float | None) -> LeaseId | None:
        lease: Any = None
        try:
            for _ in range(PUT_ATTEMPTS):
                listing = await self._list()
                replaced = self._conflicts(listing, record)
                if lease_ttl_s is not None and lease is None:
                    ttl = lease_ttl_for_etcd(lease_ttl_s)
                    lease = await self._call("lease grant", "lease", ttl)
                stored = record.with_lease(lease.id, float(lease.ttl)) if lease else \
                    record.with_lease(None, None)
                if await self._put_txn(listing, stored, replaced):
                    self._counts["puts"] += 1
                    self._counts["replaced"] += len(replaced)
                    await self._revoke_replaced(listing, stored, replaced)
                    return stored.lease_id
                self._counts["put_retries"] += 1
        except Exception:  # a cancelled put leaves its lease to expire with its TTL
            if lease is not None:
                await self._revoke_quietly(lease.id)
            raise
        if lease is not None:
            await self._revoke_quietly(lease.id)
        raise StoreUnavailable(f"put {quoted(record.id)}: other routers changed the same keys "
                               f"{PUT_ATTEMPTS} times in a row")

    async def refresh(self, lease_id: LeaseId) -> bool:
        if not 1 <= lease_id <= MAX_LEASE_ID:  # not an etcd lease id (it comes from a client)
            self._counts["refreshes_unknown"] += 1
            return False
        reply = await self._call("lease refresh", "refresh_lease", lease_id)
        alive = reply is not None and reply.TTL > 0
        self._counts["refreshes" if alive else "refreshes_unknown"] += 1
        return alive

    async def update(self, record: BackendRecord) -> BackendRecord | None:
        async with self._deadline(f"update {quoted(record.id)}"):
            return await self._update(record)

    async def _update(self, record: BackendRecord) -> BackendRecord | None:
        key = self._key(record.id)
        for _ in range(PUT_ATTEMPTS):
            got = await self._call("get", "get", key)
            if got is None or got.value == TOMBSTONE:
                return None
            old = self._decode(got.key, got.value, got.lease, got.mod_revision).record
            if old is None:
                return None  # malformed: nothing this router routes to
            check_same_address(old, record)
            stored = record.with_lease(old.lease_id, old.lease_ttl_s)
            if stored == old:
                return old
            # A lease that expired since the get fails the transaction: read again (gone).
            if await self._transaction(
                "update", compare=[_TX.mod(key) == got.mod_revision],
                success=[_TX.put(key, stored.to_json(), lease=got.lease)]):
                self._counts["updates"] += 1
                return stored
        raise StoreUnavailable(f"update {quoted(record.id)}: the record kept changing")

    async def delete(self, backend_id: str) -> bool:
        async with self._deadline(f"delete {quoted(backend_id)}"):
            return await self._delete(backend_id)

    async def _delete(self, backend_id: str) -> bool:
        key = self._key(backend_id)
        for _ in range(PUT_ATTEMPTS):
            got = await self._call("get", "get", key)
            if got is None:
                return False
            if got.value == TOMBSTONE:
                if got.lease:
                    await self._revoke(got.lease)  # a delete whose revoke failed: finish it
                return False
            # A leased record is tombstoned, then its lease revoked: watchers say delete.
            removal = _TX.put(key, TOMBSTONE, lease=got.lease) if got.lease else _TX.delete(key)
            if await self._transaction(
                "delete", compare=[_TX.mod(key) == got.mod_revision], success=[removal]):
                if got.lease:
                    await self._revoke(got.lease)
                self._counts["deletes"] += 1
                return True
        raise StoreUnavailable(f"delete {quoted(backend_id)}: the record kept changing")

    async def get(self, backend_id: str) -> BackendRecord | None:
        got = await self._call("get", "get", self._key(backend_id))
        if got is None:
            return None
        return self._decode(got.key, got.value, got.lease, got.mod_revision).record

    async def list(self) -> tuple[BackendRecord, ...]:
        return tuple((await self._list()).records().values())

    def watch(self) -> AsyncGenerator[StoreEvent, None]:
        return self._watch()

    async def close(self) -> None:
        self._closed.set()
        for call in list(self._calls):
            call.cancel()
        clients, self._clients = list(self._clients.values()), {}
        for client in clients:
            with contextlib.suppress(Exception):  # closing: nothing to do about a failure
                await client.close()

    def statistics(self) -> dict[str, Any]:
        host, port = self._endpoints[self._current]
        return {"store": "etcd", "endpoint": f"{host}:{port}", "prefix": self._prefix.decode(),
                "watches": self._watches, "watch_streams": len(self._calls),
                "closed": self._closed.is_set(), **self._counts}

    def __repr__(self) -> str:
        host, port = self._endpoints[self._current]
        return f"EtcdStore({host}:{port}, prefix={self._prefix.decode()!r})"

    # -- operations ----------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def _deadline(self, what: str) -> AsyncIterator[None]:
        """The bound of a method made of several operations (a put lists, maybe grants a
        lease, writes, revokes): as long as a first operation trying every endpoint, and two
        more. A put cut short leaves its lease to expire with its TTL."""
        limit_s = self._timeout_s * (len(self._endpoints) + 2)
        try:
            async with asyncio.timeout(limit_s):
                yield
        except TimeoutError:
            self._counts["operations_failed"] += 1
            raise StoreTimeout(f"etcd {what}: not done within {limit_s}s") from None

    def _key(self, backend_id: str) -> bytes:
        # surrogatepass: an id from a URL may hold lone surrogates; no record has such a key.
        return self._prefix + backend_id.encode("utf-8", "surrogatepass")

    async def _client(self, index: int | None = None) -> aetcd.Client:
        if self._closed.is_set():  # a closed client would open a new channel
            raise StoreUnavailable("the registry store is closed")
        index = self._current if index is None else index
        client = self._clients.get(index)
        if client is None:
            host, port = self._endpoints[index]
            host = f"[{host}]" if ":" in host else host  # aetcd's target is f"{host}:{port}"
            client = aetcd.Client(host, port, timeout=self._timeout_s, options=CHANNEL_OPTIONS)
            self._clients[index] = client
        await client.connect()
        return client

    async def _call(self, what: str, method: str, *args: Any, **kwargs: Any) -> Any:
        """The aetcd client's ``method`` on the current endpoint, then on each other one it
        cannot reach, each try bounded by ``timeout_s``; ``StoreUnavailable`` if none answers
        or etcd refuses."""
        problem: BaseException | None = None
        for step in range(len(self._endpoints)):
            index = (self._current + step) % len(self._endpoints)
            try:
                async with asyncio.timeout(self._timeout_s):
                    client = await self._client(index)
                    result = await getattr(client, method)(*args, **kwargs)
            except _UNREACHABLE as exc:
                problem = exc
                continue
            except aetcd.ClientError as exc:
                self._counts["operations_failed"] += 1
                raise StoreUnavailable(f"etcd {what} failed: {exc}") from exc
            self._current = index
            return result
        self._counts["operations_failed"] += 1
        raise StoreUnavailable(f"etcd {what}: no endpoint answered within {self._timeout_s}s "
                               f"({type(problem).__name__}: {problem})")

    async def _list(self) -> _Listing:
        got = await self._call("list", "get_prefix", self._prefix)
        entries = {}
        for kv in got.kvs:
            key = kv.key[len(self._prefix):].decode("utf-8", "replace")
            entries[key] = self._decode(kv.key, kv.value, kv.lease, kv.mod_revision)
        return _Listing(got.header.revision, entries)

    def _decode(self, key: bytes, value: bytes, lease: int, mod_revision: int) -> _Entry:
        if value == TOMBSTONE:
            return _Entry(None, mod_revision, lease, tombstone=True)
        try:
            record = BackendRecord.from_json(value)
            if self._key(record.id) != key:
                raise InvalidInput(f"the record's id is {quoted(record.id)}")
            ttl = record.lease_ttl_s if lease else None
            if lease and ttl is None:
                raise InvalidInput("leased, but no lease_ttl_s")
            record = record.with_lease(lease or None, ttl)
        except InvalidInput as exc:
            self._counts["malformed"] += 1
            log.warning("registry: skipping %s in etcd: %s", quoted(key), exc.message)
            return _Entry(None, mod_revision, lease)
        return _Entry(record, mod_revision, lease)

    def _conflicts(self, listing: _Listing, record: BackendRecord) -> tuple[str, ...]:
        """Ids of the other records at ``record``'s address (replaced by the put); raises
        ``StoreFull`` if the put would exceed ``max_backends``."""
        records = listing.records()
        replaced = tuple(k for k, r in records.items()
                         if k != record.id and r.address == record.address)
        size = len(records) + (record.id not in records) - len(replaced)
        if size > self._max_backends:
            raise StoreFull(f"the store holds {self._max_backends} backends "
                            "(registry.max_backends)")
        return replaced

    async def _put_txn(self, listing: _Listing, stored: BackendRecord,
                       replaced: Sequence[str]) -> bool:
        key = self._key(stored.id)
        own = listing.entries.get(stored.id)
        compare = [_TX.mod(key) == own.mod_revision] if own else [_TX.version(key) == 0]
        success = []
        for other_id in replaced:
            other, other_key = listing.entries[other_id], self._key(other_id)
            compare.append(_TX.mod(other_key) == other.mod_revision)
            # A leased record is tombstoned (revoked after), so watchers say delete, not expired.
            success.append(_TX.put(other_key, TOMBSTONE, lease=other.lease) if other.lease
                           else _TX.delete(other_key))
        # Last: watchers see the address freed before the record that takes it.
        success.append(_TX.put(key, stored.to_json(), lease=stored.lease_id or 0))
        return await self._transaction("put", compare=compare, success=success)

    async def _transaction(self, what: str, *, compare: Sequence[Any],
                           success: Sequence[Any]) -> bool:
        """Whether the comparisons held and the operations were applied. A lease that expired
        since it was read (etcd: NOT_FOUND) is a comparison that failed: read again."""
        try:
            done = await self._call(what, "transaction", compare=compare, success=success,
                                    failure=[])
        except StoreUnavailable as exc:
            if _not_found(exc):
                return False
            raise
        return bool(done[0])

    async def _revoke_replaced(self, listing: _Listing, stored: BackendRecord,
                               replaced: Sequence[str]) -> None:
        """Drop the leases the put made unused. The put has happened: a failure is logged."""
        own = listing.entries.get(stored.id)
        leases = [listing.entries[other].lease for other in replaced]
        if own is not None and own.lease != (stored.lease_id or 0):
            leases.append(own.lease)
        for lease in leases:
            if lease:
                await self._revoke_quietly(lease)

    async def _revoke(self, lease: int) -> None:
        try:
            await self._call("lease revoke", "revoke_lease", lease)
        except StoreUnavailable as exc:
            if not _not_found(exc):
                raise  # gone already is what a revoke wants

    async def _revoke_quietly(self, lease: int) -> None:
        try:
            await self._revoke(lease)
        except StoreUnavailable as exc:
            log.warning("registry: etcd lease %x not revoked (it expires with its TTL): %s",
                        lease, exc.message)

    # -- watching ------------------------------------------------------------------------------

    async def _watch(self) -> AsyncGenerator[StoreEvent, None]:
        view: dict[str, BackendRecord] = {}
        backoff = _Backoff(self._backoff_max_s, self._rng)
        synced = lost = False
        self._watches += 1
        try:
            while not self._closed.is_set():
                try:
                    listing = await self._list()
                except StoreUnavailable as exc:
                    if not lost:
                        log.warning("registry: etcd unreachable (%s); retrying", exc.message)
                        lost = True
                    await self._pause(backoff.next())
                    continue
                lost = False
                found = changes(view, listing.records())
                if synced:
                    self._counts["resyncs"] += 1
                    self._counts["resync_events"] += len(found)
                    log.info("registry: etcd watch resumed; %d changes while it was lost",
                             len(found))
                synced = True
                for event in found:
                    apply(view, event)
                    yield event
                try:
                    async with contextlib.aclosing(
                        self._follow(listing.revision + 1, view, backoff)
                    ) as events:
                        async for event in events:
                            yield event
                except (_WatchLost, StoreUnavailable) as exc:
                    if self._closed.is_set():
                        return
                    lost = True
                    self._counts["watch_losses"] += 1
                    log.warning("registry: etcd watch lost (%s); routing on the last view "
                                "until it is back", exc)
                await self._pause(backoff.next())
        finally:
            self._watches -= 1

    async def _follow(self, revision: int, view: dict[str, BackendRecord],
                      backoff: _Backoff) -> AsyncGenerator[StoreEvent, None]:
        """Events from ``revision`` on, applied to ``view``; raises ``_WatchLost`` when the
        stream fails, returns when the store closes."""
        client = await self._client()
        call = aetcd.rpc.WatchStub(client.channel).Watch(metadata=client.metadata)
        self._calls.add(call)
        try:
            created = await self._create(call, revision)
            if created is None:
                return  # closed
            if created is grpc.aio.EOF or not created.created:
                raise _WatchLost("etcd did not create the watch")
            backoff.reset()
            while True:
                response = await call.read()
                if response is grpc.aio.EOF:
                    raise _WatchLost("etcd ended the watch stream")
                if response.canceled or response.compact_revision:
                    why = response.cancel_reason or "revision compacted"
                    raise _WatchLost(f"etcd cancelled the watch ({why})")
                for event in response.events:
                    found = self._event(view, event)
                    if found is not None:
                        apply(view, found)
                        yield found
        except (grpc.aio.AioRpcError, TimeoutError) as exc:
            raise _WatchLost(f"{type(exc).__name__}: {_details(exc)}") from None
        except asyncio.CancelledError:
            if not self._closed.is_set() or _being_cancelled():
                raise
        finally:
            self._calls.discard(call)
            call.cancel()

    async def _create(self, call: Any, revision: int) -> Any:
        """Ask for the watch and read etcd's first answer, within ``timeout_s``; None if the
        store closes first. (A call cancelled before it has started does not wake a pending
        write, so closing is raced here rather than left to ``call.cancel()``.)"""
        request = aetcd.rpc.WatchRequest(create_request=aetcd.rpc.WatchCreateRequest(
            key=self._prefix, range_end=aetcd.utils.prefix_range_end(self._prefix),
            start_revision=revision))

        async def create() -> Any:
            await call.write(request)
            return await call.read()

        task = asyncio.create_task(create(), name="etcd watch create")
        closed = asyncio.create_task(self._closed.wait(), name="etcd store closed")
        try:
            await asyncio.wait({task, closed}, timeout=self._timeout_s,
                               return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiting in (task, closed):
                waiting.cancel()
            await asyncio.gather(task, closed, return_exceptions=True)
        if self._closed.is_set():
            return None
        if task.cancelled():
            raise TimeoutError(f"no answer within {self._timeout_s}s")
        return task.result()

    def _event(self, view: dict[str, BackendRecord], event: Any) -> StoreEvent | None:
        """The StoreEvent an etcd event makes of ``view``, if any."""
        kv = event.kv
        key = kv.key[len(self._prefix):].decode("utf-8", "replace")
        known = view.get(key)
        if event.type == aetcd.rpc.Event.DELETE:
            if known is None:
                return None  # a tombstone going, or a key that was never a record
            return StoreEvent("expired" if known.lease_id is not None else "delete", known)
        record = self._decode(kv.key, kv.value, kv.lease, kv.mod_revision).record
        if record is None:  # a tombstone, or a value that is not a record: the record is gone
            return StoreEvent("delete", known) if known is not None else None
        return StoreEvent("put", record) if record != known else None

    async def _pause(self, delay_s: float) -> None:
        """Sleep ``delay_s``, or less if the store closes."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(delay_s):
                await self._closed.wait()


def _not_found(exc: BaseException) -> bool:
    """Whether etcd answered NOT_FOUND (aetcd keeps the gRPC error as the cause)."""
    cause = exc.__cause__
    while cause is not None:
        if isinstance(cause, grpc.aio.AioRpcError):
            return bool(cause.code() == grpc.StatusCode.NOT_FOUND)
        cause = cause.__cause__
    return False


def _details(exc: BaseException) -> str:
    if isinstance(exc, grpc.aio.AioRpcError):
        return f"{exc.code().name} {exc.details()}"
    return str(exc) or "timed out"


def _being_cancelled() -> bool:
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0

