"""The admin gRPC services (``inference_router.v1.Registry`` and AnyServe's
``anyserve.WorkerManagement``) over a real ``BackendDirectory`` (a data-plane ``Registry``, a
``MemoryStore`` on a ``ManualClock``), served by real grpc.aio servers on loopback and called
with the generated stubs: every method, every error as its status and ``x-router-error``, the
credentials of the admin API (token, mTLS and its allow-list), AnyServe's models accumulating
under a worker id, and the leases the router keeps for AnyServe's workers. Leases move only
with ``clock.advance``."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest

from router.control.admin import AdminAuth
from router.control.directory import BackendDirectory
from router.control.registry_grpc import AdminGrpc, CallGuard, GrpcListener, RegistryService
from router.control.store import MemoryStore
from router.core.clock import ManualClock
from router.core.config import AdminConfig, ServerTlsConfig, from_mapping, parse_host_port
from router.core.errors import ROUTER_ERROR_HEADER, ConfigError
from router.core.types import BackendSpec
from router.dispatch.backends import Backend, Registry
from router.protocol.proto import anyserve_worker_management_pb2 as mgmt
from router.protocol.proto import anyserve_worker_management_pb2_grpc as mgmt_grpc
from router.protocol.proto import registry_pb2 as pb
from router.protocol.proto import registry_pb2_grpc as pb_grpc
from router.tls.context import ServerTls
from tests.fakes import make_backend
from tests.tls_support import Identity, Pki

TOKEN = "grpc-admin-token"
AUTH = (("authorization", f"Bearer {TOKEN}"),)
STATIC = "127.0.0.1:9000"
WAIT_S = 5.0  # bounds a broken test only: every event waited for is already due
WORKER_SOCKET = "/tmp/anyserve-worker-w1.sock"


def _backend_of(spec: BackendSpec) -> Backend:
    backend = make_backend(spec.address, spec.protocol, spec.models)
    backend.update(spec)
    return backend


async def _listen(key: str, address: str,
                  start: Callable[[str, int], Awaitable[tuple[str, int]]]) -> tuple[str, int]:
    return await start(*parse_host_port(address))


class World:
    """A directory with one static backend, its admin gRPC and AnyServe listeners, and stubs
    for both (``registry`` and ``anyserve_admin`` with credentials on the admin listener,
    ``anyserve`` without on the AnyServe one)."""

    def __init__(self, tmp_path: Path) -> None:
        self.clock = ManualClock()
        self.registry = Registry()
        self.registry.add(make_backend(STATIC, "tcp", ("s",)))
        self.store = MemoryStore(self.clock)
        self.directory = BackendDirectory(self.registry, self.store, _backend_of,
                                          apply_timeout_s=WAIT_S)
        token = tmp_path / "token"
        token.write_text(TOKEN)
        config = AdminConfig(token_file=str(token), grpc_listen="127.0.0.1:0",
                             anyserve_listen="127.0.0.1:0")
        self.auth = AdminAuth(config, None)
        self.admin_grpc = AdminGrpc(config, self.directory, self.auth, None)
        self.channels: list[grpc.aio.Channel] = []

    async def start(self) -> None:
        await self.directory.start()
        admin, anyserve = await self.admin_grpc.start(_listen)
        assert admin is not None and anyserve is not None
        await self.admin_grpc.keeper.close()  # its passes are run by hand: keeper.renew()
        admin_channel = self.channel(admin)
        self.registry_stub = pb_grpc.RegistryStub(admin_channel)
        self.anyserve_admin = mgmt_grpc.WorkerManagementStub(admin_channel)
        self.anyserve = mgmt_grpc.WorkerManagementStub(self.channel(anyserve))

    def channel(self, address: tuple[str, int]) -> grpc.aio.Channel:
        channel = grpc.aio.insecure_channel(f"{address[0]}:{address[1]}")
        self.channels.append(channel)
        return channel

    async def close(self) -> None:
        for channel in self.channels:
            await channel.close()
        await self.admin_grpc.close()
        await self.directory.close()

    async def advance(self, seconds: float) -> None:
        """Move the store's clock, then let the directory apply what expired."""
        self.clock.advance(seconds)
        for _ in range(5):
            await asyncio.sleep(0)

    def member(self, address: str) -> Backend | None:
        return self.registry.get(address)


@pytest.fixture
async def world(tmp_path: Path) -> AsyncIterator[World]:
    w = World(tmp_path)
    await w.start()
    try:
        yield w
    finally:
        await w.close()


async def refused(call: Awaitable[Any]) -> tuple[grpc.StatusCode, str | None]:
    """The status code and ``x-router-error`` of a call that must fail."""
    with pytest.raises(grpc.aio.AioRpcError) as failed:
        await asyncio.wait_for(call, WAIT_S)
    trailers = dict(failed.value.trailing_metadata() or ())
    return failed.value.code(), trailers.get(ROUTER_ERROR_HEADER)


def registration(address: str, *models: str, **fields: Any) -> pb.Registration:
    return pb.Registration(address=address, models=models, **fields)


# -- inference_router.v1.Registry ----------------------------------------------------------------


async def test_register_makes_a_member_at_once_and_list_shows_every_source(
        world: World) -> None:
    registered = await world.registry_stub.Register(
        registration("127.0.0.1:9100", "m:1", weight=3, labels={"zone": "a"}), metadata=AUTH)
    assert (registered.id, registered.lease_ttl_s) == ("127.0.0.1:9100", 10.0)
    assert registered.heartbeat_interval_s == pytest.approx(10 / 3)
    member = world.member("127.0.0.1:9100")
    assert member is not None and member.kind == "tcp" and member.weight == 3
    listed = await world.registry_stub.List(pb.ListRequest())  # a read on loopback: no token
    by_id = {info.id: info for info in listed.backends}
    assert set(by_id) == {STATIC, "127.0.0.1:9100"}
    info = by_id["127.0.0.1:9100"]
    assert (info.protocol, list(info.models), info.source, info.state, dict(info.labels)) == (
        "frames", ["m:1"], "registered", "healthy", {"zone": "a"})
    assert info.HasField("lease_ttl_s") and not info.HasField("reported")
    assert (by_id[STATIC].source, by_id[STATIC].HasField("lease_ttl_s")) == ("static", False)


async def test_a_grpc_backend_with_an_id_and_a_leaseless_api_backend(world: World) -> None:
    registered = await world.registry_stub.Register(
        registration("127.0.0.1:9101", "kserve", id="k1", protocol="grpc"), metadata=AUTH)
    assert registered.id == "k1"
    member = world.member("127.0.0.1:9101")
    assert member is not None and member.kind == "grpc"
    api = await world.registry_stub.Register(registration("127.0.0.1:9102", leaseless=True),
                                             metadata=AUTH)
    assert (api.id, api.HasField("lease_ttl_s"), api.HasField("heartbeat_interval_s")) == (
        "127.0.0.1:9102", False, False)
    assert world.directory.get("127.0.0.1:9102").source == "api"
    assert await refused(world.registry_stub.Heartbeat(
        pb.HeartbeatRequest(id="127.0.0.1:9102"), metadata=AUTH)) == (
        grpc.StatusCode.NOT_FOUND, "LEASE_NOT_FOUND")


async def test_heartbeats_renew_and_report_and_an_unknown_lease_is_not_found(
        world: World) -> None:
    await world.registry_stub.Register(registration("127.0.0.1:9103", lease_ttl_s=5.0),
                                       metadata=AUTH)
    report = pb.LoadReport(inflight=7, loaded_models=pb.ModelList(models=["m:2"]))
    for _ in range(3):  # 12 s in all, past the 5 s TTL: renewed each time
        await world.advance(4)
        answer = await world.registry_stub.Heartbeat(
            pb.HeartbeatRequest(id="127.0.0.1:9103", report=report), metadata=AUTH)
        assert (answer.id, answer.lease_ttl_s) == ("127.0.0.1:9103", 5.0)
    reported = world.directory.reported("127.0.0.1:9103")
    assert reported is not None and (reported.inflight, reported.loaded_models) == (7, ("m:2",))
    listed = await world.registry_stub.List(pb.ListRequest())
    info = next(i for i in listed.backends if i.id == "127.0.0.1:9103")
    assert (info.reported.inflight, list(info.reported.loaded_models.models)) == (7, ["m:2"])
    # An empty report is a report of no models loaded, not the absence of one.
    await world.registry_stub.Heartbeat(pb.HeartbeatRequest(
        id="127.0.0.1:9103", report=pb.LoadReport(loaded_models=pb.ModelList())),
        metadata=AUTH)
    reported = world.directory.reported("127.0.0.1:9103")
    assert reported is not None and reported.loaded_models == ()
    await world.advance(6)  # not renewed: expired, drained, gone
    assert world.member("127.0.0.1:9103") is None
    for unknown in ("127.0.0.1:9103", "never-registered"):
        assert await refused(world.registry_stub.Heartbeat(
            pb.HeartbeatRequest(id=unknown), metadata=AUTH)) == (
            grpc.StatusCode.NOT_FOUND, "LEASE_NOT_FOUND")


async def test_deregister_drains_and_its_errors(world: World) -> None:
    await world.registry_stub.Register(registration("127.0.0.1:9104"), metadata=AUTH)
    info = await world.registry_stub.Deregister(pb.DeregisterRequest(id="127.0.0.1:9104"),
                                                metadata=AUTH)
    assert info.id == "127.0.0.1:9104" and info.state in ("draining", "removed")
    assert world.member("127.0.0.1:9104") is None  # nothing in flight: left at once
    assert await refused(world.registry_stub.Deregister(
        pb.DeregisterRequest(id="127.0.0.1:9104"), metadata=AUTH)) == (
        grpc.StatusCode.NOT_FOUND, "BACKEND_NOT_FOUND")
    assert await refused(world.registry_stub.Deregister(
        pb.DeregisterRequest(id=STATIC), metadata=AUTH)) == (
        grpc.StatusCode.FAILED_PRECONDITION, "BACKEND_IS_STATIC")


async def test_invalid_and_conflicting_registrations(world: World) -> None:
    register = world.registry_stub.Register
    for bad in (registration("no-port"), registration("unix:relative.sock"),
                registration("127.0.0.1:9105", protocol="http"),
                registration("127.0.0.1:9105", "m:"), registration("127.0.0.1:9105", weight=0),
                registration("127.0.0.1:9105", lease_ttl_s=-1.0),
                registration("127.0.0.1:9105", leaseless=True, lease_ttl_s=5.0)):
        assert await refused(register(bad, metadata=AUTH)) == (
            grpc.StatusCode.INVALID_ARGUMENT, "VALIDATION_ERROR"), bad
    assert await refused(register(registration("127.0.0.1:9106", id=STATIC),
                                  metadata=AUTH)) == (
        grpc.StatusCode.ALREADY_EXISTS, "BACKEND_EXISTS")
    assert await refused(register(registration(STATIC, id="elsewhere"), metadata=AUTH)) == (
        grpc.StatusCode.ALREADY_EXISTS, "ADDRESS_CONFLICT")
    assert await refused(world.registry_stub.Heartbeat(
        pb.HeartbeatRequest(id=STATIC, report=pb.LoadReport(
            loaded_models=pb.ModelList(models=[""]))), metadata=AUTH)) == (
        grpc.StatusCode.INVALID_ARGUMENT, "VALIDATION_ERROR")
    stats = world.admin_grpc.statistics()["calls"]["admin.grpc_listen"]
    assert stats["Register VALIDATION_ERROR"] == 7 and stats["Register BACKEND_EXISTS"] == 1


async def test_watch_sees_every_backend_then_joins_changes_and_leaves(world: World) -> None:
    await world.registry_stub.Register(registration("127.0.0.1:9107"), metadata=AUTH)
    watch = world.registry_stub.Watch(pb.WatchRequest())

    async def next_event() -> tuple[str, str, str]:
        event = await asyncio.wait_for(watch.read(), WAIT_S)
        assert isinstance(event, pb.WatchEvent)
        return event.kind, event.backend.id, event.backend.state

    assert {await next_event(), await next_event()} == {
        ("joined", STATIC, "healthy"), ("joined", "127.0.0.1:9107", "healthy")}
    await world.registry_stub.Register(registration("127.0.0.1:9108", lease_ttl_s=2.0),
                                       metadata=AUTH)
    assert await next_event() == ("joined", "127.0.0.1:9108", "healthy")
    await world.directory.set_drained("127.0.0.1:9107", True)
    assert await next_event() == ("changed", "127.0.0.1:9107", "draining")
    await world.registry_stub.Deregister(pb.DeregisterRequest(id="127.0.0.1:9107"),
                                         metadata=AUTH)
    assert await next_event() == ("changed", "127.0.0.1:9107", "draining")
    assert await next_event() == ("left", "127.0.0.1:9107", "removed")
    await world.advance(3)  # 9108's lease expires
    assert await next_event() == ("changed", "127.0.0.1:9108", "draining")
    assert await next_event() == ("left", "127.0.0.1:9108", "removed")
    watch.cancel()


# -- credentials ---------------------------------------------------------------------------------


async def test_mutations_need_the_token_and_reads_on_loopback_do_not(world: World) -> None:
    stub = world.registry_stub
    wrong = (("authorization", "Bearer not-the-token"),)
    calls: list[Callable[[tuple[tuple[str, str], ...]], Awaitable[Any]]] = [
        lambda md: stub.Register(registration("127.0.0.1:9109"), metadata=md),
        lambda md: stub.Heartbeat(pb.HeartbeatRequest(id="x"), metadata=md),
        lambda md: stub.Deregister(pb.DeregisterRequest(id="x"), metadata=md),
        lambda md: world.anyserve_admin.RegisterModel(mgmt.RegisterModelRequest(
            model_name="m", worker_address="unix:///tmp/w.sock", worker_id="w"), metadata=md),
    ]
    for call in calls:
        assert await refused(call(())) == (grpc.StatusCode.UNAUTHENTICATED, "UNAUTHORIZED")
        assert await refused(call(wrong)) == (grpc.StatusCode.PERMISSION_DENIED, "FORBIDDEN")
    assert world.member("127.0.0.1:9109") is None
    assert world.auth.refused == {"UNAUTHORIZED": 4, "FORBIDDEN": 4}
    assert len((await stub.List(pb.ListRequest())).backends) == 1
    assert len((await stub.List(pb.ListRequest(), metadata=AUTH)).backends) == 1


async def test_off_loopback_reads_need_credentials_too(world: World) -> None:
    # The guard of a listener on an address other than loopback (bound here on loopback).
    guard = CallGuard(world.auth, None, reads_need_credentials=True)
    service = RegistryService(world.directory, guard)
    listener = GrpcListener(
        "admin.grpc_listen",
        lambda server: pb_grpc.add_RegistryServicer_to_server(service, server), None)
    address = await listener.start("127.0.0.1", 0)
    try:
        stub = pb_grpc.RegistryStub(world.channel(address))
        assert await refused(stub.List(pb.ListRequest())) == (
            grpc.StatusCode.UNAUTHENTICATED, "UNAUTHORIZED")
        assert await refused(stub.Watch(pb.WatchRequest()).read()) == (
            grpc.StatusCode.UNAUTHENTICATED, "UNAUTHORIZED")
        assert len((await stub.List(pb.ListRequest(), metadata=AUTH)).backends) == 1
    finally:
        await listener.close()


async def test_mutual_tls_lets_allowed_clients_in_without_a_token(
        world: World, tmp_path: Path) -> None:
    pki = Pki(tmp_path / "pki")
    tls_config = ServerTlsConfig.model_validate(pki.mutual(allowed_client_cns=["batch-worker"]))
    tls = ServerTls(tls_config, "admin.tls")
    token = tmp_path / "token"
    config = AdminConfig(token_file=str(token), tls=tls_config, grpc_listen="127.0.0.1:0")
    admin_grpc = AdminGrpc(config, world.directory, AdminAuth(config, tls), tls)
    admin, _ = await admin_grpc.start(_listen)
    assert admin is not None

    def stub(identity: Identity) -> pb_grpc.RegistryStub:
        credentials = grpc.ssl_channel_credentials(
            root_certificates=pki.ca_file.read_bytes(), private_key=identity.key.read_bytes(),
            certificate_chain=identity.cert.read_bytes())
        channel = grpc.aio.secure_channel(f"localhost:{admin[1]}", credentials)
        world.channels.append(channel)
        return pb_grpc.RegistryStub(channel)

    try:
        registered = await stub(pki.allowed_cn).Register(registration("127.0.0.1:9110"))
        assert registered.id == "127.0.0.1:9110"
        assert await refused(stub(pki.intruder).Register(registration("127.0.0.1:9111"),
                                                         metadata=AUTH)) == (
            grpc.StatusCode.PERMISSION_DENIED, "CLIENT_NOT_ALLOWED")
        assert world.member("127.0.0.1:9111") is None
    finally:
        await admin_grpc.close()


# -- anyserve.WorkerManagement ---------------------------------------------------------------


def register_model(name: str, version: str = "", *, worker_id: str = "w1",
                   address: str = f"unix://{WORKER_SOCKET}") -> mgmt.RegisterModelRequest:
    return mgmt.RegisterModelRequest(model_name=name, model_version=version,
                                     worker_address=address, worker_id=worker_id)


def test_anyserve_messages_are_anyserve_s_on_the_wire() -> None:
    """Field numbers and types as AnyServe's worker_management.proto: what its workers send
    and read, byte for byte (tag = field << 3 | 2 for strings, | 0 for bools)."""
    assert register_model("m", "1", worker_id="w", address="a").SerializeToString() == (
        b"\x0a\x01m\x12\x011\x1a\x01a\x22\x01w")
    assert mgmt.RegisterModelResponse.FromString(b"\x08\x01\x12\x02ok") == (
        mgmt.RegisterModelResponse(success=True, message="ok"))
    assert mgmt.UnregisterModelRequest(model_name="m", model_version="1", worker_id="w"
                                       ).SerializeToString() == b"\x0a\x01m\x12\x011\x1a\x01w"
    assert mgmt.HeartbeatRequest(worker_id="w", model_names=["a", "b"]).SerializeToString() == (
        b"\x0a\x01w\x12\x01a\x12\x01b")
    assert mgmt.HeartbeatResponse.FromString(b"\x08\x01").healthy
    service = mgmt.DESCRIPTOR.services_by_name["WorkerManagement"]
    assert service.full_name == "anyserve.WorkerManagement"
    assert [m.name for m in service.methods] == ["RegisterModel", "UnregisterModel",
                                                 "Heartbeat"]


async def test_a_worker_s_models_accumulate_under_its_worker_id(world: World) -> None:
    answer = await world.anyserve.RegisterModel(register_model("add"))  # no credentials
    assert (answer.success, answer.message) == (True, "Model registered successfully")
    member = world.member(f"unix:{WORKER_SOCKET}")
    assert member is not None and member.kind == "tcp"
    await world.anyserve.RegisterModel(register_model("echo", "1"))
    await world.anyserve.RegisterModel(register_model("add"))  # again: changes nothing
    info = world.directory.get("w1")
    assert (info.address, info.protocol, info.models, info.source, info.labels) == (
        f"unix:{WORKER_SOCKET}", "frames", ["add", "echo:1"], "registered",
        {"registered_by": "anyserve"})
    assert world.member(f"unix:{WORKER_SOCKET}") is member  # re-registered, never drained
    assert member.spec.models == ("add", "echo:1")
    # The same worker id from another socket: a worker started again, its record afresh.
    await world.anyserve.RegisterModel(register_model("cls", address="unix:///tmp/w1-b.sock"))
    info = world.directory.get("w1")
    assert (info.address, info.models) == ("unix:/tmp/w1-b.sock", ["cls"])
    assert world.member(f"unix:{WORKER_SOCKET}") is None
    # A worker without an id is known by its address, as a registration without one.
    await world.anyserve.RegisterModel(register_model("x", worker_id="",
                                                      address="unix:///tmp/w2.sock"))
    assert world.directory.get("unix:/tmp/w2.sock").models == ["x"]


async def test_unregister_model_removes_one_and_the_last_deregisters(world: World) -> None:
    for model in ("add", "echo"):
        await world.anyserve.RegisterModel(register_model(model))
    missing = await world.anyserve.UnregisterModel(
        mgmt.UnregisterModelRequest(model_name="nope", worker_id="w1"))
    assert (missing.success, missing.message) == (False, "Model not found")
    unknown = await world.anyserve.UnregisterModel(
        mgmt.UnregisterModelRequest(model_name="add", worker_id="nobody"))
    assert not unknown.success
    done = await world.anyserve.UnregisterModel(
        mgmt.UnregisterModelRequest(model_name="add", worker_id="w1"))
    assert (done.success, world.directory.get("w1").models) == (True, ["echo"])
    await world.anyserve.UnregisterModel(
        mgmt.UnregisterModelRequest(model_name="echo", worker_id="w1"))
    assert "w1" not in {info.id for info in world.directory.list()}
    assert world.member(f"unix:{WORKER_SOCKET}") is None


async def test_anyserve_heartbeat_reports_models_and_health(world: World) -> None:
    stranger = await world.anyserve.Heartbeat(mgmt.HeartbeatRequest(worker_id="w1"))
    assert not stranger.healthy  # unknown: a worker that looks registers again
    await world.anyserve.RegisterModel(register_model("add"))
    beat = await world.anyserve.Heartbeat(mgmt.HeartbeatRequest(worker_id="w1",
                                                                model_names=["add", "b:2"]))
    assert beat.healthy
    reported = world.directory.reported("w1")
    assert reported is not None and reported.loaded_models == ("add", "b:2")
    await world.directory.set_drained("w1", True)
    beat = await world.anyserve.Heartbeat(mgmt.HeartbeatRequest(worker_id="w1"))
    assert not beat.healthy  # out of rotation
    reported = world.directory.reported("w1")  # no names: the last report stands
    assert reported is not None and reported.loaded_models == ("add", "b:2")
    # Not an AnyServe worker's record: unknown to this service.
    await world.registry_stub.Register(registration("127.0.0.1:9112", id="r1"), metadata=AUTH)
    assert not (await world.anyserve.Heartbeat(mgmt.HeartbeatRequest(worker_id="r1"))).healthy


async def test_the_router_keeps_the_leases_of_anyserve_workers(world: World) -> None:
    await world.anyserve.RegisterModel(register_model("add"))
    await world.registry_stub.Register(registration("127.0.0.1:9113"), metadata=AUTH)
    keeper = world.admin_grpc.keeper
    for _ in range(4):  # 36 s, past their 10 s TTL: only the keeper renews
        await world.advance(9)
        assert await keeper.renew() == 1
    assert world.directory.get("w1").state == "healthy"
    assert world.member("127.0.0.1:9113") is None  # its own lease, never renewed: gone
    assert keeper.statistics()["renewals"] == 4
    # Once deregistered (here through the Registry) it is renewed no more.
    await world.registry_stub.Deregister(pb.DeregisterRequest(id="w1"), metadata=AUTH)
    assert await keeper.renew() == 0


async def test_anyserve_errors_are_statuses_with_codes(world: World) -> None:
    for bad in (register_model(""), register_model("m", address="unix://relative.sock"),
                register_model("m", address="")):
        assert await refused(world.anyserve.RegisterModel(bad)) == (
            grpc.StatusCode.INVALID_ARGUMENT, "VALIDATION_ERROR"), bad
    assert await refused(world.anyserve.RegisterModel(register_model(
        "m", worker_id=STATIC, address="unix:///tmp/w3.sock"))) == (
        grpc.StatusCode.ALREADY_EXISTS, "BACKEND_EXISTS")
    ok = await world.anyserve_admin.RegisterModel(register_model("m"), metadata=AUTH)
    assert ok.success  # the admin listener takes it with the credential


# -- configuration ---------------------------------------------------------------------------


@pytest.mark.parametrize(("admin", "extra", "problem"), [
    ({"grpc_listen": "0.0.0.0:7073"}, {},
     "admin: grpc_listen '0.0.0.0:7073' is reachable from other machines"),
    ({"anyserve_listen": "10.0.0.1:9000", "token_file": "t"}, {},
     "admin: anyserve_listen '10.0.0.1:9000' takes registrations without credentials"),
    ({"grpc_listen": "127.0.0.1:7072"}, {},
     "admin.grpc_listen: '127.0.0.1:7072' is already used by admin.listen"),
    ({"anyserve_listen": "127.0.0.1:7070"}, {},
     "admin.anyserve_listen: '127.0.0.1:7070' is already used by listener.listen"),
    ({"grpc_listen": "127.0.0.1:0"}, {"listener": {"processes": 2}},
     "admin.grpc_listen: needs listener.processes = 1"),
])
def test_the_admin_grpc_listeners_are_checked(admin: dict[str, Any], extra: dict[str, Any],
                                              problem: str) -> None:
    with pytest.raises(ConfigError) as invalid:
        from_mapping({"admin": admin, **extra}, "router.toml")
    assert any(p.startswith(f"router.toml: {problem}") for p in invalid.value.problems), (
        invalid.value.problems)


def test_the_admin_grpc_listeners_are_off_by_default_and_valid_on_loopback() -> None:
    assert (AdminConfig().grpc_listen, AdminConfig().anyserve_listen) == (None, None)
    admin = from_mapping({"admin": {"grpc_listen": "127.0.0.1:7073",
                                    "anyserve_listen": "[::1]:9000"}}).admin
    assert (admin.grpc_listen, admin.anyserve_listen) == ("127.0.0.1:7073", "[::1]:9000")


async def test_the_admin_grpc_listener_binds_an_ipv6_loopback_address(world: World) -> None:
    guard = CallGuard(None, None, reads_need_credentials=False)
    service = RegistryService(world.directory, guard)
    listener = GrpcListener(
        "admin.grpc_listen",
        lambda server: pb_grpc.add_RegistryServicer_to_server(service, server), None)
    host, port = await listener.start("::1", 0)
    try:
        stub = pb_grpc.RegistryStub(world.channel((f"[{host}]", port)))
        assert len((await stub.List(pb.ListRequest())).backends) == 1
    finally:
        await listener.close()
