"""What only the HTTP/2 relay (``grpc.engine = "relay"``) has: multiplexed backend
connections, credit passed through to a slow reader, retries before an answer, hostile and
raw HTTP/2 clients (nghttp2's ``nghttp``), on uvloop as in production."""

from __future__ import annotations

import asyncio
import re
import shutil
import socket
from collections.abc import Callable

import grpc
import pytest

from router.frontdoor.grpc.relay_call import client_reset_slack
from router.protocol import h2frames as f
from router.protocol.h2connection import H2Connection, HeadersReceived
from router.protocol.h2headers import encode_block
from tests.grpc_support import (
    CALL_TIMEOUT_S,
    MODEL_INFER,
    GrpcRouterFactory,
    KServeBackend,
    grpc_backend,
    infer_request,
    output_values,
)

pytestmark = pytest.mark.grpc_engine("relay", reason="the relay's own connections and frames")

Backends = Callable[..., KServeBackend]
ECHO = "/routertest.Echo/"
SERVER_LIVE = "/inference.GRPCInferenceService/ServerLive"
NGHTTP = shutil.which("nghttp")  # Debian's nghttp2-client, installed by make system-packages


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_many_calls_share_few_backend_connections(
    kserve_backend: Backends, grpc_router: GrpcRouterFactory
) -> None:
    backend = kserve_backend()
    router = await grpc_router([grpc_backend(backend.address, "identity")],
                               {"grpc": {"relay_connections_per_backend": 2}})
    own = [("grpc.use_local_subchannel_pool", 1)]  # four client connections, not one shared
    channels = [grpc.aio.insecure_channel(router.target, options=own) for _ in range(4)]
    try:
        calls = [channel.unary_unary(MODEL_INFER) for channel in channels]
        results = await asyncio.gather(*(
            calls[i % 4](infer_request("identity", [float(i)]), timeout=CALL_TIMEOUT_S)
            for i in range(200)))
    finally:
        for channel in channels:
            await channel.close()
    assert [output_values(r) for r in results] == [[float(i)] for i in range(200)]
    upstream = router.backend(backend.address)["calls"]
    assert 1 <= upstream["connections"] <= 2 and upstream["dials"] <= 2
    front = router.app.statistics()["grpc"]
    assert front["engine"] == "relay" and front["connections_total"] == 4
    assert router.app.stats.completed == 200


async def test_a_slow_reader_holds_its_backend_back(
    kserve_backend: Backends, grpc_router: GrpcRouterFactory
) -> None:
    """200 answers of 64 KiB (12.8 MiB) to a client that stops reading: the router holds at
    most what it credited the backend (a 1 MiB stream window), then all arrive in order."""
    backend = kserve_backend()
    router = await grpc_router([grpc_backend(backend.address)])
    message = b"m" * 65_536
    options = [("grpc.max_receive_message_length", 1 << 20),
               ("grpc.http2.lookahead_bytes", 65_536), ("grpc.http2.bdp_probe", 0)]
    async with grpc.aio.insecure_channel(router.target, options=options) as channel:
        stream = channel.unary_stream(ECHO + "ServerStream")(
            message, timeout=30, metadata=(("x-echo-count", "200"),))
        assert await stream.read() == message
        await asyncio.sleep(1.0)  # not reading: the backend may send only what it was credited
        held = router.app.statistics()["grpc"]["pending_bytes"]
        upstream = router.backend(backend.address)["calls"]
        assert held <= (1 << 20) + 65_536, held
        assert upstream["pending_bytes"] == 0
        received = 1
        async with asyncio.timeout(30):
            while (answer := await stream.read()) is not grpc.aio.EOF:
                assert answer == message
                received += 1
        assert received == 200 and await stream.code() == grpc.StatusCode.OK


async def test_a_unary_call_refused_by_one_backend_is_retried_on_another(
    kserve_backend: Backends, grpc_router: GrpcRouterFactory
) -> None:
    good = kserve_backend()
    dead = f"127.0.0.1:{_closed_port()}"
    router = await grpc_router(
        [grpc_backend(dead, "identity"), grpc_backend(good.address, "identity")],
        {"dispatch": {"policy": "round_robin", "max_retries": 1},
         "health": {"interval_s": 60.0}},
    )
    async with router.channel() as channel:
        infer = channel.unary_unary(MODEL_INFER)
        for i in range(6):
            answer = await infer(infer_request("identity", [float(i)]), timeout=CALL_TIMEOUT_S)
            assert output_values(answer) == [float(i)]
    stats = router.app.stats
    assert stats.retried >= 1 and stats.completed == 6 and not stats.errored
    assert router.backend(dead)["calls"]["dial_failures"] >= 1


async def test_a_client_that_breaks_http2_gets_goaway_and_others_go_on(
    kserve_backend: Backends, grpc_router: GrpcRouterFactory
) -> None:
    backend = kserve_backend()
    router = await grpc_router([grpc_backend(backend.address, "identity")])
    host, port = router.target.rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    open_call = f.encode_headers(1, encode_block([  # a call in progress when it happens
        (":method", "POST"), (":scheme", "http"), (":path", SERVER_LIVE),
        (":authority", "x"), ("content-type", "application/grpc"), ("te", "trailers")]),
        False, 16_384)
    writer.write(f.PREFACE + f.encode_settings([]) + open_call + f.frame(f.DATA, 0, 7, b"x"))
    frames: list[f.Frame] = []
    decoder = f.FrameDecoder(max_frame_size=1 << 20)
    async with asyncio.timeout(CALL_TIMEOUT_S):
        while not any(kind == f.GOAWAY for kind, *_ in frames):
            data = await reader.read(65_536)
            assert data, "closed without GOAWAY"
            frames += decoder.receive(data)
        assert await reader.read(65_536) == b""  # and then closed
    goaway = next(payload for kind, _, _, payload in frames if kind == f.GOAWAY)
    assert f.read_goaway(goaway, 0)[1] == f.PROTOCOL_ERROR
    writer.close()
    async with router.channel() as channel:
        answer = await channel.unary_unary(MODEL_INFER)(infer_request("identity", [2.0]),
                                                        timeout=CALL_TIMEOUT_S)
    assert output_values(answer) == [2.0]


async def _nghttp(*args: str) -> str:
    assert NGHTTP is not None, "nghttp is missing: make system-packages installs it"
    proc = await asyncio.create_subprocess_exec(
        NGHTTP, *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    async with asyncio.timeout(30):
        out, _ = await proc.communicate()
    assert proc.returncode == 0, out.decode(errors="replace")
    return out.decode(errors="replace")


def _grpc_body(message: bytes) -> bytes:
    return b"\0" + len(message).to_bytes(4) + message


@pytest.mark.parametrize("extra", [
    [],  # plain
    ["-w", "1", "-W", "1"],  # 1-byte stream and connection windows: every byte waits for credit
    ["-c", "0"],  # the client's header table is 0: our blocks must shrink it first
    ["-m", "20"],  # 20 concurrent streams on one connection
])
async def test_nghttp_calls_through_the_relay(
    kserve_backend: Backends, grpc_router: GrpcRouterFactory, tmp_path, extra: list[str]
) -> None:
    backend = kserve_backend()
    router = await grpc_router([grpc_backend(backend.address, "identity")])
    body = tmp_path / "request"
    body.write_bytes(_grpc_body(infer_request("identity", [float(i) for i in range(16)])))
    live = tmp_path / "live"
    live.write_bytes(_grpc_body(b""))
    headers = ["-H", "content-type: application/grpc", "-H", "te: trailers", "-v"]
    base = f"http://{router.target}"
    out = await _nghttp(*headers, *extra, "-d", str(body), base + MODEL_INFER)
    streams = int(extra[1]) if extra[:1] == ["-m"] else 1
    assert out.count("grpc-status: 0") == streams, out[-2000:]
    assert "GOAWAY" not in out.split("recv GOAWAY")[0] or "NO_ERROR" in out
    out = await _nghttp(*headers, *extra, "-d", str(live), base + SERVER_LIVE)
    assert out.count("grpc-status: 0") == streams
    assert router.app.stats.completed == streams


async def test_a_backend_that_answers_the_clients_deadline_counts_it_once_as_the_clients(
    kserve_backend: Backends, grpc_router: GrpcRouterFactory, tmp_path
) -> None:
    """nghttp sends grpc-timeout but keeps no timer of its own: the backend, told the time
    left, answers DEADLINE_EXCEEDED before the router's timer (which waits a slack more)."""
    backend = kserve_backend()
    router = await grpc_router([grpc_backend(backend.address)])
    body = tmp_path / "request"
    body.write_bytes(_grpc_body(b"x"))
    out = await _nghttp("-H", "content-type: application/grpc", "-H", "te: trailers",
                        "-H", "grpc-timeout: 300m", "-H", "x-echo-delay-ms: 3000", "-v",
                        "-d", str(body), f"http://{router.target}{ECHO}Unary")
    assert "grpc-status: 4" in out, out[-2000:]
    assert "x-router-error" not in out  # the backend's status, relayed
    async with asyncio.timeout(CALL_TIMEOUT_S):
        await router.app.dispatcher.wait_zero()
    assert router.app.stats.errored == {"DEADLINE_EXCEEDED": 1}
    assert router.app.stats.completed == 0
    assert router.backend(backend.address)["failures_total"] == 0


async def _until_in_flight(router: object, calls: int) -> None:
    """Bounded: until the router has ``calls`` calls in flight (10 s, 1,000 looks)."""
    app = router.app  # type: ignore[attr-defined]
    for _ in range(1000):
        if app.stats.inflight >= calls:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"never {calls} calls in flight: {app.stats.inflight}")


async def test_nghttp_sees_the_goaway_notice_the_ping_and_the_final_goaway(
    kserve_backend: Backends, grpc_router: GrpcRouterFactory, tmp_path
) -> None:
    """A call in flight when the drain starts: nghttp reads GOAWAY(2^31-1) and a PING (and
    acks it), then GOAWAY naming its stream, and the call still ends with grpc-status 0."""
    backend = kserve_backend()
    router = await grpc_router([grpc_backend(backend.address)])
    body = tmp_path / "request"
    body.write_bytes(_grpc_body(b"late"))
    headers = ["-H", "content-type: application/grpc", "-H", "te: trailers",
               "-H", "x-echo-delay-ms: 800", "-H", "x-echo-count: 1", "-v"]
    call = asyncio.create_task(_nghttp(*headers, "-d", str(body),
                                       f"http://{router.target}{ECHO}ServerStream"))
    await _until_in_flight(router, 1)
    router.start_drain()
    out = await call
    report = await router.wait_report()
    lines = out.splitlines()  # a frame's fields are on the line after its own
    goaways = [lines[i + 1] for i, line in enumerate(lines[:-1]) if "recv GOAWAY frame" in line]
    assert len(goaways) == 2, out[-3000:]
    assert "last_stream_id=2147483647, error_code=NO_ERROR" in goaways[0]
    stream = re.search(r"send HEADERS frame <[^>]*stream_id=(\d+)>", out)
    assert stream is not None  # nghttp's request (ids below it hold its priority tree)
    assert f"last_stream_id={stream[1]}, error_code=NO_ERROR" in goaways[1]
    assert "recv PING frame" in out and "send PING frame <length=8, flags=0x01" in out
    assert out.index("send PING frame <length=8, flags=0x01") < out.index(goaways[1])
    assert "grpc-status: 0" in out
    assert report.dropped == 0 and not report.timed_out


async def test_grpc_clients_racing_the_drain_lose_no_call(
    kserve_backend: Backends, grpc_router: GrpcRouterFactory
) -> None:
    """Eight grpcio clients keep calling while the router drains: every call the router took
    is answered OK; the others are refused without reaching a backend (UNAVAILABLE), and
    nothing is dropped."""
    backend = kserve_backend("--delay-ms", "50")
    router = await grpc_router([grpc_backend(backend.address, "identity")])
    own = [("grpc.use_local_subchannel_pool", 1)]
    channels = [grpc.aio.insecure_channel(router.target, options=own) for _ in range(8)]
    outcomes: list[str] = []
    drained = asyncio.Event()

    async def caller(channel: grpc.aio.Channel, index: int) -> None:
        infer = channel.unary_unary(MODEL_INFER)
        for i in range(200):  # bounded: the drain ends the loop long before
            try:
                answer = await infer(infer_request("identity", [float(i)]),
                                     timeout=CALL_TIMEOUT_S)
            except grpc.aio.AioRpcError as exc:
                code = dict(exc.trailing_metadata() or ()).get("x-router-error")
                outcomes.append(f"{exc.code().name}:{code}")
                if drained.is_set():
                    return
                continue
            outcomes.append("OK" if output_values(answer) == [float(i)] else "WRONG")

    try:
        tasks = [asyncio.create_task(caller(c, n)) for n, c in enumerate(channels)]
        await _until_in_flight(router, 8)
        router.start_drain()
        drained.set()
        async with asyncio.timeout(30):
            await asyncio.gather(*tasks)
    finally:
        for channel in channels:
            await channel.close()
    report = await router.wait_report()
    stats = router.app.stats
    refused = [o for o in outcomes if o != "OK"]
    assert outcomes.count("OK") == stats.completed == stats.accepted >= 8
    assert all(o in ("UNAVAILABLE:None", "UNAVAILABLE:DRAINING") for o in refused), refused
    assert report.dropped == 0 and stats.dropped == 0 and not report.timed_out


async def test_backend_connections_retire_when_idle_and_fail_over_without_a_ping_ack(
    kserve_backend: Backends, grpc_router: GrpcRouterFactory
) -> None:
    """A backend that takes the connection and then says nothing (no answer, no PING ack):
    the keepalive PING goes unanswered, the connection is closed and the unary call on it
    retried on the other backend. The good backend's connection, idle, retires and is
    dialled again for the next call."""
    silent_bytes = bytearray()

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(65_536):  # ends when the router closes it
            silent_bytes.extend(data)
        writer.close()

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    dead = f"127.0.0.1:{server.sockets[0].getsockname()[1]}"
    good = kserve_backend()
    router = await grpc_router(
        [grpc_backend(dead, "identity"), grpc_backend(good.address, "identity")],
        {"dispatch": {"policy": "round_robin", "max_retries": 1},
         "health": {"interval_s": 60.0}, "pool": {"idle_timeout_s": 0.5},
         "grpc": {"relay_keepalive_s": 0.2, "relay_keepalive_timeout_s": 0.3}})
    try:
        async with router.channel() as channel:
            infer = channel.unary_unary(MODEL_INFER)
            for i in range(2):  # round robin: one of them goes to the silent backend first
                answer = await infer(infer_request("identity", [float(i)]),
                                     timeout=CALL_TIMEOUT_S)
                assert output_values(answer) == [float(i)]
            silent_calls = router.backend(dead)["calls"]
            assert silent_calls["keepalive_failures"] == 1 and silent_calls["connections"] == 0
            assert f.encode_ping(b"rkeepal\0") in silent_bytes  # the PING it never acked
            for _ in range(300):  # bounded (3 s): the good connection's idle timeout passes
                if router.backend(good.address)["calls"]["connections_retired"]["idle"]:
                    break
                await asyncio.sleep(0.01)
            upstream = router.backend(good.address)["calls"]
            assert upstream["connections_retired"]["idle"] == 1 and upstream["connections"] == 0
            answer = await channel.unary_unary(MODEL_INFER)(
                infer_request("identity", [7.0]), timeout=CALL_TIMEOUT_S)
            assert output_values(answer) == [7.0]
            assert router.backend(good.address)["calls"]["dials"] == 2
        stats = router.app.stats
        failures = router.backend(dead)["calls"]["keepalive_failures"]
        assert stats.retried == failures >= 1  # each retry: a keepalive PING without its ack
        assert stats.completed == 3 and not stats.errored
    finally:
        server.close()


async def test_a_call_refused_by_a_backend_goaway_is_retried_on_a_new_connection(
    grpc_router: GrpcRouterFactory
) -> None:
    """The only backend answers the first call's stream with GOAWAY(last-stream-id 0): the
    call was never processed, so it goes to a new connection to the same backend (no other
    backend needed), and the refusing connection retires."""
    refused: list[int] = []

    async def backend(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = H2Connection(client=False)
        writer.write(conn.data_to_send())
        while data := await reader.read(65_536):
            for event in conn.receive_data(data):
                if not isinstance(event, HeadersReceived) or event.trailers:
                    continue
                if dict(event.headers).get(":path") == ECHO + "Unary" and not refused:
                    refused.append(event.stream_id)
                    conn.goaway(last_stream_id=max(event.stream_id - 2, 0))
                    continue
                conn.send_headers(event.stream_id, [(":status", "200"),
                                                    ("content-type", "application/grpc")])
                conn.send_data(event.stream_id, _grpc_body(b"pong"))
                conn.send_headers(event.stream_id, [("grpc-status", "0")], end_stream=True)
            writer.write(conn.data_to_send())
        writer.close()

    server = await asyncio.start_server(backend, "127.0.0.1", 0)
    address = f"127.0.0.1:{server.sockets[0].getsockname()[1]}"
    router = await grpc_router([grpc_backend(address)], {"health": {"interval_s": 60.0}})
    try:
        async with router.channel() as channel:
            answer = await channel.unary_unary(ECHO + "Unary")(b"ping", timeout=CALL_TIMEOUT_S)
    finally:
        server.close()
    assert answer == b"pong" and refused
    upstream = router.backend(address)["calls"]
    assert upstream["connections_retired"]["goaway"] == 1 and upstream["dials"] == 2
    stats = router.app.stats
    assert stats.completed == 1 and not stats.errored


async def test_a_client_that_never_acks_the_drain_ping_gets_the_final_goaway_in_time(
    kserve_backend: Backends, grpc_router: GrpcRouterFactory
) -> None:
    """Raw HTTP/2: a call in flight, the drain's PING left unanswered. The final GOAWAY comes
    after grpc.drain_goaway_timeout_s, naming that call's stream; a stream opened after it is
    refused (REFUSED_STREAM), and the call in flight is still answered."""
    backend = kserve_backend()
    router = await grpc_router([grpc_backend(backend.address)],
                               {"grpc": {"drain_goaway_timeout_s": 0.3}})
    host, port = router.target.rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))

    def call(stream_id: int) -> bytes:
        headers = [(":method", "POST"), (":scheme", "http"), (":path", ECHO + "ServerStream"),
                   (":authority", "x"), ("content-type", "application/grpc"),
                   ("te", "trailers"), ("x-echo-delay-ms", "1000"), ("x-echo-count", "1")]
        return (f.encode_headers(stream_id, b"\x20" + encode_block(headers), False, 16_384)
                + f.encode_data(stream_id, _grpc_body(b"x"), True, 16_384))

    writer.write(f.PREFACE + f.encode_settings([]) + call(1))
    decoder, loop = f.FrameDecoder(max_frame_size=1 << 20), asyncio.get_running_loop()
    seen: list[tuple[str, int, float]] = []  # (what, its stream or last-stream-id, when)
    try:
        await _until_in_flight(router, 1)
        router.start_drain()
        async with asyncio.timeout(CALL_TIMEOUT_S):
            while not any(what == "trailers" for what, _, _ in seen):
                data = await reader.read(65_536)
                assert data, f"closed early: {seen}"
                for kind, flags, stream_id, payload in decoder.receive(data):
                    if kind == f.GOAWAY:
                        seen.append(("goaway", f.read_goaway(payload, 0)[0], loop.time()))
                        if len([s for s in seen if s[0] == "goaway"]) == 2:
                            writer.write(call(3))  # after the final GOAWAY: refused
                    elif kind == f.PING and not flags & f.ACK:
                        seen.append(("ping", 0, loop.time()))  # and never acked
                    elif kind == f.RST_STREAM:
                        seen.append((f"rst {f.read_rst_stream(payload, stream_id)}",
                                     stream_id, loop.time()))
                    elif kind == f.HEADERS and flags & f.END_STREAM:
                        seen.append(("trailers", stream_id, loop.time()))
    finally:
        writer.close()
    kinds = [(what, value) for what, value, _ in seen]
    assert kinds[:3] == [("goaway", f.MAX_WINDOW), ("ping", 0), ("goaway", 1)], kinds
    assert (f"rst {f.REFUSED_STREAM}", 3) in kinds and ("trailers", 1) in kinds
    assert seen[2][2] - seen[0][2] >= 0.25  # the bound, not an ack, sent the final GOAWAY
    report = await router.wait_report()
    assert report.dropped == 0 and router.app.stats.completed == 1


@pytest.mark.parametrize(("timeout_s", "slack_s"), [
    (0.1, 0.05),   # never under the fixed slack
    (0.5, 0.1),    # a share of the timeout: the headers' transit grows with load
    (30.0, 1.0),   # never more than a second: a client's own cancel stays a cancel
])
def test_a_clients_reset_near_its_deadline_counts_as_the_deadlines(timeout_s: float,
                                                                   slack_s: float) -> None:
    assert client_reset_slack(timeout_s) == pytest.approx(slack_s)
