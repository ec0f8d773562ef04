"""Chaos scenario: one backend hangs; requests time out fast, then the hung backend is avoided.

Two echo backends sit behind one router: one normal, one answering after 60 s (``--delay-ms
60000``, hung for the purpose of this run; its health probes hang too). The router CLI has no
flag for ``request_timeout_s``, so the router reads a temporary TOML config with
``[dispatch] request_timeout_s = 0.5``, ``[health] failure_threshold = 3`` and both backends.
N plain ``FrameClient`` clients (no client-side retries) each send R requests one at a time,
with unique payloads ``c{client}-r{i}``, while ``GET /backends`` is polled every 20 ms.

A timeout is not retried (the backend may have acted on the request), so a request sent to the
hung backend is answered ``BACKEND_TIMEOUT``; ``failure_threshold`` consecutive timeouts mark it
down and from then on only the normal backend is chosen.

Invariants (all must hold, else exit status 1): every request ends ``ok`` or with error code
``BACKEND_TIMEOUT``, and each ``BACKEND_TIMEOUT`` answer came within request_timeout_s + 1 s of
sending; no other error code, lost connection, refusal, mismatch or client-side timeout; the
hung backend was shown ``healthy: false`` and still is at the end; every request in the last
third of the outcomes is ``ok``; the router exits 0 after SIGTERM; exactly ``clients *
requests`` outcomes.

Run: ``python -m chaos.hung_backend [--clients 20] [--requests 300] [--seed S] [--json PATH]``.
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
    get_backends,
    judged,
    reap,
    run_client,
    start_echo,
    start_router,
    stop,
)

DEFAULT_JSON = REPO_ROOT / "chaos" / "results" / "hung_backend.json"

NORMAL_DELAY_MS = 2
HUNG_DELAY_MS = 60_000
REQUEST_TIMEOUT_S = 0.5  # the router's [dispatch] request_timeout_s
FAILURE_THRESHOLD = 3  # the router's [health] failure_threshold (its default, written out)
TIMEOUT_SLACK_S = 1.0
CLIENT_REQUEST_TIMEOUT_S = 10.0  # client side: far above the router's bound
POLL_INTERVAL_S = 0.02
POLL_MAX_S = 150.0
CLIENTS_TIMEOUT_S = 90.0
ROUTER_EXIT_TIMEOUT_S = 30.0
BACKEND_EXIT_TIMEOUT_S = 10.0


def _write_config(path: Path, normal_port: int, hung_port: int) -> None:
    path.write_text(
        "[dispatch]\n"
        f"request_timeout_s = {REQUEST_TIMEOUT_S}\n"
        "\n[health]\n"
        f"failure_threshold = {FAILURE_THRESHOLD}\n"
        "\n[[backends]]\n"
        f'address = "127.0.0.1:{normal_port}"\n'
        "\n[[backends]]\n"
        f'address = "127.0.0.1:{hung_port}"\n'
    )


async def _load(
    clients: int, requests: int, addr: tuple[str, int],
) -> tuple[LoadState, dict[str, Any]]:
    total = clients * requests
    state = LoadState(total=total, trigger_at=total)
    info: dict[str, Any] = {}
    started = time.monotonic()
    info["load_started_at"] = started
    tasks = [
        asyncio.create_task(run_client(c, requests, addr, state,
                                       request_timeout_s=CLIENT_REQUEST_TIMEOUT_S))
        for c in range(clients)
    ]
    try:
        await asyncio.wait_for(asyncio.gather(*tasks), CLIENTS_TIMEOUT_S)
    except TimeoutError:
        info["clients_timed_out"] = True
    info["load_duration_s"] = round(time.monotonic() - started, 3)
    return state, info


def run(clients: int = 20, requests: int = 300, seed: int | None = None) -> dict[str, Any]:
    # Nothing here is random; ``seed`` is only recorded (the signature matches the others).
    procs: list[Process] = []
    router: Process | None = None
    poller: BackendsPoller | None = None
    router_exit: int | None = None
    with tempfile.TemporaryDirectory(prefix="chaos-hung-") as tmp:
        stderr_path = os.path.join(tmp, "router.stderr")
        config_path = Path(tmp) / "router.toml"
        try:
            normal, normal_port = start_echo(0, delay_ms=NORMAL_DELAY_MS)
            procs.append(normal)
            hung, hung_port = start_echo(0, delay_ms=HUNG_DELAY_MS)
            procs.append(hung)
            _write_config(config_path, normal_port, hung_port)
            with open(stderr_path, "wb") as stderr_file:
                router, addr, admin = start_router([], stderr_file, config_path=config_path)
            get_backends(admin)  # the admin endpoint answers
            poller = BackendsPoller(admin, interval_s=POLL_INTERVAL_S, max_s=POLL_MAX_S)
            poller.start()
            state, info = uvloop.run(_load(clients, requests, addr))
            time.sleep(5 * POLL_INTERVAL_S)  # a last few samples
            poller.stop()
            router.send_signal(signal.SIGTERM)
            try:
                router_exit = router.wait(timeout=ROUTER_EXIT_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                router.kill()
                router.wait(timeout=5)
            for proc in procs:
                stop(proc, BACKEND_EXIT_TIMEOUT_S)
        finally:
            if poller is not None:
                poller.stop()
            reap([*procs, *([router] if router is not None else [])])
        stderr_text = Path(stderr_path).read_text(errors="replace")

    hung_address = f"127.0.0.1:{hung_port}"
    normal_address = f"127.0.0.1:{normal_port}"
    samples = poller.samples() if poller is not None else []
    started = info.pop("load_started_at")
    down = first_sample_after(samples, started, hung_address, healthy=False)
    final = samples[-1][1] if samples else {}
    final_hung = final.get(hung_address)
    final_normal = final.get(normal_address)

    outcomes = state.outcomes
    ordered = list(outcomes.values())  # in the order they were recorded
    tail = ordered[len(ordered) - len(ordered) // 3:] if ordered else []
    tail_ok = sum(1 for o in tail if o == "ok")
    counts = Counter(o if not o.startswith("error:") else "error" for o in outcomes.values())
    error_codes = Counter(o[6:] for o in outcomes.values() if o.startswith("error:"))
    timeout_latencies = [
        state.latencies_s[i] for i, o in outcomes.items() if o == "error:BACKEND_TIMEOUT"]
    ok_latencies = sorted(state.latencies_s[i] for i, o in outcomes.items() if o == "ok")
    max_timeout_latency = max(timeout_latencies) if timeout_latencies else None
    # the index (in outcome order) of the last BACKEND_TIMEOUT
    last_timeout_index = max(
        (n for n, o in enumerate(ordered) if o == "error:BACKEND_TIMEOUT"), default=None)

    invariants = {
        "only_ok_or_backend_timeout": all(
            o in ("ok", "error:BACKEND_TIMEOUT") for o in outcomes.values()),
        "backend_timeout_within_bound": all(
            t < REQUEST_TIMEOUT_S + TIMEOUT_SLACK_S for t in timeout_latencies),
        "hung_backend_marked_down": down is not None,
        "hung_backend_still_down_at_end": final_hung is not None and not final_hung["healthy"],
        "last_third_all_ok": bool(tail) and tail_ok == len(tail),
        "router_exit_zero": router_exit == 0,
        "all_outcomes_counted": len(outcomes) == clients * requests == state.done,
    }
    result: dict[str, Any] = {
        "clients": clients,
        "requests": requests,
        "seed": seed,
        "request_timeout_s": REQUEST_TIMEOUT_S,
        "failure_threshold": FAILURE_THRESHOLD,
        "hung_backend": hung_address,
        "normal_backend": normal_address,
        "ok": counts["ok"],
        "errors": counts["error"],
        "error_codes": dict(error_codes),
        "lost": counts["lost"],
        "refused": counts["refused"],
        "mismatch": counts["mismatch"],
        "timeout": counts["timeout"],
        "backend_timeouts": len(timeout_latencies),
        "max_backend_timeout_latency_s": (
            round(max_timeout_latency, 3) if max_timeout_latency is not None else None),
        "min_backend_timeout_latency_s": (
            round(min(timeout_latencies), 3) if timeout_latencies else None),
        "ok_latency_p50_ms": (
            round(ok_latencies[len(ok_latencies) // 2] * 1000, 2) if ok_latencies else None),
        "ok_latency_max_ms": round(ok_latencies[-1] * 1000, 2) if ok_latencies else None,
        "last_backend_timeout_at_outcome": (
            last_timeout_index + 1 if last_timeout_index is not None else None),
        "hung_marked_down_after_s": round(down[0] - started, 3) if down else None,
        "hung_final": {k: final_hung[k] for k in
                       ("healthy", "requests_total", "failures_total")} if final_hung else None,
        "normal_final": {k: final_normal[k] for k in
                         ("healthy", "requests_total", "failures_total")}
        if final_normal else None,
        "last_third": {"requests": len(tail), "ok": tail_ok,
                       "ok_fraction": round(tail_ok / len(tail), 4) if tail else None},
        "polls": len(samples),
        "router_exit_code": router_exit,
        **info,
    }
    return judged(result, invariants, stderr_text)


def summary(result: dict[str, Any]) -> str:
    hung = result["hung_final"] or {}
    rows: list[tuple[str, Any]] = [
        ("clients x requests", f"{result['clients']} x {result['requests']}"),
        ("load duration", f"{result.get('load_duration_s')} s"),
        ("request_timeout_s / failure_threshold",
         f"{result['request_timeout_s']} / {result['failure_threshold']}"),
        ("ok / BACKEND_TIMEOUT", f"{result['ok']} / {result['backend_timeouts']}"),
        ("error codes", result["error_codes"]),
        ("lost / refused / mismatch / timeout",
         f"{result['lost']} / {result['refused']} / {result['mismatch']} / {result['timeout']}"),
        ("BACKEND_TIMEOUT latency min..max",
         f"{result['min_backend_timeout_latency_s']} .. "
         f"{result['max_backend_timeout_latency_s']} s"),
        ("ok latency p50 / max",
         f"{result['ok_latency_p50_ms']} / {result['ok_latency_max_ms']} ms"),
        ("hung marked down after", f"{result['hung_marked_down_after_s']} s"),
        ("last BACKEND_TIMEOUT at outcome", result["last_backend_timeout_at_outcome"]),
        ("hung final healthy / requests / failures",
         f"{hung.get('healthy')} / {hung.get('requests_total')} / {hung.get('failures_total')}"),
        ("last third ok", f"{result['last_third']['ok']} / {result['last_third']['requests']}"),
        ("/backends polls", result["polls"]),
        ("router exit code", result["router_exit_code"]),
    ]
    return format_summary(rows, result["invariants"], result["passed"])


def main(argv: list[str] | None = None) -> int:
    return scenario_main("python -m chaos.hung_backend", __doc__, run, summary, DEFAULT_JSON, argv,
                         clients=20, requests=300)


if __name__ == "__main__":
    sys.exit(main())
