"""The registry store without a network: BackendRecord (validation, BackendSpec and JSON),
the changes between two views, the [registry] config section, and MemoryStore driven by a
ManualClock: leases, replacement, watch snapshots and resyncs. No sleeps: a watch is read
only for events already there, or to its end after the store is closed."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncGenerator
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from router.control.store import (
    BackendRecord,
    MemoryStore,
    StoreEvent,
    apply,
    changes,
    open_store,
)
from router.core.clock import ManualClock
from router.core.config import ConfigError, RegistryConfig, from_mapping
from router.core.errors import InvalidInput, StoreFull, StoreUnavailable
from router.core.types import BackendSpec

READ_TIMEOUT_S = 1.0  # the events read are already queued: this only bounds a broken test


def record(backend_id: str, address: str, **fields: Any) -> BackendRecord:
    return BackendRecord.parse({"id": backend_id, "address": address, **fields})


async def read(watch: AsyncGenerator[StoreEvent, None], n: int) -> list[tuple[str, str]]:
    """The next ``n`` events as (kind, id)."""
    found = []
    async with asyncio.timeout(READ_TIMEOUT_S):
        for _ in range(n):
            event = await anext(watch)
            found.append((event.kind, event.record.id))
    return found


async def rest(store: MemoryStore,
               watch: AsyncGenerator[StoreEvent, None]) -> list[tuple[str, str]]:
    """Close the store and read the watch to its end: exactly the events still queued."""
    await store.close()
    async with asyncio.timeout(READ_TIMEOUT_S):
        return [(event.kind, event.record.id) async for event in watch]


# -- BackendRecord -----------------------------------------------------------------------------


def test_a_record_converts_to_a_spec_and_back_with_one_protocol_mapping() -> None:
    r = record("b1", "127.0.0.1:9001", protocol="frames", models=["m", "m:2"], weight=3,
               labels={"zone": "a", "gpu": "h100"}, source="registered")
    spec = r.to_spec()
    assert spec == BackendSpec(id="b1", address="127.0.0.1:9001", protocol="tcp",
                               models=("m", "m:2"), weight=3,
                               labels=(("gpu", "h100"), ("zone", "a")), source="registered")
    assert BackendRecord.from_spec(spec) == r
    grpc = record("b2", "unix:/tmp/worker-1.sock", protocol="grpc")
    assert grpc.to_spec().protocol == "grpc"
    assert BackendRecord.from_spec(grpc.to_spec()) == grpc
    leased = BackendRecord.from_spec(spec, lease_id=7, lease_ttl_s=10.0)
    assert (leased.lease_id, leased.lease_ttl_s) == (7, 10.0)


def test_json_round_trips_and_ignores_fields_of_a_newer_version() -> None:
    r = record("b1", "[::1]:9001", models=["m:1"], labels={"k": "v"}, lease_id=2**62,
               lease_ttl_s=2.5)
    assert BackendRecord.from_json(r.to_json()) == r
    newer = r.to_json()[:-1] + b',"affinity":{"x":1}}'
    assert BackendRecord.from_json(newer) == r


@pytest.mark.parametrize(("fields", "where"), [
    ({"address": "127.0.0.1:0"}, "address"),
    ({"address": "nohost"}, "address"),
    ({"address": "unix:relative.sock"}, "address"),
    ({"address": "unix://tmp/x.sock"}, "address"),
    ({"address": "unix:/" + "x" * 107}, "address"),
    ({"id": ""}, "id"),
    ({"id": "has space"}, "id"),
    ({"protocol": "tcp"}, "protocol"),
    ({"models": ["name:"]}, "models[0]: "),
    ({"weight": 0}, "weight"),
    ({"weight": True}, "weight"),
    ({"labels": {"": "v"}}, "labels. (key): "),
    ({"labels": {"k": "v" * 257}}, "labels.k: "),
    ({"source": "elsewhere"}, "source"),
    ({"lease_id": 5}, "(record)"),  # a lease id without its TTL
    ({"lease_id": 0, "lease_ttl_s": 1.0}, "lease_id"),
    ({"colour": "red"}, "colour"),
])
def test_an_invalid_record_names_its_field(fields: dict[str, Any], where: str) -> None:
    data = {"id": "b1", "address": "127.0.0.1:9001", **fields}
    with pytest.raises(InvalidInput) as info:
        BackendRecord.parse(data)
    assert info.value.message.startswith(where), info.value.message
    assert info.value.code == "VALIDATION_ERROR"


@pytest.mark.parametrize("data", [b"not json", b"[]", b'{"id": "b1"}', b"\xff"])
def test_stored_bytes_that_are_not_a_record_are_invalid(data: bytes) -> None:
    with pytest.raises(InvalidInput):
        BackendRecord.from_json(data)


def test_a_record_is_frozen() -> None:
    r = record("b1", "127.0.0.1:9001")
    with pytest.raises(ValueError, match="frozen"):
        r.weight = 2  # type: ignore[misc]


# -- changes -----------------------------------------------------------------------------------

views = st.dictionaries(
    st.sampled_from(["a", "b", "c", "d"]),
    st.integers(1, 3),
    max_size=4,
).map(lambda d: {k: record(k, f"127.0.0.1:{9000 + w}", weight=w) for k, w in d.items()})


@given(views, views)
def test_applying_the_changes_turns_one_view_into_the_other(
    told: dict[str, BackendRecord], now: dict[str, BackendRecord],
) -> None:
    found = changes(told, now)
    view = dict(told)
    for event in found:
        apply(view, event)
    assert view == now
    kinds = [event.kind for event in found]
    assert kinds == sorted(kinds, key=lambda kind: kind != "delete")  # deletes first
    assert len(found) == len(set(told) - set(now)) + sum(told.get(k) != r for k, r in now.items())


# -- the [registry] section --------------------------------------------------------------------


def test_the_registry_section_defaults_to_memory() -> None:
    cfg = from_mapping({})
    assert cfg.registry == RegistryConfig()
    assert (cfg.registry.store, cfg.registry.etcd_endpoints, cfg.registry.etcd_prefix) == (
        "memory", ("127.0.0.1:2379",), "/inference-router/backends/")
    assert isinstance(open_store(cfg.registry, ManualClock()), MemoryStore)


@pytest.mark.parametrize(("registry", "key"), [
    ({"store": "zookeeper"}, "registry.store"),
    ({"etcd_endpoints": []}, "registry.etcd_endpoints"),
    ({"etcd_endpoints": ["localhost"]}, "registry.etcd_endpoints[0]"),
    ({"etcd_prefix": "/no/slash"}, "registry.etcd_prefix"),
    ({"etcd_prefix": ""}, "registry.etcd_prefix"),
    ({"etcd_reconnect_backoff_max_s": 0.05}, "registry.etcd_reconnect_backoff_max_s"),
    ({"max_backends": 0}, "registry.max_backends"),
    ({"lease_ttl_s": 10}, "registry.lease_ttl_s"),
])
def test_a_bad_registry_key_is_named(registry: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError) as info:
        from_mapping({"registry": registry}, "cfg.toml")
    problem = info.value.problems[0]
    assert problem.startswith(f"cfg.toml: {key}: "), info.value.problems


# -- MemoryStore -------------------------------------------------------------------------------


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(start=0.0)


@pytest.fixture
def store(clock: ManualClock) -> MemoryStore:
    return MemoryStore(clock, rng=random.Random(1))


async def test_put_get_list_and_delete(store: MemoryStore) -> None:
    assert await store.put(record("b1", "127.0.0.1:9001")) is None
    await store.put(record("b2", "unix:/tmp/b2.sock", protocol="grpc"))
    assert await store.get("b1") == record("b1", "127.0.0.1:9001")
    assert [r.id for r in await store.list()] == ["b1", "b2"]
    assert await store.delete("b1") is True
    assert await store.delete("b1") is False
    assert await store.get("b1") is None
    assert store.statistics()["records"] == 1


async def test_a_lease_not_refreshed_expires_at_its_ttl(
    store: MemoryStore, clock: ManualClock,
) -> None:
    lease = await store.put(record("b1", "127.0.0.1:9001"), lease_ttl_s=10.0)
    watch = store.watch()
    assert await read(watch, 1) == [("put", "b1")]
    assert lease is not None
    stored = await store.get("b1")
    assert stored is not None and (stored.lease_id, stored.lease_ttl_s) == (lease, 10.0)
    clock.advance(9.999)
    assert await store.get("b1") is not None
    clock.advance(0.001)
    assert await store.get("b1") is None
    assert await store.refresh(lease) is False  # NOT_FOUND: the backend registers again
    assert await rest(store, watch) == [("expired", "b1")]


async def test_refresh_moves_the_deadline_without_setting_timers(
    store: MemoryStore, clock: ManualClock,
) -> None:
    lease = await store.put(record("b1", "127.0.0.1:9001"), lease_ttl_s=3.0)
    assert lease is not None
    for _ in range(10):  # 20 s of heartbeats every 2 s, each within the 3 s TTL
        clock.advance(2.0)
        assert await store.refresh(lease) is True
    assert clock.pending_timers == 1
    assert await store.get("b1") is not None
    clock.advance(2.999)
    assert await store.get("b1") is not None
    clock.advance(0.001)
    assert await store.get("b1") is None
    assert store.statistics()["expirations"] == 1
    assert await store.refresh(12345) is False
    assert store.statistics()["refreshes_unknown"] == 1


async def test_a_put_at_the_same_id_replaces_and_drops_the_old_lease(
    store: MemoryStore, clock: ManualClock,
) -> None:
    old = await store.put(record("b1", "127.0.0.1:9001"), lease_ttl_s=5.0)
    watch = store.watch()
    assert await read(watch, 1) == [("put", "b1")]
    new = await store.put(record("b1", "127.0.0.1:9002", weight=2), lease_ttl_s=5.0)
    assert old is not None and new is not None and old != new
    assert await store.refresh(old) is False
    assert [(r.address, r.weight) for r in await store.list()] == [("127.0.0.1:9002", 2)]
    await store.put(record("b3", "127.0.0.1:9001"))  # the old address is free again
    clock.advance(5.0)
    assert [r.id for r in await store.list()] == ["b3"]
    assert await rest(store, watch) == [("put", "b1"), ("put", "b3"), ("expired", "b1")]


async def test_a_put_at_the_same_address_under_another_id_replaces_it(store: MemoryStore) -> None:
    old = await store.put(record("old", "127.0.0.1:9001"), lease_ttl_s=5.0)
    watch = store.watch()
    assert await read(watch, 1) == [("put", "old")]
    await store.put(record("new", "127.0.0.1:9001"))
    assert [r.id for r in await store.list()] == ["new"]
    assert old is not None and await store.refresh(old) is False
    assert store.statistics()["replaced"] == 1
    assert await rest(store, watch) == [("delete", "old"), ("put", "new")]


async def test_the_store_holds_at_most_max_backends(clock: ManualClock) -> None:
    store = MemoryStore(clock, max_backends=2)
    await store.put(record("b1", "127.0.0.1:9001"))
    await store.put(record("b2", "127.0.0.1:9002"))
    with pytest.raises(StoreFull) as info:
        await store.put(record("b3", "127.0.0.1:9003"), lease_ttl_s=1.0)
    assert info.value.code == "MAX_BACKENDS_REACHED"
    assert clock.pending_timers == 0  # the refused put left no lease behind
    await store.put(record("b3", "127.0.0.1:9001"))  # replaces b1
    await store.put(record("b2", "127.0.0.1:9002", weight=4))  # replaces itself
    assert sorted(r.id for r in await store.list()) == ["b2", "b3"]


@pytest.mark.parametrize("ttl", [0.0, -1.0, float("nan"), float("inf"), 86_401.0])
async def test_a_lease_ttl_out_of_range_is_refused(store: MemoryStore, ttl: float) -> None:
    with pytest.raises(InvalidInput):
        await store.put(record("b1", "127.0.0.1:9001"), lease_ttl_s=ttl)
    assert await store.list() == ()


async def test_a_watch_starts_with_the_snapshot_then_follows(store: MemoryStore) -> None:
    await store.put(record("b1", "127.0.0.1:9001"))
    await store.put(record("b2", "127.0.0.1:9002"))
    watch = store.watch()
    await store.put(record("b3", "127.0.0.1:9003"))  # before the first read: in the snapshot
    assert sorted(await read(watch, 3)) == [("put", "b1"), ("put", "b2"), ("put", "b3")]
    await store.delete("b2")
    assert await read(watch, 1) == [("delete", "b2")]
    late = store.watch()
    assert sorted(await read(late, 2)) == [("put", "b1"), ("put", "b3")]
    assert store.statistics()["watches"] == 2
    assert await rest(store, watch) == []
    assert await rest(store, late) == []
    assert store.statistics()["watches"] == 0


async def test_a_reader_waiting_for_an_event_gets_it(store: MemoryStore) -> None:
    watch = store.watch()
    reader = asyncio.create_task(read(watch, 1))
    await asyncio.sleep(0)  # one loop iteration, not a wait: the reader runs to its await
    assert not reader.done()
    await store.put(record("b1", "127.0.0.1:9001"))
    assert await reader == [("put", "b1")]
    await watch.aclose()
    assert store.statistics()["watches"] == 0


async def rest_after_resync(store: MemoryStore,
                            watch: AsyncGenerator[StoreEvent, None]) -> list[tuple[str, str]]:
    """Read once (the resync happens on a read of an open store), then the rest."""
    first = await read(watch, 1)
    return first + await rest(store, watch)


async def test_a_watcher_that_falls_behind_gets_the_differences(clock: ManualClock) -> None:
    store = MemoryStore(clock, max_pending_events=4)
    watch = store.watch()
    await store.put(record("b1", "127.0.0.1:9001"))
    assert await read(watch, 1) == [("put", "b1")]
    for i in range(2, 12):
        await store.put(record(f"b{i}", f"127.0.0.1:{9000 + i}"))
    await store.delete("b1")
    await store.delete("b5")
    assert store.statistics()["watch_overflows"] == 1
    remaining = await rest_after_resync(store, watch)
    assert remaining[0] == ("delete", "b1")  # deletes first
    assert sorted(remaining[1:]) == sorted(
        ("put", f"b{i}") for i in range(2, 12) if i != 5)  # b5 came and went unseen


async def test_a_closed_store_ends_its_watches_and_refuses_work(store: MemoryStore) -> None:
    watch = store.watch()
    reader = asyncio.create_task(read(watch, 1))
    await asyncio.sleep(0)
    await store.close()
    with pytest.raises(StopAsyncIteration):
        await reader
    for call in (store.put(record("b1", "127.0.0.1:9001")), store.refresh(1),
                 store.delete("b1"), store.get("b1"), store.list()):
        with pytest.raises(StoreUnavailable):
            await call
    with pytest.raises(StoreUnavailable):
        store.watch()
    assert "records=0" in repr(store)


# A random sequence of operations, with reads of one slow watcher in between: the watcher's
# view always ends equal to the store's records, whatever overflowed on the way.
operations = st.lists(st.one_of(
    st.tuples(st.just("put"), st.sampled_from("abcdef"), st.integers(1, 4),
              st.sampled_from([None, 1.0, 5.0])),
    st.tuples(st.just("delete"), st.sampled_from("abcdef")),
    st.tuples(st.just("refresh"), st.sampled_from("abcdef")),
    st.tuples(st.just("advance"), st.floats(0.0, 3.0)),
    st.tuples(st.just("read"), st.integers(1, 3)),
), max_size=60)


@settings(max_examples=150, deadline=None)
@given(operations)
def test_a_watcher_ends_with_the_store_records_whatever_happened(ops: list[Any]) -> None:
    asyncio.run(_replay(ops))


async def _replay(ops: list[Any]) -> None:
    clock = ManualClock(start=0.0)
    store = MemoryStore(clock, max_pending_events=3, rng=random.Random(0))
    watch = store.watch()
    view: dict[str, BackendRecord] = {}
    leases: dict[str, int] = {}
    for op in ops:
        if op[0] == "put":
            _, key, port, ttl = op
            lease = await store.put(record(key, f"127.0.0.1:{9000 + port}"), lease_ttl_s=ttl)
            if lease is not None:
                leases[key] = lease
        elif op[0] == "delete":
            await store.delete(op[1])
        elif op[0] == "refresh" and op[1] in leases:
            await store.refresh(leases[op[1]])
        elif op[0] == "advance":
            clock.advance(op[1])
        elif op[0] == "read":
            records = {r.id: r for r in await store.list()}
            # At least one event per record that differs is queued: these reads never wait.
            for _ in range(min(op[1], len(changes(view, records)))):
                async with asyncio.timeout(READ_TIMEOUT_S):
                    apply(view, await anext(watch))
    # What is left: at most 3 queued events, or a resync of at most 2 events per id.
    records = {r.id: r for r in await store.list()}
    for _ in range(2 * len("abcdef")):
        if view == records:
            break
        async with asyncio.timeout(READ_TIMEOUT_S):
            apply(view, await anext(watch))
    assert view == records
    await store.close()
