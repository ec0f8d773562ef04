"""Two ``BackendDirectory`` objects on one real etcd, as two routers have them, each with its
own state file. The shared store, not a router's state file, keeps API backends: a router
restarted from its state file must not undo what another router changed or deleted since.
A directory that starts on a shared store holds its records when ``start`` returns (the
router's first request finds the fleet), and one started while etcd is away gets them when
etcd is back. The data plane is the real ``Registry`` with backends that never dial; every
wait is bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from pathlib import Path

from router.control.directory import BackendDirectory, BackendInfo, Registration
from router.control.etcd_store import EtcdStore
from router.control.state import StateFile
from router.control.store import BackendRecord, MemoryStore, RegistryStore
from router.core.clock import ManualClock
from router.core.types import BackendSpec
from router.dispatch.backends import Backend, Registry
from tests.etcd_support import EtcdServer, etcd_server
from tests.fakes import make_backend

__all__ = ["etcd_server"]  # the fixture, used by name

PREFIX = "/test-directory/backends/"
SEEN_WITHIN_S = 1.0  # a change through one router reaches the others within a second
ADDRESS = "127.0.0.1:9001"


def backend_of(spec: BackendSpec) -> Backend:
    return Backend(spec, make_backend(spec.address, spec.protocol).upstream)


def etcd_store(server: EtcdServer) -> EtcdStore:
    return EtcdStore([server.endpoint], prefix=PREFIX, timeout_s=1.0,
                     reconnect_backoff_max_s=0.5)


@contextlib.asynccontextmanager
async def directory(store: RegistryStore, state: Path) -> AsyncIterator[BackendDirectory]:
    """A started directory on ``store`` with the state file ``state``; closed on exit."""
    found = BackendDirectory(Registry(), store, backend_of, StateFile(state))
    await found.start()
    try:
        yield found
    finally:
        await found.close()


async def eventually(found: BackendDirectory, check: Callable[[], bool],
                     within_s: float = SEEN_WITHIN_S) -> None:
    """Wait (bounded) until ``check()`` holds, woken by each event of ``found``'s watch (told
    once the directory has applied the change)."""
    async with asyncio.timeout(within_s):
        async for _ in found.watch():
            if check():
                return
    raise AssertionError("the directory's watch ended")


def ids(found: BackendDirectory) -> list[str]:
    return [info.id for info in found.list()]


def weight(found: BackendDirectory, backend_id: str) -> int | None:
    infos: list[BackendInfo] = [i for i in found.list() if i.id == backend_id]
    return infos[0].weight if infos else None


async def in_etcd(server: EtcdServer) -> dict[str, BackendRecord]:
    """What etcd holds, read by a store of its own."""
    store = etcd_store(server)
    try:
        return {r.id: r for r in await store.list()}
    finally:
        await store.close()


API = Registration(id="gpu-1", address=ADDRESS, lease_ttl_s=None)


async def test_a_restarted_router_does_not_bring_back_what_another_deleted(
    etcd_server: EtcdServer, tmp_path: Path,
) -> None:
    async with directory(etcd_store(etcd_server), tmp_path / "b.toml") as b:
        async with directory(etcd_store(etcd_server), tmp_path / "a.toml") as a:
            await a.register(API, "api")
            await eventually(b, lambda: ids(b) == ["gpu-1"])
        # Router A is down; router B deletes the backend.
        await b.deregister("gpu-1")
        # A's start has made every put it makes by the time it returns.
        async with directory(etcd_store(etcd_server), tmp_path / "a.toml") as a:
            assert await in_etcd(etcd_server) == {}
            assert ids(a) == [] and ids(b) == []


async def test_a_restarted_router_does_not_undo_another_routers_change(
    etcd_server: EtcdServer, tmp_path: Path,
) -> None:
    async with directory(etcd_store(etcd_server), tmp_path / "b.toml") as b:
        async with directory(etcd_store(etcd_server), tmp_path / "a.toml") as a:
            await a.register(API, "api")
            await a.set_drained("gpu-1", True)
            await eventually(b, lambda: b.get("gpu-1").drained if ids(b) else False)
        await b.set_weight("gpu-1", 7)
        await b.set_drained("gpu-1", False)
        async with directory(etcd_store(etcd_server), tmp_path / "a.toml") as a:
            stored = (await in_etcd(etcd_server))["gpu-1"]
            assert (stored.weight, stored.drained) == (7, False)
            await eventually(a, lambda: weight(a, "gpu-1") == 7)
            for found in (a, b):
                info = found.get("gpu-1")
                assert (info.weight, info.drained) == (7, False)
            # A's state file holds no copy of the shared record to restore next time.
            assert a.desired_state().backends == ()


async def test_a_router_alone_restores_its_api_backends(tmp_path: Path) -> None:
    # The memory store forgets everything with its router: the state file is what restores.
    state = tmp_path / "a.toml"
    async with directory(MemoryStore(ManualClock()), state) as a:
        await a.register(API, "api")
        await a.set_weight("gpu-1", 7)
    async with directory(MemoryStore(ManualClock()), state) as a:
        assert (ids(a), weight(a, "gpu-1")) == (["gpu-1"], 7)


async def test_a_router_started_on_a_shared_store_holds_its_fleet_when_start_returns(
    etcd_server: EtcdServer, tmp_path: Path,
) -> None:
    async with directory(etcd_store(etcd_server), tmp_path / "a.toml") as a:
        for n in range(3):
            await a.register(Registration(id=f"r{n}", address=f"127.0.0.1:{9101 + n}"))
        # The first request of a router that has just started finds the fleet.
        async with directory(etcd_store(etcd_server), tmp_path / "b.toml") as b:
            assert sorted(ids(b)) == ["r0", "r1", "r2"]
            assert b.get("r0").state == "healthy"


async def test_a_router_started_while_etcd_is_away_gets_its_fleet_when_etcd_is_back(
    tmp_path: Path,
) -> None:
    server = EtcdServer(tmp_path / "etcd")  # its port is free: nothing listens there yet
    async with directory(etcd_store(server), tmp_path / "a.toml") as a:
        assert ids(a) == []
        await server.start()
        try:
            store = etcd_store(server)
            await store.put(BackendRecord.parse({"id": "r1", "address": ADDRESS,
                                                 "source": "api"}))
            await store.close()
            try:
                await eventually(a, lambda: ids(a) == ["r1"], within_s=5.0)
            except TimeoutError:
                raise AssertionError(a.statistics()) from None
        finally:
            await server.stop()
