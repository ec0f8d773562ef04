"""The router end to end: real echo backend processes, the router in process, real sockets.

Every wait is bounded by ``asyncio.timeout``; no test sleeps to wait for a server.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import signal
import socket
import struct
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from conftest import EchoBackend, RouterFactory, RunningRouter
from support import REPO_ROOT

from router.client.frames import ConnectionLost, ErrorReply, FrameClient, RetryingClient
from router.control.launcher import LaunchedProcess, launch
from router.core import build
from router.protocol.announce import Banner, parse_banner
from router.protocol.frames import ERROR_FLAG, LENGTH_MASK, encode_frame

WAIT_S = 10.0

# -- helpers -------------------------------------------------------------------------------------


async def read_frame(reader: asyncio.StreamReader) -> tuple[bool, bytes] | None:
    """(is_error, payload) of the next frame, or None at a clean EOF on a frame boundary."""
    async with asyncio.timeout(WAIT_S):
        try:
            header = await reader.readexactly(4)
        except asyncio.IncompleteReadError as exc:
            if exc.partial:
                raise AssertionError(f"EOF inside a frame header: {exc.partial!r}") from None
            return None
        word = int.from_bytes(header, "big")
        payload = await reader.readexactly(word & LENGTH_MASK)
    return bool(word & ERROR_FLAG), payload


async def read_error(reader: asyncio.StreamReader) -> str:
    """The code of the next frame, which must be a router error frame."""
    frame = await read_frame(reader)
    assert frame is not None, "expected an error frame, got EOF"
    is_error, payload = frame
    assert is_error, f"expected an error frame (bit 31 set), got payload {payload[:80]!r}"
    body = json.loads(payload)
    assert set(body) >= {"code", "message"}
    return str(body["code"])


async def expect_eof(reader: asyncio.StreamReader) -> None:
    async with asyncio.timeout(WAIT_S):
        rest = await reader.read()
    assert rest == b"", f"expected EOF, got {rest[:80]!r}"


async def close_writer(writer: asyncio.StreamWriter) -> None:
    writer.close()
    try:
        async with asyncio.timeout(5):
            await writer.wait_closed()
    except (ConnectionError, TimeoutError):
        pass


async def wait_for(predicate: Callable[[], bool], what: str, timeout_s: float = WAIT_S) -> None:
    """Poll an in-process condition (bounded in time and count)."""
    async with asyncio.timeout(timeout_s):
        for _ in range(100_000):
            if predicate():
                return
            await asyncio.sleep(0.005)
    raise AssertionError(f"never became true: {what}")


class NormalTraffic:
    """A well-behaved client requesting on its own connection until stopped (bounded)."""

    def __init__(self, router: RunningRouter, limit: int = 20_000) -> None:
        self._router = router
        self._limit = limit
        self._stop = asyncio.Event()
        self.ok = 0
        self.errors: list[BaseException] = []
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> NormalTraffic:
        client = await self._router.client()
        self._task = asyncio.create_task(self._run(client))
        # Make sure traffic is flowing before the bad input starts.
        await wait_for(lambda: self.ok > 0 or bool(self.errors), "normal traffic started")
        return self

    async def _run(self, client: FrameClient) -> None:
        for i in range(self._limit):
            if self._stop.is_set():
                return
            payload = f"normal-{i}".encode()
            try:
                async with asyncio.timeout(WAIT_S):
                    answer = await client.request(payload)
            except BaseException as exc:
                self.errors.append(exc)
                return
            if answer != payload:
                self.errors.append(AssertionError(f"{payload!r} answered {answer!r}"))
                return
            self.ok += 1

    async def __aexit__(self, *exc_info: object) -> None:
        self._stop.set()
        assert self._task is not None
        async with asyncio.timeout(WAIT_S):
            await self._task
        assert self.errors == []
        assert self.ok > 0


# -- the data path -------------------------------------------------------------------------------


async def test_many_concurrent_clients_get_their_own_payloads(
    echo_backend: Callable[..., EchoBackend], router_factory: RouterFactory
) -> None:
    backends = [echo_backend(), echo_backend()]
    router = await router_factory([b.address for b in backends])
    clients = [await router.client() for _ in range(20)]

    async def run(index: int, client: FrameClient) -> int:
        ok = 0
        for i in range(50):
            payload = f"client-{index}-req-{i}".encode()
            assert await client.request(payload) == payload
            ok += 1
        return ok

    async with asyncio.timeout(30):
        results = await asyncio.gather(*(run(n, c) for n, c in enumerate(clients)))
    assert sum(results) == 1000
    stats = router.app.stats
    assert stats.accepted == 1000
    assert stats.completed == 1000
    assert stats.inflight == 0
    assert stats.errored == {}


async def test_pipelined_answers_come_back_in_request_order_across_backends(
    echo_backend: Callable[..., EchoBackend], router_factory: RouterFactory
) -> None:
    fast, slow = echo_backend("--delay-ms", "0"), echo_backend("--delay-ms", "50")
    router = await router_factory(
        [fast.address, slow.address], {"dispatch": {"policy": "round_robin"}}
    )
    client = await router.client()
    payloads = [f"pipelined-{i}".encode() for i in range(20)]
    futures = [client.send(p) for p in payloads]  # all written before any answer
    async with asyncio.timeout(WAIT_S):
        answers = await asyncio.gather(*futures)
    # The client resolves futures strictly in arrival order, so equality is the order check.
    assert answers == payloads
    by_address = router.backend_stats()
    assert by_address[fast.address]["requests_total"] > 0
    assert by_address[slow.address]["requests_total"] > 0


async def _answer_writes(router: RunningRouter) -> float:
    timeout = aiohttp.ClientTimeout(total=WAIT_S)
    async with (
        aiohttp.ClientSession(router.admin_url, timeout=timeout) as session,
        session.get("/metrics") as resp,
    ):
        text = await resp.text()
    values = [line.split()[1] for line in text.splitlines()
              if line.startswith("router_answer_writes_total ")]
    assert len(values) == 1, "router_answer_writes_total is exported"
    return float(values[0])


async def test_a_pipelining_client_gets_its_answers_in_order_in_fewer_writes(
    echo_backend: Callable[..., EchoBackend], router_factory: RouterFactory
) -> None:
    """64 frames in one write reach the backend together, come back in one or a few reads,
    and go to the client in order; each answer written on its own would be 64 writes."""
    router = await router_factory([echo_backend().address])
    reader, writer = await router.open_raw()
    payloads = [f"coalesced-{i}".encode() for i in range(64)]
    writer.write(b"".join(encode_frame(p) for p in payloads))
    async with asyncio.timeout(WAIT_S):
        answers = [await read_frame(reader) for _ in payloads]
    assert answers == [(False, p) for p in payloads]
    writes = await _answer_writes(router)
    assert 1 <= writes <= 8, f"{writes} writes for 64 answers"
    # The common path still writes each answer of a client that does not pipeline.
    for i in range(3):
        writer.write(encode_frame(b"single-%d" % i))
        async with asyncio.timeout(WAIT_S):
            assert await read_frame(reader) == (False, b"single-%d" % i)
    assert await _answer_writes(router) == writes + 3
    writer.close()


async def test_connection_per_request_with_half_close(
    echo_backend: Callable[..., EchoBackend], router_factory: RouterFactory
) -> None:
    router = await router_factory([echo_backend().address])
    for i in range(10):
        reader, writer = await router.open_raw()
        payload = f"one-shot-{i}".encode()
        writer.write(encode_frame(payload))
        writer.write_eof()  # half-close: no more requests, answer still expected
        assert await read_frame(reader) == (False, payload)
        await expect_eof(reader)
        await close_writer(writer)
    assert router.app.stats.completed == 10


# -- backends failing ----------------------------------------------------------------------------


async def test_backend_killed_mid_run_loses_no_request(
    echo_backend: Callable[..., EchoBackend], router_factory: RouterFactory
) -> None:
    backends = [echo_backend() for _ in range(3)]
    router = await router_factory([b.address for b in backends])
    victim = backends[0]
    clients = [await router.client() for _ in range(10)]
    per_client = 150
    errors: list[BaseException] = []
    done = 0
    killed = asyncio.Event()

    async def run(index: int, client: FrameClient) -> None:
        nonlocal done
        for i in range(per_client):
            payload = f"c{index}-r{i}".encode()
            try:
                answer = await client.request(payload)
            except (ErrorReply, ConnectionError, Exception) as exc:
                errors.append(exc)
                continue
            if answer != payload:
                errors.append(AssertionError(f"{payload!r} answered {answer!r}"))
            done += 1
            if done == 300 and not killed.is_set():
                # The victim has been carrying traffic: SIGKILL it mid-run.
                assert router.backend_stats()[victim.address]["requests_total"] > 0
                victim.kill()
                killed.set()

    async with asyncio.timeout(60):
        await asyncio.gather(*(run(n, c) for n, c in enumerate(clients)))
    assert killed.is_set()
    assert errors == []
    assert done == 10 * per_client
    stats = router.app.stats
    assert stats.completed == stats.accepted == 10 * per_client
    assert stats.retried > 0
    victim_stats = router.backend_stats()[victim.address]
    assert victim_stats["healthy"] is False
    for backend in backends[1:]:
        assert router.backend_stats()[backend.address]["healthy"] is True


async def test_dead_backend_from_the_start_is_taken_out_of_rotation(
    echo_backend: Callable[..., EchoBackend], router_factory: RouterFactory, dead_port: int
) -> None:
    live = echo_backend()
    dead_address = f"127.0.0.1:{dead_port}"
    failure_threshold = 3
    concurrency = 4
    router = await router_factory(
        [live.address, dead_address], {"health": {"failure_threshold": failure_threshold}}
    )
    clients = [await router.client() for _ in range(concurrency)]

    async def run(index: int, client: FrameClient) -> None:
        for i in range(200 // concurrency):
            payload = f"c{index}-r{i}".encode()
            assert await client.request(payload) == payload

    async with asyncio.timeout(30):
        await asyncio.gather(*(run(n, c) for n, c in enumerate(clients)))
    assert router.app.stats.completed == 200
    dead = router.backend_stats()[dead_address]
    assert dead["healthy"] is False
    # Concurrent requests may each have picked the dead backend before it was marked down.
    assert dead["requests_total"] <= failure_threshold + concurrency, dead
    assert router.backend_stats()[live.address]["requests_total"] >= 200


async def test_backend_timeout(
    echo_backend: Callable[..., EchoBackend], router_factory: RouterFactory
) -> None:
    slow = echo_backend("--delay-ms", "2000")
    router = await router_factory([slow.address], {"dispatch": {"request_timeout_s": 0.3}})
    client = await router.client()
    async with asyncio.timeout(WAIT_S):
        with pytest.raises(ErrorReply) as caught:
            await client.request(b"too slow")
    assert caught.value.code == "BACKEND_TIMEOUT"
    assert router.app.stats.errored == {"BACKEND_TIMEOUT": 1}


async def _raw_backend(handler: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Any]
                       ) -> tuple[asyncio.Server, str]:
    server = await asyncio.start_server(handler, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    return server, f"127.0.0.1:{port}"


async def _replying_backend(reply: bytes) -> tuple[asyncio.Server, str]:
    """A backend that answers every frame it reads (requests and probes) with ``reply``."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            for _ in range(100):
                header = await reader.readexactly(4)
                await reader.readexactly(int.from_bytes(header, "big"))
                writer.write(reply)  # one write: one segment on loopback
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    return await _raw_backend(handler)


@pytest.mark.parametrize(
    "reply",
    [
        pytest.param((0x7FFF_FFFF).to_bytes(4, "big"), id="oversize-length-word"),
        pytest.param((0xFFFF_FFFF).to_bytes(4, "big"), id="error-flag-length-word"),
    ],
)
async def test_backend_sending_garbage_is_a_protocol_error(
    router_factory: RouterFactory, reply: bytes
) -> None:
    server, address = await _replying_backend(reply)
    async with server:
        # probe = "connect": no connection check, which would meet the garbage first (and fail
        # the request as not sent: the greeting test below).
        router = await router_factory(
            [address], {"dispatch": {"max_retries": 0}, "health": {"probe": "connect"}}
        )
        client = await router.client()
        async with asyncio.timeout(WAIT_S):
            with pytest.raises(ErrorReply) as caught:
                await client.request(b"hello")
        assert caught.value.code == "BACKEND_PROTOCOL_ERROR"
        await router.stop()


async def test_backend_sending_an_unrequested_frame_loses_its_connection(
    router_factory: RouterFactory,
) -> None:
    """Answers are matched to requests in order, so a frame beyond the requests outstanding
    means the stream can no longer be trusted: the request it follows keeps its answer and the
    connection is discarded rather than reused."""
    server, address = await _replying_backend(encode_frame(b"a") + encode_frame(b"b"))
    async with server:
        # probe = "connect": no connection check, which would meet "a" + "b" first.
        router = await router_factory(
            [address], {"dispatch": {"max_retries": 0}, "health": {"probe": "connect"}}
        )
        client = await router.client()
        async with asyncio.timeout(WAIT_S):
            assert await client.request(b"first") == b"a"
            assert await client.request(b"second") == b"a"  # on a fresh connection, not "b"
        pool = router.backend_stats()[address]["pool"]
        assert pool["dialed"] == 2
        assert pool["closed_broken"] >= 1
        await router.stop()


async def test_a_backend_that_greets_on_connect_corrupts_no_answer_and_is_taken_out(
    echo_backend: Callable[..., EchoBackend], router_factory: RouterFactory
) -> None:
    """A backend that writes a frame on every new connection before it is asked anything: the
    greeting answers the connection check instead of a request (BACKEND_PROTOCOL_ERROR), so no
    client gets it as its answer; requests not yet written go to the other backend, and the
    greeter is charged a failure per connection until it leaves rotation, after which every
    request is answered."""
    greeter = echo_backend("--greet", "hello")
    good = echo_backend()
    router = await router_factory([greeter.address, good.address])
    clients = [await router.client() for _ in range(8)]

    async def run(index: int, client: FrameClient, rounds: int) -> tuple[list[bytes], list[str]]:
        wrong, codes = [], []
        for i in range(rounds):
            payload = f"{index}-{i}".encode()
            try:
                answer = await client.request(payload)
            except ErrorReply as exc:
                codes.append(exc.code)
                continue
            if answer != payload:
                wrong.append(answer)
        return wrong, codes

    async with asyncio.timeout(30):
        results = await asyncio.gather(*(run(i, c, 25) for i, c in enumerate(clients)))
    wrong = [answer for answers, _ in results for answer in answers]
    codes = [code for _, codes in results for code in codes]
    assert wrong == []
    stats = router.backend_stats()[greeter.address]
    # A request already written when the greeting came back: the greeter may have run it.
    assert set(codes) <= {"BACKEND_PROTOCOL_ERROR"}
    assert len(codes) <= stats["failures_total"]
    assert stats["failures_total"] >= 3
    assert stats["healthy"] is False
    async with asyncio.timeout(30):
        after = await asyncio.gather(*(run(i, c, 10) for i, c in enumerate(clients)))
    assert after == [([], [])] * len(clients)
    assert router.backend_stats()[good.address]["requests_total"] >= 80


async def test_overload_answers_every_request(
    echo_backend: Callable[..., EchoBackend], router_factory: RouterFactory
) -> None:
    slow = echo_backend("--delay-ms", "500")
    router = await router_factory(
        [slow.address],
        # One connection carrying one request at a time: the pools bound what is in flight.
        {"dispatch": {"queue_size": 2, "queue_timeout_s": 0.2},
         "pool": {"max_connections": 1, "pipeline_depth": 1}},
    )
    clients = [await router.client() for _ in range(4)]
    futures: list[tuple[bytes, asyncio.Future[bytes]]] = []
    for n, client in enumerate(clients):
        for i in range(3):
            payload = f"c{n}-r{i}".encode()
            futures.append((payload, client.send(payload)))
    async with asyncio.timeout(WAIT_S):
        results = await asyncio.gather(*(f for _, f in futures), return_exceptions=True)
    ok = overloaded = 0
    for (payload, _), result in zip(futures, results, strict=True):
        if isinstance(result, ErrorReply):
            assert result.code == "OVERLOADED", result
            overloaded += 1
        else:
            assert result == payload, result
            ok += 1
    assert overloaded > 0
    assert ok > 0
    assert ok + overloaded == len(futures)
    stats = router.app.stats
    assert stats.accepted == len(futures)
    assert stats.completed == ok
    assert stats.errored == {"OVERLOADED": overloaded}
    assert stats.inflight == 0 and stats.dropped == 0


# -- bad client input ----------------------------------------------------------------------------

BAD_INPUT_OVERRIDES = {"listener": {"read_timeout_s": 0.3}}


async def test_oversize_length_gets_error_frame_then_eof(
    echo_backend: Callable[..., EchoBackend], router_factory: RouterFactory
) -> None:
    router = await router_factory([echo_backend().address], BAD_INPUT_OVERRIDES)
    async with NormalTraffic(router):
        reader, writer = await router.open_raw()
        writer.write((0x7FFF_FFF0).to_bytes(4, "big"))
        async with asyncio.timeout(WAIT_S):
            header = await reader.readexactly(4)
            word = int.from_bytes(header, "big")
            assert word & ERROR_FLAG, f"length word 0x{word:08x} lacks the error flag"
            body = json.loads(await reader.readexactly(word & LENGTH_MASK))
        assert body["code"] == "FRAME_TOO_LARGE"
        await expect_eof(reader)
        await close_writer(writer)


async def test_truncated_frame_at_eof(
    echo_backend: Callable[..., EchoBackend], router_factory: RouterFactory
) -> None:
    router = await router_factory([echo_backend().address], BAD_INPUT_OVERRIDES)
    async with NormalTraffic(router):
        reader, writer = await router.open_raw()
        writer.write((100).to_bytes(4, "big") + b"x" * 10)
        writer.write_eof()
        assert await read_error(reader) == "TRUNCATED_FRAME"
        await expect_eof(reader)
        await close_writer(writer)


async def test_partial_frame_past_read_timeout(
    echo_backend: Callable[..., EchoBackend], router_factory: RouterFactory
) -> None:
    router = await router_factory([echo_backend().address], BAD_INPUT_OVERRIDES)
    async with NormalTraffic(router):
        reader, writer = await router.open_raw()
        writer.write((100).to_bytes(4, "big") + b"x" * 10)  # and then nothing more
        await writer.drain()
        assert await read_error(reader) == "READ_TIMEOUT"
        await expect_eof(reader)
        await close_writer(writer)


async def test_random_garbage_does_not_take_the_router_down(
    echo_backend: Callable[..., EchoBackend], router_factory: RouterFactory
) -> None:
    router = await router_factory([echo_backend().address], BAD_INPUT_OVERRIDES)
    rng = random.Random(20261123)
    async with NormalTraffic(router):
        for _ in range(5):
            reader, writer = await router.open_raw()
            writer.write(rng.randbytes(rng.randrange(1, 8192)))
            await writer.drain()
            # Whatever it made of the bytes, the router ends the connection (bounded wait)
            # and every frame it sent before that is well formed.
            for _ in range(10_000):
                frame = await read_frame(reader)
                if frame is None:
                    break
            else:
                raise AssertionError("the router kept answering garbage")
            await close_writer(writer)
        client = await router.client()
        async with asyncio.timeout(WAIT_S):
            assert await client.request(b"still up") == b"still up"


async def test_abrupt_reset_mid_request_does_not_take_the_router_down(
    echo_backend: Callable[..., EchoBackend], router_factory: RouterFactory
) -> None:
    slow = echo_backend("--delay-ms", "100")
    router = await router_factory([slow.address], BAD_INPUT_OVERRIDES)
    loop = asyncio.get_running_loop()
    async with NormalTraffic(router):
        for i in range(5):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setblocking(False)
            try:
                async with asyncio.timeout(WAIT_S):
                    await loop.sock_connect(sock, (router.host, router.port))
                    # One whole request (answered later) and half of the next one.
                    await loop.sock_sendall(
                        sock, encode_frame(f"reset-{i}".encode()) + (50).to_bytes(4, "big") + b"ab"
                    )
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            finally:
                sock.close()  # linger 0: RST instead of FIN
        # The abandoned requests are still answered (into the void) and nothing stays open.
        await wait_for(lambda: router.app.stats.inflight == 0, "abandoned requests finished")
    await wait_for(
        lambda: router.app.front_door.statistics()["open_connections"] == 1,
        "reset connections forgotten",
    )


async def test_request_accepted_before_bad_bytes_is_answered_first(
    echo_backend: Callable[..., EchoBackend], router_factory: RouterFactory
) -> None:
    slow = echo_backend("--delay-ms", "200")
    router = await router_factory([slow.address], BAD_INPUT_OVERRIDES)
    async with NormalTraffic(router):
        before = router.app.stats.accepted
        reader, writer = await router.open_raw()
        writer.write(encode_frame(b"first"))
        await writer.drain()
        await wait_for(lambda: router.app.stats.accepted > before, "first request accepted")
        writer.write((0x7FFF_FFF0).to_bytes(4, "big"))  # while "first" is still in flight
        await writer.drain()
        assert await read_frame(reader) == (False, b"first")
        assert await read_error(reader) == "FRAME_TOO_LARGE"
        await expect_eof(reader)
        await close_writer(writer)


@pytest.mark.parametrize(
    "bad",
    [
        pytest.param((0x7FFF_FFF0).to_bytes(4, "big"), id="oversize"),
        pytest.param((0x8000_0010).to_bytes(4, "big"), id="error-flag"),
    ],
)
async def test_request_in_the_same_packet_as_bad_bytes_is_answered_first(
    echo_backend: Callable[..., EchoBackend], router_factory: RouterFactory, bad: bytes
) -> None:
    """A whole frame followed by a bad length word in the same segment: the whole frame was
    read by the router, so it is accepted and must be answered before the error frame."""
    router = await router_factory([echo_backend().address], BAD_INPUT_OVERRIDES)
    reader, writer = await router.open_raw()
    writer.write(encode_frame(b"first") + encode_frame(b"second") + bad)
    await writer.drain()
    assert await read_frame(reader) == (False, b"first")
    assert await read_frame(reader) == (False, b"second")
    assert await read_error(reader) == "FRAME_TOO_LARGE"
    await expect_eof(reader)
    await close_writer(writer)


async def test_idle_connection_is_closed(
    echo_backend: Callable[..., EchoBackend], router_factory: RouterFactory
) -> None:
    router = await router_factory([echo_backend().address], {"listener": {"idle_timeout_s": 0.3}})
    reader, writer = await router.open_raw()
    await expect_eof(reader)  # nothing ever sent
    await close_writer(writer)
    # A connection that did some work is closed once it falls idle, without an error frame.
    reader, writer = await router.open_raw()
    writer.write(encode_frame(b"once"))
    assert await read_frame(reader) == (False, b"once")
    await expect_eof(reader)
    await close_writer(writer)


# -- flow control --------------------------------------------------------------------------------


async def test_max_pipelined_holds_within_one_read(
    echo_backend: Callable[..., EchoBackend], router_factory: RouterFactory
) -> None:
    """One write of many small frames: only max_pipelined of them are accepted at a time (the
    rest wait unread in the connection's buffer), and every one is still answered, in order.
    (Before, the whole read was accepted at once, far past max_pipelined and queue_size.)"""
    slow = echo_backend("--delay-ms", "50")
    router = await router_factory([slow.address], {"listener": {"max_pipelined": 16}})
    payloads = [f"r{i:04d}".encode() for i in range(240)]
    reader, writer = await router.open_raw()
    writer.write(b"".join(encode_frame(p) for p in payloads))  # one write, one read
    await writer.drain()
    stats = router.app.stats
    most_in_flight = 0
    for payload in payloads:
        assert await read_frame(reader) == (False, payload)
        most_in_flight = max(most_in_flight, stats.inflight)
    assert most_in_flight <= 16
    assert stats.accepted == len(payloads)
    await close_writer(writer)


async def test_read_timeout_does_not_run_while_the_router_pauses_reading(
    echo_backend: Callable[..., EchoBackend], router_factory: RouterFactory
) -> None:
    """A partial frame held while the router itself pauses reading (max_pipelined reached)
    does not time out: the client gets READ_TIMEOUT only for its own delay, not the router's.
    (Before, the pause counted, and the client lost the request it was writing.)"""
    slow = echo_backend("--delay-ms", "2500")  # the pause: 2.5x the read timeout
    router = await router_factory(
        [slow.address], {"listener": {"max_pipelined": 2, "read_timeout_s": 1.0}}
    )
    reader, writer = await router.open_raw()
    third = encode_frame(b"third")
    writer.write(encode_frame(b"first") + encode_frame(b"second") + third[:6])
    await writer.drain()
    assert await read_frame(reader) == (False, b"first")
    assert await read_frame(reader) == (False, b"second")
    writer.write(third[6:])  # reading resumed with the answers: the rest of the frame
    await writer.drain()
    assert await read_frame(reader) == (False, b"third")
    await close_writer(writer)


# -- admin ---------------------------------------------------------------------------------------


async def test_admin_endpoints(
    echo_backend: Callable[..., EchoBackend], router_factory: RouterFactory
) -> None:
    backends = [echo_backend(), echo_backend()]
    router = await router_factory([b.address for b in backends])
    client = await router.client()
    async with asyncio.timeout(WAIT_S):
        assert await client.request(b"count me") == b"count me"
    timeout = aiohttp.ClientTimeout(total=WAIT_S)
    async with aiohttp.ClientSession(router.admin_url, timeout=timeout) as session:
        async with session.get("/metrics") as resp:
            assert resp.status == 200
            text = await resp.text()
        assert "router_requests_accepted_total 1.0" in text
        assert "router_backend_pool_open_connections" in text
        info = f'router_build_info{{build="{build.build()}",version="{build.version()}"}} 1.0'
        assert info in text
        for backend in backends:
            assert f'backend="{backend.address}"' in text
        async with session.get("/healthz") as resp:
            assert resp.status == 200
        async with session.get("/readyz") as resp:
            assert resp.status == 200
            assert (await resp.json())["ready"] is True
        async with session.get("/backends") as resp:
            assert resp.status == 200
            listed = await resp.json()
        assert sorted(b["address"] for b in listed) == sorted(b.address for b in backends)
        assert all(b["healthy"] is True for b in listed)


# -- shutdown ------------------------------------------------------------------------------------


async def test_no_leaked_connections_or_tasks_after_shutdown(
    echo_backend: Callable[..., EchoBackend], router_factory: RouterFactory
) -> None:
    backends = [echo_backend(), echo_backend()]
    router = await router_factory([b.address for b in backends])
    clients = [await router.client() for _ in range(5)]
    async with asyncio.timeout(WAIT_S):
        for n, client in enumerate(clients):
            futures = [client.send(f"{n}-{i}".encode()) for i in range(10)]
            assert await asyncio.gather(*futures) == [f"{n}-{i}".encode() for i in range(10)]
    # A raw connection left open at shutdown is closed by the drain too.
    reader, writer = await router.open_raw()
    assert any(b.pool.statistics()["open"] > 0 for b in router.app.registry)

    await router.stop()

    await expect_eof(reader)
    await close_writer(writer)
    me = asyncio.current_task()
    leftover = [
        t for t in asyncio.all_tasks()
        if t is not me and "pytest_asyncio" not in repr(t.get_coro())
    ]
    assert leftover == []
    assert router.app.front_door.statistics()["open_connections"] == 0
    for backend in router.app.registry:
        assert backend.pool.statistics()["open"] == 0, backend.statistics()
    assert router.app.stats.dropped == 0
    assert router.app.stats.inflight == 0


# -- the CLI as a real process -------------------------------------------------------------------


@contextlib.asynccontextmanager
async def cli_router(
    backend: EchoBackend, tmp_path: Path, *flags: str
) -> AsyncIterator[tuple[LaunchedProcess[Banner], str, int, Path]]:
    """``inference-router serve`` as a real process, once its banner is out: (process (its
    ``ready`` is the banner), host, port, stderr file)."""
    stderr_path = tmp_path / "router.stderr"
    proc = await launch(
        [sys.executable, "-m", "router", "serve",
         "--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0", "--backend", backend.address,
         *flags],
        parse_banner, stderr=stderr_path, cwd=REPO_ROOT, ready_timeout_s=WAIT_S,
        env={"PYTHONPATH": str(REPO_ROOT), "ROUTER_LOG_DIR": str(tmp_path / "logs"),
             "PATH": "/usr/bin:/bin"},
    )
    try:
        yield proc, *proc.ready.listen, stderr_path
    finally:
        proc.kill()
        await proc.stop()


async def test_cli_serve_answers_and_exits_cleanly_on_sigterm(
    echo_backend: Callable[..., EchoBackend], tmp_path: Path
) -> None:
    async with cli_router(echo_backend(), tmp_path) as (proc, host, port, stderr_path):
        client = await FrameClient.connect(host, port)
        try:
            async with asyncio.timeout(WAIT_S):
                assert await client.request(b"via the cli") == b"via the cli"
        finally:
            await client.close()
        proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(10):
            returncode = await proc.wait()
        assert returncode == 0, stderr_path.read_text()


async def test_cli_second_signal_forces_exit_during_a_drain(
    echo_backend: Callable[..., EchoBackend], tmp_path: Path
) -> None:
    # A request that takes 60 s keeps the first SIGTERM's drain (grace 60 s) busy; the second
    # signal must end the process at once, with status 1.
    backend = echo_backend("--delay-ms", "60000")
    flags = ("--shutdown-grace", "60")
    async with cli_router(backend, tmp_path, *flags) as (proc, host, port, stderr_path):
        admin = proc.ready.admin_url
        client = await FrameClient.connect(host, port)
        stuck = client.send(b"stuck")
        async with asyncio.timeout(WAIT_S), aiohttp.ClientSession() as session:
            # Accepted before the first signal, or that drain has nothing to wait for and the
            # second signal would land on a process already exiting.
            while True:
                async with session.get(f"{admin}/stats") as response:
                    stats = await response.json()
                if stats["dispatch"]["accepted"] == 1:
                    break
                await asyncio.sleep(0.02)  # another process: no event to await
        proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(WAIT_S):
            # The drain has begun once the router logs it; then the second signal.
            while "drain started" not in stderr_path.read_text():  # noqa: ASYNC110
                await asyncio.sleep(0.05)
        assert proc.returncode is None  # still draining: the first signal did not end it
        proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(10):
            returncode = await proc.wait()
        assert returncode == 1, stderr_path.read_text()
        assert "second signal" in stderr_path.read_text()
        with contextlib.suppress(ConnectionLost):
            await asyncio.wait_for(stuck, 5)
        await client.close()


async def test_no_leaked_backend_connection_when_shutdown_lands_during_a_health_probe(
    echo_backend: Callable[..., EchoBackend], router_factory: RouterFactory
) -> None:
    # A probe takes 300 ms on this backend, so the stop below lands while one is in flight.
    slow = echo_backend("--delay-ms", "300")
    router = await router_factory([slow.address], {"health": {"interval_s": 0.1}})
    client = await router.client()
    async with asyncio.timeout(WAIT_S):
        assert await client.request(b"leaves an idle connection") == b"leaves an idle connection"
    health = router.app.health
    sent = health.probes_sent
    await wait_for(lambda: health.probes_sent > sent, "a probe of the idle connection started")
    await router.stop()
    for backend in router.app.registry:
        assert backend.pool.statistics()["open"] == 0, backend.statistics()


async def test_drain_does_not_linger_on_a_connection_the_client_already_closed(
    echo_backend: Callable[..., EchoBackend], router_factory: RouterFactory
) -> None:
    # linger_s is long; once both sides have sent FIN there is nothing to linger for, so the
    # drain ends as soon as the last answer is out, not linger_s later.
    router = await router_factory(
        [echo_backend().address], {"drain": {"linger_s": 60.0, "shutdown_grace_s": 120.0}}
    )
    client = await router.client()
    assert await client.request(b"last") == b"last"
    await client.close()
    await router.stop()
    report = router.app.drain.report
    assert report is not None
    assert report.dropped == 0
    assert not report.timed_out
    assert report.duration_s < 30.0  # far below linger_s: the closed connection did not wait


# -- the retry contract ---------------------------------------------------------------------------


async def test_retrying_client_moves_to_a_second_router_across_a_drain_without_loss(
    echo_backend: Callable[..., EchoBackend], router_factory: RouterFactory
) -> None:
    # Two routers in front of the same backend; the first drains while pipelined requests are
    # in flight. Every request must be answered exactly once between the two routers, and the
    # client must see no error: unanswered ones were never processed, so they are resent.
    backend = echo_backend("--delay-ms", "5")
    first = await router_factory([backend.address])
    second = await router_factory([backend.address])
    client = RetryingClient([(first.host, first.port), (second.host, second.port)])
    total = 300
    try:
        async with asyncio.timeout(30):
            tasks = [
                asyncio.ensure_future(client.request(f"handover-{i}".encode()))
                for i in range(total // 2)
            ]
            await asyncio.sleep(0)  # let the first batch go out on the first router
            stopping = asyncio.ensure_future(first.stop())
            tasks += [
                asyncio.ensure_future(client.request(f"handover-{i}".encode()))
                for i in range(total // 2, total)
            ]
            answers = await asyncio.gather(*tasks)
            await stopping
    finally:
        await client.close()
    assert answers == [f"handover-{i}".encode() for i in range(total)]
    served = first.app.stats.completed + second.app.stats.completed
    assert served == total  # nothing answered twice, nothing lost
    assert first.app.drain.report is not None and first.app.drain.report.dropped == 0
    assert second.app.stats.completed > 0  # the handover really happened


async def test_rolling_restart_on_one_port_with_so_reuseport(
    echo_backend: Callable[..., EchoBackend], router_factory: RouterFactory
) -> None:
    # The old router and its replacement share one port (SO_REUSEPORT); the old one drains.
    # A client that keeps the retry contract, knowing only that one address, sees no error.
    backend = echo_backend("--delay-ms", "2")
    old = await router_factory([backend.address], {"listener": {"reuse_port": True}})
    new = await router_factory(
        [backend.address], {"listener": {"listen": f"127.0.0.1:{old.port}", "reuse_port": True}}
    )
    assert new.port == old.port
    clients = [RetryingClient([(old.host, old.port)]) for _ in range(8)]
    per_client = 60

    async def drive(index: int, client: RetryingClient) -> list[bytes]:
        answers = []
        for i in range(per_client):
            answers.append(await client.request(f"roll-{index}-{i}".encode()))
            if index == 0 and i == per_client // 3:
                stopping.append(asyncio.ensure_future(old.stop()))
        return answers

    stopping: list[asyncio.Future[None]] = []
    try:
        async with asyncio.timeout(30):
            results = await asyncio.gather(*(drive(n, c) for n, c in enumerate(clients)))
            await asyncio.gather(*stopping)
    finally:
        for client in clients:
            await client.close()
    for index, answers in enumerate(results):
        assert answers == [f"roll-{index}-{i}".encode() for i in range(per_client)]
    assert old.app.drain.report is not None and old.app.drain.report.dropped == 0
    assert old.app.stats.completed + new.app.stats.completed == 8 * per_client
    assert new.app.stats.completed > 0


# -- drain ----------------------------------------------------------------------------------------


async def test_readyz_is_503_from_the_first_moment_of_a_drain_while_requests_finish(
    echo_backend: Callable[..., EchoBackend], router_factory: RouterFactory
) -> None:
    router = await router_factory([echo_backend("--delay-ms", "800").address])
    # Not router.client(): the fixture's stop() closes those before draining.
    client = await FrameClient.connect(router.host, router.port)
    answer = client.send(b"slow")  # accepted now, answered ~0.8 s later
    async with asyncio.timeout(10):
        # Acceptance has no public event (the hot path counts plain ints): bounded re-check.
        while router.app.stats.accepted < 1:  # noqa: ASYNC110
            await asyncio.sleep(0.01)
    stopping = asyncio.ensure_future(router.stop())
    async with asyncio.timeout(10):
        while not router.app.lifecycle.draining:  # noqa: ASYNC110 (see above)
            await asyncio.sleep(0.01)
    timeout = aiohttp.ClientTimeout(total=5)
    async with (
        aiohttp.ClientSession(router.admin_url, timeout=timeout) as session,
        session.get("/readyz") as response,
    ):
        assert response.status == 503
        assert (await response.json())["reason"] == "draining"
    assert await asyncio.wait_for(answer, 10) == b"slow"  # the accepted request still finishes
    await asyncio.wait_for(stopping, 15)
    report = router.app.drain.report
    assert report is not None and report.dropped == 0
    await client.close()


async def test_requests_unanswered_at_the_grace_deadline_are_counted_dropped(
    echo_backend: Callable[..., EchoBackend], router_factory: RouterFactory
) -> None:
    router = await router_factory(
        [echo_backend("--delay-ms", "5000").address],
        {"drain": {"shutdown_grace_s": 0.3}, "dispatch": {"request_timeout_s": 30.0}},
    )
    client = await FrameClient.connect(router.host, router.port)
    pending = [client.send(f"stuck-{i}".encode()) for i in range(3)]
    async with asyncio.timeout(10):
        while router.app.stats.accepted < 3:  # noqa: ASYNC110 (see above)
            await asyncio.sleep(0.01)
    await asyncio.wait_for(router.stop(), 15)
    report = router.app.drain.report
    assert report is not None and report.timed_out
    assert report.dropped == 3
    assert router.app.stats.dropped == 3
    for future in pending:
        assert future.done()  # the client saw its connection reset, not silence


# -- backends that come back, and backends that close connections -----------------------------


async def test_backends_that_come_back_serve_before_the_next_probe(
    echo_backend: Callable[..., EchoBackend], router_factory: RouterFactory
) -> None:
    """Every backend out of rotation: the panic threshold still tries them, so once one is back
    clients are served at once, not refused NO_BACKEND until the next health pass."""
    first = echo_backend()
    port = first.port
    router = await router_factory(
        [first.address],
        {"health": {"interval_s": 60.0, "failure_threshold": 1}, "dispatch": {"max_retries": 0}},
    )
    client = await router.client()
    async with asyncio.timeout(WAIT_S):
        assert await client.request(b"up") == b"up"
        first.kill()
        with pytest.raises(ErrorReply) as caught:
            await client.request(b"down")
        assert caught.value.code == "BACKEND_UNAVAILABLE"
    assert router.backend_stats()[first.address]["healthy"] is False

    echo_backend("--port", str(port))  # back, on the same address
    codes: list[str] = []
    async with asyncio.timeout(WAIT_S):
        for i in range(20):
            try:
                assert await client.request(b"%d" % i) == b"%d" % i
            except ErrorReply as exc:
                codes.append(exc.code)
    assert codes == []
    assert router.backend_stats()[first.address]["healthy"] is True


async def test_a_backend_closing_connections_after_n_requests_costs_no_client_an_error(
    echo_backend: Callable[..., EchoBackend], router_factory: RouterFactory
) -> None:
    """The only backend closes each connection after 3 answers, with more requests on it: those
    are sent again once, on a fresh connection to it, instead of failing."""
    backend = echo_backend("--close-after", "3")
    router = await router_factory([backend.address])
    clients = [await router.client() for _ in range(10)]

    async def run(index: int, client: FrameClient) -> list[str]:
        codes = []
        for i in range(20):
            payload = f"{index}-{i}".encode()
            try:
                assert await client.request(payload) == payload
            except ErrorReply as exc:
                codes.append(exc.code + " " + exc.message)
        return codes

    async with asyncio.timeout(30):
        results = await asyncio.gather(*(run(i, c) for i, c in enumerate(clients)))
    assert [code for codes in results for code in codes] == []
    stats = router.backend_stats()[backend.address]
    assert stats["pool"]["dialed"] >= 200 // 3  # the backend really closed them
    assert stats["failures_total"] == 0
