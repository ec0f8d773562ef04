"""The parts of ``make bench-registry`` whose figures the benchmark reports, as real processes:
``backends.echo_many`` (many echo backends in one process, and the tallies a benchmark reads
back) and ``bench.admin_load`` (registration and the heartbeat generator) against a serving
router."""

from __future__ import annotations

import asyncio
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from backends.echo_many import socket_path
from bench.admin_load import AdminError, HeartbeatLoad, HeartbeatSpec, register_all
from bench.registry_scale import control
from router.control.launcher import BlockingProcess, launch_blocking
from router.protocol.announce import ready_unix_path
from router.protocol.frames import FrameDecoder, encode_frame
from tests.conftest import RouterFactory
from tests.support import READY_TIMEOUT_S, REPO_ROOT, STOP_TIMEOUT_S, child_env

TOKEN = "scale-token"


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A directory with a short path: a unix socket path is at most 107 bytes."""
    with tempfile.TemporaryDirectory(prefix="em-", dir="/tmp") as directory:
        yield Path(directory)


@pytest.fixture
def echo_many(short_dir: Path) -> Iterator[tuple[BlockingProcess[str], Path]]:
    process = launch_blocking(
        [sys.executable, "-m", "backends.echo_many", "--dir", str(short_dir), "--count", "3"],
        ready_unix_path, cwd=REPO_ROOT, env=child_env(), ready_timeout_s=READY_TIMEOUT_S)
    try:
        yield process, short_dir
    finally:
        process.stop(STOP_TIMEOUT_S)


def exchange(path: str, payloads: list[bytes]) -> list[bytes]:
    """Send ``payloads`` pipelined on one connection to a unix socket; its answers."""
    import socket

    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(5.0)
        sock.connect(path)
        sock.sendall(b"".join(encode_frame(p) for p in payloads))
        decoder, frames = FrameDecoder(), []
        for _ in range(100):  # bounded; each recv waits at most 5 s
            if len(frames) >= len(payloads):
                break
            frames += decoder.feed(sock.recv(65536))
        return frames


def test_echo_many_serves_each_socket_and_tallies_requests_but_not_probes(
        echo_many: tuple[BlockingProcess[str], Path]) -> None:
    process, directory = echo_many
    assert process.ready == str(directory / "control.sock")
    before = time.monotonic_ns()
    assert exchange(socket_path(directory, 0), [b"a", b"", b"bb"]) == [b"a", b"", b"bb"]
    assert exchange(socket_path(directory, 2), [b""]) == [b""]  # a health probe only
    assert exchange(socket_path(directory, 2), [b"c"]) == [b"c"]
    stats = control(directory, b"stats")
    (served0, first0, last0), (served1, *_), (served2, first2, last2) = stats["backends"]
    assert (served0, served1, served2) == (2, 0, 1)
    # One clock for every process: the stamps fall between ours.
    assert before <= first0 <= last0 <= first2 == last2 <= stats["now_ns"] <= time.monotonic_ns()
    assert control(directory, b"reset") == {}
    assert control(directory, b"stats")["backends"] == [[0, 0, 0]] * 3
    assert "error" in control(directory, b"what")


def test_echo_many_refuses_a_count_out_of_range(short_dir: Path) -> None:
    import subprocess

    done = subprocess.run(
        [sys.executable, "-m", "backends.echo_many", "--dir", str(short_dir), "--count", "0"],
        cwd=REPO_ROOT, env=child_env(), capture_output=True, text=True, timeout=30)
    assert done.returncode == 2
    assert "--count must be in 1..10000" in done.stderr


async def test_registration_and_heartbeat_load_agree_with_the_routers_own_counts(
        echo_many: tuple[BlockingProcess[str], Path], router_factory: RouterFactory,
        tmp_path: Path) -> None:
    _, directory = echo_many
    token_file = tmp_path / "admin.token"
    token_file.write_text(TOKEN)
    router = await router_factory([], {"admin": {"token_file": str(token_file)}})
    bodies = [{"id": f"b{i}", "address": f"unix:{socket_path(directory, i)}",
               "models": [f"m{i}"], "lease_ttl_s": 30} for i in range(3)]
    sent = time.monotonic_ns()
    answered = await register_all(router.admin_url, TOKEN, bodies, concurrency=2)
    assert sorted(answered) == ["b0", "b1", "b2"]
    assert all(sent < at <= time.monotonic_ns() for at in answered.values())
    client = await router.client()
    assert [await client.request(b"x%d" % i) for i in range(6)] == [b"x%d" % i for i in range(6)]
    assert sum(served for served, _, _ in control(directory, b"stats")["backends"]) == 6
    with pytest.raises(AdminError, match="409"):  # the address of b0, another id
        await register_all(router.admin_url, TOKEN, [{**bodies[0], "id": "other",
                                                      "lease_ttl_s": None}])

    # 4 ids (one unknown) every 0.4 s: 10 a second, for 2 s. The generator blocks, and the
    # router serves on this loop: run it on a thread.
    spec = HeartbeatSpec(router.admin_url, TOKEN, ("b0", "b1", "b2", "nobody"), 0.4,
                         connections=2)
    load = await asyncio.to_thread(HeartbeatLoad, spec)
    try:
        started = time.monotonic()
        await asyncio.sleep(2.0)  # the load runs for a stretch of time; nothing to wait for
        counts = await asyncio.to_thread(load.stop)
        elapsed = time.monotonic() - started
    finally:
        await asyncio.to_thread(load.close)
    heartbeats = router.app.directory.heartbeats
    assert (counts["ok"], counts["not_found"], counts["failed"]) == (
        heartbeats["ok"], heartbeats["lease_not_found"], heartbeats["failed"])
    assert counts["failed"] == 0
    assert sorted(counts["last_ok_sent_ns"]) == ["b0", "b1", "b2"]
    # It never runs ahead of its schedule; on a loaded machine it may fall behind.
    rounds = elapsed / spec.interval_s + 1
    assert 3 <= counts["ok"] <= 3 * rounds + 3
    assert 1 <= counts["not_found"] <= rounds + 1
    assert len(counts["latencies_us"]) == counts["ok"]

