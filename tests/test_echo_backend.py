"""The echo backend and the load generator, as real processes over real sockets."""

from __future__ import annotations

import signal
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from bench.load import run_load
from router.control.launcher import BlockingProcess
from router.protocol.frames import FrameDecoder, encode_frame
from tests.support import backend_processes

IO_TIMEOUT_S = 5.0


@contextmanager
def echo_backend(*args: str) -> Iterator[tuple[BlockingProcess[int], int]]:
    """Start ``python -m backends.echo --port 0 ARGS``; yield (process, port) once READY."""
    with backend_processes("backends.echo") as start:
        backend = start(*args)
        yield backend.proc, backend.port


def connect(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=IO_TIMEOUT_S)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def read_frames(sock: socket.socket, count: int) -> tuple[list[bytes], bool]:
    """Up to ``count`` frames; the bool says whether the peer closed the connection."""
    decoder = FrameDecoder(accept_error_flag=True)
    frames: list[bytes] = []
    for _ in range(1000):  # bounded; each recv blocks at most IO_TIMEOUT_S
        if len(frames) >= count:
            return frames, False
        try:
            data = sock.recv(65536)
        except ConnectionResetError:
            return frames, True
        if not data:
            return frames, True
        frames += decoder.feed(data)
    raise AssertionError("too many reads")


def test_echoes_frames_and_answers_the_zero_length_probe() -> None:
    payloads = [b"hello", b"", b"x" * 100_000, bytes(range(256))]
    with echo_backend() as (_, port), connect(port) as sock:
        sock.sendall(b"".join(encode_frame(p) for p in payloads))  # pipelined
        frames, closed = read_frames(sock, len(payloads))
        assert frames == payloads
        assert not closed
        sock.sendall(encode_frame(b""))
        assert read_frames(sock, 1) == ([b""], False)


def test_close_after_n_answers() -> None:
    with echo_backend("--close-after", "3") as (_, port), connect(port) as sock:
        sock.sendall(encode_frame(b"a") + encode_frame(b"b"))
        assert read_frames(sock, 2) == ([b"a", b"b"], False)
        sock.sendall(encode_frame(b"c") + encode_frame(b"d"))  # d is never answered
        frames, closed = read_frames(sock, 2)
        assert frames == [b"c"]
        assert closed


def test_fail_rate_one_drops_the_connection_unanswered() -> None:
    with echo_backend("--fail-rate", "1") as (_, port), connect(port) as sock:
        sock.sendall(encode_frame(b"doomed"))
        assert read_frames(sock, 1) == ([], True)


def test_delay_keeps_request_order_and_records_ids(tmp_path: Path) -> None:
    record = tmp_path / "ids.txt"
    payloads = [f"req-{i}".encode() for i in range(20)]
    with echo_backend("--delay-ms", "20", "--record-ids", str(record)) as (proc, port):
        with connect(port) as sock:
            sock.sendall(b"".join(encode_frame(p) for p in [*payloads, b""]))
            assert read_frames(sock, len(payloads) + 1) == ([*payloads, b""], False)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=IO_TIMEOUT_S) == 0
    # The empty probe is answered but not recorded.
    assert record.read_text().splitlines() == [p.decode() for p in payloads]


def test_oversize_frame_closes_the_connection() -> None:
    with echo_backend() as (_, port), connect(port) as sock:
        sock.sendall((64 * 1024 * 1024).to_bytes(4, "big"))
        assert read_frames(sock, 1) == ([], True)


@pytest.mark.parametrize("mode", ["persistent", "per-request"])
def test_run_load_against_echo(mode: str) -> None:
    with echo_backend() as (_, port):
        report = run_load(
            "127.0.0.1", port, connections=4, requests=50, processes=1, pipeline=2,
            mode="per-request" if mode == "per-request" else "persistent", hard_timeout_s=30,
        )
    assert report["ok"] == 200
    assert report["errors"] == {}
    assert report["error_total"] == 0
    assert report["sent"] == 200
    assert report["unsent"] == 0
    assert report["connections_opened"] == (4 if mode == "persistent" else 200)
    assert report["workers_lost"] == 0 and report["worker_errors"] == []
    assert report["p50_us"] is not None and report["max_us"] is not None
    assert 0 < report["p50_us"] <= report["max_us"]


def test_run_load_counts_connect_failures() -> None:
    with socket.socket() as probe:  # a port that was free a moment ago: nothing listens
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    report = run_load("127.0.0.1", port, connections=2, requests=10, processes=1,
                      hard_timeout_s=30)
    assert report["ok"] == 0
    assert report["connect_failures"] == 6  # each lane gives up after 3 in a row
    assert report["errors"] == {"connect_failed": 6}
    assert report["ok"] + report["error_total"] + report["unsent"] == 20
