"""Benchmark: a router with 1,000 registered backends against one with 2, same backends.

``python -m bench.registry_scale [--backends 1000] [--rounds 3] [--update-docs]``
(``make bench-registry``; ``make bench`` runs it after ``bench.run``).

The fleet: ``--echo-processes`` (2) ``backends.echo_many`` processes, each serving its share
of the backends on unix sockets, plus ``--spares`` more each for the registration phase. Every
backend is registered through the admin API (``POST /v1/backends``, protocol ``frames``, a
lease), backend k serving model ``m{k mod models}`` (1,000 backends, 100 models: 10 per
model), and renewed by a heartbeat generator in a process of its own (``bench.admin_load``).

Traffic is the length-prefixed protocol from ``bench.load`` (64-byte payloads, persistent
connections, one request in flight each). That protocol carries no model yet, so every
request may go to any of the backends: the router chooses among all 1,000 (or 2), the
widest candidate list the fleet can give it.

Three phases, one after the other, each with routers of its own (only one router runs at a
time, so neither steals CPU from the other):

1. *Throughput*: ``--rounds`` rounds; each round measures three routers, each fresh
   (register, drain, start heartbeats every TTL/3 as backends do, warm up, then
   ``--clients`` clients x ``--requests`` requests), the order reversed every other round:
   ``2`` (2 backends), ``1000`` (every request to any of 1,000), ``1000, 2 routed``
   (1,000 registered, renewed and probed, 998 of them drained: the fleet's bookkeeping
   without spreading the traffic thinner) and the same with leases long enough to need no
   heartbeat during the run (the registry's size alone). Router CPU per request comes from
   ``/proc/<pid>/stat``. The ratios are median rounds over the median of ``2``; every round
   is listed.
2. *Heartbeat CPU*: a router with the 1,000 backends on long leases; windows of
   ``--window-s`` alternate idle (no heartbeats) and ``--heartbeat-rate`` heartbeats per
   second, idle first and last. The cost is the router's CPU (utime + stime) per second in
   the heartbeat windows minus that in the idle windows, as a share of one core. After each
   heartbeat window the same heartbeats go to ``bench.bare_admin`` (the route on aiohttp
   alone): the HTTP floor, in the same sitting.
3. *Join and leave under load*: a router with the 1,000 backends and traffic from the same
   clients. ``--expire`` backends stop heartbeating: from each lease's deadline (its last
   renewal's send time + TTL, an upper bound on the router's) to its record being gone
   (``GET /v1/backends/{id}`` 404, polled every 10 ms from the deadline on; then checked
   against ``GET /v1/backends``), and to the last request it was sent (the backend's own
   stamp). Then half the ``--spares`` register one at a time among the others: from the 201
   to the first request each is sent, which is mostly the wait for a backend's turn when
   traffic is spread over 1,000; then all but 2 are drained and the other half register:
   the same latency with few candidates, the router's own part.

Prints the tables, writes ``bench/results/registry.json`` (every figure, every round, the
load average before and after) and, with ``--update-docs``, the registry block of
docs/benchmarks.md. Every wait is bounded and every process started is stopped.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import secrets
import socket
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from backends.echo_many import control_path, socket_path
from bench.admin_load import (
    AdminError,
    HeartbeatCounts,
    HeartbeatLoad,
    HeartbeatSpec,
    drain_all,
    headers,
    register_all,
)
from bench.docs import BENCHMARKS_MD, command_line, replace_block, run_header
from bench.load import LoadReport, percentile, run_load
from bench.run import cpu_seconds, markdown_table, text_table
from router.control.launcher import BlockingProcess, launch_blocking
from router.protocol.announce import Banner, parse_banner, ready_port, ready_unix_path
from router.protocol.frames import FrameDecoder, encode_frame

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "registry.json"
DOCS_START, DOCS_END = "<!-- registry:start -->", "<!-- registry:end -->"
PAYLOAD_BYTES = 64
READY_TIMEOUT_S = 30.0  # 550 sockets and a router on a loaded 2-core machine
STOP_TIMEOUT_S = 15.0
LEASE_TTL_S = 10.0  # the default TTL a backend registers with
LONG_TTL_S = 600.0  # phase 2: leases that outlast the idle windows
SPARE_TTL_S = 60.0  # phase 3: spares must not expire while the others register
POLL_S = 0.01
SPARE_SPACING_S = 0.1
WARMUP_REQUESTS = 200
CONTROL_TIMEOUT_S = 10.0


# -- the fleet -----------------------------------------------------------------------------------


@dataclass
class Fleet:
    """The ``echo_many`` processes; backend (p, i) is socket i of process p."""

    directories: list[Path]
    processes: list[BlockingProcess[str]]
    per_process: int  # registered in the full fleet
    spares: int  # per process, after the registered ones

    def backend(self, process: int, index: int) -> tuple[str, str]:
        """(id, address) of one backend."""
        return (f"echo-{process}-{index:04d}",
                f"unix:{socket_path(self.directories[process], index)}")

    def registered(self, total: int) -> list[tuple[str, str]]:
        """``total`` backends spread over the processes: every process's first ones."""
        count = len(self.processes)
        return [self.backend(k % count, k // count) for k in range(total)]

    def spare(self) -> list[tuple[str, str]]:
        return [self.backend(p, self.per_process + i)
                for i in range(self.spares) for p in range(len(self.processes))]

    def tallies(self) -> dict[str, list[int]]:
        """``{id: [served, first_ns, last_ns]}`` of every backend, from the control sockets."""
        out: dict[str, list[int]] = {}
        for process, directory in enumerate(self.directories):
            for index, tally in enumerate(control(directory, b"stats")["backends"]):
                out[self.backend(process, index)[0]] = tally
        return out

    def reset(self) -> None:
        for directory in self.directories:
            control(directory, b"reset")


def control(directory: Path, request: bytes) -> Any:
    """One request to an ``echo_many`` control socket; its JSON answer."""
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(CONTROL_TIMEOUT_S)
        sock.connect(control_path(directory))
        sock.sendall(encode_frame(request))
        decoder = FrameDecoder()
        for _ in range(100_000):  # bounded; each recv waits at most CONTROL_TIMEOUT_S
            data = sock.recv(1 << 20)
            if not data:
                break
            frames = decoder.feed(data)
            if frames:
                return orjson.loads(frames[0])
    raise AdminError(f"{control_path(directory)}: no answer to {request!r}")


@contextmanager
def fleet(root: Path, processes: int, per_process: int, spares: int) -> Iterator[Fleet]:
    started: list[BlockingProcess[str]] = []
    directories = [root / f"p{p}" for p in range(processes)]
    try:
        for directory in directories:
            directory.mkdir()
            started.append(launch_blocking(
                [sys.executable, "-m", "backends.echo_many", "--dir", str(directory),
                 "--count", str(per_process + spares)],
                ready_unix_path, cwd=ROOT, stderr=root / f"{directory.name}.stderr.log",
                ready_timeout_s=READY_TIMEOUT_S, new_session=True))
        yield Fleet(directories, started, per_process, spares)
    finally:
        for process in started:
            process.stop(STOP_TIMEOUT_S)


def registration(backend_id: str, address: str, model: str, ttl_s: float) -> dict[str, Any]:
    return {"id": backend_id, "address": address, "protocol": "frames", "models": [model],
            "lease_ttl_s": ttl_s}


def registrations(backends: Sequence[tuple[str, str]], models: int, ttl_s: float
                  ) -> list[dict[str, Any]]:
    return [registration(bid, address, f"m{k % models:03d}", ttl_s)
            for k, (bid, address) in enumerate(backends)]


# -- the router ----------------------------------------------------------------------------------


@dataclass
class Router:
    process: BlockingProcess[Banner]
    port: int
    admin_url: str
    token: str

    def cpu_s(self) -> float:
        return cpu_seconds(self.process.pid)

    def register(self, bodies: Sequence[dict[str, Any]], concurrency: int = 16,
                 spacing_s: float = 0.0) -> dict[str, int]:
        return asyncio.run(register_all(self.admin_url, self.token, bodies, concurrency,
                                        spacing_s))

    def heartbeats(self, ids: Sequence[str], interval_s: float, batch: int = 1
                   ) -> HeartbeatLoad:
        return heartbeats(self.admin_url, self.token, ids, interval_s, batch)


def heartbeats(admin_url: str, token: str, ids: Sequence[str], interval_s: float,
               batch: int = 1) -> HeartbeatLoad:
    """A heartbeat generator renewing ``ids`` once per ``interval_s`` at ``admin_url``."""
    return HeartbeatLoad(HeartbeatSpec(admin_url, token, tuple(ids), interval_s, batch=batch))


@contextmanager
def router(log_dir: Path, name: str) -> Iterator[Router]:
    """A router with no backends, its admin API behind a token; stopped on exit."""
    token = secrets.token_urlsafe(24)
    token_file = log_dir / "admin.token"
    token_file.write_text(token)
    config = log_dir / "router.toml"
    config.write_text(f'[admin]\ntoken_file = "{token_file}"\n')
    process = launch_blocking(
        [sys.executable, "-m", "router", "serve", "--config", str(config), "--listen",
         "127.0.0.1:0", "--admin", "127.0.0.1:0", "--log-level", "WARNING"],
        parse_banner, cwd=ROOT, stderr=log_dir / f"{name}.stderr.log",
        ready_timeout_s=READY_TIMEOUT_S, new_session=True)
    try:
        banner = process.ready
        yield Router(process, banner.listen[1], banner.admin_url, token)
    finally:
        process.stop(STOP_TIMEOUT_S)


def load(router_: Router, args: argparse.Namespace, requests: int,
         duration_s: float | None = None) -> LoadReport:
    return run_load("127.0.0.1", router_.port, connections=args.clients, requests=requests,
                    duration_s=duration_s or args.max_seconds, payload_bytes=PAYLOAD_BYTES,
                    processes=args.load_processes)


# -- phase 1: throughput -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Target:
    """A router of the throughput phase: ``registered`` backends, ``routed`` of them in
    rotation (the others drained: members, probed, renewed, never sent a request)."""

    registered: int
    routed: int
    heartbeats: bool = True  # False: leases long enough to need none during the run

    @property
    def name(self) -> str:
        name = f"{self.registered} backends"
        if self.routed < self.registered:
            name += f", {self.routed} routed"
        return name if self.heartbeats else f"{name}, no heartbeats"


def throughput_round(fleet_: Fleet, target: Target, args: argparse.Namespace, log_dir: Path
                     ) -> dict[str, Any]:
    backends = fleet_.registered(target.registered)
    ids = [bid for bid, _ in backends]
    with router(log_dir, f"router-{target.registered}-{target.routed}") as r:
        t0 = time.monotonic()
        r.register(registrations(backends, args.models,
                                 LEASE_TTL_S if target.heartbeats else LONG_TTL_S))
        registered_s = time.monotonic() - t0
        if target.routed < target.registered:
            asyncio.run(drain_all(r.admin_url, r.token, ids[target.routed:]))
        beats = r.heartbeats(ids, LEASE_TTL_S / 3) if target.heartbeats else None
        try:
            load(r, args, WARMUP_REQUESTS)
            cpu0 = r.cpu_s()
            report = load(r, args, args.requests)
            cpu = r.cpu_s() - cpu0
        finally:
            counts = beats.stop() if beats is not None else None
    return {
        "target": target.name, "registration_s": round(registered_s, 3), "report": report,
        "router_cpu_us_per_request": round(cpu / report["ok"] * 1e6, 1) if report["ok"] else None,
        "heartbeats": _beat_summary(counts) if counts is not None else None,
    }


def median_report(reports: list[LoadReport]) -> LoadReport:
    """The round with the median req/s (the lower middle for an even count)."""
    return sorted(reports, key=lambda r: r["requests_per_s"])[(len(reports) - 1) // 2]


def phase_throughput(fleet_: Fleet, args: argparse.Namespace, log_dir: Path
                     ) -> dict[str, Any]:
    targets = [Target(2, 2), Target(args.backends, args.backends), Target(args.backends, 2),
               Target(args.backends, 2, heartbeats=False)]
    rounds: dict[str, list[dict[str, Any]]] = {t.name: [] for t in targets}
    for round_no in range(args.rounds):
        for target in targets if round_no % 2 == 0 else reversed(targets):
            _progress(f"throughput: {target.name}, round {round_no + 1}/{args.rounds}")
            rounds[target.name].append(throughput_round(fleet_, target, args, log_dir))
    medians = {name: median_report([r["report"] for r in runs]) for name, runs in rounds.items()}
    cpu = {name: statistics.median(r["router_cpu_us_per_request"] or 0.0 for r in runs)
           for name, runs in rounds.items()}
    base, base_cpu = medians[targets[0].name]["requests_per_s"], cpu[targets[0].name]
    return {"rounds": rounds, "median": medians, "median_cpu_us_per_request": cpu,
            "ratios": {t.name: round(medians[t.name]["requests_per_s"] / base, 3)
                       if base else None for t in targets[1:]},
            "cpu_ratios": {t.name: round(cpu[t.name] / base_cpu, 3) if base_cpu else None
                           for t in targets[1:]}}


# -- phase 2: heartbeat CPU ----------------------------------------------------------------------


def phase_heartbeat_cpu(fleet_: Fleet, args: argparse.Namespace, log_dir: Path
                        ) -> dict[str, Any]:
    backends = fleet_.registered(args.backends)
    ids = [bid for bid, _ in backends]
    windows: list[dict[str, Any]] = []
    with router(log_dir, "router-heartbeats") as r, bare_admin(log_dir) as bare:
        r.register(registrations(backends, args.models, LONG_TTL_S))
        for index in range(2 * args.heartbeat_windows + 1):
            beating = index % 2 == 1
            _progress(f"heartbeat CPU: window {index + 1}, "
                      f"{'heartbeats' if beating else 'idle'}")
            windows.append(_window(r, ids, args) if beating else _idle_window(r, args.window_s))
            if beating:
                _progress("heartbeat CPU: the same heartbeats to a bare aiohttp app")
                windows.append({**_window(bare, ids, args), "bare": True})
        # The same renewals, each PUT /v1/leases carrying a batch (as a process of many
        # backends sends them), against their own idle windows.
        for index in range(2 * args.heartbeat_windows):
            beating = index % 2 == 1
            _progress(f"heartbeat CPU: batched window {index + 1}, "
                      f"{'heartbeats' if beating else 'idle'}")
            windows.append({**(_window(r, ids, args, args.heartbeat_batch) if beating
                               else _idle_window(r, args.window_s)), "batched": True})
    batched = [w for w in windows if w.get("batched")]
    windows = [w for w in windows if not w.get("batched")]
    b_idle = [w["router_core"] for w in batched if not w["heartbeats"]]
    b_busy = [w for w in batched if w["heartbeats"]]
    b_idle_core = sum(b_idle) / len(b_idle)
    b_core = sum(w["router_core"] for w in b_busy) / len(b_busy)
    b_beats = sum(w["heartbeats"]["ok"] for w in b_busy)
    b_seconds = sum(w["seconds"] for w in b_busy)
    batched_summary = {
        "batch": args.heartbeat_batch, "windows": batched,
        "cost_core": round(b_core - b_idle_core, 4),
        "achieved_per_s": round(b_beats / b_seconds, 1),
        "router_us_per_heartbeat": _us_each(b_core - b_idle_core, b_seconds, b_beats),
    }
    routed = [w for w in windows if not w.get("bare")]
    idle = [w["router_core"] for w in routed if not w["heartbeats"]]
    busy = [w for w in routed if w["heartbeats"]]
    floor = [w for w in windows if w.get("bare")]
    idle_core = sum(idle) / len(idle)
    busy_core = sum(w["router_core"] for w in busy) / len(busy)
    floor_core = sum(w["router_core"] for w in floor) / len(floor)
    beats = sum(w["heartbeats"]["ok"] for w in busy)
    floor_beats = sum(w["heartbeats"]["ok"] for w in floor)
    seconds = sum(w["seconds"] for w in busy)
    floor_seconds = sum(w["seconds"] for w in floor)
    return {
        "windows": windows, "idle_core": round(idle_core, 4),
        "heartbeat_core": round(busy_core, 4), "cost_core": round(busy_core - idle_core, 4),
        "achieved_per_s": round(beats / seconds, 1),
        "router_us_per_heartbeat": _us_each(busy_core - idle_core, seconds, beats),
        "floor_core": round(floor_core, 4),
        "floor_us_per_heartbeat": _us_each(floor_core, floor_seconds, floor_beats),
        "batched": batched_summary,
    }


def _us_each(core: float, seconds: float, count: int) -> float | None:
    return round(core * seconds / count * 1e6, 1) if count else None


@dataclass
class BareAdmin:
    """``bench.bare_admin``: the heartbeat route on aiohttp alone."""

    process: BlockingProcess[int]
    admin_url: str
    token: str = "unused"

    def cpu_s(self) -> float:
        return cpu_seconds(self.process.pid)

    def heartbeats(self, ids: Sequence[str], interval_s: float, batch: int = 1
                   ) -> HeartbeatLoad:
        return heartbeats(self.admin_url, self.token, ids, interval_s, batch)


@contextmanager
def bare_admin(log_dir: Path) -> Iterator[BareAdmin]:
    process = launch_blocking([sys.executable, "-m", "bench.bare_admin"], ready_port, cwd=ROOT,
                              stderr=log_dir / "bare-admin.stderr.log",
                              ready_timeout_s=READY_TIMEOUT_S, new_session=True)
    try:
        yield BareAdmin(process, f"http://127.0.0.1:{process.ready}")
    finally:
        process.stop(STOP_TIMEOUT_S)


def _idle_window(r: Router, seconds: float) -> dict[str, Any]:
    t0, cpu0 = time.monotonic(), r.cpu_s()
    time.sleep(seconds)
    wall, cpu = time.monotonic() - t0, r.cpu_s() - cpu0
    return {"heartbeats": None, "seconds": round(wall, 3), "router_core": round(cpu / wall, 4)}


def _window(r: Router | BareAdmin, ids: list[str], args: argparse.Namespace, batch: int = 1
            ) -> dict[str, Any]:
    beats = r.heartbeats(ids, len(ids) / args.heartbeat_rate, batch)
    try:
        time.sleep(1.0)  # the first round of heartbeats opens the connections
        before = beats.snapshot()
        t0, cpu0 = time.monotonic(), r.cpu_s()
        time.sleep(args.window_s)
        wall, cpu = time.monotonic() - t0, r.cpu_s() - cpu0
        counts = beats.snapshot()
    finally:
        beats.stop()
    return {"heartbeats": _beat_summary(counts, before), "seconds": round(wall, 3),
            "router_core": round(cpu / wall, 4)}


def _beat_summary(counts: HeartbeatCounts, since: HeartbeatCounts | None = None
                  ) -> dict[str, Any]:
    """The heartbeats of ``counts`` (latencies: those since the previous snapshot) less
    those of the earlier snapshot ``since``."""
    latencies = sorted(counts["latencies_us"])
    summary: dict[str, Any] = {
        key: counts[key] - (since[key] if since else 0)
        for key in ("ok", "not_found", "failed", "late")}
    return {**summary, "p50_us": percentile(latencies, 0.5),
            "p99_us": percentile(latencies, 0.99)}


# -- phase 3: joining and leaving under load -----------------------------------------------------


class BackgroundLoad:
    """``bench.load`` on a thread (it blocks), so the main thread can act meanwhile."""

    def __init__(self, r: Router, args: argparse.Namespace, duration_s: float) -> None:
        self.report: LoadReport | None = None
        self._thread = threading.Thread(
            target=self._run, args=(r, args, duration_s), name="bench-load", daemon=True)
        self._thread.start()

    def _run(self, r: Router, args: argparse.Namespace, duration_s: float) -> None:
        self.report = load(r, args, 10**9, duration_s)

    def join(self, timeout_s: float) -> LoadReport:
        self._thread.join(timeout_s)
        if self.report is None:
            raise AdminError("the background load did not finish")
        return self.report


def phase_join_leave(fleet_: Fleet, args: argparse.Namespace, log_dir: Path
                     ) -> dict[str, Any]:
    backends = fleet_.registered(args.backends)
    leaving = backends[:: max(1, len(backends) // args.expire)][: args.expire]
    staying = [b for b in backends if b not in leaving]
    spares = fleet_.spare()
    wide, narrow = spares[: len(spares) // 2], spares[len(spares) // 2:]
    duration_s = (LEASE_TTL_S / 3 + 1.0 + LEASE_TTL_S + 3.0 + len(spares) * SPARE_SPACING_S
                  + 5.0)
    with router(log_dir, "router-join-leave") as r:
        r.register(registrations(backends, args.models, LEASE_TTL_S))
        keep = r.heartbeats([bid for bid, _ in staying], LEASE_TTL_S / 3)
        doomed = r.heartbeats([bid for bid, _ in leaving], LEASE_TTL_S / 3)
        try:
            fleet_.reset()
            traffic = BackgroundLoad(r, args, duration_s)
            # Every leaving backend renews at least once first: its deadline is then its last
            # heartbeat's send time + TTL.
            time.sleep(LEASE_TTL_S / 3 + 1.0)
            _progress(f"join/leave: {len(leaving)} leases left to expire")
            last_sent = doomed.stop()["last_ok_sent_ns"]
            deadlines = {bid: last_sent[bid] + int(LEASE_TTL_S * 1e9) for bid, _ in leaving}
            gone = asyncio.run(_wait_gone(r, deadlines))
            joined_wide = _join_one_by_one(r, wide, args, f"among {len(staying)} routed")
            asyncio.run(drain_all(r.admin_url, r.token,
                                  [bid for bid, _ in staying[2:]] + [bid for bid, _ in wide]))
            joined_narrow = _join_one_by_one(r, narrow, args, "beside 2 routed")
            report = traffic.join(duration_s + 120.0)
        finally:
            keep.close()
            doomed.close()
        tallies = fleet_.tallies()
    return {**_leave_result(deadlines, gone, tallies),
            "first_request": _first_requests(joined_wide, tallies),
            "first_request_narrow": _first_requests(joined_narrow, tallies),
            "routed_wide": len(staying) + len(wide), "traffic": report}


def _join_one_by_one(r: Router, spares: list[tuple[str, str]], args: argparse.Namespace,
                     where: str) -> dict[str, int]:
    _progress(f"join/leave: {len(spares)} backends register one at a time, {where}")
    return r.register(registrations(spares, args.models, SPARE_TTL_S), spacing_s=SPARE_SPACING_S)


async def _wait_gone(r: Router, deadlines: dict[str, int]) -> dict[str, Any]:
    """When each record stopped being found, polled from its deadline on; then the list."""
    gone: dict[str, int] = {}
    bound = max(deadlines.values()) + int(5e9)
    timeout = aiohttp.ClientTimeout(total=5.0)
    async with aiohttp.ClientSession(headers=headers(r.token), timeout=timeout) as session:
        pending = dict(deadlines)
        while pending and time.monotonic_ns() < bound:
            now = time.monotonic_ns()
            for bid in [b for b, due in pending.items() if due <= now]:
                async with session.get(f"{r.admin_url}/v1/backends/{bid}") as response:
                    await response.read()
                    if response.status == 404:
                        gone[bid] = time.monotonic_ns()
                        del pending[bid]
            await asyncio.sleep(POLL_S)
        async with session.get(f"{r.admin_url}/v1/backends") as response:
            listed = {b["id"] for b in await response.json()}
    return {"gone_ns": gone, "still_listed": sorted(listed & set(deadlines)),
            "never_gone": sorted(pending)}


def _ms_stats(values_ns: list[int]) -> dict[str, float | None]:
    ordered = sorted(values_ns)
    def ms(value: int | None) -> float | None:
        return None if value is None else round(value / 1e6, 1)
    return {"count": len(ordered), "p50_ms": ms(percentile(ordered, 0.5)),
            "p99_ms": ms(percentile(ordered, 0.99)),
            "min_ms": ms(ordered[0] if ordered else None),
            "max_ms": ms(ordered[-1] if ordered else None)}


def _leave_result(deadlines: dict[str, int], gone: dict[str, Any],
                  tallies: dict[str, list[int]]) -> dict[str, Any]:
    removal = [gone["gone_ns"][bid] - due for bid, due in deadlines.items()
               if bid in gone["gone_ns"]]
    last_request = [tallies[bid][2] - due for bid, due in deadlines.items() if tallies[bid][0]]
    return {"expired": len(deadlines), "removal": _ms_stats(removal),
            "last_request_after_deadline": _ms_stats(last_request),
            "still_listed": gone["still_listed"], "never_gone": gone["never_gone"]}


def _first_requests(joined: dict[str, int], tallies: dict[str, list[int]]) -> dict[str, Any]:
    """From each registration's 201 to the first request its backend saw."""
    first = [tallies[bid][1] - at for bid, at in joined.items() if tallies[bid][0]]
    return {**_ms_stats(first), "never_served": sorted(b for b in joined if not tallies[b][0])}


# -- output --------------------------------------------------------------------------------------


def _progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _ms(us: int | None) -> str:
    return "-" if us is None else f"{us / 1000:.2f}"


def throughput_rows(result: dict[str, Any]) -> list[list[str]]:
    rows = []
    for name, runs in result["throughput"]["rounds"].items():
        for number, run in enumerate(runs, 1):
            r = run["report"]
            rows.append([name, str(number), f"{r['requests_per_s']:.0f}", _ms(r["p50_us"]),
                         _ms(r["p99_us"]), str(r["error_total"]),
                         f"{run['router_cpu_us_per_request']}",
                         f"{run['registration_s']:.2f}"])
    return rows


THROUGHPUT_HEADER = ["router", "round", "req/s", "p50 ms", "p99 ms", "errors",
                     "router us/req", "register s"]


def summary_rows(result: dict[str, Any]) -> list[list[str]]:
    t, h, j = result["throughput"], result["heartbeat_cpu"], result["join_leave"]
    f, rm, last = j["first_request"], j["removal"], j["last_request_after_deadline"]
    n, rate = j["first_request_narrow"], j["traffic"]["requests_per_s"] or 1.0
    size = result["settings"]["backends"]
    return [
        *([f"req/s, {name} / 2 backends (median rounds)", f"{ratio:.2f}", ">= 0.90"]
          for name, ratio in t["ratios"].items()),
        *([f"router CPU per request, {name} / 2 backends (medians)", f"{ratio:.2f}", ""]
          for name, ratio in t["cpu_ratios"].items()),
        [f"router CPU for {h['achieved_per_s']:.0f} heartbeats/s",
         f"{h['cost_core'] * 100:.1f} % of a core ({h['router_us_per_heartbeat']} us each)",
         "< 10 %"],
        [f"router CPU for {h['batched']['achieved_per_s']:.0f} heartbeats/s in PUT /v1/leases "
         f"of {h['batched']['batch']}",
         f"{h['batched']['cost_core'] * 100:.1f} % of a core "
         f"({h['batched']['router_us_per_heartbeat']} us each)", "< 10 %"],
        ["the single heartbeats to a bare aiohttp app (the HTTP floor)",
         f"{h['floor_core'] * 100:.1f} % of a core ({h['floor_us_per_heartbeat']} us each)",
         ""],
        [f"router CPU idle with {size} backends (probes every 2 s)",
         f"{h['idle_core'] * 100:.1f} % of a core", ""],
        [f"registration -> first request, among {j['routed_wide']} routed (p50 / p99)",
         f"{f['p50_ms']} / {f['p99_ms']} ms (of {f['count']}; one request per "
         f"{1000 * j['routed_wide'] / rate:.0f} ms per backend)", ""],
        ["registration -> first request, beside 2 routed (p50 / p99)",
         f"{n['p50_ms']} / {n['p99_ms']} ms (of {n['count']})", ""],
        ["lease deadline -> record gone (p50 / max)",
         f"{rm['p50_ms']} / {rm['max_ms']} ms (of {rm['count']})", ""],
        ["lease deadline -> last request to it (p50 / max)",
         f"{last['p50_ms']} / {last['max_ms']} ms", ""],
    ]


SUMMARY_HEADER = ["measure", "figure", "target"]


def docs_block(result: dict[str, Any]) -> str:
    s, m = result["settings"], result["machine"]
    command = command_line("bench.registry_scale", [
        ("--backends", s["backends"]), ("--models", s["models"]),
        ("--clients", s["clients"]), ("--requests", s["requests"]),
        ("--rounds", s["rounds"]), ("--load-processes", s["load_processes"]),
        ("--echo-processes", s["echo_processes"]), ("--heartbeat-rate", s["heartbeat_rate"]),
        ("--heartbeat-batch", s.get("heartbeat_batch", 1)),
        ("--window-s", s["window_s"]), ("--expire", s["expire"]), ("--spares", s["spares"]),
    ])
    machine = (f"{m['nproc']} CPUs, {m['platform']}, Python {m['python']}; load average "
               f"{m['loadavg_before']} before, {m['loadavg_after']} after")
    j = result["join_leave"]
    return "\n".join([
        run_header(command, result["timestamp"], machine),
        f"{s['backends']} backends ({s['echo_processes']} `backends.echo_many` processes, unix "
        f"sockets), {s['models']} models, registered through `POST /v1/backends` and renewed "
        f"every {LEASE_TTL_S / 3:.1f} s; {s['clients']} clients of length-prefixed traffic "
        f"with no model (any backend), {PAYLOAD_BYTES}-byte payloads, {s['requests']} requests "
        f"per connection, {s['load_processes']} load processes; {s['rounds']} interleaved "
        "rounds of each router, all listed.",
        "",
        markdown_table(SUMMARY_HEADER, summary_rows(result)),
        "",
        markdown_table(THROUGHPUT_HEADER, throughput_rows(result)),
        "",
        f"Join and leave ran under {j['traffic']['requests_per_s']:.0f} req/s "
        f"({j['traffic']['error_total']} errors).",
    ])


def machine(loadavg_before: str) -> dict[str, Any]:
    return {"nproc": os.cpu_count(), "platform": platform.platform(),
            "python": platform.python_version(), "loadavg_before": loadavg_before,
            "loadavg_after": loadavg()}


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


# -- main ----------------------------------------------------------------------------------------


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.registry_scale", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--backends", type=int, default=1000, help="the big fleet (default: 1000)")
    add("--models", type=int, default=100, help="models over the fleet (default: 100)")
    add("--clients", type=int, default=50, help="client connections (default: 50)")
    add("--requests", type=int, default=2000, help="requests per connection (default: 2000)")
    add("--max-seconds", type=float, default=30.0, help="bound on one measured run")
    add("--rounds", type=int, default=3, help="throughput rounds per router (default: 3)")
    add("--load-processes", type=int, default=2, help="load generator processes (default: 2)")
    add("--echo-processes", type=int, default=2, help="backends.echo_many processes")
    add("--heartbeat-rate", type=float, default=1000.0, help="phase 2 (default: 1000/s)")
    add("--heartbeat-batch", type=int, default=100,
        help="phase 2's batched windows: leases per PUT /v1/leases (default: 100)")
    add("--heartbeat-windows", type=int, default=2, help="phase 2 heartbeat windows")
    add("--window-s", type=float, default=10.0, help="phase 2 window length (default: 10)")
    add("--expire", type=int, default=50, help="phase 3: leases left to expire")
    add("--spares", type=int, default=50, help="phase 3: backends registering, per process")
    add("--update-docs", action="store_true", help="write the registry block of "
        "docs/benchmarks.md")
    args = parser.parse_args(argv)
    if args.backends < 2 or args.backends % args.echo_processes:
        parser.error("--backends: at least 2, a multiple of --echo-processes")
    if not 1 <= args.expire <= args.backends // 2 or args.spares < 1 or args.rounds < 1:
        parser.error("--expire: 1 .. half the backends; --spares, --rounds: at least 1")
    return args


def main(argv: list[str] | None = None) -> None:
    args = _parse_args(argv)
    before = loadavg()
    with tempfile.TemporaryDirectory(prefix="rs-", dir="/tmp") as tmp:
        root = Path(tmp)  # short: unix socket paths are at most 107 bytes
        with fleet(root, args.echo_processes, args.backends // args.echo_processes,
                   args.spares) as fleet_:
            result: dict[str, Any] = {
                "throughput": phase_throughput(fleet_, args, root),
                "heartbeat_cpu": phase_heartbeat_cpu(fleet_, args, root),
                "join_leave": phase_join_leave(fleet_, args, root),
            }
    result.update({
        "timestamp": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine(before),
        "settings": {k: getattr(args, k) for k in (
            "backends", "models", "clients", "requests", "max_seconds", "rounds",
            "load_processes", "echo_processes", "heartbeat_rate", "heartbeat_batch",
            "heartbeat_windows", "window_s", "expire", "spares")},
    })
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(text_table(SUMMARY_HEADER, summary_rows(result)))
    print()
    print(text_table(THROUGHPUT_HEADER, throughput_rows(result)))
    if args.update_docs:
        done = replace_block(DOCS_START, DOCS_END, docs_block(result), BENCHMARKS_MD)
        print("docs/benchmarks.md updated" if done else f"docs/benchmarks.md has no {DOCS_START}")


if __name__ == "__main__":
    main()
