"""Chaos scenario: thousands of connections each trickle a 15 MiB frame; router memory stays
bounded and normal clients see no error.

Two echo backends sit behind one router at its default limits (``listener.max_buffered_bytes``
128 MiB, ``max_connections`` 20,000, ``max_frame_bytes`` 16 MiB), with ``read_timeout_s`` from
``--read-timeout`` (default 10, the router's own default). A separate process (uvloop) runs H
hostile connections (``--hostiles``, default 2,000): each sends the length word of a
``--frame-mib`` (15) MiB frame, then its body in ``--chunk-kib`` (64) KiB pieces every
``--interval-ms`` (20) ms, as fast as the router reads them, and never the last byte. Whatever
the router answers (READ_TIMEOUT once the frame is older than the read timeout, OVERLOADED
when the read budget takes its bytes back) or however it closes, the hostile connects again and
starts over, until ``--attack-s`` (30) seconds are up. Meanwhile N normal ``FrameClient``
clients (``--clients``, no retries) send small requests one at a time.

Without the read budget the router would hold every hostile's bytes: 2,000 x 15 MiB is 30 GiB
(issue 11: 10 connections holding 15 MiB each added 151 MiB of RSS). With it, the admitted
frames are at most 128 MiB together and every other hostile holds one read at most.

Memory is read from ``/proc/<pid>/status``: ``VmRSS`` sampled every 50 ms, and ``VmHWM`` (the
kernel's own high-water mark, which no sampling gap can miss) before the attack and after it.

Invariants (all must hold, else exit status 1):

* every normal request is answered ``ok``;
* the router's peak RSS (``VmHWM`` after the attack) minus its RSS before the attack stays
  under the stated bound ``RSS_BOUND``: 1.25 x max_buffered_bytes (a bytearray grows in steps
  of an eighth; the allocator keeps some slack) + 16 KiB per hostile connection (its uvloop
  transport, session, decoder and socket buffers in user space; an idle connection costs about
  3 KiB) + 48 MiB (a frame completed and copied twice, allocator noise);
* the read budget's own peak (admin ``/stats``) is at most max_buffered_bytes plus one read
  (256,000 bytes under uvloop), and it took bytes back or made frames wait (it was exercised);
* the router answers a request after the attack, then drains with ``dropped 0`` and exits 0.

Run: ``python -m chaos.frame_flood [--hostiles 2000] [--attack-s 30] [--clients 20]
[--read-timeout 10] [--seed S] [--json PATH]``; ``make chaos`` runs it full size, and
``tests/test_chaos_smoke.py`` with 150 hostiles for 4 seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing
import os
import resource
import socket
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import uvloop

from chaos.common import (
    REPO_ROOT,
    LoadState,
    Process,
    RssSampler,
    format_summary,
    get_backends,
    judged,
    reap,
    start_echoes,
    start_router,
    stop,
    timed_request,
)
from chaos.drain import DRAIN_LOG_RE
from router.client.frames import FrameClient
from router.core.config import ListenerConfig
from router.protocol.frames import decode_error, parse_header

DEFAULT_JSON = REPO_ROOT / "chaos" / "results" / "frame_flood.json"

MIB = 1024 * 1024
BUDGET_BYTES = ListenerConfig().max_buffered_bytes  # the router's default, not set here
UVLOOP_READ_BYTES = 256_000  # the most one read hands the router (uvloop's receive buffer)
PER_HOSTILE_BYTES = 16 * 1024
BOUND_SLACK_BYTES = 48 * MIB
HOSTILE_SNDBUF = 64 * 1024  # keeps the hostiles' own kernel buffers small
CONNECT_TIMEOUT_S = 5.0
RECONNECT_PAUSE_S = 0.05
RSS_INTERVAL_S = 0.05
CLIENT_REQUEST_TIMEOUT_S = 10.0
CLIENT_MAX_REQUESTS = 100_000
ROUTER_EXIT_TIMEOUT_S = 60.0
BACKEND_EXIT_TIMEOUT_S = 10.0
HOSTILE_EXIT_S = 30.0  # after the attack: time for the hostile process to report


@dataclass(frozen=True)
class Attack:
    hostiles: int
    attack_s: float
    frame_bytes: int
    chunk_bytes: int
    interval_s: float


def rss_bound(hostiles: int) -> int:
    """The stated bound on the router's RSS growth (module docstring)."""
    return int(1.25 * BUDGET_BYTES) + hostiles * PER_HOSTILE_BYTES + BOUND_SLACK_BYTES


def proc_status(pid: int, key: str) -> int:
    """``VmRSS`` or ``VmHWM`` of ``pid`` in bytes (0 once it is gone)."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0
    for line in text.splitlines():
        name, _, value = line.partition(":")
        if name == key:
            return int(value.split()[0]) * 1024  # kB
    return 0


# --------------------------------------------------------------------------- hostile process


async def _first_reply(reader: asyncio.StreamReader) -> str:
    """What the router says first: ``error:CODE``, ``frame``, ``eof`` or ``reset``."""
    try:
        header = await reader.readexactly(4)
        length, is_error = parse_header(header)
        body = await reader.readexactly(length)
    except asyncio.IncompleteReadError:
        return "eof"
    except ConnectionError:
        return "reset"
    return f"error:{decode_error(body)[0]}" if is_error else "frame"


async def _trickle(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, attack: Attack, deadline: float,
    chunk: memoryview,
) -> str:
    """One frame, never finished: its outcome (``attack-over`` if the time ran out first)."""
    reply = asyncio.ensure_future(_first_reply(reader))
    try:
        writer.write(attack.frame_bytes.to_bytes(4, "big"))
        left = attack.frame_bytes - 1  # never the last byte
        while left > 0:
            piece = chunk[:min(len(chunk), left)]
            writer.write(piece)
            left -= len(piece)
            drain = asyncio.ensure_future(writer.drain())
            done, _ = await asyncio.wait({drain, reply}, timeout=deadline - time.monotonic())
            if drain not in done:
                drain.cancel()
            if reply in done:
                return reply.result()
            if drain not in done:
                return "attack-over"
            if drain.exception() is not None:
                return "write-failed"
            done, _ = await asyncio.wait({reply}, timeout=attack.interval_s)
            if done:
                return reply.result()
        done, _ = await asyncio.wait({reply}, timeout=max(0.0, deadline - time.monotonic()))
        return reply.result() if done else "attack-over"
    except ConnectionError:
        return "reset"
    finally:
        if not reply.done():
            reply.cancel()


async def _hostile(
    addr: tuple[str, int], attack: Attack, deadline: float, outcomes: Counter[str],
    chunk: memoryview,
) -> None:
    while time.monotonic() < deadline:
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(*addr), CONNECT_TIMEOUT_S)
        except (OSError, TimeoutError) as exc:
            outcomes[f"connect-failed:{type(exc).__name__}"] += 1
            await asyncio.sleep(RECONNECT_PAUSE_S)
            continue
        sock = writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, HOSTILE_SNDBUF)
        outcomes["connections"] += 1
        outcomes[await _trickle(reader, writer, attack, deadline, chunk)] += 1
        writer.transport.abort()  # a reset: the router must cope with that too
        await asyncio.sleep(RECONNECT_PAUSE_S)


async def _hostiles_main(addr: tuple[str, int], attack: Attack, conn: Connection) -> None:
    outcomes: Counter[str] = Counter()
    chunk = memoryview(b"h" * attack.chunk_bytes)  # one buffer, shared by every write
    deadline = time.monotonic() + attack.attack_s
    conn.send("started")
    tasks = [asyncio.create_task(_hostile(addr, attack, deadline, outcomes, chunk))
             for _ in range(attack.hostiles)]
    async with asyncio.timeout(attack.attack_s + HOSTILE_EXIT_S):
        await asyncio.gather(*tasks)
    conn.send(dict(outcomes))


def _hostiles_entry(addr: tuple[str, int], attack: Attack, conn: Connection) -> None:
    raise_nofile_limit()
    try:
        uvloop.run(_hostiles_main(addr, attack, conn))
    except BaseException as exc:  # report it; the parent's invariants then fail
        conn.send({"crashed": repr(exc)})
    finally:
        conn.close()


# --------------------------------------------------------------------------- normal clients


async def _normal_client(
    index: int, addr: tuple[str, int], state: LoadState, until: asyncio.Event,
) -> None:
    client = await asyncio.wait_for(FrameClient.connect(*addr), CONNECT_TIMEOUT_S)
    try:
        for i in range(CLIENT_MAX_REQUESTS):
            if until.is_set():
                return
            await timed_request(state, f"n{index}-{i}", client.request, CLIENT_REQUEST_TIMEOUT_S)
    finally:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(client.close(), CONNECT_TIMEOUT_S)


async def _load(
    clients: int, addr: tuple[str, int], attack: Attack,
) -> tuple[LoadState, dict[str, Any], str]:
    state = LoadState(total=0, trigger_at=CLIENT_MAX_REQUESTS * clients)
    until = asyncio.Event()
    parent, child = multiprocessing.Pipe()
    hostiles = multiprocessing.get_context("spawn").Process(
        target=_hostiles_entry, args=(addr, attack, child), name="hostiles")
    hostiles.start()
    child.close()
    loop = asyncio.get_running_loop()
    started = await loop.run_in_executor(None, _recv, parent, CONNECT_TIMEOUT_S * 4)
    tasks = [asyncio.create_task(_normal_client(i, addr, state, until)) for i in range(clients)]
    report = await loop.run_in_executor(None, _recv, parent, attack.attack_s + HOSTILE_EXIT_S)
    until.set()
    async with asyncio.timeout(CLIENT_REQUEST_TIMEOUT_S * 2):
        await asyncio.gather(*tasks, return_exceptions=True)
    hostiles.join(timeout=10)
    if hostiles.is_alive():
        hostiles.kill()
        hostiles.join(timeout=5)
    after = await _one_request(addr)
    if started != "started" or not isinstance(report, dict):
        report = {"crashed": f"no report from the hostile process ({started!r}, {report!r})"}
    return state, report, after


def _recv(conn: Connection, timeout_s: float) -> Any:
    return conn.recv() if conn.poll(timeout_s) else None


async def _one_request(addr: tuple[str, int]) -> str:
    state = LoadState(total=1, trigger_at=1)
    try:
        client = await asyncio.wait_for(FrameClient.connect(*addr), CONNECT_TIMEOUT_S)
    except (OSError, TimeoutError) as exc:
        return f"refused:{type(exc).__name__}"
    try:
        await timed_request(state, "after-attack", client.request, CLIENT_REQUEST_TIMEOUT_S)
    finally:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(client.close(), CONNECT_TIMEOUT_S)
    return state.outcomes.get("after-attack", "none")


# --------------------------------------------------------------------------- the run


def raise_nofile_limit() -> None:
    """Soft RLIMIT_NOFILE up to the hard limit: the router and the hostiles inherit it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _stats(admin: str) -> dict[str, Any]:
    with urllib.request.urlopen(f"{admin}/stats", timeout=5.0) as resp:
        data: dict[str, Any] = json.loads(resp.read())
    return data


def run(
    clients: int = 20, hostiles: int = 2000, attack_s: float = 30.0, read_timeout_s: float = 10.0,
    frame_mib: float = 15.0, chunk_kib: int = 64, interval_ms: float = 20.0,
    seed: int | None = None,
) -> dict[str, Any]:
    """Run the scenario; ``seed`` is recorded only (the attack is not random)."""
    raise_nofile_limit()
    attack = Attack(hostiles, attack_s, int(frame_mib * MIB), chunk_kib * 1024,
                    interval_ms / 1000)
    procs: list[Process] = []
    router: Process | None = None
    sampler: RssSampler | None = None
    router_exit: int | None = None
    budget: dict[str, Any] = {}
    rss_before = hwm_before = hwm_after = 0
    with tempfile.TemporaryDirectory(prefix="chaos-flood-") as tmp:
        stderr_path = os.path.join(tmp, "router.stderr")
        config_path = Path(tmp) / "router.toml"
        try:
            ports = start_echoes(2, procs)
            text = f"[listener]\nread_timeout_s = {read_timeout_s}\n"
            text += "".join(f'\n[[backends]]\naddress = "127.0.0.1:{p}"\n' for p in ports)
            config_path.write_text(text)
            with open(stderr_path, "wb") as stderr_file:
                router, addr, admin = start_router([], stderr_file, config_path=config_path)
            get_backends(admin)  # the admin endpoint answers
            rss_before = proc_status(router.pid, "VmRSS")
            hwm_before = proc_status(router.pid, "VmHWM")
            sampler = RssSampler(router.pid, interval_s=RSS_INTERVAL_S, max_s=attack_s + 120)
            sampler.start()
            state, report, after = uvloop.run(_load(clients, addr, attack))
            sampler.stop()
            hwm_after = proc_status(router.pid, "VmHWM")
            budget = _stats(admin)["listener"].get("read_budget", {})
            router_exit = stop(router, ROUTER_EXIT_TIMEOUT_S)
            for proc in procs:
                stop(proc, BACKEND_EXIT_TIMEOUT_S)
        finally:
            if sampler is not None:
                sampler.stop()
            reap([*procs, *([router] if router is not None else [])])
        stderr_text = Path(stderr_path).read_text(errors="replace")
    return _result(clients, attack, read_timeout_s, seed, state, report, after, budget,
                   (rss_before, hwm_before, hwm_after, sampler), stderr_text, router_exit)


def _result(
    clients: int, attack: Attack, read_timeout_s: float, seed: int | None, state: LoadState,
    report: dict[str, Any], after: str, budget: dict[str, Any],
    memory: tuple[int, int, int, RssSampler | None], stderr_text: str,
    router_exit: int | None,
) -> dict[str, Any]:
    rss_before, hwm_before, hwm_after, sampler = memory
    drain = DRAIN_LOG_RE.search(stderr_text)
    dropped = int(drain.group(2)) if drain else None
    outcomes = Counter(o if not o.startswith("error:") else "error"
                       for o in state.outcomes.values())
    codes = Counter(o[6:] for o in state.outcomes.values() if o.startswith("error:"))
    peak = max(hwm_after, sampler.peak if sampler else 0)
    growth = peak - rss_before
    bound = rss_bound(attack.hostiles)
    latencies = sorted(state.latencies_s.values())
    invariants = {
        "normal_requests_all_ok": bool(state.outcomes) and outcomes["ok"] == len(state.outcomes),
        "hostiles_ran": "crashed" not in report and report.get("connections", 0)
        >= attack.hostiles,
        "rss_growth_under_bound": growth < bound,
        "budget_peak_within_limit": budget.get("peak_bytes", 0)
        <= budget.get("limit_bytes", 0) + UVLOOP_READ_BYTES,
        "budget_was_exercised": budget.get("waits_total", 0) + budget.get("shed_total", 0) > 0,
        "router_answers_after_attack": after == "ok",
        "drain_dropped_zero": dropped == 0,
        "router_exit_zero": router_exit == 0,
    }
    result: dict[str, Any] = {
        "clients": clients, "hostiles": attack.hostiles, "attack_s": attack.attack_s,
        "frame_bytes": attack.frame_bytes, "chunk_bytes": attack.chunk_bytes,
        "interval_s": attack.interval_s, "read_timeout_s": read_timeout_s, "seed": seed,
        "normal_requests": len(state.outcomes), "ok": outcomes["ok"], "errors": outcomes["error"],
        "error_codes": dict(codes), "lost": outcomes["lost"], "timeout": outcomes["timeout"],
        "mismatch": outcomes["mismatch"],
        "normal_p99_ms": round(latencies[int(len(latencies) * 0.99)] * 1000, 2)
        if latencies else None,
        "hostile_outcomes": report,
        "read_budget": budget,
        "rss_before_mib": round(rss_before / MIB, 1),
        "vmhwm_before_mib": round(hwm_before / MIB, 1),
        "rss_sampled_peak_mib": round((sampler.peak if sampler else 0) / MIB, 1),
        "vmhwm_after_mib": round(hwm_after / MIB, 1),
        "rss_growth_mib": round(growth / MIB, 1),
        "rss_bound_mib": round(bound / MIB, 1),
        "rss_samples": sampler.samples if sampler else 0,
        "after_attack": after, "dropped": dropped, "router_exit_code": router_exit,
    }
    return judged(result, invariants, stderr_text)


def summary(result: dict[str, Any]) -> str:
    budget = result["read_budget"]
    rows: list[tuple[str, Any]] = [
        ("hostiles x frame / attack",
         f"{result['hostiles']} x {result['frame_bytes'] / MIB:.0f} MiB / {result['attack_s']} s"),
        ("hostile outcomes", result["hostile_outcomes"]),
        ("normal requests ok / errors",
         f"{result['ok']} / {result['errors']} {result['error_codes']} (p99 "
         f"{result['normal_p99_ms']} ms)"),
        ("RSS before / sampled peak / VmHWM",
         f"{result['rss_before_mib']} / {result['rss_sampled_peak_mib']} / "
         f"{result['vmhwm_after_mib']} MiB ({result['rss_samples']} samples)"),
        ("RSS growth / bound", f"{result['rss_growth_mib']} / {result['rss_bound_mib']} MiB"),
        ("read budget peak / limit",
         f"{budget.get('peak_bytes', 0) / MIB:.1f} / {budget.get('limit_bytes', 0) / MIB:.0f} MiB"),
        ("budget waits / shed / too large",
         f"{budget.get('waits_total')} / {budget.get('shed_total')} / "
         f"{budget.get('too_large_total')}"),
        ("request after attack", result["after_attack"]),
        ("dropped (router log) / exit", f"{result['dropped']} / {result['router_exit_code']}"),
    ]
    return format_summary(rows, result["invariants"], result["passed"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m chaos.frame_flood", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--hostiles", type=int, default=2000)
    parser.add_argument("--attack-s", type=float, default=30.0)
    parser.add_argument("--read-timeout", type=float, default=10.0)
    parser.add_argument("--frame-mib", type=float, default=15.0)
    parser.add_argument("--chunk-kib", type=int, default=64)
    parser.add_argument("--interval-ms", type=float, default=20.0)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON)
    args = parser.parse_args(argv)
    if args.clients < 1 or not 1 <= args.hostiles <= 10_000 or not 0 < args.attack_s <= 600:
        parser.error("--clients >= 1, --hostiles in 1..10000, --attack-s in (0, 600]")
    if not 0 < args.frame_mib <= 16 or args.chunk_kib < 1 or args.interval_ms < 0:
        parser.error("--frame-mib in (0, 16], --chunk-kib >= 1, --interval-ms >= 0")
    result = run(args.clients, args.hostiles, args.attack_s, args.read_timeout, args.frame_mib,
                 args.chunk_kib, args.interval_ms, args.seed)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(summary(result))
    print(f"wrote {args.json}")
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
