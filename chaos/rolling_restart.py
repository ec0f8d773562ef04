"""Chaos scenario: rolling restart of the router on one port with SO_REUSEPORT.

Two echo backends (``--record-ids``) sit behind router A, started with ``--listen 127.0.0.1:P
--reuse-port``. N ``RetryingClient`` clients (all to ``127.0.0.1:P``) each send R requests one
at a time, with unique payloads ``c{client}-r{i}``. Once about 30 % of all requests have an
outcome, router B is started with the same ``--listen`` and ``--reuse-port`` (its own admin
port); once B's ``GET /readyz`` answers 200, A gets SIGTERM (docs/operations.md, "Rolling
restart on one port"). The clients reconnect to the same address, land on B and resend only
what was never answered. When the load is done, B's ``/metrics`` is scraped and B gets SIGTERM.

Each request ends as ``ok`` (the echo matched), ``error:X`` (an error frame), ``lost`` (no
answer after the client's attempts), ``mismatch`` or ``timeout``.

Invariants (all must hold, else exit status 1): every request ``ok`` (exactly
``clients * requests`` of them); A and B both logged ``dropped 0`` and exited 0; every ``ok``
id was processed by a backend and every processed id was seen ``ok``; no id was processed
twice (a resend only ever repeats a request that was never processed); B answered requests.

Run: ``python -m chaos.rolling_restart [--clients 20] [--requests 200] [--seed S] [--json PATH]``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import uvloop

from chaos.cli import scenario_main
from chaos.common import (
    REPO_ROOT,
    LoadState,
    Process,
    format_summary,
    free_port,
    reap,
    start_echo,
    start_router,
    stop,
    timed_request,
    wait_readyz,
)
from chaos.drain import DRAIN_LOG_RE, scrape
from router.client.frames import RetryingClient

DEFAULT_JSON = REPO_ROOT / "chaos" / "results" / "rolling_restart.json"

BACKEND_DELAY_MS = 2
TRIGGER_FRACTION = (0.25, 0.35)  # "about 30 %"
# a client's requests past this fraction wait until A got SIGTERM (bounded by the clients'
# timeout), so a fast load cannot finish before B is up and B is sure to serve some of it
GATE_FRACTION = 0.6
READYZ_TIMEOUT_S = 10.0
REQUEST_TIMEOUT_S = 30.0  # must exceed the drain grace: an accepted request is answered by then
CLIENTS_TIMEOUT_S = 90.0
ROUTER_EXIT_TIMEOUT_S = 30.0
BACKEND_EXIT_TIMEOUT_S = 10.0


# --------------------------------------------------------------------------- clients


async def _client(
    index: int, requests: int, addr: tuple[str, int], state: LoadState, stats: Counter[str],
    restarted: asyncio.Event,
) -> None:
    """One ``RetryingClient`` sending ``c{index}-r{i}`` one at a time.

    From request ``GATE_FRACTION * requests`` on it waits for ``restarted`` first.
    """
    client = RetryingClient([addr])
    gate_at = int(requests * GATE_FRACTION)
    try:
        for i in range(requests):
            if i == gate_at:
                await restarted.wait()
            request_id = f"c{index}-r{i}"
            await timed_request(state, request_id, client.request, REQUEST_TIMEOUT_S)
    finally:
        stats["resent"] += client.resent
        stats["connects"] += client.reconnects
        with contextlib.suppress(Exception):
            await asyncio.wait_for(client.close(), 2.0)


async def _load(
    clients: int, requests: int, addr: tuple[str, int], router_a: Process,
    admin_a: str, start_b: Any, rng: random.Random,
) -> tuple[LoadState, Counter[str], dict[str, Any]]:
    total = clients * requests
    fraction = rng.uniform(*TRIGGER_FRACTION)
    state = LoadState(total=total, trigger_at=max(1, int(total * fraction)))
    stats: Counter[str] = Counter()
    info: dict[str, Any] = {"trigger_fraction": round(fraction, 3)}
    restarted = asyncio.Event()
    started = time.monotonic()
    tasks = [asyncio.create_task(_client(c, requests, addr, state, stats, restarted))
             for c in range(clients)]
    all_done = asyncio.gather(*tasks)

    async def restart_when_triggered() -> None:
        try:
            await restart()
        finally:
            restarted.set()  # also on failure: the clients go on (and the run fails)

    async def restart() -> None:
        await state.triggered.wait()
        info["restart_after_outcomes"] = state.done
        info["b_started_at_s"] = round(time.monotonic() - started, 3)
        await asyncio.to_thread(start_b)  # starts B and waits for its /readyz
        info["b_ready_at_s"] = round(time.monotonic() - started, 3)
        with contextlib.suppress(OSError):
            info["a_metrics_before_sigterm"] = await asyncio.to_thread(scrape, admin_a)
        info["a_sigterm_at_s"] = round(time.monotonic() - started, 3)
        info["a_sigterm_after_outcomes"] = state.done
        router_a.terminate()

    trigger = asyncio.create_task(restart_when_triggered())
    try:
        await asyncio.wait_for(all_done, CLIENTS_TIMEOUT_S)
    except TimeoutError:
        info["clients_timed_out"] = True
    info["load_duration_s"] = round(time.monotonic() - started, 3)
    if not trigger.done():
        trigger.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await trigger
    if not trigger.cancelled() and trigger.exception() is not None:
        info["restart_error"] = repr(trigger.exception())
    return state, stats, info


# --------------------------------------------------------------------------- scenario


def _read_ids(path: str) -> list[str]:
    try:
        return Path(path).read_text().splitlines()
    except FileNotFoundError:
        return []


def _wait_exit(proc: Process, timeout_s: float) -> int | None:
    try:
        return proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=5)
        return None


def _drain(stderr_text: str) -> tuple[int | None, float | None, str | None]:
    match = DRAIN_LOG_RE.search(stderr_text)
    if match is None:
        return None, None, None
    return int(match.group(2)), float(match.group(1)), match.group(0)


def run(clients: int = 20, requests: int = 200, seed: int | None = None) -> dict[str, Any]:
    rng = random.Random(seed)
    procs: list[Process] = []
    router_b: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="chaos-rolling-") as tmp:
        record_paths = [os.path.join(tmp, f"backend{i}.ids") for i in range(2)]
        stderr_paths = {name: os.path.join(tmp, f"router_{name}.stderr") for name in "ab"}
        a_exit: int | None = None
        b_exit: int | None = None
        b_metrics: dict[str, float] | None = None
        try:
            backends = []
            for path in record_paths:
                proc, port = start_echo(delay_ms=BACKEND_DELAY_MS, record_path=path)
                procs.append(proc)
                backends.append((proc, port))
            backend_ports = [p for _, p in backends]
            listen = f"127.0.0.1:{free_port()}"
            with open(stderr_paths["a"], "wb") as stderr_file:
                router_a, addr, admin_a = start_router(
                    backend_ports, stderr_file, listen_address=listen, reuse_port=True)
            procs.append(router_a)
            if not wait_readyz(admin_a, READYZ_TIMEOUT_S):
                raise RuntimeError("router A never became ready")

            def start_b() -> None:
                with open(stderr_paths["b"], "wb") as stderr_file:
                    proc, b_addr, admin_b = start_router(
                        backend_ports, stderr_file, listen_address=listen, reuse_port=True)
                procs.append(proc)
                router_b.update(proc=proc, addr=b_addr, admin=admin_b)
                if not wait_readyz(admin_b, READYZ_TIMEOUT_S):
                    raise RuntimeError("router B never became ready")

            state, stats, info = uvloop.run(
                _load(clients, requests, addr, router_a, admin_a, start_b, rng))

            if router_a.poll() is None and "a_sigterm_at_s" not in info:
                router_a.terminate()  # the restart never happened; still stop A
            a_exit = _wait_exit(router_a, ROUTER_EXIT_TIMEOUT_S)
            if "proc" in router_b:
                with contextlib.suppress(OSError):
                    b_metrics = scrape(router_b["admin"])
                b_exit = stop(router_b["proc"], ROUTER_EXIT_TIMEOUT_S)
            for proc, _ in backends:
                stop(proc, BACKEND_EXIT_TIMEOUT_S)
        finally:
            reap(procs)

        stderr_a = Path(stderr_paths["a"]).read_text(errors="replace")
        stderr_b = (Path(stderr_paths["b"]).read_text(errors="replace")
                    if os.path.exists(stderr_paths["b"]) else "")
        processed_list = [i for path in record_paths for i in _read_ids(path)]

    a_dropped, a_drain_s, a_line = _drain(stderr_a)
    b_dropped, b_drain_s, b_line = _drain(stderr_b)
    outcomes = state.outcomes
    counts = Counter(o if not o.startswith("error:") else "error" for o in outcomes.values())
    error_codes = Counter(o[6:] for o in outcomes.values() if o.startswith("error:"))
    ok_ids = {i for i, o in outcomes.items() if o == "ok"}
    processed_counts = Counter(processed_list)
    processed = set(processed_counts)
    duplicates = sum(n - 1 for n in processed_counts.values() if n > 1)
    b_completed = int(b_metrics["completed"]) if b_metrics else None
    total = clients * requests

    invariants = {
        "restart_happened": "a_sigterm_at_s" in info and "restart_error" not in info,
        "all_requests_ok": counts["ok"] == total == len(outcomes) == state.done,
        "a_dropped_zero": a_dropped == 0,
        "b_dropped_zero": b_dropped == 0,
        "a_exit_zero": a_exit == 0,
        "b_exit_zero": b_exit == 0,
        "ok_ids_processed": ok_ids <= processed,
        "processed_ids_seen_ok": processed <= ok_ids,
        "no_duplicate_processing": duplicates == 0,
        "b_served_requests": b_completed is not None and b_completed > 0,
    }
    result: dict[str, Any] = {
        "clients": clients,
        "requests": requests,
        "seed": seed,
        "listen": listen,
        "ok": counts["ok"],
        "lost": counts["lost"],
        "errors": counts["error"],
        "error_codes": dict(error_codes),
        "mismatch": counts["mismatch"],
        "timeout": counts["timeout"],
        "resent": stats["resent"],
        "connects": stats["connects"],
        "processed": len(processed_list),
        "processed_duplicates": duplicates,
        "processed_not_ok": sorted(processed - ok_ids)[:20],
        "ok_not_processed": sorted(ok_ids - processed)[:20],
        "a_dropped": a_dropped,
        "a_drain_duration_s": a_drain_s,
        "a_drain_log_line": a_line,
        "a_exit_code": a_exit,
        "b_dropped": b_dropped,
        "b_drain_duration_s": b_drain_s,
        "b_drain_log_line": b_line,
        "b_exit_code": b_exit,
        "b_completed": b_completed,
        "b_metrics": b_metrics,
        **info,
        "invariants": invariants,
        "passed": all(invariants.values()),
    }
    if a_line is None:
        result["router_a_stderr_tail"] = stderr_a[-2000:]
    if b_line is None:
        result["router_b_stderr_tail"] = stderr_b[-2000:]
    return result


def summary(result: dict[str, Any]) -> str:
    a_before = result.get("a_metrics_before_sigterm") or {}
    rows: list[tuple[str, Any]] = [
        ("clients x requests", f"{result['clients']} x {result['requests']}"),
        ("listen (shared)", result["listen"]),
        ("B started after", f"{result.get('restart_after_outcomes')} outcomes "
                            f"({result.get('b_started_at_s')} s)"),
        ("A SIGTERM at", f"{result.get('a_sigterm_at_s')} s after "
                         f"{result.get('a_sigterm_after_outcomes')} outcomes"),
        ("A completed before SIGTERM", a_before.get("completed")),
        ("B completed (final scrape)", result["b_completed"]),
        ("ok / lost / errors", f"{result['ok']} / {result['lost']} / {result['errors']}"),
        ("mismatch / timeout", f"{result['mismatch']} / {result['timeout']}"),
        ("resent / connects", f"{result['resent']} / {result['connects']}"),
        ("processed / duplicates",
         f"{result['processed']} / {result['processed_duplicates']}"),
        ("A dropped / drain / exit",
         f"{result['a_dropped']} / {result['a_drain_duration_s']} s / {result['a_exit_code']}"),
        ("B dropped / drain / exit",
         f"{result['b_dropped']} / {result['b_drain_duration_s']} s / {result['b_exit_code']}"),
        ("load duration", f"{result.get('load_duration_s')} s"),
    ]
    return format_summary(rows, result["invariants"], result["passed"])


def main(argv: list[str] | None = None) -> int:
    return scenario_main("python -m chaos.rolling_restart", __doc__, run, summary, DEFAULT_JSON,
                         argv, clients=20, requests=200)


if __name__ == "__main__":
    sys.exit(main())
