"""The backend directory over a real data-plane ``Registry`` and a ``MemoryStore`` on a
``ManualClock``: registration makes a backend a member at once, leases expire into a drain,
replacement and conflicts by id and address, operators' drain and weight on every source,
the state file (what is saved, what is restored), and the watch. No sleeps: leases move
only with ``clock.advance``, and every wait is for events already due."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from router.control.directory import (
    BackendDirectory,
    DirectoryEvent,
    LoadReport,
    Registration,
)
from router.control.state import StateFile, decode
from router.control.store import MemoryStore
from router.core.clock import ManualClock
from router.core.errors import (
    AddressConflict,
    BackendExists,
    BackendIsStatic,
    BackendNotFound,
    InvalidInput,
    LeaseNotFound,
    StoreFull,
)
from router.core.types import BackendSpec
from router.dispatch.backends import Backend, Registry
from tests.fakes import make_backend

STATIC = "127.0.0.1:9000"
WAIT_S = 1.0  # only bounds a broken test: every event waited for is already due


def _backend_of(spec: BackendSpec) -> Backend:
    backend = make_backend(spec.address, spec.protocol, spec.models)
    backend.update(spec)
    return backend


class World:
    def __init__(self, tmp_path: Path, *, max_backends: int = 100) -> None:
        self.clock = ManualClock()
        self.registry = Registry()
        static = make_backend(STATIC, "tcp", ("s",))
        self.registry.add(static)
        self.store = MemoryStore(self.clock, max_backends=max_backends)
        self.state_path = tmp_path / "state.toml"
        self.state = StateFile(self.state_path)
        self.directory = self.new_directory()

    def new_directory(self) -> BackendDirectory:
        return BackendDirectory(self.registry, self.store, _backend_of, self.state,
                                apply_timeout_s=WAIT_S)

    def member(self, address: str) -> Backend:
        backend = self.registry.get(address)
        assert backend is not None, f"{address} is not a member"
        return backend

    async def expire(self, seconds: float) -> None:
        self.clock.advance(seconds)
        await settle()

    async def saved(self) -> str:
        await self.state.flush()
        return self.state_path.read_text()


async def settle() -> None:
    """Let the directory's follow task apply what the store has published."""
    for _ in range(5):
        await asyncio.sleep(0)


@pytest.fixture
async def world(tmp_path: Path) -> AsyncIterator[World]:
    w = World(tmp_path)
    await w.directory.start()
    try:
        yield w
    finally:
        await w.directory.close()


def reg(address: str, **fields: object) -> Registration:
    return Registration.model_validate({"address": address, **fields})


async def test_a_registration_is_a_member_when_it_answers(world: World) -> None:
    got = await world.directory.register(reg("127.0.0.1:9001", models=["m:1"], weight=3,
                                             lease_ttl_s=9.0))
    assert (got.id, got.lease_ttl_s, got.heartbeat_interval_s) == ("127.0.0.1:9001", 9.0, 3.0)
    backend = world.member("127.0.0.1:9001")  # no settle(): at once
    assert (backend.weight, backend.serves("m:1"), backend.spec.source) == (3, True,
                                                                            "registered")
    assert world.directory.get("127.0.0.1:9001").state == "healthy"
    assert world.directory.registrations["created"] == 1


async def test_heartbeats_keep_a_lease_and_an_unrenewed_one_drains_then_leaves(
        world: World) -> None:
    await world.directory.register(reg("127.0.0.1:9001", lease_ttl_s=3.0))
    for _ in range(4):  # 8 s of heartbeats every 2 s: past the 3 s TTL
        await world.expire(2.0)
        await world.directory.heartbeat("127.0.0.1:9001", LoadReport(inflight=2))
    backend = world.member("127.0.0.1:9001")
    assert world.directory.reported("127.0.0.1:9001") == LoadReport(inflight=2)
    backend.inflight = 1  # a request in flight: the expiry drains rather than cuts it
    await world.expire(3.5)
    assert world.registry.get("127.0.0.1:9001") is None
    assert world.registry.draining() == [backend]
    assert world.directory.lease_expirations == 1
    with pytest.raises(LeaseNotFound):
        await world.directory.heartbeat("127.0.0.1:9001")
    backend.inflight = 0
    world.registry.settle(backend)  # what dispatch does when the attempt ends
    assert world.registry.draining() == []
    assert world.directory.heartbeats == {"ok": 4, "lease_not_found": 1, "failed": 0}


async def test_a_heartbeat_for_an_unknown_id_or_a_leaseless_backend_is_lease_not_found(
        world: World) -> None:
    await world.directory.register(reg("127.0.0.1:9002", lease_ttl_s=None))
    for backend_id in ("nobody", STATIC, "127.0.0.1:9002"):
        with pytest.raises(LeaseNotFound):
            await world.directory.heartbeat(backend_id)


async def test_registering_the_same_address_again_replaces_the_record(world: World) -> None:
    await world.directory.register(reg("127.0.0.1:9001", id="w-1", models=["a"]))
    first = world.member("127.0.0.1:9001")
    await world.directory.register(reg("127.0.0.1:9001", id="w-2", models=["b"]))
    await settle()
    assert [info.id for info in world.directory.list() if info.source == "registered"] == ["w-2"]
    second = world.member("127.0.0.1:9001")
    assert second is not first and second.serves("b") and not second.serves("a")
    assert world.directory.registrations == {"created": 1, "replaced": 1, "rejected": 0,
                                             "failed": 0}


async def test_registering_the_same_id_at_the_same_address_updates_the_member(
        world: World) -> None:
    await world.directory.register(reg("127.0.0.1:9001", models=["a"]))
    first = world.member("127.0.0.1:9001")
    await world.directory.register(reg("127.0.0.1:9001", models=["a", "b"], weight=5))
    assert world.member("127.0.0.1:9001") is first
    assert (first.weight, first.serves("b")) == (5, True)


async def test_static_and_api_backends_are_never_replaced_by_a_registration(
        world: World) -> None:
    with pytest.raises(AddressConflict):
        await world.directory.register(reg(STATIC))
    with pytest.raises(BackendExists):
        await world.directory.register(reg("127.0.0.1:9003", id=STATIC))
    await world.directory.register(reg("127.0.0.1:9004", id="api-1", lease_ttl_s=None))
    with pytest.raises(BackendExists):
        await world.directory.register(reg("127.0.0.1:9005", id="api-1"))
    with pytest.raises(AddressConflict):
        await world.directory.register(reg("127.0.0.1:9004", id="other"))
    with pytest.raises(BackendExists):  # an API backend is added once; change it in place
        await world.directory.register(reg("127.0.0.1:9004", id="api-1", lease_ttl_s=None))
    assert world.directory.registrations["rejected"] == 5
    assert world.member(STATIC).spec.source == "static"


async def test_a_full_store_refuses_with_max_backends_reached(tmp_path: Path) -> None:
    w = World(tmp_path, max_backends=1)
    await w.directory.start()
    try:
        await w.directory.register(reg("127.0.0.1:9001"))
        with pytest.raises(StoreFull):
            await w.directory.register(reg("127.0.0.1:9002"))
        assert w.directory.registrations["rejected"] == 1
    finally:
        await w.directory.close()


async def test_deregistration_drains_and_static_backends_cannot_be_deregistered(
        world: World) -> None:
    await world.directory.register(reg("127.0.0.1:9001"))
    backend = world.member("127.0.0.1:9001")
    backend.inflight = 1
    info = await world.directory.deregister("127.0.0.1:9001")
    assert info.state == "draining" and world.registry.draining() == [backend]
    with pytest.raises(BackendNotFound):
        await world.directory.deregister("127.0.0.1:9001")
    with pytest.raises(BackendIsStatic):
        await world.directory.deregister(STATIC)
    assert world.directory.get("127.0.0.1:9001").state == "draining"  # while in flight
    assert [i.state for i in world.directory.list() if i.id != STATIC] == ["draining"]
    backend.inflight = 0
    world.registry.settle(backend)
    with pytest.raises(BackendNotFound):
        world.directory.get("127.0.0.1:9001")
    assert [i.id for i in world.directory.list()] == [STATIC]


async def test_drain_and_weight_on_a_record_keep_its_lease_and_membership(
        world: World) -> None:
    await world.directory.register(reg("127.0.0.1:9001", models=["m"], lease_ttl_s=3.0))
    backend = world.member("127.0.0.1:9001")
    info = await world.directory.set_drained("127.0.0.1:9001", True)
    assert (info.state, info.drained, info.lease_ttl_s) == ("draining", True, 3.0)
    assert world.member("127.0.0.1:9001") is backend  # a member still, out of rotation
    assert world.registry.candidates(model="m") == []
    await world.directory.heartbeat("127.0.0.1:9001")  # the lease survived the update
    await world.directory.set_drained("127.0.0.1:9001", False)
    await world.directory.set_weight("127.0.0.1:9001", 7)
    assert world.registry.candidates(model="m") == [backend] and backend.weight == 7


async def test_static_overrides_survive_a_spec_update_and_are_saved(world: World) -> None:
    static = world.member(STATIC)
    await world.directory.set_weight(STATIC, 4)
    await world.directory.set_drained(STATIC, True)
    world.registry.update(static.spec)  # a reload hands the config's spec again
    assert (static.weight, static.drained) == (4, True)
    assert world.registry.candidates(model="s") == []
    assert decode((await world.saved()).encode()).static[STATIC].weight == 4
    await world.directory.set_drained(STATIC, False)
    await world.directory.set_weight(STATIC, 1)
    assert world.registry.candidates(model="s") == [static]


async def test_the_state_file_restores_api_backends_and_overrides_not_leases(
        tmp_path: Path) -> None:
    w = World(tmp_path)
    await w.directory.start()
    await w.directory.register(reg("127.0.0.1:9004", id="api-1", models=["x"],
                                   lease_ttl_s=None))
    await w.directory.set_drained("api-1", True)
    await w.directory.register(reg("unix:/tmp/leased.sock"))  # leased: not persisted
    await w.directory.set_weight(STATIC, 9)
    await w.directory.close()
    saved = decode(w.state_path.read_bytes())
    assert [(b.id, b.drained) for b in saved.backends] == [("api-1", True)]
    assert saved.static[STATIC].weight == 9

    again = World(tmp_path)  # a new router process: empty store, same state file
    await again.directory.start()
    try:
        infos = {info.id: info for info in again.directory.list()}
        assert set(infos) == {STATIC, "api-1"}
        assert (infos["api-1"].source, infos["api-1"].drained) == ("api", True)
        assert again.member(STATIC).weight == 9
        assert again.member("127.0.0.1:9004").drained
    finally:
        await again.directory.close()


async def test_a_record_at_a_static_address_from_a_shared_store_is_left_out(
        world: World) -> None:
    # Another router (sharing etcd) registered an address this router's config holds.
    from router.control.store import BackendRecord
    await world.store.put(BackendRecord.parse({"id": "foreign", "address": STATIC,
                                               "source": "registered"}), 10.0)
    await settle()
    assert world.member(STATIC).spec.source == "static"
    assert world.directory.get("foreign").state == "starting"


async def test_an_update_cannot_move_a_record(world: World) -> None:
    from router.control.store import BackendRecord
    await world.directory.register(reg("127.0.0.1:9001"))
    moved = BackendRecord.parse({"id": "127.0.0.1:9001", "address": "127.0.0.1:9009"})
    with pytest.raises(InvalidInput):
        await world.store.update(moved)


async def test_a_watch_sees_every_backend_then_joins_changes_and_leaves(world: World) -> None:
    watch = world.directory.watch()
    events: list[DirectoryEvent] = []

    async def take(n: int) -> None:
        async with asyncio.timeout(WAIT_S):
            for _ in range(n):
                events.append(await anext(watch))

    await take(1)  # the snapshot: the static backend
    await world.directory.register(reg("127.0.0.1:9001", lease_ttl_s=2.0))
    await world.directory.set_drained("127.0.0.1:9001", True)
    await world.expire(2.5)
    await take(4)
    await settle()
    got = [(e.kind, e.backend.id, e.backend.state) for e in events]
    assert got == [
        ("joined", STATIC, "healthy"),
        ("joined", "127.0.0.1:9001", "healthy"),
        ("changed", "127.0.0.1:9001", "draining"),  # drained by the operator
        ("changed", "127.0.0.1:9001", "draining"),  # the lease expired: leaving
        ("left", "127.0.0.1:9001", "removed"),
    ]
    await watch.aclose()


async def test_a_batch_renews_each_lease_and_names_the_ones_to_register_again(
        world: World) -> None:
    from router.control.directory import LeaseRenewal
    await world.directory.register(reg("127.0.0.1:9001", lease_ttl_s=3.0))
    await world.directory.register(reg("127.0.0.1:9002", lease_ttl_s=3.0))
    await world.expire(2.0)
    result = await world.directory.heartbeat_many([
        LeaseRenewal(id="127.0.0.1:9001", inflight=5), LeaseRenewal(id="gone")])
    assert (result.renewed, result.not_found) == (["127.0.0.1:9001"], ["gone"])
    await world.expire(2.0)  # 4 s: past the unrenewed lease of 9002, within 9001's
    assert world.registry.get("127.0.0.1:9002") is None
    assert world.member("127.0.0.1:9001") is not None
    assert world.directory.reported("127.0.0.1:9001") == LoadReport(inflight=5)
    assert world.directory.heartbeats["ok"] == 1
    assert world.directory.heartbeats["lease_not_found"] == 1
