"""Load generator for the length-prefixed protocol.

Usable as a library (``run_load(...) -> LoadReport``) and as
``python -m bench.load --port P --connections N --requests M ...``.

It shares two cores with the router and the backends, so the client side is kept cheap:
K worker processes (spawned, default ``min(2, cpu_count)``), each one uvloop loop driving its
share of connections as ``asyncio.Protocol`` clients. One task per connection ("lane"), none
per request: a response arriving in ``data_received`` settles the request and sends the next
one from the same callback, and the replies of one read are answered with one write.

Modes:

- ``persistent``: each lane opens a connection and sends ``requests`` requests on it, keeping up
  to ``pipeline`` in flight. If the connection is lost, its outstanding requests count as
  ``eof``/``reset`` errors and the lane reconnects for the rest of its budget.
- ``per-request``: each lane runs its requests one at a time, one connection per request
  (connect, send, read, close); latency then includes the connect.

With ``tls_ca`` (``--tls-ca``) every connection is TLS, verifying the server's certificate
against that CA for ``tls_server_name`` (default: the host); a handshake is part of the
connect (and, per request, of its latency).

Every payload is ``prefix + "<worker>.<lane>-<seq>"`` padded with spaces to ``payload_bytes``
(longer if the id does not fit) and the echo is checked byte for byte. Each request ends in
exactly one of: ``ok``, an error by kind, or ``unsent`` (budget left when the duration or hard
timeout stopped the run, or after a lane gave up on connecting), so
``ok + error_total + unsent == connections * requests``. Error kinds: the router's error-frame
codes (``OVERLOADED``, ...), ``connect_failed`` (one request of the lane's budget per failed
connect; a lane gives up after 3 in a row), ``eof``/``reset`` (connection lost with the request
outstanding), ``mismatch``, ``timeout`` (no answer within ``timeout_s``), ``aborted`` (still
outstanding at the hard timeout), ``protocol`` (undecodable response).

Latencies are exact: microseconds as ints in an ``array('l')`` per process, merged and sorted
in the parent. ``elapsed_s`` runs from the first worker's start to the last worker's end
(CLOCK_MONOTONIC is system-wide, so the processes' clocks agree); ``requests_per_s`` is
``ok / elapsed_s``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import multiprocessing as mp
import os
import resource
import ssl
import sys
import time
import traceback
from array import array
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from multiprocessing.synchronize import Event
from typing import Literal, TypedDict, cast

import uvloop

from router.core.errors import FrameTooLarge
from router.protocol.frames import ErrorFrame, FrameDecoder, encode_frame

Mode = Literal["persistent", "per-request"]

DEFAULT_TIMEOUT_S = 30.0
HARD_TIMEOUT_MARGIN_S = 60.0
# Without --duration the run is bounded by count; the hard timeout still needs a bound.
UNTIMED_RUN_BOUND_S = 300.0
# Connects in progress, shared out over the load processes: 10,000 simultaneous SYNs would
# overflow a 4096 backlog and cost 1 s SYN retransmits; 1,024 at a time keeps the ramp-up fast
# and loss-free, however many processes the load runs in.
CONNECT_CONCURRENCY = 1024
MAX_CONSECUTIVE_CONNECT_FAILURES = 3
CONNECT_BACKOFF_S = 0.05
# Spawning a worker (interpreter + imports) takes ~0.3 s; allow a loaded machine 30 s.
WORKER_READY_TIMEOUT_S = 30.0
WORKER_REPORT_GRACE_S = 30.0


@dataclass(frozen=True, slots=True)
class LoadSpec:
    host: str
    port: int
    connections: int
    requests: int  # per connection (lane)
    duration_s: float | None = None
    payload_bytes: int = 64
    pipeline: int = 1
    mode: Mode = "persistent"
    timeout_s: float = DEFAULT_TIMEOUT_S
    hard_timeout_s: float | None = None  # None: (duration_s or 300 s) + 60 s
    prefix: bytes = b""
    tls_ca: str | None = None  # a CA file: speak TLS, verifying the server against it
    tls_server_name: str | None = None  # the name the server's certificate must carry

    def __post_init__(self) -> None:
        checks = [
            (0 < self.port < 65536, f"port must be in 1..65535, got {self.port}"),
            (self.connections >= 1, f"connections must be >= 1, got {self.connections}"),
            (self.requests >= 1, f"requests must be >= 1, got {self.requests}"),
            (self.duration_s is None or self.duration_s > 0, "duration_s must be > 0"),
            (self.payload_bytes >= 1, "payload_bytes must be >= 1 (0 is the health probe)"),
            (self.pipeline >= 1, f"pipeline must be >= 1, got {self.pipeline}"),
            (self.mode in ("persistent", "per-request"), f"unknown mode {self.mode!r}"),
            (self.timeout_s > 0, "timeout_s must be > 0"),
            (self.hard_timeout_s is None or self.hard_timeout_s > 0, "hard_timeout_s must be > 0"),
        ]
        problems = [message for ok, message in checks if not ok]
        if problems:
            raise ValueError("; ".join(problems))

    @property
    def effective_hard_timeout_s(self) -> float:
        if self.hard_timeout_s is not None:
            return self.hard_timeout_s
        return (self.duration_s or UNTIMED_RUN_BOUND_S) + HARD_TIMEOUT_MARGIN_S


class WorkerResult(TypedDict):
    ok: int
    errors: dict[str, int]
    sent: int
    unsent: int
    connect_failures: int
    connections_opened: int
    start_ns: int
    end_ns: int
    timed_out: bool
    latencies_us: bytes  # array('l').tobytes()


class LoadReport(TypedDict):
    mode: str
    connections: int
    requests_per_connection: int
    pipeline: int
    payload_bytes: int
    processes: int
    ok: int
    errors: dict[str, int]
    error_total: int
    connect_failures: int
    sent: int
    unsent: int
    connections_opened: int
    elapsed_s: float
    requests_per_s: float
    p50_us: int | None
    p95_us: int | None
    p99_us: int | None
    p999_us: int | None
    max_us: int | None
    mean_us: float | None
    timed_out: bool
    workers_lost: int
    worker_errors: list[str]


class _Lane:
    """One connection slot: its request budget and id sequence."""

    __slots__ = ("failures", "label", "remaining", "seq")

    def __init__(self, label: str, requests: int) -> None:
        self.label = label
        self.remaining = requests
        self.seq = 0
        self.failures = 0  # consecutive connect failures


class _Client(asyncio.Protocol):
    """One connection of a lane; sends up to ``quota`` requests, ``depth`` at a time."""

    __slots__ = ("closed", "decoder", "depth", "first_t0", "inflight", "lane", "quota",
                 "transport", "worker")

    def __init__(self, worker: _Worker, lane: _Lane, quota: int, first_t0: int | None) -> None:
        self.worker = worker
        self.lane = lane
        self.quota = quota
        self.depth = worker.spec.pipeline
        self.first_t0 = first_t0  # per-request mode: latency counts from before the connect
        self.decoder = FrameDecoder(accept_error_flag=True)
        self.inflight: deque[tuple[bytes, int]] = deque()  # (payload, sent at ns)
        self.transport: asyncio.Transport | None = None
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's TCPTransport implements asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)
        self.worker.active.add(self)
        self.worker.connections_opened += 1
        self._fill(time.monotonic_ns())

    def data_received(self, data: bytes) -> None:
        try:
            frames = self.decoder.feed(data)
        except FrameTooLarge:
            self.abandon("protocol")
            return
        now = time.monotonic_ns()
        self.worker.settle(frames, self.inflight, now)
        self._fill(now)

    def connection_lost(self, exc: Exception | None) -> None:
        self.worker.active.discard(self)
        if self.inflight:
            self.worker.error("eof" if exc is None else "reset", len(self.inflight))
            self.inflight.clear()
        if not self.closed.done():
            self.closed.set_result(None)

    def abandon(self, kind: str) -> None:
        """Count what is outstanding as ``kind`` and drop the connection."""
        if self.inflight:
            self.worker.error(kind, len(self.inflight))
            self.inflight.clear()
        if self.transport is not None:
            self.transport.abort()

    def _fill(self, now: int) -> None:
        worker, lane, inflight, transport = self.worker, self.lane, self.inflight, self.transport
        assert transport is not None
        if now < worker.stop_sending_ns and not transport.is_closing():
            out: list[bytes] = []
            while len(inflight) < self.depth and lane.remaining > 0 and self.quota > 0:
                payload = worker.next_payload(lane)
                self.quota -= 1
                t0 = self.first_t0 if self.first_t0 is not None else now
                self.first_t0 = None
                inflight.append((payload, t0))
                out.append(encode_frame(payload))
            if out:
                worker.sent += len(out)
                transport.write(b"".join(out))
        if not inflight:
            transport.close()


class _Worker:
    """One process's share of the lanes, and its counters."""

    def __init__(
        self, spec: LoadSpec, index: int, lanes: Sequence[int], connect_slots: int
    ) -> None:
        self.spec = spec
        self.connect_slots = connect_slots  # connects in progress at once, in this process
        self.lanes = [_Lane(f"{index}.{lane}", spec.requests) for lane in lanes]
        self.pad = spec.payload_bytes
        self.ok = 0
        self.sent = 0
        self.connect_failures = 0
        self.connections_opened = 0
        self.errors: dict[str, int] = {}
        self.latencies_us = array("l")
        self.active: set[_Client] = set()
        self.stop_sending_ns = 0
        self.timed_out = False
        self.timeout_ns = int(spec.timeout_s * 1e9)
        # An SSLContext does not pickle: each worker process builds its own, once.
        self.tls = ssl.create_default_context(cafile=spec.tls_ca) if spec.tls_ca else None

    def next_payload(self, lane: _Lane) -> bytes:
        lane.remaining -= 1
        lane.seq += 1
        return (self.spec.prefix + f"{lane.label}-{lane.seq}".encode()).ljust(self.pad, b" ")

    def settle(self, frames: list[bytes], inflight: deque[tuple[bytes, int]], now: int) -> None:
        """Match responses to the oldest outstanding requests (answers come in order)."""
        for frame in frames:
            if not inflight:
                self.error("unexpected_frame")
                continue
            expected, t0 = inflight.popleft()
            if type(frame) is ErrorFrame:
                self.error(_error_code(frame))
            elif frame == expected:
                self.ok += 1
                self.latencies_us.append((now - t0) // 1000)
            else:
                self.error("mismatch")

    def error(self, kind: str, count: int = 1) -> None:
        self.errors[kind] = self.errors.get(kind, 0) + count

    async def run(self) -> WorkerResult:
        loop = asyncio.get_running_loop()
        spec = self.spec
        start_ns = time.monotonic_ns()
        self.stop_sending_ns = (
            start_ns + int(spec.duration_s * 1e9) if spec.duration_s is not None else 2**63
        )
        slots = asyncio.Semaphore(self.connect_slots)
        sweep_s = min(1.0, spec.timeout_s / 4)
        sweeper = loop.call_later(sweep_s, self._sweep, sweep_s)
        try:
            async with asyncio.timeout(spec.effective_hard_timeout_s):
                async with asyncio.TaskGroup() as tasks:
                    for lane in self.lanes:
                        tasks.create_task(self._run_lane(lane, slots))
        except TimeoutError:
            self.timed_out = True
        finally:
            sweeper.cancel()
            for client in list(self.active):
                client.abandon("aborted")
        end_ns = time.monotonic_ns()
        return WorkerResult(
            ok=self.ok, errors=self.errors, sent=self.sent,
            unsent=sum(lane.remaining for lane in self.lanes),
            connect_failures=self.connect_failures, connections_opened=self.connections_opened,
            start_ns=start_ns, end_ns=end_ns, timed_out=self.timed_out,
            latencies_us=self.latencies_us.tobytes(),
        )

    async def _run_lane(self, lane: _Lane, slots: asyncio.Semaphore) -> None:
        while lane.remaining > 0 and time.monotonic_ns() < self.stop_sending_ns:
            client = await self._connect(lane, slots)
            if client is None:
                if not await self._connect_failed(lane):
                    return
                continue
            lane.failures = 0
            await client.closed

    async def _connect(self, lane: _Lane, slots: asyncio.Semaphore) -> _Client | None:
        spec = self.spec
        per_request = spec.mode == "per-request"
        async with slots:
            t0 = time.monotonic_ns()
            client = _Client(self, lane, 1 if per_request else lane.remaining,
                             t0 if per_request else None)
            try:
                async with asyncio.timeout(spec.timeout_s):
                    await asyncio.get_running_loop().create_connection(
                        lambda: client, spec.host, spec.port, ssl=self.tls,
                        server_hostname=(spec.tls_server_name or spec.host) if self.tls else None,
                    )
            except (OSError, TimeoutError):
                return None
        return client

    async def _connect_failed(self, lane: _Lane) -> bool:
        """Charge one request to the failed connect; False when the lane should give up."""
        self.connect_failures += 1
        self.error("connect_failed")
        lane.remaining -= 1
        lane.failures += 1
        if lane.failures >= MAX_CONSECUTIVE_CONNECT_FAILURES or lane.remaining <= 0:
            return False
        await asyncio.sleep(CONNECT_BACKOFF_S * 2 ** (lane.failures - 1))
        return True

    def _sweep(self, interval_s: float) -> None:
        """Time out connections whose oldest request is older than ``timeout_s``.

        One timer per process instead of one per request; answers come in order, so only the
        head of each connection's queue needs checking.
        """
        limit = time.monotonic_ns() - self.timeout_ns
        for client in list(self.active):
            if client.inflight and client.inflight[0][1] < limit:
                client.abandon("timeout")
        asyncio.get_running_loop().call_later(interval_s, self._sweep, interval_s)


def _error_code(frame: ErrorFrame) -> str:
    try:
        return frame.code_and_message[0]
    except (ValueError, KeyError, TypeError):
        return "bad_error_frame"


def raise_nofile_limit() -> None:
    """Soft RLIMIT_NOFILE up to the hard limit: a run may hold 10,000 sockets."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _worker_entry(
    spec: LoadSpec, index: int, lanes: Sequence[int], connect_slots: int, conn: Connection,
    go: Event,
) -> None:
    try:
        raise_nofile_limit()
        worker = _Worker(spec, index, lanes, connect_slots)
        conn.send(("ready", None))
        if not go.wait(WORKER_READY_TIMEOUT_S + WORKER_REPORT_GRACE_S):
            return
        conn.send(("result", uvloop.run(worker.run())))
    except Exception:
        conn.send(("error", traceback.format_exc()))
    finally:
        conn.close()


@dataclass
class _Collected:
    results: list[WorkerResult] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    lost: int = 0


def _messages(
    waiting: set[Connection], until: float
) -> Iterator[tuple[Connection, str, object]]:
    """Messages from the workers in ``waiting`` until it empties or ``until`` passes."""
    while waiting:
        remaining = until - time.monotonic()
        if remaining <= 0:
            return
        for conn in wait(list(waiting), timeout=remaining):
            assert isinstance(conn, Connection)
            try:
                kind, value = conn.recv()
            except EOFError:
                kind, value = "lost", None
            yield conn, kind, value


def _collect(conns: list[Connection], go: Event, deadline: float) -> _Collected:
    """Wait until every worker is ready, start them together, then gather their results."""
    collected = _Collected()
    waiting = set(conns)
    unready = set(conns)

    def handle(conn: Connection, kind: str, value: object) -> None:
        if kind == "ready":
            unready.discard(conn)
            return
        waiting.discard(conn)
        if kind == "result":
            collected.results.append(value)  # type: ignore[arg-type]
        elif kind == "error":
            collected.errors.append(str(value))
        else:
            collected.lost += 1

    for message in _messages(waiting, time.monotonic() + WORKER_READY_TIMEOUT_S):
        handle(*message)
        if not unready & waiting:
            break
    go.set()  # every live worker is ready, or the stragglers start late
    for message in _messages(waiting, deadline):
        handle(*message)
    collected.lost += len(waiting)
    return collected


def run_load(
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    connections: int = 1,
    requests: int = 1000,
    duration_s: float | None = None,
    payload_bytes: int = 64,
    pipeline: int = 1,
    mode: Mode = "persistent",
    processes: int | None = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    hard_timeout_s: float | None = None,
    prefix: bytes = b"",
    tls_ca: str | None = None,
    tls_server_name: str | None = None,
) -> LoadReport:
    """Run a load and return its report (see the module docstring for the counting rules)."""
    spec = LoadSpec(
        host=host, port=port, connections=connections, requests=requests, duration_s=duration_s,
        payload_bytes=payload_bytes, pipeline=pipeline, mode=mode, timeout_s=timeout_s,
        hard_timeout_s=hard_timeout_s, prefix=prefix, tls_ca=tls_ca,
        tls_server_name=tls_server_name,
    )
    nproc = max(1, min(processes or min(2, os.cpu_count() or 1), connections))
    return run_specs([spec] * nproc)



def run_specs(specs: Sequence[LoadSpec]) -> LoadReport:
    """One worker process per spec, lane k in worker k mod len(specs); one merged report.

    All workers start on one signal; percentiles are exact over every request.
    """
    raise_nofile_limit()
    nproc = len(specs)
    connections = specs[0].connections
    ctx = mp.get_context("spawn")
    go = ctx.Event()
    conns: list[Connection] = []
    procs = []
    for index, spec in enumerate(specs):
        receiver, sender = ctx.Pipe(duplex=False)
        lanes = range(index, connections, nproc)
        connect_slots = max(1, CONNECT_CONCURRENCY // nproc)
        proc = ctx.Process(target=_worker_entry,
                           args=(spec, index, lanes, connect_slots, sender, go),
                           name=f"bench-load-{index}", daemon=True)
        proc.start()
        sender.close()
        conns.append(receiver)
        procs.append(proc)
    deadline = (time.monotonic() + WORKER_READY_TIMEOUT_S + specs[0].effective_hard_timeout_s
                + WORKER_REPORT_GRACE_S)
    try:
        collected = _collect(conns, go, deadline)
    finally:
        _stop_processes(procs)
        for conn in conns:
            conn.close()
    return summarize(specs[0], nproc, collected.results, collected.errors, collected.lost)

def _stop_processes(procs: Sequence[mp.process.BaseProcess]) -> None:
    for proc in procs:
        proc.join(timeout=5.0)
        if proc.is_alive():
            proc.terminate()
            proc.join(timeout=5.0)
        if proc.is_alive():
            proc.kill()
            proc.join(timeout=5.0)


def percentile(sorted_values: Sequence[int], q: float) -> int | None:
    """Nearest-rank percentile of already sorted values (None when there are none)."""
    if not sorted_values:
        return None
    rank = max(1, math.ceil(q * len(sorted_values)))
    return sorted_values[rank - 1]


def summarize(
    spec: LoadSpec, processes: int, results: list[WorkerResult],
    worker_errors: list[str] | None = None, workers_lost: int = 0,
) -> LoadReport:
    latencies = array("l")
    errors: dict[str, int] = {}
    for result in results:
        latencies.frombytes(result["latencies_us"])
        for kind, count in result["errors"].items():
            errors[kind] = errors.get(kind, 0) + count
    ordered = sorted(latencies)
    ok = sum(r["ok"] for r in results)
    elapsed_s = (
        (max(r["end_ns"] for r in results) - min(r["start_ns"] for r in results)) / 1e9
        if results else 0.0
    )
    return LoadReport(
        mode=spec.mode, connections=spec.connections, requests_per_connection=spec.requests,
        pipeline=spec.pipeline, payload_bytes=spec.payload_bytes, processes=processes,
        ok=ok, errors=dict(sorted(errors.items())), error_total=sum(errors.values()),
        connect_failures=sum(r["connect_failures"] for r in results),
        sent=sum(r["sent"] for r in results), unsent=sum(r["unsent"] for r in results),
        connections_opened=sum(r["connections_opened"] for r in results),
        elapsed_s=round(elapsed_s, 6),
        requests_per_s=round(ok / elapsed_s, 1) if elapsed_s > 0 else 0.0,
        p50_us=percentile(ordered, 0.50), p95_us=percentile(ordered, 0.95),
        p99_us=percentile(ordered, 0.99), p999_us=percentile(ordered, 0.999),
        max_us=ordered[-1] if ordered else None,
        mean_us=round(sum(ordered) / len(ordered), 1) if ordered else None,
        timed_out=any(r["timed_out"] for r in results),
        workers_lost=workers_lost, worker_errors=list(worker_errors or []),
    )


def format_report(report: LoadReport) -> str:
    def ms(value: int | None) -> str:
        return "-" if value is None else f"{value / 1000:.3f}"

    errors = ", ".join(f"{k}={v}" for k, v in report["errors"].items()) or "none"
    rows = [
        ("mode", f"{report['mode']}  connections={report['connections']}  "
                 f"requests/conn={report['requests_per_connection']}  "
                 f"pipeline={report['pipeline']}  payload={report['payload_bytes']} B  "
                 f"processes={report['processes']}"),
        ("ok", str(report["ok"])),
        ("errors", f"{report['error_total']}  ({errors})"),
        ("connect failures", str(report["connect_failures"])),
        ("sent / unsent", f"{report['sent']} / {report['unsent']}"),
        ("connections opened", str(report["connections_opened"])),
        ("elapsed", f"{report['elapsed_s']:.3f} s"),
        ("requests/s", f"{report['requests_per_s']:.0f}"),
        ("latency ms", f"p50={ms(report['p50_us'])}  p95={ms(report['p95_us'])}  "
                       f"p99={ms(report['p99_us'])}  p999={ms(report['p999_us'])}  "
                       f"max={ms(report['max_us'])}"),
    ]
    if report["timed_out"]:
        rows.append(("hard timeout", "reached; partial results"))
    if report["workers_lost"] or report["worker_errors"]:
        rows.append(("workers", f"lost={report['workers_lost']}  "
                                f"errors={len(report['worker_errors'])}"))
    return "\n".join(f"{name:<20}{value}" for name, value in rows)


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.load", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--connections", type=int, default=1)
    parser.add_argument("--requests", type=int, default=1000, help="per connection")
    parser.add_argument("--duration", type=float, default=None, help="seconds; stop sending")
    parser.add_argument("--payload-bytes", type=int, default=64)
    parser.add_argument("--pipeline", type=int, default=1, help="in-flight depth per connection")
    parser.add_argument("--mode", choices=["persistent", "per-request"], default="persistent")
    parser.add_argument("--processes", type=int, default=None)
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S,
                        help="per-request timeout, seconds")
    parser.add_argument("--hard-timeout", type=float, default=None,
                        help="whole-run bound, seconds (default: duration or 300, plus 60)")
    parser.add_argument("--prefix", default="", help="bytes (utf-8) starting every payload")
    parser.add_argument("--json", default=None, metavar="OUT", help="write the report here")
    parser.add_argument("--tls-ca", default=None, metavar="PEM",
                        help="speak TLS, verifying the server's certificate against this CA")
    parser.add_argument("--tls-server-name", default=None,
                        help="name the server's certificate must carry (default: --host)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = _parse_args(argv)
    mode: Mode = "per-request" if args.mode == "per-request" else "persistent"
    try:
        report = run_load(
            args.host, args.port, connections=args.connections, requests=args.requests,
            duration_s=args.duration, payload_bytes=args.payload_bytes, pipeline=args.pipeline,
            mode=mode, processes=args.processes, timeout_s=args.timeout,
            hard_timeout_s=args.hard_timeout, prefix=args.prefix.encode(),
            tls_ca=args.tls_ca, tls_server_name=args.tls_server_name,
        )
    except ValueError as exc:
        sys.exit(f"bench.load: {exc}")
    print(format_report(report))
    for message in report["worker_errors"]:
        print(message, file=sys.stderr)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as out:
            json.dump(report, out, indent=2)
            out.write("\n")
    if report["worker_errors"] or report["workers_lost"]:
        sys.exit(1)


__all__ = ["LoadReport", "LoadSpec", "format_report", "main", "percentile", "run_load",
           "summarize"]

if __name__ == "__main__":
    main()
