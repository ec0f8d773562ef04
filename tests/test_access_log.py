"""The access log (router/control/access_log.py, fed by router/dispatch/access.py).

The writer on its own (a file, /dev/full, a buffer that fills), then a real router with a TCP
echo backend and a KServe backend (processes on loopback): one line per TCP request and per
gRPC call, with the right fields; and the same router with the log off, which attaches
nothing and writes no file.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import orjson
import pytest

from router.cli import _parser, build_config
from router.control.access_log import JsonLinesAccessLog, format_line
from router.dispatch.access import AccessEntry, format_peer
from router.protocol.frames import encode_frame
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
)

__all__ = ["echo_backend", "grpc_router", "kserve_backend"]  # fixtures, imported for pytest

FIELDS = ["time", "front_door", "client", "method", "model", "backend", "status", "error",
          "bytes_in", "bytes_out", "duration_ms"]
MODEL_STREAM_INFER = "/inference.GRPCInferenceService/ModelStreamInfer"
SERVER_LIVE = "/inference.GRPCInferenceService/ServerLive"
WAIT_S = 10.0


def _lines(path: Path) -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in path.read_bytes().splitlines()]


# -- the writer --------------------------------------------------------------------------------


def test_a_line_has_every_field_in_order_and_utc_milliseconds() -> None:
    entry = AccessEntry("tcp", "127.0.0.1:5000", None, "m", "127.0.0.1:9001", "ERROR",
                        "OVERLOADED", 12, 0, 0.0012345)
    line = orjson.loads(format_line(1_700_000_000.1234, entry))
    assert list(line) == FIELDS
    assert line["time"] == "2023-11-14T22:13:20.123Z"
    assert line["duration_ms"] == 1.234  # rounded to the microsecond
    assert (line["status"], line["error"], line["bytes_in"]) == ("ERROR", "OVERLOADED", 12)


def test_peers_are_written_host_colon_port() -> None:
    assert format_peer(("127.0.0.1", 5000)) == "127.0.0.1:5000"
    assert format_peer(("::1", 5000, 0, 0)) == "[::1]:5000"
    assert format_peer("/tmp/router.sock") == "/tmp/router.sock"
    assert format_peer(None) is None


def test_entries_are_written_by_the_thread_and_flushed_on_close(tmp_path: Path) -> None:
    path = tmp_path / "access.log"
    clock = iter(range(1000, 2000))
    log = JsonLinesAccessLog(str(path), 100, wall_clock=lambda: float(next(clock)))
    log.start()
    for i in range(50):
        log.write(AccessEntry("tcp", "127.0.0.1:1", bytes_in=i))
    log.close()
    lines = _lines(path)
    assert [line["bytes_in"] for line in lines] == list(range(50))
    assert lines[0]["time"] == "1970-01-01T00:16:40.000Z"  # stamped at write, not at flush
    assert log.statistics() == {"path": str(path), "written": 50, "dropped": 0, "buffered": 0,
                                "write_errors": 0}


def test_a_full_buffer_drops_new_entries_and_counts_them(tmp_path: Path) -> None:
    path = tmp_path / "access.log"
    log = JsonLinesAccessLog(str(path), 10)  # not started: nothing drains the buffer yet
    for i in range(13):
        log.write(AccessEntry("tcp", None, bytes_in=i))  # returns at once, full or not
    assert (log.dropped_full, log.statistics()["buffered"]) == (3, 10)
    log.start()
    log.close()
    assert [line["bytes_in"] for line in _lines(path)] == list(range(10))
    log.write(AccessEntry("tcp", None))
    assert log.dropped == 4  # closed: dropped, not buffered


def test_a_file_that_refuses_writes_loses_lines_counted_and_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    log = JsonLinesAccessLog("/dev/full", 100)  # every write fails with ENOSPC
    log.start()
    for _ in range(5):
        log.write(AccessEntry("tcp", None))
    log.close()
    assert (log.written, log.dropped_unwritable) == (0, 5)
    assert log.write_errors >= 1
    assert "access log: cannot write to /dev/full" in caplog.text


def test_a_log_rotated_away_is_reopened(tmp_path: Path) -> None:
    path = tmp_path / "access.log"
    log = JsonLinesAccessLog(str(path), 100)
    log.start()
    log.write(AccessEntry("tcp", None, bytes_in=1))
    deadline = time.monotonic() + WAIT_S
    while log.written < 1 and time.monotonic() < deadline:  # the writer thread, not the loop
        time.sleep(0.01)
    path.rename(tmp_path / "access.log.1")
    log.reopen()
    log.write(AccessEntry("tcp", None, bytes_in=2))
    log.close()
    assert [line["bytes_in"] for line in _lines(tmp_path / "access.log.1")] == [1]
    assert [line["bytes_in"] for line in _lines(path)] == [2]


def test_the_access_log_flag_sets_its_path() -> None:
    args = _parser().parse_args(["serve", "--backend", "127.0.0.1:9001", "--access-log", "-"])
    assert build_config(args).access_log.path == "-"
    args = _parser().parse_args(["serve", "--backend", "127.0.0.1:9001"])
    assert build_config(args).access_log.path is None


# -- a real router -----------------------------------------------------------------------------


async def _tcp_request(host: str, port: int, payload: bytes) -> tuple[str, bytes]:
    """Send one frame on a new connection; (our address as HOST:PORT, the answer)."""
    async with asyncio.timeout(WAIT_S):
        reader, writer = await asyncio.open_connection(host, port)
        try:
            writer.write(encode_frame(payload))
            length = int.from_bytes(await reader.readexactly(4), "big")
            answer = await reader.readexactly(length)
        finally:
            writer.close()
            await writer.wait_closed()
    local = writer.get_extra_info("sockname")
    return f"{local[0]}:{local[1]}", answer


async def test_one_line_per_tcp_request_and_per_grpc_call_with_their_fields(
    tmp_path: Path, kserve_backend: Callable[..., KServeBackend],
    echo_backend: Callable[..., EchoBackend], grpc_router: GrpcRouterFactory,
) -> None:
    kserve, echo = kserve_backend(), echo_backend()
    path = tmp_path / "access.log"
    router = await grpc_router(
        [grpc_backend(kserve.address, "sum"), {"address": echo.address}],
        {"access_log": {"path": str(path)}},
    )
    started = dt.datetime.now(dt.UTC)
    assert router.app.bound is not None
    host, port = router.app.bound.listen
    clients = [await _tcp_request(host, port, b"x" * n) for n in (1, 200, 3000)]
    assert [answer for _, answer in clients] == [b"x", b"x" * 200, b"x" * 3000]
    infer = infer_request("sum", [1.0, 2.0])
    async with router.channel() as channel:
        response = await channel.unary_unary(MODEL_INFER)(infer, timeout=CALL_TIMEOUT_S)
        with pytest.raises(grpc.aio.AioRpcError) as unknown:
            await channel.unary_unary(MODEL_INFER)(infer_request("nope", [1.0]),
                                                   timeout=CALL_TIMEOUT_S)
        assert unknown.value.code() == grpc.StatusCode.NOT_FOUND
        await channel.unary_unary(SERVER_LIVE)(b"", timeout=CALL_TIMEOUT_S)
        messages = [infer_request("sum", [float(i)]) for i in range(3)]
        stream = channel.stream_stream(MODEL_STREAM_INFER)(iter(messages), timeout=CALL_TIMEOUT_S)
        answers = [answer async for answer in stream]
    await router.stop()  # closing the app writes what is buffered and closes the file
    lines = _lines(path)
    assert all(list(line) == FIELDS for line in lines)
    for line in lines:
        stamp = dt.datetime.fromisoformat(line["time"])
        assert started - dt.timedelta(seconds=1) <= stamp <= dt.datetime.now(dt.UTC)
        assert line["duration_ms"] >= 0
    tcp = [line for line in lines if line["front_door"] == "tcp"]
    assert [(t["client"], t["backend"], t["status"], t["error"], t["bytes_in"], t["bytes_out"])
            for t in tcp] == [(client, echo.address, "OK", None, n, n)
                              for (client, _), n in zip(clients, (1, 200, 3000), strict=True)]
    assert all(t["method"] is None and t["model"] is None for t in tcp)
    calls = {line["method"]: line for line in lines if line["front_door"] == "grpc"}
    assert len([line for line in lines if line["front_door"] == "grpc"]) == 4
    ok = next(line for line in lines if line["method"] == MODEL_INFER and line["status"] == "OK")
    assert (ok["model"], ok["backend"], ok["error"]) == ("sum", kserve.address, None)
    assert (ok["bytes_in"], ok["bytes_out"]) == (len(infer), len(response))
    assert ok["client"].startswith("127.0.0.1:")
    refused = next(line for line in lines if line["status"] == "NOT_FOUND")
    assert (refused["method"], refused["error"], refused["backend"]) == (
        MODEL_INFER, "UNKNOWN_MODEL", None)
    assert (calls[SERVER_LIVE]["status"], calls[SERVER_LIVE]["backend"]) == ("OK", None)
    streamed = calls[MODEL_STREAM_INFER]
    assert (streamed["model"], streamed["backend"], streamed["status"]) == (
        "sum", kserve.address, "OK")
    assert streamed["bytes_in"] == sum(map(len, messages))
    assert streamed["bytes_out"] == sum(map(len, answers))
    stats = router.app.statistics()["access_log"]
    assert (stats["written"], stats["dropped"]) == (len(lines), 0)


async def test_with_the_access_log_off_nothing_is_attached_and_no_file_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kserve_backend: Callable[..., KServeBackend],
    echo_backend: Callable[..., EchoBackend], grpc_router: GrpcRouterFactory,
) -> None:
    monkeypatch.chdir(tmp_path)  # where a relative path would have gone
    kserve, echo = kserve_backend(), echo_backend()
    router = await grpc_router([grpc_backend(kserve.address, "sum"), {"address": echo.address}])
    app = router.app
    assert app.access_log is None and app.dispatcher.access_log is None
    assert app.grpc_front is not None and app.grpc_front.access_log is None
    assert app.bound is not None
    _, answer = await _tcp_request(*app.bound.listen, b"ping")
    assert answer == b"ping"
    async with router.channel() as channel:
        await channel.unary_unary(MODEL_INFER)(infer_request("sum", [1.0]),
                                               timeout=CALL_TIMEOUT_S)
    await router.stop()
    assert app.statistics()["access_log"] is None
    assert os.listdir(tmp_path) == []
