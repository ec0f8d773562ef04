"""Model-affinity routing end to end: a real router and ``backends.modelsim`` processes, on
keyed frames and on KServe gRPC; misses are the backends' own count (their stats files)."""

from __future__ import annotations

import asyncio
import json
import random
import signal
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pytest

from router.control.directory import LoadReport
from router.control.residency import MODEL_READY_MAX
from router.core.errors import ROUTER_ERROR_HEADER
from router.protocol.keyed import encode_keyed
from router.protocol.proto import grpc_predict_v2_pb2 as pb
from router.protocol.proto.model_stream_infer_pb2 import ModelStreamInferResponse
from tests.conftest import RouterFactory
from tests.grpc_support import MODEL_INFER, GrpcRouterFactory, grpc_backend, infer_request
from tests.support import BackendProcess, backend_processes

IO_TIMEOUT_S = 10.0
UNLOAD = "/inference.GRPCInferenceService/RepositoryModelUnload"
STREAM_INFER = "/inference.GRPCInferenceService/ModelStreamInfer"
LOAD_MS, SERVICE_MS = 100, 5
# Priors at the backends' own times, and a per-backend limit of one request: the router waits
# where it can still choose (its queue), and sees the backends' concurrency.
AFFINITY = {
    "dispatch": {"policy": "affinity"},
    "pool": {"max_connections": 1, "pipeline_depth": 1},
    "grpc": {"max_calls_per_backend": 1},
    "affinity": {"model_slots": 2, "load_time_s": LOAD_MS / 1000, "service_time_s":
                 SERVICE_MS / 1000, "min_residency_s": 0.2, "index_interval_s": 0},
}


@pytest.fixture
def modelsim(tmp_path: Path) -> Iterator[Callable[..., BackendProcess]]:
    """``modelsim(name, *args)``: a modelsim process writing its stats to tmp_path/name."""
    with backend_processes("backends.modelsim") as start:
        def run(name: str, *args: str) -> BackendProcess:
            return start("--slots", "2", "--load-ms", str(LOAD_MS), "--service-ms",
                         str(SERVICE_MS), "--stats", str(tmp_path / f"{name}.json"), *args)
        yield run


async def stats_of(backend: BackendProcess, tmp_path: Path, name: str) -> dict[str, Any]:
    """Stop ``backend`` and read its statistics file. Waited for off the loop: a registered
    backend deregisters on SIGTERM from the router this loop runs."""
    backend.proc.send_signal(signal.SIGTERM)
    assert await asyncio.to_thread(backend.proc.wait, IO_TIMEOUT_S) == 0
    stats: dict[str, Any] = json.loads((tmp_path / f"{name}.json").read_text())
    return stats


async def get_json(url: str) -> Any:
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        assert response.status == 200, await response.text()
        return await response.json()


async def test_keyed_frames_go_where_their_model_is_loaded(
    modelsim: Callable[..., BackendProcess], router_factory: RouterFactory, tmp_path: Path
) -> None:
    a, b = modelsim("a"), modelsim("b")
    router = await router_factory(
        [{"address": s.address, "models": ["*"]} for s in (a, b)],
        {**AFFINITY, "listener": {"keyed": True}},
    )
    client = await router.client()
    rng = random.Random(11)
    models = [f"m{rng.randrange(4)}" for _ in range(60)]  # 4 models, 2 x 2 slots: all fit
    for i, model in enumerate(models):
        payload = encode_keyed(model, f"{i}".encode())
        assert await client.request(payload) == f"{i}".encode()  # the body, answered

    listed = {m["model"]: m for m in await get_json(f"{router.admin_url}/v1/models")}
    assert set(listed) == {"m0", "m1", "m2", "m3"}
    assert all(len(m["holders"]) >= 1 for m in listed.values())
    assert sum(m["requests"]["hit"] + m["requests"]["waited"] for m in listed.values()) >= 50
    route = await get_json(f"{router.admin_url}/v1/debug/route?model=m0")
    assert route["policy"] == "affinity" and route["reason"] == "hit"
    assert route["choice"] in listed["m0"]["holders"]
    async with aiohttp.ClientSession() as session, session.get(
            f"{router.admin_url}/metrics") as response:
        metrics = await response.text()
    assert 'router_model_requests_total{model="m0",outcome="hit"}' in metrics
    assert 'router_route_decisions_total{policy="affinity",reason="load"}' in metrics

    served = [await stats_of(s, tmp_path, n) for s, n in ((a, "a"), (b, "b"))]
    assert sum(s["requests"] for s in served) == 60
    # Four models fit in the four slots: after their first loads, almost every request hits.
    # (Common-queue routing misses about half of them here.)
    assert sum(s["misses"] for s in served) <= 8, served


async def test_kserve_calls_go_to_the_backend_its_index_says_holds_the_model(
    modelsim: Callable[..., BackendProcess], grpc_router: GrpcRouterFactory, tmp_path: Path
) -> None:
    cold = modelsim("cold", "--protocol", "grpc")
    warm = modelsim("warm", "--protocol", "grpc", "--preload", "p")
    router = await grpc_router([grpc_backend(s.address, "*") for s in (cold, warm)], AFFINITY)
    # The router reads each backend's RepositoryIndex (every index_interval_s; here, now).
    assert await router.app.residency_feed.read_indexes() == 2
    holders = router.app.residency.holders("p")
    assert list(holders) == [router.backend(warm.address)["id"]]
    async with router.channel() as channel:
        infer = channel.unary_unary(MODEL_INFER)
        for i in range(8):
            reply = await infer(infer_request("p", [float(i)], id=str(i)), timeout=IO_TIMEOUT_S)
            assert pb.ModelInferResponse.FromString(reply).id == str(i)
    warm_stats = await stats_of(warm, tmp_path, "warm")
    cold_stats = await stats_of(cold, tmp_path, "cold")
    assert warm_stats["models"]["p"]["requests"] == 8 and warm_stats["misses"] == 0
    assert cold_stats["requests"] == 0


async def test_heartbeat_reports_tell_the_router_what_a_registered_backend_holds(
    modelsim: Callable[..., BackendProcess], router_factory: RouterFactory, tmp_path: Path
) -> None:
    token = tmp_path / "admin.token"
    token.write_text("affinity-test-token\n")
    router = await router_factory([], {**AFFINITY, "listener": {"keyed": True},
                                       "admin": {"token_file": str(token)}})
    reported = asyncio.Event()
    reports: list[tuple[str, LoadReport]] = []

    def heard(backend_id: str, report: LoadReport) -> None:
        reports.append((backend_id, report))
        if report.loaded_models:
            reported.set()

    router.app.directory.add_report_listener(heard)
    # Started off the loop: it is ready once registered, through the router this loop runs.
    backend = await asyncio.to_thread(
        modelsim, "registered", "--preload", "x", "--register", router.admin_url,
        "--lease-ttl", "0.6", "--token-file", str(token))
    async with asyncio.timeout(IO_TIMEOUT_S):
        await reported.wait()
    backend_id = reports[-1][0]
    assert router.app.residency.shape_of(backend_id).slots == 2  # its model_slots label
    assert router.app.residency.get(backend_id, "x") is not None  # from its heartbeat
    client = await router.client()
    assert await client.request(encode_keyed("x", b"hello")) == b"hello"
    stats = await stats_of(backend, tmp_path, "registered")
    assert stats["models"]["x"] == {"requests": 1, "misses": 0, "loads": 1, "evictions": 0}


async def test_explicit_model_control_the_router_loads_and_unloads_before_sending(
    modelsim: Callable[..., BackendProcess], grpc_router: GrpcRouterFactory, tmp_path: Path
) -> None:
    """Triton's explicit model control: the backend serves only what was loaded through
    RepositoryModelLoad, so the router loads a model (unloading one to make room) first."""
    backend = modelsim("explicit", "--protocol", "grpc", "--models", "a,b", "--slots", "1",
                       "--model-control", "explicit")
    labels = {"model_slots": "1", "model_control": "explicit"}
    router = await grpc_router([grpc_backend(backend.address, "*", labels=labels)], AFFINITY)
    async with router.channel() as channel:
        infer = channel.unary_unary(MODEL_INFER)
        for i, model in enumerate(["a", "a", "b", "a"]):
            reply = await infer(infer_request(model, [1.0], id=str(i)), timeout=IO_TIMEOUT_S)
            assert pb.ModelInferResponse.FromString(reply).model_name == model
    stats = await stats_of(backend, tmp_path, "explicit")
    assert (stats["loads"], stats["unloads"], stats["evictions"]) == (3, 2, 0)
    assert stats["models"]["a"]["requests"] == 3 and stats["models"]["b"]["requests"] == 1


async def test_explicit_model_control_loads_before_a_stream_too(
    modelsim: Callable[..., BackendProcess], grpc_router: GrpcRouterFactory, tmp_path: Path
) -> None:
    """ModelStreamInfer, placed by its first message: the load comes before the stream."""
    backend = modelsim("stream", "--protocol", "grpc", "--models", "a,b", "--slots", "1",
                       "--model-control", "explicit", "--preload", "a")
    labels = {"model_slots": "1", "model_control": "explicit"}
    router = await grpc_router([grpc_backend(backend.address, "*", labels=labels)], AFFINITY)
    assert await router.app.residency_feed.read_indexes() == 1  # a is loaded there
    async with router.channel() as channel:
        stream = channel.stream_stream(STREAM_INFER)(timeout=IO_TIMEOUT_S)
        for i in range(3):
            await stream.write(infer_request("b", [1.0], id=f"s{i}"))
        await stream.done_writing()
        answers = [ModelStreamInferResponse.FromString(m) async for m in stream]
    assert [(a.error_message, a.infer_response.model_name) for a in answers] == [("", "b")] * 3
    stats = await stats_of(backend, tmp_path, "stream")
    # a (preloaded), then b in its place: the router unloaded a first.
    assert (stats["loads"], stats["unloads"], stats["evictions"]) == (2, 1, 0)
    assert stats["models"]["b"]["requests"] == 3


EXPLICIT = {"model_slots": "1", "model_control": "explicit"}


async def test_a_failed_explicit_load_is_retried_elsewhere_then_answered_model_load_failed(
    modelsim: Callable[..., BackendProcess], grpc_router: GrpcRouterFactory, tmp_path: Path
) -> None:
    """RepositoryModelLoad fails on both backends: the call is tried on each (nothing of it
    was sent), then answered UNAVAILABLE with MODEL_LOAD_FAILED; the view holds the model
    nowhere, and the backends go on serving the models they can load."""
    args = ("--protocol", "grpc", "--models", "a,bad", "--slots", "1", "--model-control",
            "explicit", "--fail-load", "bad")
    one, two = modelsim("one", *args), modelsim("two", *args)
    router = await grpc_router(
        [grpc_backend(s.address, "*", labels=EXPLICIT) for s in (one, two)], AFFINITY)
    async with router.channel() as channel:
        infer = channel.unary_unary(MODEL_INFER)
        with pytest.raises(grpc.aio.AioRpcError) as failed:
            await infer(infer_request("bad", [1.0]), timeout=IO_TIMEOUT_S)
        assert failed.value.code() == grpc.StatusCode.UNAVAILABLE
        trailers = dict(failed.value.trailing_metadata() or ())
        assert trailers.get(ROUTER_ERROR_HEADER) == "MODEL_LOAD_FAILED", trailers
        assert router.app.residency.holders("bad") == {}
        reply = await infer(infer_request("a", [1.0], id="after"), timeout=IO_TIMEOUT_S)
        assert pb.ModelInferResponse.FromString(reply).id == "after"
    control = router.app.model_control.statistics()
    assert (control["load_failures"], control["loads"]) == (2, 1), control
    served = [await stats_of(s, tmp_path, n) for s, n in ((one, "one"), (two, "two"))]
    assert [s["load_failures"] for s in served] == [1, 1]
    assert sum(s["models"].get("bad", {}).get("requests", 0) for s in served) == 0
    assert sum(s["models"].get("a", {}).get("requests", 0) for s in served) == 1


async def test_backends_without_repository_index_are_asked_model_ready_for_what_the_view_holds(
    modelsim: Callable[..., BackendProcess], grpc_router: GrpcRouterFactory, tmp_path: Path
) -> None:
    """A KServe backend without RepositoryIndex: the view is checked model by model with
    ModelReady, at most MODEL_READY_MAX models per pass, only the models it holds there."""
    backend = modelsim("plain", "--protocol", "grpc", "--no-repository-index")
    router = await grpc_router([grpc_backend(backend.address, "*")], AFFINITY)
    backend_id = router.backend(backend.address)["id"]
    view, feed = router.app.residency, router.app.residency_feed
    async with router.channel() as channel:
        infer = channel.unary_unary(MODEL_INFER)
        for model in ("m", "n"):
            await infer(infer_request(model, [1.0]), timeout=IO_TIMEOUT_S)
    assert set(view.models_of(backend_id)) == {"m", "n"}  # learnt from routing
    # RepositoryIndex is UNIMPLEMENTED: the same pass asks ModelReady; both are loaded.
    assert await feed.read_indexes() == 1
    assert feed.statistics()["ready_reads"] == 2
    assert {name: r.state for name, r in view.models_of(backend_id).items()} == {
        "m": "loaded", "n": "loaded"}
    # Behind the router's back the backend unloads m: the next pass takes it out of the view.
    async with grpc.aio.insecure_channel(backend.address) as direct:
        unload = pb.RepositoryModelUnloadRequest(model_name="m").SerializeToString()
        await direct.unary_unary(UNLOAD)(unload, timeout=IO_TIMEOUT_S)
    assert await feed.read_indexes() == 1
    assert set(view.models_of(backend_id)) == {"n"}
    # Bounded: ten more models in the view take two passes of MODEL_READY_MAX (8) calls.
    extra = [f"x{i}" for i in range(10)]
    view.report(backend_id, ["n", *extra], router.app.clock.now())
    before = feed.statistics()["ready_reads"]
    await feed.read_indexes()
    assert feed.statistics()["ready_reads"] - before == MODEL_READY_MAX
    assert set(view.models_of(backend_id)) == {"n", "x7", "x8", "x9"}  # 8 of 11 asked
    await feed.read_indexes()
    assert set(view.models_of(backend_id)) == {"n"}  # the other x's, asked in their turn
    assert feed.statistics()["index_reads"] == 0
    assert (await stats_of(backend, tmp_path, "plain"))["unloads"] == 1


async def test_a_client_deadline_that_passes_during_an_explicit_load_ends_the_call_cleanly(
    modelsim: Callable[..., BackendProcess], grpc_router: GrpcRouterFactory, tmp_path: Path
) -> None:
    """The load outlives the client's deadline: the client gets DEADLINE_EXCEEDED, the
    attempt ends (nothing left in flight), the request is never sent, and the next call for
    the model, once it is loaded, is served."""
    backend = modelsim("slow", "--protocol", "grpc", "--models", "a", "--slots", "1",
                       "--model-control", "explicit", "--load-ms", "1500")
    router = await grpc_router([grpc_backend(backend.address, "*", labels=EXPLICIT)], AFFINITY)
    async with router.channel() as channel:
        infer = channel.unary_unary(MODEL_INFER)
        with pytest.raises(grpc.aio.AioRpcError) as late:
            await infer(infer_request("a", [1.0]), timeout=0.3)
        assert late.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        async with asyncio.timeout(IO_TIMEOUT_S):
            await router.app.dispatcher.wait_zero()
        assert router.app.residency.holders("a") == {}  # the load did not finish in time
        reply = await infer(infer_request("a", [1.0], id="next"), timeout=IO_TIMEOUT_S)
        assert pb.ModelInferResponse.FromString(reply).id == "next"
    stats = await stats_of(backend, tmp_path, "slow")
    assert stats["models"]["a"]["requests"] == 1  # the late call never reached it
