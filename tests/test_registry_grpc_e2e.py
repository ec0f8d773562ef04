"""The admin gRPC listeners of a real router process (``python -m router serve``) over
loopback, with real backend processes: backends that register through
``inference_router.v1.Registry`` take frame and KServe traffic at once, heartbeat, are
NOT_FOUND once unknown, are listed and watched joining, changing and leaving, and stop
getting traffic when they deregister; a worker that behaves as AnyServe's registers unchanged
(``anyserve.WorkerManagement`` on ``admin.anyserve_listen``, no credentials) and serves the
frames it is sent."""

from __future__ import annotations

import asyncio
import sys
from array import array
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
import tomli_w

from router.client.frames import ErrorReply, FrameClient
from router.control.launcher import LaunchedProcess, launch
from router.core.errors import ROUTER_ERROR_HEADER
from router.protocol.announce import Banner, parse_banner
from router.protocol.proto import grpc_predict_v2_pb2 as kserve
from router.protocol.proto import registry_pb2 as pb
from router.protocol.proto import registry_pb2_grpc as pb_grpc
from tests.conftest import EchoBackend
from tests.grpc_support import MODEL_INFER, KServeBackend, infer_request, output_values
from tests.support import REPO_ROOT, backend_processes, child_env

TOKEN = "e2e-admin-token"
AUTH = (("authorization", f"Bearer {TOKEN}"),)
WAIT_S = 10.0


def _target(address: tuple[str, int] | None) -> str:
    assert address is not None, "the banner names no such listener"
    return f"{address[0]}:{address[1]}"


@pytest.fixture
async def router(tmp_path: Path) -> AsyncIterator[Banner]:
    """A router process with no backends, its admin gRPC and AnyServe listeners on."""
    token = tmp_path / "admin.token"
    token.write_text(TOKEN)
    config = {
        "listener": {"listen": "127.0.0.1:0"},
        "grpc": {"listen": "127.0.0.1:0", "reconnect_backoff_max_s": 0.5},
        "admin": {"listen": "127.0.0.1:0", "grpc_listen": "127.0.0.1:0",
                  "anyserve_listen": "127.0.0.1:0", "token_file": str(token)},
        # AnyServe's workers answer one request per connection and no zero-length probe.
        "health": {"probe": "connect", "interval_s": 0.5},
        "pool": {"pipeline_depth": 1, "connect_timeout_s": 1.0},
        "dispatch": {"request_timeout_s": 5.0},
        "drain": {"shutdown_grace_s": 5.0, "linger_s": 0.5},
    }
    path = tmp_path / "router.toml"
    path.write_text(tomli_w.dumps(config))
    proc: LaunchedProcess[Banner] = await launch(
        [sys.executable, "-m", "router", "serve", "--config", str(path)], parse_banner,
        stderr=tmp_path / "router.stderr", cwd=REPO_ROOT, env=child_env(),
        ready_timeout_s=WAIT_S)
    try:
        yield proc.ready
    finally:
        await proc.stop()


@pytest.fixture
async def registry(router: Banner) -> AsyncIterator[pb_grpc.RegistryStub]:
    async with grpc.aio.insecure_channel(_target(router.admin_grpc)) as channel:
        yield pb_grpc.RegistryStub(channel)


async def refused(call: Awaitable[Any]) -> tuple[grpc.StatusCode, str | None]:
    with pytest.raises(grpc.aio.AioRpcError) as failed:
        await asyncio.wait_for(call, WAIT_S)
    return failed.value.code(), dict(failed.value.trailing_metadata() or ()).get(
        ROUTER_ERROR_HEADER)


async def frame_client(router: Banner) -> FrameClient:
    async with asyncio.timeout(WAIT_S):
        return await FrameClient.connect(*router.listen)


async def test_registered_backends_take_traffic_heartbeat_and_leave(
        router: Banner, registry: pb_grpc.RegistryStub,
        echo_backend: Callable[..., EchoBackend],
        kserve_backend: Callable[..., KServeBackend]) -> None:
    echo, model_server = echo_backend(), kserve_backend("--models", "sum")
    watch = registry.Watch(pb.WatchRequest())  # a read on loopback: no token

    async def next_event() -> tuple[str, str, str]:
        event = await asyncio.wait_for(watch.read(), WAIT_S)
        assert isinstance(event, pb.WatchEvent)
        return event.kind, event.backend.id, event.backend.state

    client = await frame_client(router)
    with pytest.raises(ErrorReply) as nothing_yet:
        await asyncio.wait_for(client.request(b"early"), WAIT_S)
    assert nothing_yet.value.code == "NO_BACKEND"

    assert await refused(registry.Register(pb.Registration(address=echo.address))) == (
        grpc.StatusCode.UNAUTHENTICATED, "UNAUTHORIZED")
    registered = await registry.Register(pb.Registration(address=echo.address, id="echo-1"),
                                         metadata=AUTH)
    assert (registered.id, registered.lease_ttl_s) == ("echo-1", 10.0)
    assert await asyncio.wait_for(client.request(b"hello"), WAIT_S) == b"hello"  # at once
    assert await next_event() == ("joined", "echo-1", "healthy")

    await registry.Register(pb.Registration(address=model_server.address, protocol="grpc",
                                            models=["sum"], lease_ttl_s=30.0), metadata=AUTH)
    async with grpc.aio.insecure_channel(_target(router.grpc)) as channel:
        infer = channel.unary_unary(MODEL_INFER)
        answer = await infer(infer_request("sum", [1.0, 2.5]), timeout=WAIT_S)
    assert output_values(answer) == [3.5]
    assert await next_event() == ("joined", model_server.address, "healthy")

    beat = await registry.Heartbeat(pb.HeartbeatRequest(
        id="echo-1", report=pb.LoadReport(inflight=2)), metadata=AUTH)
    assert beat.heartbeat_interval_s == pytest.approx(10 / 3)
    assert await refused(registry.Heartbeat(pb.HeartbeatRequest(id="nobody"),
                                            metadata=AUTH)) == (
        grpc.StatusCode.NOT_FOUND, "LEASE_NOT_FOUND")
    listed = {info.id: info for info in (await registry.List(pb.ListRequest())).backends}
    assert set(listed) == {"echo-1", model_server.address}
    assert (listed["echo-1"].reported.inflight, listed[model_server.address].protocol) == (
        2, "grpc")

    left = await registry.Deregister(pb.DeregisterRequest(id="echo-1"), metadata=AUTH)
    assert left.id == "echo-1"
    assert await next_event() == ("changed", "echo-1", "draining")
    assert await next_event() == ("left", "echo-1", "removed")
    with pytest.raises(ErrorReply) as gone:
        await asyncio.wait_for(client.request(b"late"), WAIT_S)
    assert gone.value.code == "NO_BACKEND"
    watch.cancel()
    await client.close()


def _infer(model: str, values: list[float], version: str = "") -> bytes:
    request = kserve.ModelInferRequest(model_name=model, model_version=version, id="r")
    request.inputs.add(name="INPUT0", datatype="FP32", shape=[len(values)])
    request.raw_input_contents.append(array("f", values).tobytes())
    return request.SerializeToString()


async def test_an_anyserve_worker_registers_unchanged_and_serves_frames(
        router: Banner, registry: pb_grpc.RegistryStub, tmp_path: Path) -> None:
    socket_path = tmp_path / "anyserve-worker-w1.sock"
    with backend_processes("backends.anyserve_worker") as start:
        # READY comes after its RegisterModel calls have answered.
        start("--ingress", _target(router.anyserve), "--worker-id", "w1",
              "--models", "add,echo:1", unix=socket_path)
        listed = {info.id: info for info in (await registry.List(pb.ListRequest())).backends}
        worker = listed["w1"]
        assert (worker.address, list(worker.models), worker.protocol, worker.source) == (
            f"unix:{socket_path}", ["add", "echo:1"], "frames", "registered")
        assert dict(worker.labels) == {"registered_by": "anyserve"}

        client = await frame_client(router)

        async def infer(model: str, values: list[float], version: str = "") -> None:
            reply = kserve.ModelInferResponse.FromString(await asyncio.wait_for(
                client.request(_infer(model, values, version)), WAIT_S))
            assert reply.parameters["worker_id"].string_param == "w1"
            assert (reply.model_name, reply.id, "error" in reply.parameters) == (
                model, "r", False)
            got = array("f")
            got.frombytes(reply.raw_output_contents[0])
            assert list(got) == values

        for i in range(10):  # one connection per request on the worker's side
            await infer("add", [float(i)])
        await asyncio.gather(*(infer("echo", [float(i), 0.5], "1") for i in range(8)))
        await client.close()
