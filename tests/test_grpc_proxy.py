"""The gRPC front door as a transparent proxy, its health service, protocols and drain.

``routertest.Echo`` (backends/grpc_echo.py, served by every ``backends.kserve`` process) has no
.proto: the router cannot know its methods or their kinds, so these calls exercise the generic
handler, with plain grpc.aio multi-callables as the client.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from router.client.frames import FrameClient
from router.core.clock import ManualClock
from router.core.errors import Cancelled, DeadlineExceeded
from router.frontdoor.grpc.forward import DEADLINE_SLACK_S, AnswerBound, ended_by
from tests.conftest import EchoBackend, echo_backend
from tests.grpc_support import (
    CALL_TIMEOUT_S,
    MODEL_INFER,
    GrpcRouterFactory,
    KServeBackend,
    grpc_backend,
    grpc_router,
    infer_request,
    kserve_backend,
    output_values,
)

__all__ = ["echo_backend", "grpc_router", "kserve_backend"]  # fixtures, imported for pytest

Backends = Callable[..., KServeBackend]
ECHO = "/routertest.Echo/"
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def _md(metadata: grpc.aio.Metadata | None) -> dict[str, str]:
    return {key: value for key, value in metadata or () if isinstance(value, str)}


async def test_unary_call_relays_metadata_deadline_and_answer(
    kserve_backend: Backends, grpc_router: GrpcRouterFactory
) -> None:
    backend = kserve_backend()
    router = await grpc_router([grpc_backend(backend.address)])
    async with router.channel() as channel:
        call = channel.unary_unary(ECHO + "Unary")(
            b"hello", timeout=5.0, metadata=(("x-tenant", "t1"), ("x-trace-bin", b"\x00\x01")),
        )
        assert await call == b"hello"
        initial, trailing = _md(await call.initial_metadata()), _md(await call.trailing_metadata())
    assert initial["x-backend"] == str(backend.port)  # the backend's initial metadata
    assert trailing["echo-x-tenant"] == "t1"  # our header reached the backend
    assert "echo-user-agent" not in trailing and "echo-te" not in trailing
    assert 0 < int(trailing["x-deadline-ms"]) <= 5000  # the client's deadline went along


async def test_no_client_deadline_means_none_for_the_backend(
    kserve_backend: Backends, grpc_router: GrpcRouterFactory
) -> None:
    backend = kserve_backend()
    router = await grpc_router([grpc_backend(backend.address)])
    async with router.channel() as channel:
        call = channel.unary_unary(ECHO + "Unary")(b"x")
        await call
        assert _md(await call.trailing_metadata())["x-deadline-ms"] == "none"


async def test_backend_status_details_and_trailers_are_relayed(
    kserve_backend: Backends, grpc_router: GrpcRouterFactory
) -> None:
    backend = kserve_backend()
    router = await grpc_router([grpc_backend(backend.address)])
    metadata = (("x-echo-status", "FAILED_PRECONDITION"), ("x-echo-details", "not today"))
    async with router.channel() as channel:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await channel.unary_unary(ECHO + "Unary")(
                b"x", timeout=CALL_TIMEOUT_S, metadata=metadata
            )
    error = caught.value
    assert (error.code(), error.details()) == (grpc.StatusCode.FAILED_PRECONDITION, "not today")
    assert _md(error.trailing_metadata())["x-echo-trailer"] == "kept"
    assert "x-router-error" not in _md(error.trailing_metadata())  # the backend's, not ours
    assert router.app.stats.completed == 1  # the backend's answer, relayed
    assert router.backend(backend.address)["failures_total"] == 0


async def test_a_backends_immediate_status_reaches_the_client_every_time(
    kserve_backend: Backends, grpc_router: GrpcRouterFactory
) -> None:
    """A backend that ends a call at once (UNIMPLEMENTED for a method it lacks) while the
    router is still sending the request: the client gets that status, never INTERNAL. A 1 MiB
    request is still on its way when the status comes back (more than 1 in 2 of them were
    INTERNAL "Internal error from Core"); small ones race it less often (1 in 30 or so)."""
    backend = kserve_backend()
    router = await grpc_router([grpc_backend(backend.address)])
    statuses: Counter[tuple[grpc.StatusCode, str]] = Counter()
    async with router.channel() as channel:
        missing = channel.unary_unary(ECHO + "Missing")
        for payload in [b"x" * (1 << 20)] * 40 + [b"small"] * 200:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await missing(payload, timeout=CALL_TIMEOUT_S)
            statuses[(caught.value.code(), caught.value.details() or "")] += 1
    assert statuses == {(grpc.StatusCode.UNIMPLEMENTED, "Method not found!"): 240}
    assert router.app.stats.completed == 240  # the backend's answer, relayed
    assert router.backend(backend.address)["failures_total"] == 0


async def test_every_streaming_kind_is_proxied(
    kserve_backend: Backends, grpc_router: GrpcRouterFactory
) -> None:
    backend = kserve_backend()
    router = await grpc_router([grpc_backend(backend.address)])
    async with router.channel() as channel:
        server_stream = channel.unary_stream(ECHO + "ServerStream")(
            b"s", timeout=CALL_TIMEOUT_S, metadata=(("x-echo-count", "4"),)
        )
        assert [m async for m in server_stream] == [b"s"] * 4

        client_stream = channel.stream_unary(ECHO + "ClientStream")(timeout=CALL_TIMEOUT_S)
        for part in (b"a", b"b", b"c"):
            await client_stream.write(part)
        await client_stream.done_writing()
        assert await client_stream == b"abc"

        bidi = channel.stream_stream(ECHO + "Bidi")(timeout=CALL_TIMEOUT_S)
        for i in range(5):  # each answer arrives before the next request is sent
            await bidi.write(f"m{i}".encode())
            assert await bidi.read() == f"m{i}".encode()
        await bidi.done_writing()
        assert await bidi.read() == grpc.aio.EOF
        assert await bidi.code() == grpc.StatusCode.OK
    stats = router.app.stats
    assert (stats.accepted, stats.completed, stats.inflight) == (3, 3, 0)


async def test_request_timeout_bounds_the_answer_of_a_relayed_call(
    kserve_backend: Backends, grpc_router: GrpcRouterFactory
) -> None:
    """request_timeout_s = 1: a unary call through the generic proxy whose backend takes 3 s
    ends BACKEND_TIMEOUT after about 1 s; streams that answer, or whose client is still
    writing, run past it; a shorter client deadline stays the client's."""
    backend = kserve_backend()
    router = await grpc_router(
        [grpc_backend(backend.address)], {"dispatch": {"request_timeout_s": 1.0}}
    )
    slow = (("x-echo-delay-ms", "3000"),)
    async with router.channel() as channel:
        unary = channel.unary_unary(ECHO + "Unary")
        started = time.monotonic()
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await unary(b"x", timeout=CALL_TIMEOUT_S, metadata=slow)
        elapsed = time.monotonic() - started
        assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert _md(caught.value.trailing_metadata())["x-router-error"] == "BACKEND_TIMEOUT"
        assert 0.9 < elapsed < 2.5, elapsed
        with pytest.raises(grpc.aio.AioRpcError) as caught:  # no deadline from the client
            await unary(b"x", metadata=slow)
        assert _md(caught.value.trailing_metadata())["x-router-error"] == "BACKEND_TIMEOUT"

        with pytest.raises(grpc.aio.AioRpcError) as caught:  # the client's deadline is shorter
            await unary(b"x", timeout=0.5, metadata=slow)
        assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert "x-router-error" not in _md(caught.value.trailing_metadata())

        bidi = channel.stream_stream(ECHO + "Bidi")(timeout=CALL_TIMEOUT_S)
        for i in range(5):  # 1.5 s of answers: the bound never starts on a stream answering
            await bidi.write(f"m{i}".encode())
            assert await bidi.read() == f"m{i}".encode()
            await asyncio.sleep(0.3)
        await bidi.done_writing()
        assert await bidi.read() == grpc.aio.EOF
        assert await bidi.code() == grpc.StatusCode.OK

        client_stream = channel.stream_unary(ECHO + "ClientStream")(timeout=CALL_TIMEOUT_S)
        for part in (b"a", b"b", b"c", b"d", b"e"):  # 1.5 s of writing, then the answer
            await client_stream.write(part)
            await asyncio.sleep(0.3)
        await client_stream.done_writing()
        assert await client_stream == b"abcde"
    async with asyncio.timeout(CALL_TIMEOUT_S):
        await router.app.dispatcher.wait_zero()
    stats = router.app.stats
    assert stats.errored == {"BACKEND_TIMEOUT": 2, "DEADLINE_EXCEEDED": 1}
    assert stats.completed == 2
    assert router.backend(backend.address)["failures_total"] == 2


async def test_route_model_header_selects_the_model_group(
    kserve_backend: Backends, grpc_router: GrpcRouterFactory
) -> None:
    a, b = kserve_backend(), kserve_backend()
    router = await grpc_router([grpc_backend(a.address, "alpha"), grpc_backend(b.address, "beta")])
    async with router.channel() as channel:
        unary = channel.unary_unary(ECHO + "Unary")
        for model, backend in (("alpha", a), ("beta", b)) * 3:
            call = unary(b"x", timeout=CALL_TIMEOUT_S, metadata=(("x-route-model", model),))
            await call
            assert _md(await call.initial_metadata())["x-backend"] == str(backend.port)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await unary(b"x", timeout=CALL_TIMEOUT_S, metadata=(("x-route-model", "gamma"),))
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND


async def test_echoed_names_are_truncated_in_router_statuses(
    kserve_backend: Backends, grpc_router: GrpcRouterFactory
) -> None:
    """A long model header or health service name comes back cut short in the details, with
    the router's error code in the trailer (a 1 MiB echo exceeds gRPC's metadata limit)."""
    backend = kserve_backend()
    router = await grpc_router([grpc_backend(backend.address, "alpha")])
    async with router.channel() as channel:
        unary = channel.unary_unary(ECHO + "Unary")
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await unary(b"x", timeout=CALL_TIMEOUT_S, metadata=(("x-route-model", "g" * 6000),))
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND
        assert len(caught.value.details() or "") < 512
        assert _md(caught.value.trailing_metadata())["x-router-error"] == "UNKNOWN_MODEL"

        stub = health_pb2_grpc.HealthStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.Check(health_pb2.HealthCheckRequest(service="s" * (1 << 20)), timeout=5)
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND
        assert f"({1 << 20} bytes)" in (details := caught.value.details() or "")
        assert len(details) < 512
        assert _md(caught.value.trailing_metadata())["x-router-error"] == "UNKNOWN_SERVICE"
    assert router.backend(backend.address)["requests_total"] == 0


async def test_router_health_service(
    kserve_backend: Backends, grpc_router: GrpcRouterFactory
) -> None:
    backend = kserve_backend()
    router = await grpc_router([grpc_backend(backend.address)])
    async with router.channel() as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for service in ("", "inference.GRPCInferenceService"):
            reply = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert reply.status == SERVING
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.Check(health_pb2.HealthCheckRequest(service="routertest.Echo"), timeout=5)
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND

        watch = stub.Watch(health_pb2.HealthCheckRequest(service=""), timeout=CALL_TIMEOUT_S)
        assert (await watch.read()).status == SERVING
        router.app.registry.get(backend.address).mark_down()  # type: ignore[union-attr]
        assert (await watch.read()).status == NOT_SERVING
        router.app.registry.get(backend.address).mark_up()  # type: ignore[union-attr]
        assert (await watch.read()).status == SERVING
        watch.cancel()
    assert router.backend(backend.address)["requests_total"] == 0  # answered by the router


async def test_tcp_and_grpc_backends_never_get_each_others_traffic(
    kserve_backend: Backends, echo_backend: Callable[..., EchoBackend],
    grpc_router: GrpcRouterFactory,
) -> None:
    kserve, echo = kserve_backend(), echo_backend()
    router = await grpc_router([grpc_backend(kserve.address, "sum"), {"address": echo.address}])
    host, port = router.app.bound.listen  # type: ignore[union-attr]
    client = await FrameClient.connect(host, port)
    try:
        for i in range(10):
            assert await client.request(f"tcp-{i}".encode()) == f"tcp-{i}".encode()
    finally:
        await client.close()
    async with router.channel() as channel:
        for _ in range(10):
            await channel.unary_unary(MODEL_INFER)(
                infer_request("sum", [1.0]), timeout=CALL_TIMEOUT_S
            )
            await channel.unary_unary(ECHO + "Unary")(b"g", timeout=CALL_TIMEOUT_S)
    assert router.backend(echo.address)["requests_total"] == 10
    assert router.backend(kserve.address)["requests_total"] == 20


async def test_drain_finishes_calls_in_flight_and_refuses_new_ones(
    kserve_backend: Backends, grpc_router: GrpcRouterFactory
) -> None:
    backend = kserve_backend("--delay-ms", "700")  # slows ModelInfer only
    router = await grpc_router([grpc_backend(backend.address, "sum")])
    async with router.channel() as channel:
        watch = health_pb2_grpc.HealthStub(channel).Watch(
            health_pb2.HealthCheckRequest(service=""), timeout=CALL_TIMEOUT_S
        )
        assert (await watch.read()).status == SERVING
        infer = channel.unary_unary(MODEL_INFER)
        unary = infer(infer_request("sum", [1.0, 2.0]), timeout=CALL_TIMEOUT_S)  # starts now
        # A unary call's headers arrive with its answer; a server stream's arrive first, so
        # this one tells when the router has the calls (it took them in order) in flight.
        slow = channel.unary_stream(ECHO + "ServerStream")(
            b"late", timeout=CALL_TIMEOUT_S,
            metadata=(("x-echo-delay-ms", "500"), ("x-echo-count", "1")),
        )
        bidi = channel.stream_stream(ECHO + "Bidi")(timeout=CALL_TIMEOUT_S)
        await bidi.write(b"s1")
        assert await bidi.read() == b"s1"
        await slow.initial_metadata()
        assert router.app.stats.inflight == 3

        router.start_drain()
        assert (await watch.read()).status == NOT_SERVING
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await infer(infer_request("sum", [1.0]), timeout=CALL_TIMEOUT_S)
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        assert _md(caught.value.trailing_metadata())["x-router-error"] == "DRAINING"
        ready = await channel.unary_unary("/inference.GRPCInferenceService/ServerReady")(
            b"", timeout=CALL_TIMEOUT_S
        )
        assert ready == b""  # ready = false (proto3 leaves a false bool out)

        await bidi.write(b"s2")  # a stream in flight goes on during the drain
        assert await bidi.read() == b"s2"
        await bidi.done_writing()
        assert await bidi.code() == grpc.StatusCode.OK
        assert [m async for m in slow] == [b"late"]
        assert output_values(await unary) == [3.0]
    report = await router.wait_report()
    assert report.dropped == 0 and not report.timed_out
    stats = router.app.stats
    assert (stats.accepted, stats.completed, stats.dropped, stats.inflight) == (3, 3, 0, 0)
    assert router.app.grpc_stats.statistics()[MODEL_INFER] == {"OK": 1, "UNAVAILABLE": 1}


async def test_calls_unanswered_at_the_grace_deadline_are_dropped(
    kserve_backend: Backends, grpc_router: GrpcRouterFactory
) -> None:
    backend = kserve_backend()
    router = await grpc_router(
        [grpc_backend(backend.address)], {"drain": {"shutdown_grace_s": 0.3}}
    )
    async with router.channel() as channel:
        stuck = channel.unary_stream(ECHO + "ServerStream")(
            b"x", timeout=CALL_TIMEOUT_S, metadata=(("x-echo-delay-ms", "5000"),)
        )
        await stuck.initial_metadata()
        router.start_drain()
        report = await router.wait_report()
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stuck.read()
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE  # told at once, not at its deadline
    assert _md(caught.value.trailing_metadata())["x-router-error"] == "DROPPED"
    assert (report.dropped, report.timed_out) == (1, True)
    stats = router.app.stats
    assert (stats.accepted, stats.dropped, stats.inflight, stats.completed) == (1, 1, 0, 0)


async def test_grpc_backend_revived_by_health_probe(
    kserve_backend: Backends, grpc_router: GrpcRouterFactory
) -> None:
    backend = kserve_backend()
    router = await grpc_router([grpc_backend(backend.address)])
    changed = asyncio.Event()
    router.app.registry.add_listener(lambda b, reason: changed.set())
    router.app.registry.get(backend.address).mark_down()  # type: ignore[union-attr]
    changed.clear()
    async with asyncio.timeout(CALL_TIMEOUT_S):  # the next probe pass (health.interval_s 0.5)
        await changed.wait()
    assert router.backend(backend.address)["healthy"]
    assert router.app.health.statistics()["marked_up"] == 1


class _Context:
    def __init__(self, remaining: float | None) -> None:
        self._remaining = remaining

    def time_remaining(self) -> float | None:
        return self._remaining


@pytest.mark.parametrize(
    ("remaining", "expected"),
    [
        (-0.1, DeadlineExceeded),
        (0.0, DeadlineExceeded),
        # The client's deadline fired and cancelled the call a moment before the server's.
        (DEADLINE_SLACK_S / 2, DeadlineExceeded),
        (1.0, Cancelled),
        (None, Cancelled),  # no deadline: the client went away
    ],
)
def test_a_cancelled_handler_is_told_why(remaining: float | None, expected: type) -> None:
    assert type(ended_by(_Context(remaining))) is expected  # type: ignore[arg-type]


class _BackendCall:
    """The two things ``AnswerBound`` asks of a backend call: whether it ended, and to cancel it."""

    def __init__(self, done: bool = False) -> None:
        self.ended = done
        self.cancels = 0

    def done(self) -> bool:
        return self.ended

    def cancel(self) -> bool:
        self.cancels += 1
        self.ended = True
        return True


def test_the_answer_bound_runs_from_the_half_close_until_the_first_message() -> None:
    clock = ManualClock()
    relay, rpc = AnswerBound(clock, 1.0), _BackendCall()
    clock.advance(5.0)  # the client may write for as long as it likes
    relay.half_closed(rpc)  # type: ignore[arg-type]
    clock.advance(0.99)
    assert (relay.timed_out, rpc.cancels) == (False, 0)
    clock.advance(0.01)
    assert (relay.timed_out, rpc.cancels) == (True, 1)


def test_the_answer_bound_stops_at_the_first_message_or_never_starts() -> None:
    clock = ManualClock()
    answered, rpc = AnswerBound(clock, 1.0), _BackendCall()
    answered.half_closed(rpc)  # type: ignore[arg-type]
    clock.advance(0.5)
    answered.message()
    clock.advance(10.0)  # a stream answering goes on past the bound
    assert (answered.timed_out, rpc.cancels) == (False, 0)

    streaming, rpc = AnswerBound(clock, 1.0), _BackendCall()
    streaming.message()  # answered before the client half-closed: no bound at all
    streaming.half_closed(rpc)  # type: ignore[arg-type]
    unbounded, ended = AnswerBound(clock, None), _BackendCall()  # the client's deadline is shorter
    unbounded.half_closed(ended)  # type: ignore[arg-type]
    finished, done = AnswerBound(clock, 1.0), _BackendCall(done=True)  # the backend already ended
    finished.half_closed(done)  # type: ignore[arg-type]
    assert clock.advance(10.0) == 0  # no timer was set
    assert not (streaming.timed_out or unbounded.timed_out or finished.timed_out)
    assert rpc.cancels == ended.cancels == done.cancels == 0

