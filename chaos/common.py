"""Helpers shared by the chaos scenarios.

Starting the router and echo backends (``router.control.launcher``: the router is ready once
its banner is out, a backend once it printed ``READY <port>``), stopping them within a
bound, and the plain sequential load client.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import sys
import threading
import time
import urllib.request
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from router.client.frames import ConnectionLost, ErrorReply, FrameClient
from router.control.launcher import BlockingProcess, Stderr, launch_blocking
from router.protocol.announce import Banner, parse_banner, ready_port

REPO_ROOT = Path(__file__).resolve().parent.parent

STARTUP_TIMEOUT_S = 10.0
SHUTDOWN_GRACE_S = 20
# How much of the router's stderr a failed scenario keeps in its result.
STDERR_TAIL_CHARS = 3000

MODEL_INFER = "/inference.GRPCInferenceService/ModelInfer"

# Every process a scenario starts; the announcement it was waited on (a port, a ``Banner``)
# is its ``ready``.
Process = BlockingProcess[Any]


def free_port() -> int:
    """A port free on 127.0.0.1 right now (so a backend can be restarted on it later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def start_backend(module: str, *args: str, port: int = 0) -> tuple[BlockingProcess[int], int]:
    """Start ``python -m MODULE --port PORT ARGS`` (0: any port); return it and its port once
    it printed ``READY <port>``."""
    proc = launch_blocking(
        [sys.executable, "-m", module, "--port", str(port), *args], ready_port,
        cwd=REPO_ROOT, ready_timeout_s=STARTUP_TIMEOUT_S,
    )
    return proc, proc.ready


def start_echo(
    port: int = 0, *, delay_ms: float = 0.0, record_path: str | None = None
) -> tuple[BlockingProcess[int], int]:
    """Start ``backends.echo`` on ``port`` (0: any); wait for READY and return (proc, port)."""
    args = ["--delay-ms", str(delay_ms)]
    if record_path is not None:
        args += ["--record-ids", record_path]
    return start_backend("backends.echo", *args, port=port)


def start_echoes(count: int, procs: list[Process]) -> list[int]:
    """Start ``count`` plain echo backends, appending each to ``procs`` (so a failure later
    still reaps them); their ports."""
    ports = []
    for _ in range(count):
        proc, port = start_echo(0)
        procs.append(proc)
        ports.append(port)
    return ports


def start_router(
    backend_ports: list[int], stderr_file: Stderr, *, config_path: Path | None = None,
    shutdown_grace_s: float = SHUTDOWN_GRACE_S, listen_address: str = "127.0.0.1:0",
    reuse_port: bool = False, processes: int = 1,
) -> tuple[BlockingProcess[Banner], tuple[str, int], str]:
    """Start the router on free ports; return (proc, listen address, admin base URL).
    ``launch_router`` takes the same arguments and returns the whole ``Banner``.
    """
    proc, banner = launch_router(
        backend_ports, stderr_file, config_path=config_path, shutdown_grace_s=shutdown_grace_s,
        listen_address=listen_address, reuse_port=reuse_port, processes=processes,
    )
    return proc, banner.listen, banner.admin_url


def launch_router(
    backend_ports: list[int], stderr_file: Stderr, *, config_path: Path | None = None,
    shutdown_grace_s: float = SHUTDOWN_GRACE_S, listen_address: str = "127.0.0.1:0",
    reuse_port: bool = False, processes: int = 1,
) -> tuple[BlockingProcess[Banner], Banner]:
    """Start the router on free ports; return (proc, what its banner says).

    ``backend_ports`` become ``--backend`` flags (which replace a config file's backends);
    pass none to use the backends of ``config_path``. ``listen_address`` (default: any port)
    and ``reuse_port`` (``--reuse-port``) let several routers share one address;
    ``processes`` > 1 runs that many router processes under one supervisor (``--processes``).
    """
    cmd = [sys.executable, "-m", "router", "serve"]
    if config_path is not None:
        cmd += ["--config", str(config_path)]
    cmd += ["--listen", listen_address, "--admin", "127.0.0.1:0"]
    if reuse_port:
        cmd.append("--reuse-port")
    if processes > 1:
        cmd += ["--processes", str(processes)]
    for port in backend_ports:
        cmd += ["--backend", f"127.0.0.1:{port}"]
    cmd += ["--shutdown-grace", str(shutdown_grace_s), "--log-level", "INFO"]
    proc = launch_blocking(cmd, parse_banner, cwd=REPO_ROOT, stderr=stderr_file,
                           ready_timeout_s=STARTUP_TIMEOUT_S)
    return proc, proc.ready


def reap(procs: Iterable[Process]) -> None:
    """Kill whatever is still running and reap it (the last step of every run)."""
    for proc in procs:
        proc.kill()
        proc.stop()


def stop(proc: Process, timeout_s: float) -> int | None:
    """SIGTERM ``proc`` (if still running) and wait; kill it past the bound (returns None)."""
    code = proc.stop(timeout_s)
    return None if proc.killed else code


def wait_readyz(admin_base: str, timeout_s: float, interval_s: float = 0.02) -> bool:
    """Poll ``GET /readyz`` until it answers 200 (True) or ``timeout_s`` passes (False)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{admin_base}/readyz", timeout=1.0) as resp:
                if resp.status == 200:
                    return True
        except OSError:
            pass  # not up yet, or 503 (HTTPError is an OSError)
        time.sleep(interval_s)
    return False


# --------------------------------------------------------------------------- clients


@dataclass
class LoadState:
    """Outcomes of a client load, one per request id, in the order they were recorded."""

    total: int
    trigger_at: int
    done: int = 0
    reconnects: int = 0
    outcomes: dict[str, str] = field(default_factory=dict)
    latencies_s: dict[str, float] = field(default_factory=dict)  # answered requests only
    triggered: asyncio.Event = field(default_factory=asyncio.Event)
    on_record: Callable[[int], None] | None = None  # called with ``done`` after each outcome

    def record(self, request_id: str, outcome: str) -> None:
        self.outcomes[request_id] = outcome
        self.done += 1
        if self.done >= self.trigger_at:
            self.triggered.set()
        if self.on_record is not None:
            self.on_record(self.done)


async def timed_request(
    state: LoadState,
    request_id: str,
    send: Callable[[bytes], Awaitable[bytes]],
    timeout_s: float,
) -> None:
    """Send one request (its id is the payload) and record its outcome and latency."""
    sent_at = time.monotonic()
    try:
        answer = await asyncio.wait_for(send(request_id.encode()), timeout_s)
    except ErrorReply as exc:
        state.latencies_s[request_id] = time.monotonic() - sent_at
        state.record(request_id, f"error:{exc.code}")
    except ConnectionLost:
        state.record(request_id, "lost")
    except TimeoutError:
        state.record(request_id, "timeout")
    else:
        state.latencies_s[request_id] = time.monotonic() - sent_at
        state.record(request_id, "ok" if answer == request_id.encode() else "mismatch")


async def run_client(
    index: int, requests: int, addr: tuple[str, int], state: LoadState, *,
    connect_timeout_s: float = 2.0, request_timeout_s: float = 30.0,
) -> None:
    """One plain ``FrameClient`` (no retries) sending ``c{index}-r{i}`` one at a time."""
    conn: FrameClient | None = None
    try:
        for i in range(requests):
            request_id = f"c{index}-r{i}"
            if conn is None or conn.is_closing:
                if conn is not None:
                    with contextlib.suppress(Exception):
                        await asyncio.wait_for(conn.close(), connect_timeout_s)
                    state.reconnects += 1
                try:
                    conn = await asyncio.wait_for(
                        FrameClient.connect(*addr), connect_timeout_s)
                except (OSError, TimeoutError):
                    for j in range(i, requests):
                        state.record(f"c{index}-r{j}", "refused")
                    conn = None
                    return
            await timed_request(state, request_id, conn.request, request_timeout_s)
    finally:
        if conn is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(conn.close(), connect_timeout_s)


def _router_error(exc: Any) -> str | None:
    """The router's own error code on a gRPC status (``x-router-error``), if it set one."""
    for key, value in exc.trailing_metadata() or ():
        if key == "x-router-error":
            return str(value)
    return None


async def run_grpc_client(
    index: int, requests: int, target: str, state: LoadState, *,
    request_timeout_s: float = 30.0, model: str = "identity",
) -> None:
    """One grpc.aio channel (no retries) sending ModelInfer with id ``g{index}-r{i}``, one at a
    time. Outcomes: ``ok`` (the answer carries the id), ``refused`` (the router said DRAINING,
    or gRPC ended the call without the router's code: this and the remaining ids),
    ``lost`` (the router gave up on an accepted call: DROPPED), ``error:CODE`` (any other
    router error code or status), ``mismatch``, ``timeout``."""
    import grpc

    from router.protocol.proto import grpc_predict_v2_pb2 as pb

    async with grpc.aio.insecure_channel(target) as channel:
        infer = channel.unary_unary(MODEL_INFER)
        for i in range(requests):
            request_id = f"g{index}-r{i}"
            request = pb.ModelInferRequest(model_name=model, id=request_id)
            request.inputs.add(name="INPUT0", datatype="FP32", shape=[1])
            request.raw_input_contents.append(b"\x00\x00\x80\x3f")  # 1.0
            sent_at = time.monotonic()
            try:
                answer = await infer(request.SerializeToString(), timeout=request_timeout_s)
            except grpc.aio.AioRpcError as exc:
                code, status = _router_error(exc), exc.code()
                if status == grpc.StatusCode.DEADLINE_EXCEEDED and code is None:
                    state.record(request_id, "timeout")
                    continue
                unreached = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)
                if code == "DRAINING" or (code is None and status in unreached):
                    # Refused; or gRPC itself ended it without the router's code: the server
                    # had stopped (UNAVAILABLE) or was stopping and cancelled calls no handler
                    # had taken yet (CANCELLED). A real client moves to another router; the
                    # invariants check that none of these ids was processed.
                    for j in range(i, requests):
                        state.record(f"g{index}-r{j}", "refused")
                    return
                if code == "DROPPED":
                    state.record(request_id, "lost")
                    continue
                state.record(request_id, f"error:{code or status.name}")
                continue
            state.latencies_s[request_id] = time.monotonic() - sent_at
            answered = pb.ModelInferResponse.FromString(answer).id
            state.record(request_id, "ok" if answered == request_id else "mismatch")


# --------------------------------------------------------------------------- admin /backends


def get_backends(admin_base: str, timeout_s: float = 1.0) -> list[dict[str, Any]]:
    with urllib.request.urlopen(f"{admin_base}/backends", timeout=timeout_s) as resp:
        body: bytes = resp.read()
    data: list[dict[str, Any]] = json.loads(body)
    return data


class BackendsPoller(threading.Thread):
    """GET /backends every ``interval_s`` (bounded in time and count); keep every sample.

    A sample is ``(monotonic time the answer arrived, {address: backend stats})``.
    """

    def __init__(
        self, admin_base: str, *, interval_s: float = 0.02, max_s: float = 120.0,
        max_samples: int = 20_000,
    ) -> None:
        super().__init__(name="backends-poller", daemon=True)
        self._admin = admin_base
        self._interval_s = interval_s
        self._max_s = max_s
        self._max_samples = max_samples
        self._stop_event = threading.Event()
        self._lock = threading.Lock()
        self._samples: list[tuple[float, dict[str, dict[str, Any]]]] = []
        self.errors = 0

    def run(self) -> None:
        deadline = time.monotonic() + self._max_s
        while (not self._stop_event.is_set() and time.monotonic() < deadline
               and len(self._samples) < self._max_samples):
            try:
                backends = get_backends(self._admin)
            except (OSError, ValueError):
                self.errors += 1  # the admin endpoint goes away when the router exits
            else:
                sample = (time.monotonic(), {b["address"]: b for b in backends})
                with self._lock:
                    self._samples.append(sample)
            self._stop_event.wait(self._interval_s)

    def samples(self) -> list[tuple[float, dict[str, dict[str, Any]]]]:
        with self._lock:
            return list(self._samples)

    def latest(self) -> dict[str, dict[str, Any]] | None:
        with self._lock:
            return self._samples[-1][1] if self._samples else None

    def stop(self) -> None:
        self._stop_event.set()
        self.join(timeout=2.0)


def first_sample_after(
    samples: list[tuple[float, dict[str, dict[str, Any]]]], after: float, address: str,
    healthy: bool,
) -> tuple[float, dict[str, Any]] | None:
    """The first sample taken after ``after`` showing ``address`` with that health."""
    for at, backends in samples:
        stats = backends.get(address)
        if at >= after and stats is not None and stats["healthy"] is healthy:
            return at, stats
    return None


def last_sample_before(
    samples: list[tuple[float, dict[str, dict[str, Any]]]], before: float, address: str,
) -> dict[str, Any] | None:
    found = None
    for at, backends in samples:
        if at > before:
            break
        found = backends.get(address, found)
    return found


def judged(result: dict[str, Any], invariants: dict[str, bool], stderr_text: str
           ) -> dict[str, Any]:
    """``result`` with its ``invariants`` and verdict, and the router's stderr tail when a
    check failed (what an operator reads first)."""
    result["invariants"] = invariants
    result["passed"] = all(invariants.values())
    if not result["passed"]:
        result["router_stderr_tail"] = stderr_text[-STDERR_TAIL_CHARS:]
    return result


def format_summary(rows: list[tuple[str, Any]], invariants: dict[str, bool], passed: bool) -> str:
    rows = rows + [(f"  {name}", "ok" if ok else "FAIL") for name, ok in invariants.items()]
    rows.append(("PASSED" if passed else "FAILED", ""))
    width = max(len(str(k)) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


# --------------------------------------------------------------------------- process memory


class RssSampler(threading.Thread):
    """Sample the RSS of process ``pid`` every ``interval_s`` (bounded in time and count).

    ``peak`` is the largest sample seen; a process that went away stops the sampling.
    """

    def __init__(
        self, pid: int, *, interval_s: float = 0.05, max_s: float = 120.0,
        max_samples: int = 10_000,
    ) -> None:
        super().__init__(name="rss-sampler", daemon=True)
        import psutil

        self._proc = psutil.Process(pid)
        self._interval_s = interval_s
        self._max_s = max_s
        self._max_samples = max_samples
        self._stop_event = threading.Event()
        self.samples = 0
        self.peak = 0

    def rss(self) -> int:
        rss: int = self._proc.memory_info().rss
        return rss

    def run(self) -> None:
        import psutil

        deadline = time.monotonic() + self._max_s
        while (not self._stop_event.is_set() and time.monotonic() < deadline
               and self.samples < self._max_samples):
            try:
                rss = self.rss()
            except psutil.Error:
                return
            self.samples += 1
            self.peak = max(self.peak, rss)
            self._stop_event.wait(self._interval_s)

    def stop(self) -> None:
        self._stop_event.set()
        self.join(timeout=2.0)
