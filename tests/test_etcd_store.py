"""EtcdStore against a real etcd server on loopback: two stores on one etcd, as two routers
would have them. A put through either reaches the other's watch within a second; a lease not
renewed expires for both; delete and replacement by address are told apart from expiry; a
store cut off from etcd, and etcd itself stopped and restarted, leave every watcher on its last
view, and the watchers resync when etcd is back. Every wait is bounded."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import aetcd
import pytest

from router.control.etcd_store import TOMBSTONE, EtcdStore, lease_ttl_for_etcd
from router.control.store import BackendRecord, open_store
from router.core.clock import ManualClock
from router.core.config import RegistryConfig
from router.core.errors import InvalidInput, StoreFull, StoreTimeout, StoreUnavailable
from tests.etcd_support import Collector, EtcdServer, Relay, etcd_server, free_port

__all__ = ["etcd_server"]  # the fixture, used by name

PREFIX = "/test/backends/"
SEEN_WITHIN_S = 1.0  # the promise: a put through one router reaches every router within 1 s
# A 1 s lease goes within 1 s of its last renewal plus etcd's expiry check (every 500 ms);
# the margin covers a loaded machine.
EXPIRY_WITHIN_S = 5.0
RECONNECT_WITHIN_S = 5.0  # backoff of at most 0.5 s here, then a list


def record(backend_id: str, address: str, **fields: object) -> BackendRecord:
    return BackendRecord.parse({"id": backend_id, "address": address, **fields})


def make_store(endpoint: str | list[str], **kwargs: object) -> EtcdStore:
    endpoints = [endpoint] if isinstance(endpoint, str) else endpoint
    options: dict[str, object] = {"prefix": PREFIX, "timeout_s": 1.0,
                                  "reconnect_backoff_max_s": 0.5, **kwargs}
    return EtcdStore(endpoints, **options)  # type: ignore[arg-type]


@pytest.fixture
async def two_stores(etcd_server: EtcdServer) -> AsyncIterator[tuple[EtcdStore, EtcdStore]]:
    a, b = make_store(etcd_server.endpoint), make_store(etcd_server.endpoint)
    try:
        yield a, b
    finally:
        await a.close()
        await b.close()


async def collectors(*stores: EtcdStore) -> list[Collector]:
    """One collector per store, each past its snapshot of a sentinel record, so that every
    later change reaches it through its watch."""
    await stores[0].put(record("sentinel", "127.0.0.1:1"))
    found = [Collector(store) for store in stores]
    for c in found:
        await c.wait_until(lambda c: "sentinel" in c.view, SEEN_WITHIN_S)
    return found


async def stop_all(found: list[Collector]) -> None:
    for c in found:
        await c.stop()


async def test_a_put_through_one_store_reaches_the_other_within_a_second(
    two_stores: tuple[EtcdStore, EtcdStore],
) -> None:
    a, b = two_stores
    ca, cb = await collectors(a, b)
    started = time.monotonic()
    lease = await a.put(record("r1", "127.0.0.1:9001", models=["m:1"]), lease_ttl_s=10)
    await cb.wait_until(lambda c: "r1" in c.view, SEEN_WITHIN_S)
    assert time.monotonic() - started < SEEN_WITHIN_S
    seen = cb.view["r1"]
    assert (seen.address, seen.models, seen.lease_id, seen.lease_ttl_s) == (
        "127.0.0.1:9001", ("m:1",), lease, 10.0)
    await ca.wait_until(lambda c: "r1" in c.view, SEEN_WITHIN_S)
    assert await b.get("r1") == seen
    assert [r.id for r in await b.list()] == ["r1", "sentinel"]
    await stop_all([ca, cb])


async def test_a_lease_not_renewed_expires_for_every_store(
    two_stores: tuple[EtcdStore, EtcdStore],
) -> None:
    a, b = two_stores
    ca, cb = await collectors(a, b)
    lease = await a.put(record("r1", "127.0.0.1:9001"), lease_ttl_s=1)
    assert lease is not None
    for c in (ca, cb):
        await c.wait_until(lambda c: c.kinds("r1") == ["put", "expired"], EXPIRY_WITHIN_S)
    assert await a.get("r1") is None
    assert await b.refresh(lease) is False  # the backend is told NOT_FOUND and registers again
    assert "sentinel" in ca.view  # a record without a lease stays
    await stop_all([ca, cb])


async def test_refresh_through_either_store_keeps_a_lease(
    two_stores: tuple[EtcdStore, EtcdStore],
) -> None:
    a, b = two_stores
    lease = await a.put(record("r1", "127.0.0.1:9001"), lease_ttl_s=1)
    assert lease is not None
    deadline = time.monotonic() + 2.5  # past two TTLs
    while time.monotonic() < deadline:
        assert await (b if int(time.monotonic() * 4) % 2 else a).refresh(lease) is True
        await asyncio.sleep(0.25)  # a heartbeat every TTL/4
    assert await a.get("r1") is not None
    assert b.statistics()["refreshes"] + a.statistics()["refreshes"] >= 8


async def test_an_update_keeps_the_lease_and_reaches_the_other_store(
    two_stores: tuple[EtcdStore, EtcdStore],
) -> None:
    a, b = two_stores
    cb, = await collectors(b)
    lease = await a.put(record("r1", "127.0.0.1:9001"), lease_ttl_s=30)
    stored = await a.update(record("r1", "127.0.0.1:9001", weight=4, drained=True))
    assert stored is not None and (stored.lease_id, stored.weight) == (lease, 4)
    await cb.wait_until(lambda c: "r1" in c.view and c.view["r1"].drained, SEEN_WITHIN_S)
    assert cb.view["r1"].lease_id == lease
    assert await b.refresh(lease) is True  # the same lease: heartbeats go on
    assert await a.update(record("gone", "127.0.0.1:9002")) is None
    with pytest.raises(InvalidInput):  # moving a record is a new registration
        await a.update(record("r1", "127.0.0.1:9009"))
    await stop_all([cb])


async def test_an_operation_past_its_bound_is_timeout_504() -> None:
    store = make_store("127.0.0.1:1", timeout_s=0.05)
    with pytest.raises(StoreTimeout) as raised:
        async with store._deadline("a slow put"):
            await asyncio.sleep(1.0)  # several calls that each kept within timeout_s
    assert (raised.value.code, raised.value.http_status) == ("TIMEOUT", 504)
    await store.close()


async def test_a_delete_is_a_delete_for_every_store_not_an_expiry(
    two_stores: tuple[EtcdStore, EtcdStore],
) -> None:
    a, b = two_stores
    ca, cb = await collectors(a, b)
    lease = await a.put(record("r1", "127.0.0.1:9001"), lease_ttl_s=10)
    await b.put(record("r2", "127.0.0.1:9002"))
    await ca.wait_until(lambda c: {"r1", "r2"} <= set(c.view), SEEN_WITHIN_S)
    assert await b.delete("r1") is True
    assert await b.delete("r2") is True
    for c in (ca, cb):
        await c.wait_for_ids({"sentinel"}, SEEN_WITHIN_S)
        assert c.kinds("r1") == ["put", "delete"]
        assert c.kinds("r2") == ["put", "delete"]
    assert lease is not None and await a.refresh(lease) is False  # revoked with its record
    assert await a.delete("r1") is False
    assert await a.get("r1") is None
    await stop_all([ca, cb])


async def test_a_put_at_the_same_address_replaces_the_record(
    two_stores: tuple[EtcdStore, EtcdStore],
) -> None:
    a, b = two_stores
    ca, cb = await collectors(a, b)
    old_lease = await a.put(record("old", "127.0.0.1:9001"), lease_ttl_s=10)
    await cb.wait_until(lambda c: "old" in c.view, SEEN_WITHIN_S)
    new_lease = await b.put(record("new", "127.0.0.1:9001", weight=3), lease_ttl_s=10)
    for c in (ca, cb):
        await c.wait_for_ids({"sentinel", "new"}, SEEN_WITHIN_S)
        assert c.kinds("old") == ["put", "delete"]  # replaced, not expired
        order = [(e.kind, e.record.id) for e in c.events]
        assert order.index(("delete", "old")) < order.index(("put", "new"))  # address freed
    assert sorted(r.id for r in await a.list()) == ["new", "sentinel"]
    assert old_lease is not None and await a.refresh(old_lease) is False
    assert new_lease is not None and await a.refresh(new_lease) is True
    # The same id again: one record, the new lease in place of the old.
    newer_lease = await a.put(record("new", "127.0.0.1:9001", weight=5), lease_ttl_s=10)
    await cb.wait_until(lambda c: c.view["new"].weight == 5, SEEN_WITHIN_S)
    assert [r.weight for r in await b.list() if r.id == "new"] == [5]
    assert await b.refresh(new_lease) is False
    assert newer_lease is not None and await b.refresh(newer_lease) is True
    assert b.statistics()["replaced"] == 1  # b put "new" over "old"
    assert await a.refresh(2**64) is False  # not a lease id: unknown, not an error
    await stop_all([ca, cb])


async def test_the_store_holds_at_most_max_backends(etcd_server: EtcdServer) -> None:
    store = make_store(etcd_server.endpoint, max_backends=2)
    try:
        await store.put(record("r1", "127.0.0.1:9001"))
        await store.put(record("r2", "127.0.0.1:9002"))
        with pytest.raises(StoreFull):
            await store.put(record("r3", "127.0.0.1:9003"), lease_ttl_s=5)
        await store.put(record("r3", "127.0.0.1:9001"))  # replaces r1: still two
        await store.put(record("r2", "127.0.0.1:9002", weight=2))  # replaces itself
        assert sorted(r.id for r in await store.list()) == ["r2", "r3"]
    finally:
        await store.close()


async def test_a_store_cut_off_from_etcd_keeps_its_view_and_resyncs_when_back(
    etcd_server: EtcdServer,
) -> None:
    relay = Relay(etcd_server.client_port)
    await relay.start()
    a, b = make_store(relay.endpoint), make_store(etcd_server.endpoint)
    try:
        await b.put(record("stays", "127.0.0.1:9001"))
        await b.put(record("goes", "127.0.0.1:9002"))
        ca, cb = await collectors(a, b)
        await ca.wait_for_ids({"sentinel", "stays", "goes"}, SEEN_WITHIN_S)
        relay.cut()
        with pytest.raises(StoreUnavailable):
            await a.list()
        await b.delete("goes")
        await b.put(record("joined", "127.0.0.1:9003"))
        await b.put(record("stays", "127.0.0.1:9001", weight=7))
        await cb.wait_for_ids({"sentinel", "stays", "joined"}, SEEN_WITHIN_S)
        await asyncio.sleep(1.0)  # a second cut off: the watch neither ends nor changes
        assert set(ca.view) == {"sentinel", "stays", "goes"} and not ca.ended
        relay.restore()
        await ca.wait_for_ids({"sentinel", "stays", "joined"}, RECONNECT_WITHIN_S)
        await ca.wait_until(lambda c: c.view["stays"].weight == 7, SEEN_WITHIN_S)
        assert ca.kinds("goes") == ["put", "delete"]
        assert a.statistics()["resyncs"] >= 1
        # Watching again: a put after the resync arrives as any other.
        await b.put(record("later", "127.0.0.1:9004"))
        await ca.wait_until(lambda c: "later" in c.view, SEEN_WITHIN_S)
        await stop_all([ca, cb])
    finally:
        await a.close()
        await b.close()
        await relay.close()


async def test_etcd_restarted_every_store_keeps_its_view_then_resyncs(
    etcd_server: EtcdServer, two_stores: tuple[EtcdStore, EtcdStore],
) -> None:
    a, b = two_stores
    await a.put(record("r1", "127.0.0.1:9001"))
    lease = await a.put(record("leased", "127.0.0.1:9002"), lease_ttl_s=30)
    ca, cb = await collectors(a, b)
    before = {"sentinel", "r1", "leased"}
    await ca.wait_for_ids(before, SEEN_WITHIN_S)
    await cb.wait_for_ids(before, SEEN_WITHIN_S)
    await etcd_server.stop()
    assert lease is not None
    for call in (b.list(), b.put(record("r2", "127.0.0.1:9003")), a.refresh(lease)):
        started = time.monotonic()
        with pytest.raises(StoreUnavailable):
            await call
        assert time.monotonic() - started < 1.0 + 0.5  # bounded by timeout_s
    for c in (ca, cb):  # three seconds without etcd
        assert set(c.view) == before and not c.ended
    await etcd_server.start()
    await b.put(record("r2", "127.0.0.1:9003"))  # waits (within timeout_s) to reconnect
    for c in (ca, cb):
        await c.wait_for_ids(before | {"r2"}, RECONNECT_WITHIN_S)
        assert c.kinds("r1") == ["put"]
    assert await a.refresh(lease) is True  # etcd kept the lease across its restart
    assert a.statistics()["watch_losses"] >= 1
    await stop_all([ca, cb])


async def test_an_endpoint_that_does_not_answer_is_skipped(etcd_server: EtcdServer) -> None:
    dead = f"127.0.0.1:{free_port()}"
    store = make_store([dead, etcd_server.endpoint])
    try:
        await store.put(record("r1", "127.0.0.1:9001"))
        assert [r.id for r in await store.list()] == ["r1"]
        assert store.statistics()["endpoint"] == etcd_server.endpoint
        c = Collector(store)
        await c.wait_for_ids({"r1"}, SEEN_WITHIN_S)
        await c.stop()
    finally:
        await store.close()


async def test_values_that_are_not_records_are_skipped(etcd_server: EtcdServer) -> None:
    host, port = etcd_server.endpoint.split(":")
    raw = aetcd.Client(host, int(port), timeout=2)
    store = make_store(etcd_server.endpoint)
    try:
        await store.put(record("good", "127.0.0.1:9001"))
        c = Collector(store)
        await c.wait_for_ids({"good"}, SEEN_WITHIN_S)
        await raw.put(f"{PREFIX}junk".encode(), b"not json")
        await raw.put(f"{PREFIX}wrong-id".encode(), record("other", "127.0.0.1:9002").to_json())
        await raw.put(f"{PREFIX}good2".encode(), b'{"id": "good2"}')  # no address
        await raw.put(f"{PREFIX}tomb".encode(), TOMBSTONE)
        await store.put(record("after", "127.0.0.1:9003"))
        await c.wait_for_ids({"good", "after"}, SEEN_WITHIN_S)
        assert [r.id for r in await store.list()] == ["after", "good"]
        assert await store.get("junk") is None
        assert store.statistics()["malformed"] >= 6  # three in the watch, three per list
        # A record overwritten with something that is not one is gone.
        await raw.put(f"{PREFIX}good".encode(), b"[]")
        await c.wait_for_ids({"after"}, SEEN_WITHIN_S)
        assert c.kinds("good") == ["put", "delete"]
        await c.stop()
    finally:
        await store.close()
        await raw.close()


async def test_close_ends_every_watch(etcd_server: EtcdServer) -> None:
    store = make_store(etcd_server.endpoint)
    await store.put(record("r1", "127.0.0.1:9001"))
    c = Collector(store)
    await c.wait_for_ids({"r1"}, SEEN_WITHIN_S)
    await store.close()
    await c.wait_until(lambda c: c.ended, 2.0)
    assert store.statistics()["watches"] == 0
    with pytest.raises(StoreUnavailable):
        await store.list()


async def test_the_registry_section_opens_an_etcd_store(etcd_server: EtcdServer) -> None:
    config = RegistryConfig(store="etcd", etcd_endpoints=(etcd_server.endpoint,),
                            etcd_prefix="/other/", etcd_timeout_s=1.0)
    store = open_store(config, ManualClock())
    other = make_store(etcd_server.endpoint)
    try:
        assert isinstance(store, EtcdStore)
        await store.put(record("r1", "127.0.0.1:9001"))
        assert [r.id for r in await store.list()] == ["r1"]
        assert await other.list() == ()  # another prefix, another fleet
    finally:
        await store.close()
        await other.close()


def test_etcd_leases_are_whole_seconds_rounded_up() -> None:
    assert [lease_ttl_for_etcd(t) for t in (0.001, 1.0, 1.2, 10.0, 29.5)] == [1, 1, 2, 10, 30]
