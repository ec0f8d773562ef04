"""KServe v2 through the gRPC front door, with clients this project did not write.

Triton's ``tritonclient.grpc.InferenceServerClient`` (synchronous: run in a thread, so the
in-process router keeps its event loop) and tritonclient's generated grpcio stubs for the
streaming ModelStreamInfer, through the router to real ``backends.kserve`` processes.
"""

from __future__ import annotations

import asyncio
import time
import urllib.request
from collections.abc import Callable
from typing import Any

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from router.frontdoor.grpc.kserve import SERVICE
from router.protocol.proto import grpc_predict_v2_pb2 as pb
from router.protocol.proto import triton_extensions_pb2 as triton_ext
from tests.grpc_support import (
    CALL_TIMEOUT_S,
    MODEL_INFER,
    GrpcRouterFactory,
    KServeBackend,
    grpc_backend,
    infer_request,
    output_values,
)

Backends = Callable[..., KServeBackend]


def _input(values: list[float]) -> triton.InferInput:
    tensor = triton.InferInput("INPUT0", [len(values)], "FP32")
    tensor.set_data_from_numpy(np.array(values, dtype=np.float32))
    return tensor


def _client(target: str) -> triton.InferenceServerClient:
    return triton.InferenceServerClient(target)


async def _in_thread(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    async with asyncio.timeout(CALL_TIMEOUT_S):
        return await asyncio.to_thread(fn, *args, **kwargs)


def _status(exc: InferenceServerException) -> str:
    return str(exc.status())


async def test_tritonclient_server_and_model_state_and_infer(
    kserve_backend: Backends, grpc_router: GrpcRouterFactory
) -> None:
    a, b = kserve_backend(), kserve_backend()
    router = await grpc_router(
        [grpc_backend(a.address, "identity", "sum"), grpc_backend(b.address, "identity", "sum")]
    )
    client = _client(router.target)
    assert await _in_thread(client.is_server_live)
    assert await _in_thread(client.is_server_ready)
    assert await _in_thread(client.is_model_ready, "sum")
    assert not await _in_thread(client.is_model_ready, "no-such-model")

    metadata = await _in_thread(client.get_model_metadata, "sum")
    assert (metadata.name, list(metadata.versions)) == ("sum", ["1"])
    assert [(t.name, t.datatype) for t in metadata.outputs] == [("OUTPUT0", "FP32")]
    accepted = router.app.stats.accepted
    again = await _in_thread(client.get_model_metadata, "sum")
    assert again == metadata
    assert router.app.stats.accepted == accepted  # answered from the router's cache

    for i in range(20):
        result = await _in_thread(client.infer, "sum", [_input([1.0, 2.0, float(i)])])
        assert result.as_numpy("OUTPUT0").tolist() == [3.0 + i]
    echoed = await _in_thread(client.infer, "identity", [_input([0.5, -1.5])])
    assert echoed.as_numpy("OUTPUT0").tolist() == [0.5, -1.5]
    assert router.backend(a.address)["requests_total"] > 0
    assert router.backend(b.address)["requests_total"] > 0
    stats = router.app.stats
    assert (stats.completed, stats.inflight, stats.errored) == (stats.accepted, 0, {})
    client.close()


async def test_unknown_model_is_not_found_without_touching_a_backend(
    kserve_backend: Backends, grpc_router: GrpcRouterFactory
) -> None:
    backend = kserve_backend()
    router = await grpc_router([grpc_backend(backend.address, "sum")])
    client = _client(router.target)
    with pytest.raises(InferenceServerException) as caught:
        await _in_thread(client.infer, "identity", [_input([1.0])])
    assert _status(caught.value) == "StatusCode.NOT_FOUND"
    with pytest.raises(InferenceServerException) as caught:
        await _in_thread(client.get_model_metadata, "identity")
    assert _status(caught.value) == "StatusCode.NOT_FOUND"
    assert router.backend(backend.address)["requests_total"] == 0
    assert router.app.stats.accepted == 0
    client.close()


async def test_a_huge_unknown_model_name_is_not_found_with_a_short_message(
    kserve_backend: Backends, grpc_router: GrpcRouterFactory
) -> None:
    """The status details echo the name truncated: a 1 MiB name in the grpc-message trailer
    would exceed the client's metadata limit and turn NOT_FOUND into another error."""
    backend = kserve_backend()
    router = await grpc_router([grpc_backend(backend.address, "sum")])
    name = "m" * (1 << 20)
    async with router.channel() as channel:
        infer = channel.unary_unary(MODEL_INFER)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await infer(infer_request(name, [1.0]), timeout=CALL_TIMEOUT_S)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND, caught.value
    details = caught.value.details() or ""
    assert len(details) < 512, len(details)
    assert details.startswith("no backend serves model 'mmm") and f"({1 << 20} bytes)" in details
    assert dict(caught.value.trailing_metadata() or ())["x-router-error"] == "UNKNOWN_MODEL"
    assert router.backend(backend.address)["requests_total"] == 0


async def test_calls_go_only_to_backends_serving_the_model_and_version(
    kserve_backend: Backends, grpc_router: GrpcRouterFactory
) -> None:
    ident, sum1 = kserve_backend("--models", "identity"), kserve_backend("--models", "sum")
    router = await grpc_router(
        [grpc_backend(ident.address, "identity"), grpc_backend(sum1.address, "sum:1")]
    )
    async with router.channel() as channel:
        infer = channel.unary_unary(MODEL_INFER)
        for _ in range(5):
            await infer(infer_request("identity", [1.0]), timeout=CALL_TIMEOUT_S)
            answer = await infer(infer_request("sum", [1.0, 2.0]), timeout=CALL_TIMEOUT_S)
            assert output_values(answer) == [3.0]
        answer = await infer(infer_request("sum", [4.0], version="1"), timeout=CALL_TIMEOUT_S)
        assert output_values(answer) == [4.0]
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await infer(infer_request("sum", [4.0], version="2"), timeout=CALL_TIMEOUT_S)
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert router.backend(ident.address)["requests_total"] == 5
    assert router.backend(sum1.address)["requests_total"] == 6


async def test_model_stream_infer_with_grpcio_stubs(
    kserve_backend: Backends, grpc_router: GrpcRouterFactory
) -> None:
    backend = kserve_backend()
    router = await grpc_router([grpc_backend(backend.address, "sum", "identity")])

    def request(i: int) -> service_pb2.ModelInferRequest:
        message = service_pb2.ModelInferRequest(model_name="sum", id=f"s{i}")
        message.inputs.add(name="INPUT0", datatype="FP32", shape=[2])
        message.raw_input_contents.append(np.array([i, 1.0], dtype=np.float32).tobytes())
        return message

    def run_stream() -> list[service_pb2.ModelStreamInferResponse]:
        with grpc.insecure_channel(router.target) as channel:
            stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
            return list(stub.ModelStreamInfer(iter([request(i) for i in range(10)]),
                                              timeout=CALL_TIMEOUT_S))

    responses = await _in_thread(run_stream)
    assert [r.error_message for r in responses] == [""] * 10
    assert [r.infer_response.id for r in responses] == [f"s{i}" for i in range(10)]
    sums = [np.frombuffer(r.infer_response.raw_output_contents[0], np.float32)[0]
            for r in responses]
    assert sums == [i + 1.0 for i in range(10)]

    def unknown_model_stream() -> None:
        with grpc.insecure_channel(router.target) as channel:
            stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
            message = service_pb2.ModelInferRequest(model_name="nope")
            list(stub.ModelStreamInfer(iter([message]), timeout=CALL_TIMEOUT_S))

    with pytest.raises(grpc.RpcError) as caught:
        await _in_thread(unknown_model_stream)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


async def test_readiness_follows_backend_health_and_no_backend_is_unavailable(
    kserve_backend: Backends, grpc_router: GrpcRouterFactory
) -> None:
    backend = kserve_backend()
    # Panic off: with the only backend down, a call is refused rather than tried anyway.
    router = await grpc_router(
        [grpc_backend(backend.address, "sum")], {"health": {"panic_threshold": 0.0}}
    )
    client = _client(router.target)
    assert await _in_thread(client.is_server_ready)
    router.app.registry.get(backend.address).mark_down()  # type: ignore[union-attr]
    assert not await _in_thread(client.is_server_ready)
    assert not await _in_thread(client.is_model_ready, "sum")
    with pytest.raises(InferenceServerException) as caught:
        await _in_thread(client.infer, "sum", [_input([1.0])])
    assert _status(caught.value) == "StatusCode.UNAVAILABLE"
    assert router.app.stats.errored == {"NO_BACKEND": 1}
    router.app.registry.get(backend.address).mark_up()  # type: ignore[union-attr]
    assert await _in_thread(client.is_server_ready)
    client.close()


async def test_malformed_request_is_invalid_argument(
    kserve_backend: Backends, grpc_router: GrpcRouterFactory
) -> None:
    backend = kserve_backend()
    router = await grpc_router([grpc_backend(backend.address, "sum")])
    async with router.channel() as channel:
        infer = channel.unary_unary(MODEL_INFER)
        for payload in (b"\x0a\x10truncated", infer_request("", [1.0])):
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await infer(payload, timeout=CALL_TIMEOUT_S)
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert router.backend(backend.address)["requests_total"] == 0


async def test_unary_call_is_retried_when_its_backend_dies_before_answering(
    kserve_backend: Backends, grpc_router: GrpcRouterFactory
) -> None:
    doomed, healthy = kserve_backend("--crash-on-infer"), kserve_backend()
    # Weight 1000 makes least-connections send the first attempt to the doomed backend.
    router = await grpc_router([
        grpc_backend(doomed.address, "sum", weight=1000), grpc_backend(healthy.address, "sum"),
    ])
    client = _client(router.target)
    result = await _in_thread(client.infer, "sum", [_input([2.0, 3.0])])
    assert result.as_numpy("OUTPUT0").tolist() == [5.0]
    assert doomed.proc.wait(timeout=CALL_TIMEOUT_S) == 3  # it died on the request
    stats = router.app.stats
    assert (stats.retried, stats.completed, stats.errored) == (1, 1, {})
    assert router.backend(doomed.address)["failures_total"] == 1
    assert router.backend(healthy.address)["requests_total"] == 1
    client.close()


async def test_client_deadline_is_deadline_exceeded(
    kserve_backend: Backends, grpc_router: GrpcRouterFactory
) -> None:
    slow = kserve_backend("--delay-ms", "2000")
    router = await grpc_router([grpc_backend(slow.address, "sum")])
    async with router.channel() as channel:
        infer = channel.unary_unary(MODEL_INFER)
        started = time.monotonic()
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await infer(infer_request("sum", [1.0]), timeout=0.3)
        assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert time.monotonic() - started < 1.5
    async with asyncio.timeout(CALL_TIMEOUT_S):
        await router.app.dispatcher.wait_zero()
    assert router.app.stats.errored == {"DEADLINE_EXCEEDED": 1}
    assert router.backend(slow.address)["failures_total"] == 0  # the client's deadline


async def test_full_queue_is_resource_exhausted(
    kserve_backend: Backends, grpc_router: GrpcRouterFactory
) -> None:
    slow = kserve_backend("--delay-ms", "1000")
    router = await grpc_router(
        [grpc_backend(slow.address, "sum")],
        {"grpc": {"max_calls_per_backend": 1},
         "dispatch": {"queue_size": 1, "queue_timeout_s": 0.3}},
    )
    async with router.channel() as channel:
        infer = channel.unary_unary(MODEL_INFER)

        async def call() -> str:
            try:
                await infer(infer_request("sum", [1.0]), timeout=CALL_TIMEOUT_S)
            except grpc.aio.AioRpcError as exc:
                return str(exc.code().name)
            return "OK"

        codes = await asyncio.gather(*(call() for _ in range(3)))
    # One call on the backend; the others wait (in the queue, or in a worker once the queue
    # handed them over) until queue_timeout_s, or are refused on arrival while the queue is at
    # its bound. Either way RESOURCE_EXHAUSTED; the ones accepted count as OVERLOADED.
    assert sorted(codes) == ["OK", "RESOURCE_EXHAUSTED", "RESOURCE_EXHAUSTED"]
    stats = router.app.stats
    # (The relay may refuse both on arrival: they come in one read while the first waits.)
    assert stats.errored == ({"OVERLOADED": stats.accepted - 1} if stats.accepted > 1 else {})
    assert stats.completed == 1


async def test_metrics_count_grpc_calls_by_method_and_code(
    kserve_backend: Backends, grpc_router: GrpcRouterFactory
) -> None:
    backend = kserve_backend()
    router = await grpc_router([grpc_backend(backend.address, "sum")])
    async with router.channel() as channel:
        infer = channel.unary_unary(MODEL_INFER)
        for _ in range(3):
            await infer(infer_request("sum", [1.0]), timeout=CALL_TIMEOUT_S)
        with pytest.raises(grpc.aio.AioRpcError):
            await infer(infer_request("nope", [1.0]), timeout=CALL_TIMEOUT_S)

    def scrape() -> str:
        with urllib.request.urlopen(f"{router.admin_url}/metrics", timeout=5) as response:
            body: bytes = response.read()
        return body.decode()

    text = await _in_thread(scrape)
    method = 'method="/inference.GRPCInferenceService/ModelInfer"'
    assert f'router_grpc_requests_total{{code="OK",{method}}} 3.0' in text
    assert f'router_grpc_requests_total{{code="NOT_FOUND",{method}}} 1.0' in text
    assert "router_grpc_request_duration_seconds_count 4.0" in text
    assert "router_requests_completed_total 3.0" in text
    assert f'router_backend_inflight_requests{{backend="{backend.address}"}} 0.0' in text


async def test_with_its_only_backend_marked_down_a_call_is_still_tried_in_panic(
    kserve_backend: Backends, grpc_router: GrpcRouterFactory
) -> None:
    """The default panic threshold: every backend of the model is out of rotation, so health
    is ignored and the backend (which is up) answers; readiness still says not ready."""
    backend = kserve_backend()
    # No probe during the test: only the answer may bring the backend back.
    router = await grpc_router(
        [grpc_backend(backend.address, "sum")], {"health": {"interval_s": 60.0}}
    )
    client = _client(router.target)
    async with asyncio.timeout(CALL_TIMEOUT_S):  # the monitor's first pass is over
        while router.app.health.statistics()["passes"] < 1:  # noqa: ASYNC110 (bounded)
            await asyncio.sleep(0.01)
    router.app.registry.get(backend.address).mark_down()  # type: ignore[union-attr]
    assert not await _in_thread(client.is_server_ready)
    result = await _in_thread(client.infer, "sum", [_input([1.0, 2.0])])
    assert result.get_response() is not None
    assert router.app.stats.errored == {}
    assert await _in_thread(client.is_server_ready)  # the answer put it back in rotation
    client.close()


async def test_every_call_naming_a_model_goes_only_to_backends_serving_it(
    kserve_backend: Backends, grpc_router: GrpcRouterFactory
) -> None:
    """ModelConfig, ModelStatistics, RepositoryModelLoad/Unload (Triton's request layout from
    tritonclient, KServe's from the project's proto) and TraceSetting for model "sum", with two
    of three backends not serving it (they answer NOT_FOUND for it)."""
    first, summer, last = (
        kserve_backend("--models", "identity"), kserve_backend("--models", "sum"),
        kserve_backend("--models", "identity"),
    )
    router = await grpc_router([
        grpc_backend(first.address, "identity"), grpc_backend(summer.address, "sum"),
        grpc_backend(last.address, "identity"),
    ])
    client = _client(router.target)
    await _in_thread(client.infer, "sum", [_input([1.0, 2.0])])
    for _ in range(3):
        config = await _in_thread(client.get_model_config, "sum")
        assert (config.config.name, config.config.platform) == ("sum", "inference-router-test")
        stats = await _in_thread(client.get_inference_statistics, "sum")
        assert [(s.name, s.inference_count) for s in stats.model_stats] == [("sum", 1)]
        await _in_thread(client.unload_model, "sum", unload_dependents=True)
        await _in_thread(client.load_model, "sum", config="{}")
        await _in_thread(client.update_trace_settings, "sum", {"trace_level": ["TIMESTAMPS"]})
    async with router.channel() as channel:
        kserve_layout = pb.RepositoryModelUnloadRequest(model_name="sum").SerializeToString()
        reply = await channel.unary_unary(f"/{SERVICE}/RepositoryModelUnload")(
            kserve_layout, timeout=CALL_TIMEOUT_S
        )
    assert pb.RepositoryModelUnloadResponse.FromString(reply).isUnloaded
    assert router.backend(summer.address)["requests_total"] == 1 + 5 * 3 + 1
    assert router.backend(first.address)["requests_total"] == 0
    assert router.backend(last.address)["requests_total"] == 0
    client.close()


async def test_repository_index_is_answered_by_the_router_and_a_model_is_required(
    kserve_backend: Backends, grpc_router: GrpcRouterFactory
) -> None:
    a, b = kserve_backend("--models", "identity,sum"), kserve_backend("--models", "sum")
    router = await grpc_router(
        [grpc_backend(a.address, "identity", "sum:1"), grpc_backend(b.address, "sum:1")],
        {"health": {"panic_threshold": 0.0}},
    )
    client = _client(router.target)
    index = await _in_thread(client.get_model_repository_index)
    assert [(m.name, m.version, m.state) for m in index.models] == [
        ("identity", "", "READY"), ("sum", "1", "READY"),
    ]
    router.app.registry.get(a.address).mark_down()  # type: ignore[union-attr]
    index = await _in_thread(client.get_model_repository_index)
    assert [(m.name, m.state) for m in index.models] == [
        ("identity", "UNAVAILABLE"), ("sum", "READY"),
    ]
    async with router.channel() as channel:
        ready_only = triton_ext.RepositoryIndexRequest(ready=True).SerializeToString()
        reply = await channel.unary_unary(f"/{SERVICE}/RepositoryIndex")(
            ready_only, timeout=CALL_TIMEOUT_S
        )
    assert [m.name for m in triton_ext.RepositoryIndexResponse.FromString(reply).models] == [
        "sum"
    ]
    router.app.registry.get(a.address).mark_up()  # type: ignore[union-attr]

    with pytest.raises(InferenceServerException) as caught:  # every model's: name one
        await _in_thread(client.get_inference_statistics)
    assert _status(caught.value) == "StatusCode.INVALID_ARGUMENT"
    for call in (client.get_model_config, client.load_model, client.get_inference_statistics):
        with pytest.raises(InferenceServerException) as caught:
            await _in_thread(call, "nope")
        assert _status(caught.value) == "StatusCode.NOT_FOUND"
    assert router.backend(a.address)["requests_total"] == 0
    assert router.backend(b.address)["requests_total"] == 0
    assert router.app.stats.accepted == 0
    client.close()
