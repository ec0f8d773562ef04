"""Admission limits and the read budget end to end: real echo and KServe backend processes, the
router in process, real sockets over loopback (issue 11, feature 2).

Every wait is bounded; conditions inside the router process are re-checked with the bounded
``wait_for`` of the integration tests (the hot path has no events to await).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import aiohttp
import grpc
import pytest
from conftest import EchoBackend, RouterFactory
from test_router_integration import close_writer, expect_eof, read_error, read_frame, wait_for

from router.protocol.frames import encode_frame
from tests.grpc_support import (
    MODEL_INFER,
    GrpcRouterFactory,
    KServeBackend,
    grpc_backend,
    infer_request,
)

WAIT_S = 10.0


async def metrics_text(admin_url: str) -> str:
    timeout = aiohttp.ClientTimeout(total=5)
    async with (
        aiohttp.ClientSession(admin_url, timeout=timeout) as session,
        session.get("/metrics") as response,
    ):
        assert response.status == 200
        return await response.text()


# -- connection limits ---------------------------------------------------------------------------


async def test_one_connection_over_max_connections_gets_connection_limit_then_eof(
    echo_backend: Callable[..., EchoBackend], router_factory: RouterFactory
) -> None:
    router = await router_factory([echo_backend().address], {"listener": {"max_connections": 3}})
    clients = [await router.client() for _ in range(3)]
    async with asyncio.timeout(WAIT_S):
        for client in clients:
            assert await client.request(b"in") == b"in"
    reader, writer = await router.open_raw()
    writer.write(encode_frame(b"never read"))
    assert await read_error(reader) == "CONNECTION_LIMIT"
    await expect_eof(reader)
    await close_writer(writer)
    front_door = router.app.front_door
    assert front_door.limit_statistics()["connections_refused"]["max_connections"] == 1
    assert router.app.stats.accepted == 3  # the refused connection's frame was never read

    await clients[0].close()  # a place frees up
    await wait_for(lambda: front_door.limit_statistics()["counted_connections"] == 2,
                   "the closed connection uncounted")
    late = await router.client()
    async with asyncio.timeout(WAIT_S):
        assert await late.request(b"late") == b"late"
    text = await metrics_text(router.admin_url)
    assert 'router_connections_refused_total{limit="max_connections"} 1.0' in text
    assert "router_connections_open 3.0" in text


async def test_max_connections_per_ip_refuses_only_the_address_over_it(
    echo_backend: Callable[..., EchoBackend], router_factory: RouterFactory
) -> None:
    router = await router_factory(
        [echo_backend().address], {"listener": {"max_connections_per_ip": 2}}
    )
    first = [await router.client() for _ in range(2)]
    async with asyncio.timeout(WAIT_S):
        for client in first:
            assert await client.request(b"in") == b"in"
    reader, writer = await router.open_raw()  # a third from 127.0.0.1
    assert await read_error(reader) == "CONNECTION_LIMIT"
    await expect_eof(reader)
    await close_writer(writer)
    # The same router from another loopback address is another client.
    async with asyncio.timeout(WAIT_S):
        reader, writer = await asyncio.open_connection(
            router.host, router.port, local_addr=("127.0.0.2", 0)
        )
        writer.write(encode_frame(b"other address"))
        assert await read_frame(reader) == (False, b"other address")
    await close_writer(writer)
    refused = router.app.front_door.limit_statistics()["connections_refused"]
    assert refused == {"max_connections": 0, "max_connections_per_ip": 1}


# -- the read budget -----------------------------------------------------------------------------


async def test_a_frame_that_does_not_fit_the_read_budget_waits_while_small_frames_flow(
    echo_backend: Callable[..., EchoBackend], router_factory: RouterFactory
) -> None:
    """Budget 100,000 bytes: one 60,000-byte frame being read fits, a second waits unread until
    the first is whole; a whole small frame never waits; one over the budget is
    FRAME_TOO_LARGE."""
    router = await router_factory(
        [echo_backend().address],
        {"listener": {"max_buffered_bytes": 100_000, "max_frame_bytes": 1_000_000}},
    )
    budget = router.app.front_door.budget
    frame_a, frame_b = encode_frame(b"a" * 60_000), encode_frame(b"b" * 60_000)
    reader_a, writer_a = await router.open_raw()
    writer_a.write(frame_a[:1000])
    await wait_for(lambda: budget.used == 60_004, "the first frame admitted whole")
    reader_b, writer_b = await router.open_raw()
    writer_b.write(frame_b[:1000])
    await wait_for(lambda: budget.statistics()["frames_waiting"] == 1, "the second waits")
    writer_b.write(frame_b[1000:])  # the rest waits in the kernel: its connection is not read

    small = await router.client()
    async with asyncio.timeout(WAIT_S):
        for i in range(20):
            assert await small.request(b"%d" % i) == b"%d" % i

    assert router.app.stats.accepted == 20  # neither large frame is whole yet
    writer_a.write(frame_a[1000:])
    assert await read_frame(reader_a) == (False, b"a" * 60_000)
    assert await read_frame(reader_b) == (False, b"b" * 60_000)  # admitted once "a" was whole
    await wait_for(lambda: budget.used == 0, "the budget empty again")

    reader_c, writer_c = await router.open_raw()
    writer_c.write(encode_frame(b"c" * 200_000)[:5000])
    assert await read_error(reader_c) == "FRAME_TOO_LARGE"
    await expect_eof(reader_c)
    for writer in (writer_a, writer_b, writer_c):
        await close_writer(writer)
    stats = budget.statistics()
    assert (stats["waits_total"], stats["too_large_total"], stats["shed_total"]) == (1, 1, 0)
    text = await metrics_text(router.admin_url)
    assert 'router_read_budget_events_total{event="waited"} 1.0' in text
    assert "router_read_budget_limit_bytes 100000.0" in text


# -- gRPC ----------------------------------------------------------------------------------------


async def test_grpc_calls_past_max_concurrent_calls_are_resource_exhausted(
    kserve_backend: Callable[..., KServeBackend], grpc_router: GrpcRouterFactory
) -> None:
    backend = kserve_backend("--delay-ms", "1500")
    router = await grpc_router(
        [grpc_backend(backend.address, "identity")], {"grpc": {"max_concurrent_calls": 2}}
    )
    async with router.channel() as channel:
        infer = channel.unary_unary(MODEL_INFER)
        slow = [asyncio.ensure_future(infer(infer_request("identity", [1.0]), timeout=WAIT_S))
                for _ in range(2)]
        await wait_for(lambda: router.app.dispatcher.stats.inflight == 2, "two calls running")
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await infer(infer_request("identity", [2.0]), timeout=WAIT_S)
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        async with asyncio.timeout(WAIT_S):
            await asyncio.gather(*slow)  # the calls within the bound are answered
        await infer(infer_request("identity", [3.0]), timeout=WAIT_S)  # room again


async def test_grpc_connections_past_max_connections_are_closed(
    kserve_backend: Callable[..., KServeBackend], grpc_router: GrpcRouterFactory
) -> None:
    backend = kserve_backend()
    router = await grpc_router(
        [grpc_backend(backend.address, "identity")], {"grpc": {"max_connections": 1}}
    )
    request = infer_request("identity", [1.0])
    async with router.channel() as first:
        await first.unary_unary(MODEL_INFER)(request, timeout=WAIT_S)
        # A channel is one connection; the option keeps grpc from reusing the first one's.
        options = [("grpc.use_local_subchannel_pool", 1)]
        async with grpc.aio.insecure_channel(router.target, options=options) as second:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await second.unary_unary(MODEL_INFER)(request, timeout=2.0)
            assert caught.value.code() in (
                grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED
            )
        await first.unary_unary(MODEL_INFER)(request, timeout=WAIT_S)  # still served
