"""Chaos scenario: hostile client connections while normal clients run; nobody else notices.

Two echo backends sit behind one router that reads a temporary TOML config with
``[listener] read_timeout_s = 0.5`` and ``max_frame_bytes = 1048576``. N plain ``FrameClient``
clients (no client-side retries) each send R requests one at a time while H hostile
connections (a seeded mix, each one connection, at most ``HOSTILE_CONCURRENCY`` at a time, on
blocking sockets in worker threads) do one of:

* ``slow``: a header announcing 1000 bytes, then 10 bytes every 100 ms; the router must answer
  ``READ_TIMEOUT`` (or close) within read_timeout_s + 1 s of the first byte;
* ``oversize``: the length word 0x7FFFFFF0; the router must answer ``FRAME_TOO_LARGE``;
* ``garbage``: 1-200 seeded random bytes, then close;
* ``reset``: half a frame, then an abortive close (``SO_LINGER (1, 0)``: a RST);
* ``idle``: connect, send nothing, close after 0.2 s.

The router's RSS is read before the hostiles, sampled every 50 ms during, and read after.

Invariants (all must hold, else exit status 1): every normal request ``ok``; every ``slow``
connection got ``READ_TIMEOUT`` or EOF in the bound and every ``oversize`` one got
``FRAME_TOO_LARGE``; the router answers one more request after the storm; peak RSS - RSS
before < 50 MiB; the router logged ``dropped 0`` and exited 0 after SIGTERM.

Run: ``python -m chaos.hostile_clients [--clients 10] [--requests 300] [--hostiles 200]
[--seed S] [--json PATH]``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import select
import socket
import struct
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
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
    run_client,
    start_echoes,
    start_router,
    stop,
)
from chaos.drain import DRAIN_LOG_RE
from router.client.frames import ErrorReply, FrameClient
from router.protocol.frames import decode_error, encode_frame, parse_header

DEFAULT_JSON = REPO_ROOT / "chaos" / "results" / "hostile_clients.json"

READ_TIMEOUT_S = 0.5  # the router's [listener] read_timeout_s
MAX_FRAME_BYTES = 1_048_576  # the router's [listener] max_frame_bytes
SLOW_ANNOUNCED = 1000
SLOW_CHUNK = 10
SLOW_INTERVAL_S = 0.1
SLOW_BOUND_S = READ_TIMEOUT_S + 1.0  # "within ~1 s": the read timeout plus slack
OVERSIZE_WORD = 0x7FFF_FFF0
IDLE_S = 0.2
HOSTILE_KINDS = ("slow", "oversize", "garbage", "reset", "idle")
HOSTILE_CONCURRENCY = 16
HOSTILE_IO_TIMEOUT_S = 3.0
RSS_INTERVAL_S = 0.05
RSS_MAX_S = 120.0
RSS_GROWTH_LIMIT = 50 * 1024 * 1024
CLIENT_REQUEST_TIMEOUT_S = 10.0
CLIENTS_TIMEOUT_S = 90.0
HOSTILES_TIMEOUT_S = 90.0
ROUTER_EXIT_TIMEOUT_S = 30.0
BACKEND_EXIT_TIMEOUT_S = 10.0


def _write_config(path: Path, ports: list[int]) -> None:
    text = (
        "[listener]\n"
        f"read_timeout_s = {READ_TIMEOUT_S}\n"
        f"max_frame_bytes = {MAX_FRAME_BYTES}\n"
    )
    for port in ports:
        text += f'\n[[backends]]\naddress = "127.0.0.1:{port}"\n'
    path.write_text(text)


# --------------------------------------------------------------------------- hostile connections


def _read_reply(sock: socket.socket, deadline: float) -> str:
    """The first thing the router says: ``error:CODE``, ``frame`` (a normal one), ``eof``,
    ``reset`` or ``no-reply`` (nothing by ``deadline``)."""
    buf = b""
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return "no-reply"
        readable, _, _ = select.select([sock], [], [], remaining)
        if not readable:
            continue
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            return "reset"
        if not chunk:
            return "eof"
        buf += chunk
        if len(buf) >= 4:
            length, is_error = parse_header(buf[:4])
            if len(buf) >= 4 + length:
                if is_error:
                    return f"error:{decode_error(buf[4:4 + length])[0]}"
                return "frame"


def _slow(sock: socket.socket) -> tuple[str, float]:
    started = time.monotonic()
    deadline = started + SLOW_BOUND_S + 1.0  # observe a bit past the bound, then give up
    body = b"s" * SLOW_ANNOUNCED
    try:
        sock.sendall(SLOW_ANNOUNCED.to_bytes(4, "big"))
        sent = 0
        while time.monotonic() < deadline:
            readable, _, _ = select.select([sock], [], [], SLOW_INTERVAL_S)
            if readable:
                outcome = _read_reply(sock, deadline)
                return outcome, time.monotonic() - started
            if sent < SLOW_ANNOUNCED - SLOW_CHUNK:  # never complete the frame
                sock.sendall(body[sent:sent + SLOW_CHUNK])
                sent += SLOW_CHUNK
    except (BrokenPipeError, ConnectionResetError):
        return "reset", time.monotonic() - started
    return "no-reply", time.monotonic() - started


def _hostile(kind: str, addr: tuple[str, int], rng_seed: int) -> dict[str, Any]:
    rng = random.Random(rng_seed)
    result: dict[str, Any] = {"kind": kind}
    try:
        sock = socket.create_connection(addr, timeout=HOSTILE_IO_TIMEOUT_S)
    except OSError as exc:
        result["outcome"] = f"connect-failed:{type(exc).__name__}"
        return result
    try:
        if kind == "slow":
            outcome, elapsed = _slow(sock)
            result["outcome"] = outcome
            result["elapsed_s"] = round(elapsed, 3)
        elif kind == "oversize":
            sock.sendall(OVERSIZE_WORD.to_bytes(4, "big"))
            result["outcome"] = _read_reply(sock, time.monotonic() + HOSTILE_IO_TIMEOUT_S)
        elif kind == "garbage":
            sock.sendall(rng.randbytes(rng.randint(1, 200)))
            result["outcome"] = "sent"
        elif kind == "reset":
            frame = encode_frame(rng.randbytes(rng.randint(20, 400)))
            sock.sendall(frame[:len(frame) // 2])
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            result["outcome"] = "sent"
        else:  # idle
            time.sleep(IDLE_S)
            result["outcome"] = "sent"
    except OSError as exc:
        result["outcome"] = f"io-error:{type(exc).__name__}"
    finally:
        sock.close()
    return result


def _hostile_ok(item: dict[str, Any]) -> bool:
    kind, outcome = item["kind"], item["outcome"]
    if kind == "slow":
        return (outcome in ("error:READ_TIMEOUT", "eof", "reset")
                and item["elapsed_s"] <= SLOW_BOUND_S)
    if kind == "oversize":
        return bool(outcome == "error:FRAME_TOO_LARGE")
    return not outcome.startswith("connect-failed")


# --------------------------------------------------------------------------- load


async def _storm(
    clients: int, requests: int, hostiles: int, seed: int, addr: tuple[str, int],
) -> tuple[LoadState, list[dict[str, Any]], dict[str, Any]]:
    total = clients * requests
    state = LoadState(total=total, trigger_at=total)
    info: dict[str, Any] = {}
    rng = random.Random(seed)
    plan = [(rng.choice(HOSTILE_KINDS), rng.randrange(2**32)) for _ in range(hostiles)]
    loop = asyncio.get_running_loop()
    started = time.monotonic()
    client_tasks = [
        asyncio.create_task(run_client(c, requests, addr, state,
                                       request_timeout_s=CLIENT_REQUEST_TIMEOUT_S))
        for c in range(clients)
    ]
    with ThreadPoolExecutor(max_workers=HOSTILE_CONCURRENCY,
                            thread_name_prefix="hostile") as pool:
        hostile_futs = [loop.run_in_executor(pool, _hostile, kind, addr, s) for kind, s in plan]
        try:
            hostile_results = await asyncio.wait_for(
                asyncio.gather(*hostile_futs), HOSTILES_TIMEOUT_S)
        except TimeoutError:
            info["hostiles_timed_out"] = True
            hostile_results = [f.result() for f in hostile_futs if f.done()]
    info["hostiles_duration_s"] = round(time.monotonic() - started, 3)
    try:
        await asyncio.wait_for(asyncio.gather(*client_tasks), CLIENTS_TIMEOUT_S)
    except TimeoutError:
        info["clients_timed_out"] = True
    info["load_duration_s"] = round(time.monotonic() - started, 3)
    return state, list(hostile_results), info


async def _one_request(addr: tuple[str, int]) -> str:
    try:
        conn = await asyncio.wait_for(FrameClient.connect(*addr), 2.0)
    except (OSError, TimeoutError) as exc:
        return f"refused:{type(exc).__name__}"
    try:
        answer = await asyncio.wait_for(conn.request(b"after-storm"), CLIENT_REQUEST_TIMEOUT_S)
    except ErrorReply as exc:
        return f"error:{exc.code}"
    except Exception as exc:
        return f"failed:{type(exc).__name__}"
    finally:
        await asyncio.wait_for(conn.close(), 2.0)
    return "ok" if answer == b"after-storm" else "mismatch"


def run(
    clients: int = 10, requests: int = 300, hostiles: int = 200, seed: int | None = None,
) -> dict[str, Any]:
    seed = 0 if seed is None else seed
    procs: list[Process] = []
    router: Process | None = None
    sampler: RssSampler | None = None
    router_exit: int | None = None
    rss_before = rss_after = 0
    with tempfile.TemporaryDirectory(prefix="chaos-hostile-") as tmp:
        stderr_path = os.path.join(tmp, "router.stderr")
        config_path = Path(tmp) / "router.toml"
        try:
            ports = start_echoes(2, procs)
            _write_config(config_path, ports)
            with open(stderr_path, "wb") as stderr_file:
                router, addr, admin = start_router([], stderr_file, config_path=config_path)
            get_backends(admin)  # the admin endpoint answers
            sampler = RssSampler(router.pid, interval_s=RSS_INTERVAL_S, max_s=RSS_MAX_S)
            rss_before = sampler.rss()
            sampler.start()
            state, hostile_results, info = uvloop.run(
                _storm(clients, requests, hostiles, seed, addr))
            sampler.stop()
            rss_after = sampler.rss()
            after_storm = uvloop.run(_one_request(addr))
            router_exit = stop(router, ROUTER_EXIT_TIMEOUT_S)
            for proc in procs:
                stop(proc, BACKEND_EXIT_TIMEOUT_S)
        finally:
            if sampler is not None:
                sampler.stop()
            reap([*procs, *([router] if router is not None else [])])
        stderr_text = Path(stderr_path).read_text(errors="replace")

    drain = DRAIN_LOG_RE.search(stderr_text)
    dropped = int(drain.group(2)) if drain else None
    outcomes = state.outcomes
    counts = Counter(o if not o.startswith("error:") else "error" for o in outcomes.values())
    error_codes = Counter(o[6:] for o in outcomes.values() if o.startswith("error:"))
    by_kind: dict[str, Counter[str]] = {k: Counter() for k in HOSTILE_KINDS}
    for item in hostile_results:
        by_kind[item["kind"]][item["outcome"]] += 1
    failed_hostiles = [h for h in hostile_results if not _hostile_ok(h)]
    slow_elapsed = [h["elapsed_s"] for h in hostile_results if h["kind"] == "slow"]
    rss_peak = max(sampler.peak if sampler else 0, rss_before, rss_after)
    mib = 1024 * 1024

    invariants = {
        "normal_clients_all_ok": counts["ok"] == clients * requests == len(outcomes),
        "hostiles_all_finished": len(hostile_results) == hostiles,
        "hostiles_answered_as_expected": not failed_hostiles,
        "router_answers_after_storm": after_storm == "ok",
        "rss_growth_bounded": rss_peak - rss_before < RSS_GROWTH_LIMIT,
        "drain_dropped_zero": dropped == 0,
        "router_exit_zero": router_exit == 0,
    }
    result: dict[str, Any] = {
        "clients": clients,
        "requests": requests,
        "hostiles": hostiles,
        "seed": seed,
        "read_timeout_s": READ_TIMEOUT_S,
        "max_frame_bytes": MAX_FRAME_BYTES,
        "ok": counts["ok"],
        "errors": counts["error"],
        "error_codes": dict(error_codes),
        "lost": counts["lost"],
        "refused": counts["refused"],
        "mismatch": counts["mismatch"],
        "timeout": counts["timeout"],
        "reconnects": state.reconnects,
        "hostile_outcomes": {k: dict(v) for k, v in by_kind.items()},
        "hostile_failures": failed_hostiles[:20],
        "slow_elapsed_s_min_max": (
            [min(slow_elapsed), max(slow_elapsed)] if slow_elapsed else None),
        "after_storm": after_storm,
        "rss_before_mib": round(rss_before / mib, 2),
        "rss_peak_mib": round(rss_peak / mib, 2),
        "rss_after_mib": round(rss_after / mib, 2),
        "rss_growth_mib": round((rss_peak - rss_before) / mib, 2),
        "rss_samples": sampler.samples if sampler else 0,
        "dropped": dropped,
        "router_exit_code": router_exit,
        **info,
    }
    return judged(result, invariants, stderr_text)


def summary(result: dict[str, Any]) -> str:
    rows: list[tuple[str, Any]] = [
        ("clients x requests / hostiles",
         f"{result['clients']} x {result['requests']} / {result['hostiles']}"),
        ("load / hostiles duration",
         f"{result.get('load_duration_s')} / {result.get('hostiles_duration_s')} s"),
        ("ok / errors", f"{result['ok']} / {result['errors']} {result['error_codes']}"),
        ("lost / refused / mismatch / timeout",
         f"{result['lost']} / {result['refused']} / {result['mismatch']} / {result['timeout']}"),
    ]
    rows += [(f"hostile {kind}", outcomes)
             for kind, outcomes in result["hostile_outcomes"].items()]
    rows += [
        ("slow answered after min..max", f"{result['slow_elapsed_s_min_max']} s"),
        ("request after storm", result["after_storm"]),
        ("RSS before / peak / after",
         f"{result['rss_before_mib']} / {result['rss_peak_mib']} / "
         f"{result['rss_after_mib']} MiB ({result['rss_samples']} samples)"),
        ("dropped (router log)", result["dropped"]),
        ("router exit code", result["router_exit_code"]),
    ]
    return format_summary(rows, result["invariants"], result["passed"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m chaos.hostile_clients", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--hostiles", type=int, default=200)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON)
    args = parser.parse_args(argv)
    if args.clients < 1 or args.requests < 1 or not 0 <= args.hostiles <= 10_000:
        parser.error("--clients and --requests must be >= 1, --hostiles in 0..10000")
    result = run(args.clients, args.requests, args.hostiles, args.seed)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(summary(result))
    print(f"wrote {args.json}")
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
