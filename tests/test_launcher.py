"""The launcher against real tiny processes (``python -c`` scripts); the announcement formats.

Each script plays one way a process can behave at start and stop: READY late, after other
output, never, an early exit, a closed stdout, SIGTERM ignored. Every wait is bounded (the
launcher's own timeouts, small here, and ``asyncio.timeout`` around each test's awaits);
"reaped" is checked in /proc, where a child that was killed but not reaped stays a zombie.
"""

from __future__ import annotations

import asyncio
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from router.control.launcher import launch, launch_blocking, started
from router.core.errors import SpawnError
from router.protocol.announce import Banner, format_banner, format_ready, parse_banner, ready_port

WAIT_S = 10.0  # bound on every await; each script is ready or gone in well under a second

# Prints its pid (so a test can find the process after a failed launch), other lines, READY
# late and one more line, then waits for a signal.
READY_LATE = """
import os, sys, time
print("pid", os.getpid(), flush=True)
print("loading the model", flush=True)
time.sleep(0.3)
print("READY 4321\\nserving", flush=True)  # one write: "serving" is in the pipe before any stop
time.sleep(30)
"""
NEVER_READY = """
import os, time
print("pid", os.getpid(), flush=True)
print("still loading", flush=True)
time.sleep(30)
"""
EXITS_EARLY = """
import os, sys
print("pid", os.getpid(), flush=True)
print("cannot bind: address in use", file=sys.stderr, flush=True)
sys.exit(3)
"""
CLOSES_STDOUT = """
import os, time
print("pid", os.getpid(), flush=True)
os.close(1)
time.sleep(30)
"""
IGNORES_SIGTERM = """
import signal, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
print("READY 1234", flush=True)
time.sleep(30)
"""
SILENT = "import time; time.sleep(30)"


def script(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def reaped(pid: int) -> bool:
    """Gone from the process table: killed (or exited) and waited for."""
    return not Path(f"/proc/{pid}").exists()


def pid_in(message: str) -> int:
    match = re.search(r"pid (\d+)", message)
    assert match is not None, message
    return int(match[1])


# -- asyncio ----------------------------------------------------------------------------------


async def test_ready_late_after_other_output_then_stopped_by_sigterm(tmp_path: Path) -> None:
    log_paths: list[Path] = []

    def log_path(pid: int) -> Path:
        log_paths.append(tmp_path / f"p-{pid}.log")
        return log_paths[-1]

    async with asyncio.timeout(WAIT_S):
        started_at = time.monotonic()
        proc = await launch(script(READY_LATE), ready_port, log_path=log_path,
                            ready_timeout_s=WAIT_S)
        assert time.monotonic() - started_at >= 0.3  # it waited for the late line
        assert proc.ready == 4321
        assert proc.returncode is None
        assert proc.output_tail()[1:3] == ["loading the model", "READY 4321"]
        code = await proc.stop()
    assert code == -signal.SIGTERM and not proc.killed
    assert reaped(proc.pid)
    # The whole of stdout went to the log, what came after READY too.
    assert log_paths == [tmp_path / f"p-{proc.pid}.log"]
    assert log_paths[0].read_text().splitlines()[1:] == [
        "loading the model", "READY 4321", "serving"]


async def test_never_ready_is_killed_reaped_and_the_error_quotes_its_output() -> None:
    async with asyncio.timeout(WAIT_S):
        started_at = time.monotonic()
        with pytest.raises(SpawnError, match=r"announced nothing within 0\.5s") as caught:
            await launch(script(NEVER_READY), ready_port, ready_timeout_s=0.5)
    assert time.monotonic() - started_at < 0.5 + WAIT_S / 2
    assert "still loading" in caught.value.message
    assert caught.value.code == "SPAWN_FAILED"
    assert reaped(pid_in(caught.value.message))


async def test_early_exit_names_the_status_and_quotes_stdout_and_stderr(tmp_path: Path) -> None:
    stderr_path = tmp_path / "stderr.log"
    async with asyncio.timeout(WAIT_S):
        with pytest.raises(SpawnError, match="exited with status 3 before it was ready") as caught:
            await launch(script(EXITS_EARLY), ready_port, stderr=stderr_path,
                         ready_timeout_s=WAIT_S)
    message = caught.value.message
    assert "cannot bind: address in use" in message  # from the stderr file
    assert reaped(pid_in(message))  # the pid came from stdout


async def test_stdout_closed_before_ready_is_a_failure_and_the_process_is_killed() -> None:
    async with asyncio.timeout(WAIT_S):
        with pytest.raises(SpawnError, match="closed its stdout before it was ready") as caught:
            await launch(script(CLOSES_STDOUT), ready_port, ready_timeout_s=WAIT_S)
    assert reaped(pid_in(caught.value.message))


async def test_sigterm_ignored_means_sigkill_after_the_bound() -> None:
    async with asyncio.timeout(WAIT_S):
        proc = await launch(script(IGNORES_SIGTERM), ready_port, ready_timeout_s=WAIT_S)
        stopping_at = time.monotonic()
        code = await proc.stop(timeout_s=0.3)
    assert code == -signal.SIGKILL and proc.killed
    assert 0.3 <= time.monotonic() - stopping_at < WAIT_S / 2
    assert reaped(proc.pid)


async def test_a_cancelled_launch_kills_and_reaps_the_process(tmp_path: Path) -> None:
    pids: list[int] = []

    def log_path(pid: int) -> Path:
        pids.append(pid)
        return tmp_path / "never.log"

    async with asyncio.timeout(WAIT_S):
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(
                launch(script(NEVER_READY), ready_port, log_path=log_path,
                       ready_timeout_s=WAIT_S), 0.5)
    assert len(pids) == 1 and reaped(pids[0])


async def test_started_is_ready_without_any_output() -> None:
    async with asyncio.timeout(WAIT_S):
        proc = await launch(script(SILENT), started, ready_timeout_s=WAIT_S)
        assert proc.ready is True and proc.returncode is None
        proc.kill()
        assert await proc.wait() == -signal.SIGKILL
        assert await proc.stop() == -signal.SIGKILL  # already exited: nothing to signal
    assert not proc.killed  # stop did not have to kill it


# -- the blocking driver ----------------------------------------------------------------------


def _launcher_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("launcher ")]


def test_blocking_wait_signal_and_stop_behave_like_popen() -> None:
    before = len(_launcher_threads())
    proc = launch_blocking(script(READY_LATE), ready_port, ready_timeout_s=WAIT_S)
    assert proc.ready == 4321 and proc.poll() is None
    assert len(_launcher_threads()) == before + 1
    with pytest.raises(subprocess.TimeoutExpired):
        proc.wait(timeout=0.1)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=WAIT_S) == -signal.SIGTERM
    assert proc.stop() == -signal.SIGTERM and proc.stop() == -signal.SIGTERM  # idempotent
    assert reaped(proc.pid)
    assert len(_launcher_threads()) == before  # stop ended the loop thread


def test_blocking_failure_raises_and_leaves_no_thread_behind() -> None:
    before = len(_launcher_threads())
    with pytest.raises(SpawnError, match="exited with status 3") as caught:
        launch_blocking(script(EXITS_EARLY), ready_port, stderr=subprocess.DEVNULL,
                        ready_timeout_s=WAIT_S)
    assert reaped(pid_in(caught.value.message))
    assert len(_launcher_threads()) == before


def test_blocking_stop_kills_a_process_that_ignores_sigterm() -> None:
    with launch_blocking(script(IGNORES_SIGTERM), ready_port, ready_timeout_s=WAIT_S) as proc:
        assert proc.stop(timeout_s=0.3) == -signal.SIGKILL
        assert proc.killed
    assert reaped(proc.pid)


# -- what a process announces -----------------------------------------------------------------


hosts = st.sampled_from(["127.0.0.1", "0.0.0.0", "::1", "::", "localhost", "10.1.2.3"])
ports = st.integers(min_value=1, max_value=65535)
addresses = st.tuples(hosts, ports)


@given(addresses, addresses, st.none() | addresses, st.none() | addresses,
       st.none() | addresses, st.text(max_size=30).filter(str.isprintable))
def test_banner_round_trip(listen: tuple[str, int], admin: tuple[str, int],
                           grpc: tuple[str, int] | None, admin_grpc: tuple[str, int] | None,
                           anyserve: tuple[str, int] | None, extra: str) -> None:
    banner = Banner(listen, admin, grpc, admin_grpc, anyserve)
    lines = format_banner(banner, f"backends: {extra}").splitlines()
    assert parse_banner(lines) == banner
    # Log lines around it change nothing; until the admin line is out there is no banner.
    assert parse_banner(["INFO starting", *lines, "INFO serving"]) == banner
    admin_at = next(i for i, line in enumerate(lines) if line.startswith("  admin: "))
    assert parse_banner(lines[:admin_at]) is None


def test_banner_urls_and_targets() -> None:
    banner = Banner(("127.0.0.1", 7070), ("127.0.0.1", 7072), ("::", 8081))
    assert banner.admin_url == "http://127.0.0.1:7072"
    assert banner.grpc_target == ":::8081"
    assert Banner(("h", 1), ("h", 2)).grpc_target is None


def test_parse_banner_ignores_lines_that_only_look_alike() -> None:
    assert parse_banner(["  admin: http://127.0.0.1:9/metrics"]) is None  # no listen line first
    assert parse_banner(["something listening on 1.2.3.4:5 (x)",
                         "  admin: http://127.0.0.1:9/metrics"]) is None


@given(ports)
def test_ready_line_round_trip(port: int) -> None:
    assert ready_port([format_ready(port)]) == port
    assert ready_port(["READY 1", format_ready(port)]) == port


@pytest.mark.parametrize("line", [
    "READY 0", "READY 65536", "READY", "READY x", "READY 12 extra", "ready 80",
    "READY \u0661\u0662",  # Arabic-Indic digits: str.isdigit() is true, int() would be wrong
])
def test_ready_port_rejects_anything_but_a_port(line: str) -> None:
    assert ready_port([line]) is None


def test_ready_port_reads_only_the_latest_line() -> None:
    assert ready_port([]) is None
    assert ready_port(["READY 80", "a later line"]) is None
