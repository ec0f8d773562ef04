"""Chaos scenario: kill -9 backends under load; retries hide it, health marks them down and up.

Three echo backends listen on ports picked up front (so each can be restarted on the same
port) behind one router. N plain ``FrameClient`` clients (no client-side retries) each send R
requests one at a time, with unique payloads ``c{client}-r{i}``. By share of outcomes:

* at ~25 % backend 0 gets SIGKILL, at ~45 % backend 1 gets SIGKILL;
* at ~65 % both are restarted on their old ports.

Meanwhile ``GET /backends`` is polled every 20 ms (bounded), which gives the time from each kill
to the router showing the backend ``healthy: false``, and from each restart to ``healthy: true``.
The router revives a down backend only through its active probe (every ``[health] interval_s``),
which can come after the main load has finished; so if a restarted backend has not yet served
a request when the load ends, a bounded recovery load (small rounds of the same kind of
clients) runs until both have, or the bound passes. Its requests count like the others.

Invariants (all must hold, else exit status 1): every request answered ``ok`` (router retries
hide the crashes: no error frame, no lost connection, no timeout); each killed backend was
shown down; each restarted backend was shown healthy again and answered requests again
(``requests_total - failures_total`` grew after the restart); the router exits 0 after SIGTERM;
exactly the expected number of outcomes.

Run: ``python -m chaos.backend_crash [--clients 20] [--requests 300] [--seed S] [--json PATH]``.
"""

from __future__ import annotations

import asyncio
import os
import signal
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
    BackendsPoller,
    LoadState,
    Process,
    first_sample_after,
    format_summary,
    free_port,
    get_backends,
    judged,
    last_sample_before,
    reap,
    run_client,
    start_echo,
    start_router,
    stop,
)

DEFAULT_JSON = REPO_ROOT / "chaos" / "results" / "backend_crash.json"

BACKENDS = 3
BACKEND_DELAY_MS = 2
KILL_AT = (0.25, 0.45)  # share of outcomes at which backend 0, then backend 1, is killed
RESTART_AT = 0.65
POLL_INTERVAL_S = 0.02
POLL_MAX_S = 150.0
CLIENTS_TIMEOUT_S = 90.0
REQUEST_TIMEOUT_S = 30.0
RECOVERY_MAX_S = 15.0  # bound on the recovery load (the router's probe interval is 2 s)
RECOVERY_CLIENTS = 4
RECOVERY_REQUESTS = 25
RECOVERY_MAX_ROUNDS = 50
ROUTER_EXIT_TIMEOUT_S = 30.0
BACKEND_EXIT_TIMEOUT_S = 10.0


def _successes(stats: dict[str, Any] | None) -> int:
    if stats is None:
        return 0
    return int(stats["requests_total"]) - int(stats["failures_total"])


class Chaos:
    """The backend processes and what was done to them, with monotonic timestamps."""

    def __init__(self, ports: list[int]) -> None:
        self.ports = ports
        self.procs: list[Process] = []
        self.retired: list[Process] = []  # killed ones, for cleanup
        self.killed_at: dict[int, float] = {}
        self.restarted_at: dict[int, float] = {}
        self.kill_after_outcomes: dict[int, int] = {}
        self.restart_after_outcomes: int | None = None
        self.error: str | None = None

    def start_all(self) -> None:
        for port in self.ports:
            proc, _ = start_echo(port, delay_ms=BACKEND_DELAY_MS)
            self.procs.append(proc)

    def kill(self, index: int, outcomes: int) -> None:
        proc = self.procs[index]
        proc.kill()  # SIGKILL: no goodbye to the router's pooled connections
        self.killed_at[index] = time.monotonic()
        self.kill_after_outcomes[index] = outcomes
        proc.wait(timeout=5)
        self.retired.append(proc)

    def restart(self, index: int) -> None:
        proc, _ = start_echo(self.ports[index], delay_ms=BACKEND_DELAY_MS)
        self.procs[index] = proc
        self.restarted_at[index] = time.monotonic()

    def cleanup(self) -> None:
        for proc in self.procs:
            stop(proc, BACKEND_EXIT_TIMEOUT_S)
        reap(self.procs + self.retired)


async def _main_load(
    clients: int, requests: int, addr: tuple[str, int], chaos: Chaos,
) -> tuple[LoadState, dict[str, Any]]:
    total = clients * requests
    marks = [max(1, int(total * f)) for f in (*KILL_AT, RESTART_AT)]
    events = [asyncio.Event() for _ in marks]

    def on_record(done: int) -> None:
        for mark, event in zip(marks, events, strict=True):
            if done >= mark:
                event.set()

    state = LoadState(total=total, trigger_at=total, on_record=on_record)
    info: dict[str, Any] = {}
    started = time.monotonic()

    async def inject() -> None:
        for index in (0, 1):
            await events[index].wait()
            chaos.kill(index, state.done)
        await events[2].wait()
        chaos.restart_after_outcomes = state.done
        for index in (0, 1):
            await asyncio.to_thread(chaos.restart, index)

    injector = asyncio.create_task(inject())
    tasks = [
        asyncio.create_task(run_client(c, requests, addr, state,
                                       request_timeout_s=REQUEST_TIMEOUT_S))
        for c in range(clients)
    ]
    try:
        await asyncio.wait_for(asyncio.gather(*tasks), CLIENTS_TIMEOUT_S)
    except TimeoutError:
        info["clients_timed_out"] = True
    info["load_duration_s"] = round(time.monotonic() - started, 3)
    # the restart may still be in progress when the last client finishes: let it complete
    try:
        await asyncio.wait_for(injector, 30.0)
    except TimeoutError:
        chaos.error = "fault injection did not finish within 30 s"
    except Exception as exc:
        chaos.error = f"fault injection failed: {exc!r}"
    return state, info


def _restarted_served(admin: str, chaos: Chaos, poller: BackendsPoller) -> bool:
    """Both restarted backends healthy and with more successes than just before the restart."""
    try:
        now = {b["address"]: b for b in get_backends(admin)}
    except (OSError, ValueError):
        return False
    samples = poller.samples()
    for index, restarted_at in chaos.restarted_at.items():
        address = f"127.0.0.1:{chaos.ports[index]}"
        before = last_sample_before(samples, restarted_at, address)
        stats = now.get(address)
        if stats is None or not stats["healthy"] or _successes(stats) <= _successes(before):
            return False
    return len(chaos.restarted_at) == 2


async def _recovery_load(
    addr: tuple[str, int], admin: str, chaos: Chaos, poller: BackendsPoller,
) -> tuple[LoadState, dict[str, Any]]:
    state = LoadState(total=0, trigger_at=1)
    info: dict[str, Any] = {"rounds": 0}
    deadline = time.monotonic() + RECOVERY_MAX_S
    started = time.monotonic()
    for round_no in range(RECOVERY_MAX_ROUNDS):
        if await asyncio.to_thread(_restarted_served, admin, chaos, poller):
            break
        if time.monotonic() >= deadline:
            info["gave_up"] = True
            break
        info["rounds"] = round_no + 1
        state.total += RECOVERY_CLIENTS * RECOVERY_REQUESTS
        tasks = [
            run_client(1000 * (round_no + 1) + c, RECOVERY_REQUESTS, addr, state,
                       request_timeout_s=REQUEST_TIMEOUT_S)
            for c in range(RECOVERY_CLIENTS)
        ]
        try:
            await asyncio.wait_for(asyncio.gather(*tasks), REQUEST_TIMEOUT_S)
        except TimeoutError:
            info["timed_out"] = True
            break
        await asyncio.sleep(0.1)  # paced: the router's probe brings a backend back, not load
    info["duration_s"] = round(time.monotonic() - started, 3)
    return state, info


def run(clients: int = 20, requests: int = 300, seed: int | None = None) -> dict[str, Any]:
    # The trigger points are fixed, so nothing here is random; ``seed`` is only recorded
    # (the signature matches the other scenarios).
    ports: list[int] = []
    while len(ports) < BACKENDS:  # distinct ports, picked before anything starts
        port = free_port()
        if port not in ports:
            ports.append(port)
    addresses = [f"127.0.0.1:{p}" for p in ports]
    chaos = Chaos(ports)
    router: Process | None = None
    poller: BackendsPoller | None = None
    router_exit: int | None = None
    recovery_info: dict[str, Any] = {}
    recovery_state = LoadState(total=0, trigger_at=1)
    with tempfile.TemporaryDirectory(prefix="chaos-crash-") as tmp:
        stderr_path = os.path.join(tmp, "router.stderr")
        try:
            chaos.start_all()
            with open(stderr_path, "wb") as stderr_file:
                router, addr, admin = start_router(ports, stderr_file)
            get_backends(admin)  # the admin endpoint answers
            poller = BackendsPoller(admin, interval_s=POLL_INTERVAL_S, max_s=POLL_MAX_S)
            poller.start()
            state, info = uvloop.run(_main_load(clients, requests, addr, chaos))
            served_in_main = _restarted_served(admin, chaos, poller)
            if chaos.error is None and not served_in_main:
                recovery_state, recovery_info = uvloop.run(
                    _recovery_load(addr, admin, chaos, poller))
            time.sleep(5 * POLL_INTERVAL_S)  # a last few samples
            poller.stop()
            router.send_signal(signal.SIGTERM)
            try:
                router_exit = router.wait(timeout=ROUTER_EXIT_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                router.kill()
                router.wait(timeout=5)
        finally:
            if poller is not None:
                poller.stop()
            if router is not None:
                reap([router])
            chaos.cleanup()
        stderr_text = Path(stderr_path).read_text(errors="replace")

    samples = poller.samples() if poller is not None else []
    per_backend: list[dict[str, Any]] = []
    for index, address in enumerate(addresses):
        entry: dict[str, Any] = {"address": address, "killed": index in chaos.killed_at}
        killed_at = chaos.killed_at.get(index)
        if killed_at is not None:
            down = first_sample_after(samples, killed_at, address, healthy=False)
            entry["kill_after_outcomes"] = chaos.kill_after_outcomes[index]
            entry["time_to_mark_down_ms"] = (
                round((down[0] - killed_at) * 1000, 1) if down else None)
        restarted_at = chaos.restarted_at.get(index)
        if restarted_at is not None:
            up = first_sample_after(samples, restarted_at, address, healthy=True)
            before = last_sample_before(samples, restarted_at, address)
            last = samples[-1][1].get(address) if samples else None
            entry["time_to_healthy_after_restart_ms"] = (
                round((up[0] - restarted_at) * 1000, 1) if up else None)
            entry["successes_before_restart"] = _successes(before)
            entry["successes_at_end"] = _successes(last)
            entry["served_after_restart"] = _successes(last) > _successes(before)
        final = samples[-1][1].get(address) if samples else None
        if final is not None:
            entry["final"] = {k: final[k] for k in
                              ("healthy", "requests_total", "failures_total")}
        per_backend.append(entry)

    outcomes = {**state.outcomes, **recovery_state.outcomes}
    counts = Counter(o if not o.startswith("error:") else "error" for o in outcomes.values())
    error_codes = Counter(o[6:] for o in outcomes.values() if o.startswith("error:"))
    expected = clients * requests + recovery_state.total
    killed = [b for b in per_backend if b["killed"]]
    invariants = {
        "no_client_visible_errors": counts["ok"] == len(outcomes),
        "killed_backends_marked_down": len(killed) == 2 and all(
            b.get("time_to_mark_down_ms") is not None for b in killed),
        "restarted_backends_healthy_again": len(chaos.restarted_at) == 2 and all(
            b.get("time_to_healthy_after_restart_ms") is not None for b in killed),
        "traffic_returned_to_restarted": len(chaos.restarted_at) == 2 and all(
            b.get("served_after_restart") for b in killed),
        "router_exit_zero": router_exit == 0,
        "all_outcomes_counted": len(outcomes) == expected
        and state.done + recovery_state.done == expected,
        "fault_injection_completed": chaos.error is None,
    }
    result: dict[str, Any] = {
        "clients": clients,
        "requests": requests,
        "seed": seed,
        "backends": per_backend,
        "ok": counts["ok"],
        "errors": counts["error"],
        "error_codes": dict(error_codes),
        "lost": counts["lost"],
        "refused": counts["refused"],
        "mismatch": counts["mismatch"],
        "timeout": counts["timeout"],
        "reconnects": state.reconnects + recovery_state.reconnects,
        "restart_after_outcomes": chaos.restart_after_outcomes,
        "served_again_during_main_load": not recovery_info,
        "recovery": {**recovery_info, "requests": recovery_state.total},
        "polls": len(samples),
        "poll_interval_ms": POLL_INTERVAL_S * 1000,
        "router_exit_code": router_exit,
        **info,
        "fault_injection_error": chaos.error,
    }
    return judged(result, invariants, stderr_text)


def summary(result: dict[str, Any]) -> str:
    rows: list[tuple[str, Any]] = [
        ("clients x requests", f"{result['clients']} x {result['requests']}"),
        ("load duration", f"{result.get('load_duration_s')} s"),
    ]
    for b in result["backends"]:
        if not b["killed"]:
            continue
        rows += [
            (f"{b['address']} killed after", f"{b['kill_after_outcomes']} outcomes"),
            ("  time to mark down", f"{b['time_to_mark_down_ms']} ms"),
            ("  healthy after restart", f"{b.get('time_to_healthy_after_restart_ms')} ms"),
            ("  successes before/after restart",
             f"{b.get('successes_before_restart')} -> {b.get('successes_at_end')}"),
        ]
    rows += [
        ("restart after", f"{result['restart_after_outcomes']} outcomes"),
        ("served again during main load", result["served_again_during_main_load"]),
        ("recovery load", f"{result['recovery'].get('requests', 0)} requests, "
                          f"{result['recovery'].get('duration_s', 0)} s"),
        ("ok / errors / lost / refused",
         f"{result['ok']} / {result['errors']} / {result['lost']} / {result['refused']}"),
        ("mismatch / timeout", f"{result['mismatch']} / {result['timeout']}"),
        ("final requests_total per backend",
         ", ".join(str(b.get("final", {}).get("requests_total")) for b in result["backends"])),
        ("/backends polls", result["polls"]),
        ("router exit code", result["router_exit_code"]),
    ]
    return format_summary(rows, result["invariants"], result["passed"])


def main(argv: list[str] | None = None) -> int:
    return scenario_main("python -m chaos.backend_crash", __doc__, run, summary, DEFAULT_JSON, argv,
                         clients=20, requests=300)


if __name__ == "__main__":
    sys.exit(main())
