"""Chaos scenario: SIGTERM the router under load and check that the drain drops nothing.

Two echo backends (``--record-ids``) sit behind one router. N plain ``FrameClient`` clients
(no retries: this scenario counts refusals) each send R requests one at a time, with unique
payloads ``c{client}-r{i}``. Once a seeded-random fraction (20 % .. 60 %) of all requests has
been answered, the router's ``/metrics`` is scraped once and the router gets SIGTERM.

Each request ends as one of:

* ``ok``        the echo matched;
* ``error:X``   the router answered with an error frame (code X);
* ``lost``      the connection closed with it unanswered (``ConnectionLost``);
* ``refused``   a reconnect failed, so this and the client's remaining requests were never sent;
* ``mismatch`` / ``timeout``  anomalies (wrong echo, or no answer within the bound).

With ``--grpc-clients G`` (``make chaos`` uses 10), the router also runs its gRPC front door
with a ``backends.kserve`` backend (``--record-ids``) behind it, and G grpc.aio clients send R
ModelInfer calls each, one at a time, with ids ``g{client}-r{i}``: ``ok`` when the answer
carries the id, ``refused`` when the router said DRAINING or could not be reached (this and the
client's remaining calls), ``lost`` when the router gave up on an accepted call (DROPPED), and
``error:X`` for any other status. The same invariants cover them.

After the run the backends are stopped and their id files read. The invariants (all must
hold, else exit status 1): the router logged ``dropped 0`` and exited 0; every ``ok`` id was
processed by a backend and every processed id was seen ``ok`` (nothing processed but lost);
no ``lost``/``refused`` id was processed; no error frames and no anomalies; and exactly
``clients * requests`` outcomes.

Run: ``python -m chaos.drain [--clients 50] [--requests 100] [--grpc-clients 0] [--seed S]
[--json PATH]``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any

import uvloop

from chaos.cli import scenario_main
from chaos.common import (
    REPO_ROOT,
    LoadState,
    Process,
    launch_router,
    reap,
    run_grpc_client,
    start_backend,
)
from chaos.common import run_client as _client
from chaos.common import start_router as _start_router
from chaos.common import stop as _stop

DEFAULT_JSON = REPO_ROOT / "chaos" / "results" / "drain.json"

BACKEND_DELAY_MS = 2
CONNECT_TIMEOUT_S = 2.0
REQUEST_TIMEOUT_S = 30.0  # must exceed the drain grace: an accepted request is answered by then
CLIENTS_TIMEOUT_S = 60.0
ROUTER_EXIT_TIMEOUT_S = 30.0
BACKEND_EXIT_TIMEOUT_S = 10.0
SCRAPE_INTERVAL_S = 0.05
SCRAPE_HTTP_TIMEOUT_S = 1.0
SCRAPE_MAX_S = CLIENTS_TIMEOUT_S + ROUTER_EXIT_TIMEOUT_S
TRIGGER_FRACTION = (0.2, 0.6)

DRAIN_LOG_RE = re.compile(r"drain finished in ([0-9.]+)\s*s, dropped (\d+)")
METRICS = {
    "accepted": "router_requests_accepted_total",
    "completed": "router_requests_completed_total",
    "dropped": "router_requests_dropped_total",
    "errored": "router_requests_errored_total",
}


# --------------------------------------------------------------------------- processes


def _start_backend(record_path: str) -> tuple[Process, int]:
    return start_backend("backends.echo", "--delay-ms", str(BACKEND_DELAY_MS),
                         "--record-ids", record_path)


def _start_kserve(record_path: str) -> tuple[Process, int]:
    return start_backend("backends.kserve", "--models", "identity",
                         "--delay-ms", str(BACKEND_DELAY_MS), "--record-ids", record_path)


def _config_with_grpc(path: Path, echo_ports: list[int], kserve_port: int,
                      engine: str = "relay") -> Path:
    """The router's config when gRPC clients take part: the echo backends, the KServe
    backend, and the gRPC front door (``grpc.engine``) on a free port."""
    tables = [f'[[backends]]\naddress = "127.0.0.1:{p}"\n' for p in echo_ports]
    tables.append(f'[[backends]]\naddress = "127.0.0.1:{kserve_port}"\nprotocol = "grpc"\n'
                  'models = ["identity"]\n')
    path.write_text(f'[grpc]\nlisten = "127.0.0.1:0"\nengine = "{engine}"\n\n'
                    + "\n".join(tables))
    return path


# --------------------------------------------------------------------------- metrics


def parse_metrics(text: str) -> dict[str, float]:
    """Sum each counter we care about over all its label sets."""
    out = dict.fromkeys(METRICS, 0.0)
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name, _, rest = line.partition(" ")
        base = name.split("{", 1)[0]
        for key, metric in METRICS.items():
            if base == metric:
                with contextlib.suppress(ValueError):
                    out[key] += float(rest.split()[0])
    return out


def scrape(admin_base: str) -> dict[str, float]:
    with urllib.request.urlopen(f"{admin_base}/metrics", timeout=SCRAPE_HTTP_TIMEOUT_S) as resp:
        body: bytes = resp.read()
    return parse_metrics(body.decode())


class MetricsPoller(threading.Thread):
    """Scrape /metrics every 50 ms (bounded) and keep the last successful scrape."""

    def __init__(self, admin_base: str) -> None:
        super().__init__(name="metrics-poller", daemon=True)
        self._admin = admin_base
        self._stop_event = threading.Event()
        self._lock = threading.Lock()
        self.last: dict[str, float] | None = None
        self.scrapes = 0

    def record(self, metrics: dict[str, float]) -> None:
        """Keep the latest scrape; counters only grow, so the latest is the largest."""
        with self._lock:
            self.scrapes += 1
            key = (metrics["accepted"], metrics["completed"], metrics["errored"])
            if self.last is None or key >= (
                self.last["accepted"], self.last["completed"], self.last["errored"]
            ):
                self.last = metrics

    def run(self) -> None:
        deadline = time.monotonic() + SCRAPE_MAX_S
        while not self._stop_event.is_set() and time.monotonic() < deadline:
            # the admin endpoint goes away when the router exits
            with contextlib.suppress(OSError):
                self.record(scrape(self._admin))
            self._stop_event.wait(SCRAPE_INTERVAL_S)

    def stop(self) -> None:
        self._stop_event.set()
        self.join(timeout=SCRAPE_HTTP_TIMEOUT_S + 1)


# --------------------------------------------------------------------------- clients


async def _load(
    clients: int, requests: int, addr: tuple[str, int], admin: str,
    router: Process, rng: random.Random, poller: MetricsPoller,
    grpc_clients: int = 0, grpc_target: str | None = None,
) -> tuple[LoadState, dict[str, Any]]:
    total = (clients + grpc_clients) * requests
    fraction = rng.uniform(*TRIGGER_FRACTION)
    state = LoadState(total=total, trigger_at=max(1, int(total * fraction)))
    info: dict[str, Any] = {"trigger_fraction": round(fraction, 3)}
    started = time.monotonic()
    tasks = [asyncio.create_task(_client(c, requests, addr, state)) for c in range(clients)]
    if grpc_clients:
        assert grpc_target is not None
        tasks += [
            asyncio.create_task(run_grpc_client(
                c, requests, grpc_target, state, request_timeout_s=REQUEST_TIMEOUT_S))
            for c in range(grpc_clients)
        ]
    all_done = asyncio.gather(*tasks)

    async def sigterm_when_triggered() -> None:
        await state.triggered.wait()
        metrics = await asyncio.to_thread(scrape, admin)
        poller.record(metrics)
        info["pre_sigterm_metrics"] = metrics
        info["sigterm_at_s"] = round(time.monotonic() - started, 3)
        info["sigterm_after_outcomes"] = state.done
        router.send_signal(signal.SIGTERM)

    trigger = asyncio.create_task(sigterm_when_triggered())
    try:
        await asyncio.wait_for(all_done, CLIENTS_TIMEOUT_S)
    except TimeoutError:
        info["clients_timed_out"] = True
    info["load_duration_s"] = round(time.monotonic() - started, 3)
    if not trigger.done():
        trigger.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await trigger
    if trigger.done() and not trigger.cancelled() and trigger.exception() is not None:
        info["sigterm_error"] = repr(trigger.exception())
    return state, info


# --------------------------------------------------------------------------- scenario


def _read_ids(path: str) -> list[str]:
    try:
        return Path(path).read_text().splitlines()
    except FileNotFoundError:
        return []


def run(clients: int = 50, requests: int = 100, seed: int | None = None,
        processes: int = 1, grpc_clients: int = 0, grpc_engine: str = "relay"
        ) -> dict[str, Any]:
    rng = random.Random(seed)
    procs: list[Process] = []
    with tempfile.TemporaryDirectory(prefix="chaos-drain-") as tmp:
        record_paths = [os.path.join(tmp, f"backend{i}.ids") for i in range(2)]
        stderr_path = os.path.join(tmp, "router.stderr")
        poller: MetricsPoller | None = None
        grpc_target: str | None = None
        try:
            backends = []
            for path in record_paths:
                proc, port = _start_backend(path)
                procs.append(proc)
                backends.append((proc, port))
            with open(stderr_path, "wb") as stderr_file:
                if grpc_clients:
                    record_paths.append(os.path.join(tmp, "kserve.ids"))
                    kserve, kserve_port = _start_kserve(record_paths[-1])
                    procs.append(kserve)
                    backends.append((kserve, kserve_port))
                    config = _config_with_grpc(Path(tmp) / "router.toml",
                                               [p for _, p in backends[:2]], kserve_port,
                                               grpc_engine)
                    router, banner = launch_router([], stderr_file, config_path=config,
                                                   processes=processes)
                    addr, admin = banner.listen, banner.admin_url
                    assert banner.grpc is not None, "the router printed no gRPC address"
                    grpc_target = banner.grpc_target
                else:
                    router, addr, admin = _start_router([p for _, p in backends], stderr_file,
                                                        processes=processes)
            procs.append(router)
            scrape(admin)  # the router is up and its admin endpoint answers
            poller = MetricsPoller(admin)
            poller.start()

            state, info = uvloop.run(_load(
                clients, requests, addr, admin, router, rng, poller, grpc_clients, grpc_target))

            if router.poll() is None and "sigterm_at_s" not in info:
                router.send_signal(signal.SIGTERM)  # the load finished before the trigger
            try:
                router_exit: int | None = router.wait(timeout=ROUTER_EXIT_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                router_exit = None
                router.kill()
                router.wait(timeout=5)
            poller.stop()
            for proc, _ in backends:
                _stop(proc, BACKEND_EXIT_TIMEOUT_S)
        finally:
            if poller is not None:
                poller.stop()
            reap(procs)

        stderr_text = Path(stderr_path).read_text(errors="replace")
        processed_list = [i for path in record_paths for i in _read_ids(path)]

    # One drain line per router process; all of them must have drained.
    drains = DRAIN_LOG_RE.findall(stderr_text)
    drain = len(drains) == processes
    dropped = sum(int(d) for _, d in drains) if drain else None
    drain_duration = max(float(s) for s, _ in drains) if drain else None

    outcomes = state.outcomes
    counts = Counter(o if not o.startswith("error:") else "error" for o in outcomes.values())
    error_codes = Counter(o[6:] for o in outcomes.values() if o.startswith("error:"))
    ok_ids = {i for i, o in outcomes.items() if o == "ok"}
    unanswered_ids = {i for i, o in outcomes.items() if o in ("lost", "refused")}
    processed_counts = Counter(processed_list)
    processed = set(processed_counts)
    last = poller.last if poller is not None else None

    invariants = {
        "dropped_zero": dropped == 0,
        "router_exit_zero": router_exit == 0,
        "ok_ids_processed": ok_ids <= processed,
        "processed_ids_seen_ok": processed <= ok_ids,
        "lost_refused_never_processed": not (unanswered_ids & processed),
        "no_error_replies": counts["error"] == 0,
        "no_mismatch_or_timeout": counts["mismatch"] + counts["timeout"] == 0,
        "all_outcomes_counted": len(outcomes) == (clients + grpc_clients) * requests
        == state.done,
    }
    result: dict[str, Any] = {
        "clients": clients,
        "grpc_clients": grpc_clients,
        "grpc_ok": sum(1 for i, o in outcomes.items() if i.startswith("g") and o == "ok"),
        "grpc_lost": sum(1 for i, o in outcomes.items() if i.startswith("g") and o == "lost"),
        "requests": requests,
        "seed": seed,
        "accepted": int(last["accepted"]) if last else None,
        "completed": int(last["completed"]) if last else None,
        "ok": counts["ok"],
        "lost": counts["lost"],
        "refused": counts["refused"],
        "errors": counts["error"],
        "error_codes": dict(error_codes),
        "mismatch": counts["mismatch"],
        "timeout": counts["timeout"],
        "dropped": dropped,
        "drain_duration_s": drain_duration,
        "router_exit_code": router_exit,
        "processed": len(processed_list),
        "processed_duplicates": sum(n - 1 for n in processed_counts.values() if n > 1),
        "processed_not_ok": sorted(processed - ok_ids)[:20],
        "ok_not_processed": sorted(ok_ids - processed)[:20],
        "reconnects": state.reconnects,
        "last_metrics": last,
        "metrics_scrapes": poller.scrapes if poller is not None else 0,
        "processes": processes,
        "drain_log_lines": len(drains),
        **info,
        "invariants": invariants,
        "passed": all(invariants.values()),
    }
    if not drain:
        result["router_stderr_tail"] = stderr_text[-2000:]
    return result


def summary(result: dict[str, Any]) -> str:
    rows = [
        ("clients x requests", f"{result['clients']} x {result['requests']}"),
        ("gRPC clients (ok)", f"{result.get('grpc_clients', 0)} ({result.get('grpc_ok', 0)})"),
        ("sigterm at", f"{result.get('sigterm_at_s')} s after "
                       f"{result.get('sigterm_after_outcomes')} outcomes"),
        ("accepted (last scrape)", result["accepted"]),
        ("completed (last scrape)", result["completed"]),
        ("ok / lost / refused", f"{result['ok']} / {result['lost']} / {result['refused']}"),
        ("errors / mismatch / timeout",
         f"{result['errors']} / {result['mismatch']} / {result['timeout']}"),
        ("processed by backends", result["processed"]),
        ("dropped (router log)", result["dropped"]),
        ("drain duration", f"{result['drain_duration_s']} s"),
        ("router exit code", result["router_exit_code"]),
    ]
    rows += [(f"  {name}", "ok" if ok else "FAIL") for name, ok in result["invariants"].items()]
    rows.append(("PASSED" if result["passed"] else "FAILED", ""))
    width = max(len(str(k)) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def main(argv: list[str] | None = None) -> int:
    # --grpc-clients is this scenario's own flag; the shared command line takes the rest.
    extra = argparse.ArgumentParser(add_help=False)
    extra.add_argument("--grpc-clients", type=int, default=0)
    extra.add_argument("--grpc-engine", choices=("relay", "grpcio"), default="relay")
    known, rest = extra.parse_known_args(argv)
    if known.grpc_clients < 0:
        extra.error("--grpc-clients must be >= 0")
    return scenario_main("python -m chaos.drain", __doc__,
                         functools.partial(run, grpc_clients=known.grpc_clients,
                                           grpc_engine=known.grpc_engine), summary,
                         DEFAULT_JSON, rest, clients=50, requests=100, supports_processes=True)


if __name__ == "__main__":
    sys.exit(main())
