"""The 10,000-client run: 10,000 concurrent persistent connections x 50 requests through the router.

``python -m bench.tenk [--clients 10000] [--requests 50] [--repeat 2] [--update-docs]``
(``make bench-10k``)

Each repetition starts two fresh echo backends and a fresh router on the router's default
config (``bench.run``'s helpers), so no run inherits another's heap, and then the same for
HAProxy (TCP mode, one thread, ``balance leastconn``, as in ``bench.run``) when ``haproxy`` is
on PATH: the same load generator, the same backends' settings, interleaved (router, HAProxy,
router, HAProxy), so the throughput ratio compares runs of one sitting. HAProxy holds two fds
per client connection, so under a hard RLIMIT_NOFILE of 20,000 its ``maxconn`` is
(hard limit - ``HAPROXY_FD_RESERVE``) / 2 = 9,900: the last clients wait in the listen queue
until others finish, as they would in front of a real HAProxy on this machine. Each run then:

1. reads the router's RSS just after start;
2. warms up with ``WARMUP_CONNECTIONS`` x ``WARMUP_REQUESTS`` (every dispatch worker busy, the
   backend pools at their high-water mark), so the baseline already holds what does not scale
   with client connections;
3. reads the baseline RSS, then drives ``clients`` x ``requests`` 64-byte round trips with
   ``bench.load`` (persistent connections, one request in flight per connection, lanes spread
   over the load processes, at most 1,024 connects in progress) while a thread samples the
   router's ``VmRSS`` every 20 ms and its open client connections (admin ``/stats``; for
   HAProxy, its fds over the baseline, halved) every 0.5 s, both summed over its processes
   when ``listener.processes`` > 1; the kernel's own
   high-water mark ``VmHWM`` (of the first process) is read at the end as a cross-check;
4. reports req/s, p50/p95/p99/p999, errors by kind, peak RSS, the most connections the router
   held at once, and (peak - baseline) divided by that as the RSS cost of one open client
   connection (and by ``clients``, which understates it when fewer were open together).

A separate idle probe (fresh router again) opens ``clients`` plain sockets from this process and
reads the router's RSS with them open and never used, and again after one round trip on each:
the static cost of a connection, without the in-flight request state of the loaded run.

The script raises its soft RLIMIT_NOFILE to the hard limit before starting anything; the
router and the backends inherit it (rlimits survive fork and exec), and the load workers raise
their own. It checks the kernel settings that bound the run (hard nofile limit, somaxconn,
ephemeral port range) and writes everything to ``bench/results/<name>.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.docs import BENCHMARKS_MD, command_line, replace_block, run_header
from bench.load import LoadReport, format_report, raise_nofile_limit, run_load
from bench.run import (
    PAYLOAD_BYTES,
    RESULTS_DIR,
    ROOT,
    Service,
    admin_stats,
    markdown_table,
    start_echo,
    start_haproxy,
    start_router,
    text_table,
)
from router.protocol.frames import encode_frame

DOCS_START = "<!-- tenk:start -->"
DOCS_END = "<!-- tenk:end -->"

# 256 = the router's default dispatch.workers: every worker and both pools get used once, so
# their memory is in the baseline rather than charged to the 10,000 client connections.
WARMUP_CONNECTIONS = 256
WARMUP_REQUESTS = 20
RSS_INTERVAL_S = 0.02
STATS_EVERY = 25  # /stats every 25 RSS samples (0.5 s): cheap for a loop serving 10k clients
SAMPLER_MAX_S = 900.0
# 500,000 round trips at the 1,550 req/s of the C++ design would take 320 s; bound a run at 600.
RUN_BOUND_S = 600.0
# One answer may wait behind ~10,000 others at ~10,000 req/s: seconds, not tens of them.
REQUEST_TIMEOUT_S = 30.0
IDLE_CONNECT_TIMEOUT_S = 10.0
IDLE_SETTLE_TIMEOUT_S = 60.0
IDLE_POLL_S = 0.1

TARGETS = {
    "errors": "zero errors",
    "p99": "p99 < 1 s",
    "vs_haproxy": ">= 1.0x HAProxy's req/s in the same sitting",
    "rss_per_connection": "<= 2.5 KiB RSS per open connection",
    "all_connections_open_together": "every client connection open at once",
}
RSS_TARGET_BYTES = 2560
# Descriptors HAProxy keeps beside its two per connection (listener, logs, pollers).
HAPROXY_FD_RESERVE = 200

# The router's default config: the kernel clamps listener.backlog (4096) to
# net.core.somaxconn, and the pools deepen their pipelines with demand (pool.max_pipeline_depth)
# so 10,000 requests in flight go straight out instead of parking on the dispatch queue.
ROUTER_CONFIG = ""


# -- the machine -------------------------------------------------------------------------------


def _read(path: str) -> str | None:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return None


def tree_state() -> dict[str, Any]:
    """The commit measured and the router files modified on top of it (the tree is shared)."""
    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True,
                                  timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return done.stdout.rstrip() if done.returncode == 0 else None

    status = git("status", "--porcelain", "--", "router")
    return {"commit": git("rev-parse", "HEAD"),
            "router_changes": status.splitlines() if status else []}


def kernel_limits() -> dict[str, Any]:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    low_high = (_read("/proc/sys/net/ipv4/ip_local_port_range") or "0 0").split()
    return {
        "nofile_soft": soft, "nofile_hard": hard,
        "somaxconn": _read("/proc/sys/net/core/somaxconn"),
        "tcp_max_syn_backlog": _read("/proc/sys/net/ipv4/tcp_max_syn_backlog"),
        "ip_local_port_range": " ".join(low_high),
        "ephemeral_ports": int(low_high[1]) - int(low_high[0]) + 1,
        "tcp_tw_reuse": _read("/proc/sys/net/ipv4/tcp_tw_reuse"),
        "fs_file_max": _read("/proc/sys/fs/file-max"),
        "fs_nr_open": _read("/proc/sys/fs/nr_open"),
    }


def check_kernel(limits: dict[str, Any], clients: int) -> list[str]:
    """Reasons the run cannot work as asked (empty: go)."""
    problems = []
    # The router holds one fd per client plus its pools; a load process holds its share.
    if limits["nofile_hard"] != resource.RLIM_INFINITY and limits["nofile_hard"] < clients + 512:
        problems.append(f"hard RLIMIT_NOFILE {limits['nofile_hard']} < {clients} clients + 512")
    if limits["ephemeral_ports"] < clients:
        problems.append(f"ephemeral port range {limits['ip_local_port_range']} has fewer than "
                        f"{clients} ports")
    return problems


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS, VmHWM, RssAnon, RssFile of ``pid`` in bytes (empty once it is gone)."""
    out = {}
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
            out[key] = int(value.split()[0]) * 1024
    return out


def tree_pids(pid: int, depth: int = 3) -> list[int]:
    """``pid`` and its descendants (a multi-process router: supervisor plus its routers)."""
    pids = [pid]
    if depth > 0:
        for task in (_read(f"/proc/{pid}/task/{pid}/children") or "").split():
            pids += tree_pids(int(task), depth - 1)
    return pids


def tree_rss(pid: int) -> dict[str, int]:
    """VmRSS and RssAnon summed over ``pid`` and its descendants (empty once it is gone)."""
    total: dict[str, int] = {}
    for one in tree_pids(pid):
        for key, value in proc_status(one).items():
            if key != "VmHWM":  # per-process peaks at different moments do not add up
                total[key] = total.get(key, 0) + value
    return total if proc_status(pid) else {}


def open_connections(stats: dict[str, Any]) -> int:
    """Open client connections from ``/stats``: one router, or a supervisor's processes."""
    if "listener" in stats:
        return int(stats["listener"]["open_connections"])
    return sum(int(p["stats"]["listener"]["open_connections"])
               for p in stats.get("processes", []) if p.get("stats"))


def tree_fds(pid: int) -> int:
    """Open file descriptors of ``pid`` and its descendants."""
    total = 0
    for one in tree_pids(pid):
        with contextlib.suppress(OSError):  # a process that just exited has none
            total += len(os.listdir(f"/proc/{one}/fd"))
    return total


def nofile_limit_of(pid: int) -> str | None:
    for line in (_read(f"/proc/{pid}/limits") or "").splitlines():
        if line.startswith("Max open files"):
            return " ".join(line.split()[3:5])  # soft hard
    return None


class Sampler(threading.Thread):
    """The router's VmRSS every ``RSS_INTERVAL_S``; its open client connections and open fds
    every ``STATS_EVERY`` samples; until stopped (bounded in time and count).

    Connections are counted twice: by the router (``/stats``), and as open fds above the count
    after the warm-up (``fd_baseline``). The second needs nothing from the router, so it also
    holds when a multi-process router's federated ``/stats`` misses a busy process.
    """

    def __init__(self, pid: int, admin_port: int | None, fd_baseline: int) -> None:
        """``admin_port`` None: a proxy without one (HAProxy), whose client connections are
        half its fds over the baseline (each has a backend connection)."""
        super().__init__(name="tenk-sampler", daemon=True)
        self.pid = pid
        self.admin_port = admin_port
        self.fd_baseline = fd_baseline
        self._stop_event = threading.Event()
        self.started = time.monotonic()
        self.peak_rss = 0
        self.peak_rss_anon = 0
        self.peak_at_s = 0.0
        self.samples = 0
        self.max_open_connections = 0
        self.max_fds_over_baseline = 0
        self.stats_errors = 0
        self.stats_incomplete = 0
        # (s, RSS bytes, open connections by /stats, open fds over the baseline)
        self.timeline: list[tuple[float, int, int, int]] = []

    def run(self) -> None:
        deadline = self.started + SAMPLER_MAX_S
        open_now = 0
        max_samples = int(SAMPLER_MAX_S / RSS_INTERVAL_S)
        while (not self._stop_event.is_set() and time.monotonic() < deadline
               and self.samples < max_samples):
            status = tree_rss(self.pid)
            if not status:
                return
            at = time.monotonic() - self.started
            if status["VmRSS"] > self.peak_rss:
                self.peak_rss, self.peak_at_s = status["VmRSS"], at
                self.peak_rss_anon = status.get("RssAnon", 0)
            if self.samples % STATS_EVERY == 0:
                open_now = self._open_connections(open_now)
                fds = tree_fds(self.pid) - self.fd_baseline
                self.max_fds_over_baseline = max(self.max_fds_over_baseline, fds)
                self.timeline.append((round(at, 2), status["VmRSS"], open_now, fds))
            self.samples += 1
            self._stop_event.wait(RSS_INTERVAL_S)

    def _open_connections(self, previous: int) -> int:
        if self.admin_port is None:
            now = max(0, tree_fds(self.pid) - self.fd_baseline) // 2
            self.max_open_connections = max(self.max_open_connections, now)
            return now
        try:
            stats = admin_stats(self.admin_port)
        except (OSError, ValueError):
            self.stats_errors += 1
            return previous
        if any(not p.get("stats") for p in stats.get("processes", [])):
            self.stats_incomplete += 1
        now = open_connections(stats)
        self.max_open_connections = max(self.max_open_connections, now)
        return now

    @property
    def max_open(self) -> int:
        """The most client connections seen open at once: the router's own count, or the fd
        count when ``/stats`` was unavailable or incomplete (it also holds pool sockets)."""
        if self.max_open_connections and not (self.stats_incomplete or self.stats_errors):
            return self.max_open_connections
        return max(self.max_open_connections, self.max_fds_over_baseline)

    def stop(self) -> None:
        self._stop_event.set()
        self.join(timeout=5.0)


# -- one run -----------------------------------------------------------------------------------


def _start_stack(log_dir: Path, config_text: str, haproxy: str | None = None
                 ) -> tuple[list[Service], Service, int | None]:
    """Two echo backends and the router (its admin port), or HAProxy from the path
    ``haproxy`` (no admin port)."""
    services = []
    backends = []
    for index in (1, 2):
        echo = start_echo(f"echo{index}", log_dir)
        services.append(echo)
        backends.append(echo.port)
    if haproxy is not None:
        proxy = start_haproxy(haproxy, backends, log_dir, maxconn=_haproxy_maxconn())
        services.append(proxy)
        return services, proxy, None
    config = log_dir / "router.toml"
    config.write_text(config_text)
    router, admin_port = start_router(backends, log_dir, config=config)
    services.append(router)
    return services, router, admin_port


def _haproxy_maxconn() -> int:
    """What the hard RLIMIT_NOFILE lets HAProxy hold: two fds per connection."""
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    return 100_000 if hard == resource.RLIM_INFINITY else (hard - HAPROXY_FD_RESERVE) // 2


def _stop_stack(services: list[Service]) -> int | None:
    """Stop in reverse order; return the target's exit code (None if it had to be killed)."""
    for service in reversed(services):
        service.stop()
    target = next((s for s in services if s.name in ("router", "haproxy")), None)
    return target.process.returncode if target is not None else None


def _kib(value: float) -> float:
    return round(value / 1024, 2)


def loaded_run(index: int, args: argparse.Namespace, haproxy: str | None = None
               ) -> dict[str, Any]:
    """One run against a fresh router, or a fresh HAProxy from the path ``haproxy``."""
    target = "router" if haproxy is None else "haproxy"
    with tempfile.TemporaryDirectory(prefix="bench-tenk-") as tmp:
        services, router, admin_port = _start_stack(Path(tmp), args.config_text, haproxy)
        try:
            pid = router.process.pid
            rss_start = tree_rss(pid)["VmRSS"]
            # The machine is shared: say how busy it was when the run started.
            loadavg = [round(x, 2) for x in os.getloadavg()]
            warm = run_load("127.0.0.1", router.port, connections=WARMUP_CONNECTIONS,
                            requests=WARMUP_REQUESTS, payload_bytes=PAYLOAD_BYTES,
                            processes=args.processes)
            baseline = tree_rss(pid)["VmRSS"]
            sampler = Sampler(pid, admin_port, fd_baseline=tree_fds(pid))
            sampler.start()
            try:
                print(f"run {index} ({target}): {args.clients} clients x {args.requests} "
                      "requests ...", file=sys.stderr, flush=True)
                report = run_load("127.0.0.1", router.port, connections=args.clients,
                                  requests=args.requests, payload_bytes=PAYLOAD_BYTES,
                                  processes=args.processes, timeout_s=REQUEST_TIMEOUT_S,
                                  hard_timeout_s=RUN_BOUND_S)
            finally:
                sampler.stop()
            status = proc_status(pid)
            rss_after = tree_rss(pid).get("VmRSS")
            router_pids = tree_pids(pid)
            stats = admin_stats(admin_port) if admin_port is not None else None
            nofile = nofile_limit_of(pid)
        finally:
            exit_code = _stop_stack(services)
    peak = max(sampler.peak_rss, baseline)
    return {
        "run": index,
        "target": target,
        "report": report,
        "warmup_errors": warm["error_total"],
        "loadavg_before": loadavg,
        "router": {
            "nofile_limit": nofile,
            "rss_start_bytes": rss_start,
            "rss_baseline_bytes": baseline,
            "rss_peak_bytes": peak,
            "rss_peak_anon_bytes": sampler.peak_rss_anon,
            "rss_peak_at_s": round(sampler.peak_at_s, 2),
            "vm_hwm_bytes": status.get("VmHWM"),  # the first pid's own, as a cross-check
            "rss_after_bytes": rss_after,
            "router_pids": router_pids,
            "rss_per_connection_bytes": round((peak - baseline) / args.clients, 1),
            # The same growth over the connections actually open together (sampled every
            # 0.5 s): the honest divisor when the router never held all of them at once.
            "rss_per_open_connection_bytes": round(
                (peak - baseline) / max(1, sampler.max_open), 1),
            "max_open_connections_seen": sampler.max_open,
            "max_open_connections_by_stats": sampler.max_open_connections,
            "max_fds_over_baseline": sampler.max_fds_over_baseline,
            "stats_incomplete": sampler.stats_incomplete,
            "rss_samples": sampler.samples,
            "stats_errors": sampler.stats_errors,
            "timeline": sampler.timeline,
            "exit_code": exit_code,
            "stats": stats,
        },
    }


# -- the idle probe ----------------------------------------------------------------------------


def _wait_open_connections(admin_port: int, want: int) -> int:
    """Poll ``/stats`` (another process: no event to wait on) until ``want`` are open."""
    deadline = time.monotonic() + IDLE_SETTLE_TIMEOUT_S
    seen = -1
    while time.monotonic() < deadline:
        seen = open_connections(admin_stats(admin_port))
        if seen == want:
            return seen
        time.sleep(IDLE_POLL_S)
    return seen


def _one_round_trip_each(socks: list[socket.socket]) -> int:
    """Send one 64-byte request on every socket, then read every answer; return the good ones."""
    ok = 0
    for i, sock in enumerate(socks):
        sock.sendall(encode_frame(f"idle-{i}".encode().ljust(PAYLOAD_BYTES, b" ")))
    for i, sock in enumerate(socks):
        want = encode_frame(f"idle-{i}".encode().ljust(PAYLOAD_BYTES, b" "))
        got = b""
        while len(got) < len(want):  # bounded: the socket timeout ends a stalled read
            chunk = sock.recv(len(want) - len(got))
            if not chunk:
                break
            got += chunk
        ok += got == want
    return ok


def idle_probe(clients: int, config_text: str) -> dict[str, Any]:
    """RSS of a fresh router holding ``clients`` connections: never used, then used once."""
    socks: list[socket.socket] = []
    with tempfile.TemporaryDirectory(prefix="bench-tenk-idle-") as tmp:
        services, router, admin_port = _start_stack(Path(tmp), config_text)
        assert admin_port is not None  # the router's
        try:
            pid = router.process.pid
            warm = run_load("127.0.0.1", router.port, connections=WARMUP_CONNECTIONS,
                            requests=WARMUP_REQUESTS, payload_bytes=PAYLOAD_BYTES)
            baseline = tree_rss(pid)["VmRSS"]
            print(f"idle probe: opening {clients} connections ...", file=sys.stderr, flush=True)
            for _ in range(clients):
                socks.append(socket.create_connection(("127.0.0.1", router.port),
                                                      timeout=IDLE_CONNECT_TIMEOUT_S))
            opened = _wait_open_connections(admin_port, clients)
            rss_open = tree_rss(pid)["VmRSS"]
            answered = _one_round_trip_each(socks)
            rss_used = tree_rss(pid)["VmRSS"]
        finally:
            for sock in socks:
                sock.close()
            exit_code = _stop_stack(services)
    return {
        "clients": clients,
        "open_connections_seen": opened,
        "warmup_errors": warm["error_total"],
        "rss_baseline_bytes": baseline,
        "rss_open_unused_bytes": rss_open,
        "rss_open_used_once_bytes": rss_used,
        "answered_once": answered,
        "per_connection_unused_bytes": round((rss_open - baseline) / clients, 1),
        "per_connection_used_once_bytes": round((rss_used - baseline) / clients, 1),
        "router_exit_code": exit_code,
    }


# -- output ------------------------------------------------------------------------------------


def _ms(us: int | None) -> str:
    return "-" if us is None else f"{us / 1000:.1f}"


def _errors(report: LoadReport) -> str:
    if not report["error_total"]:
        return "0"
    kinds = ", ".join(f"{k} {v}" for k, v in report["errors"].items())
    return f"{report['error_total']} ({kinds})"


HEADER = ["run", "target", "ok", "req/s", "p50 ms", "p95 ms", "p99 ms", "p99.9 ms", "errors",
          "RSS base MiB", "RSS peak MiB", "KiB / client", "KiB / open conn", "max open conns"]
RATIO_HEADER = ["run", "router req/s", "haproxy req/s", "router/haproxy", "p99 router/haproxy"]


def table_rows(runs: list[dict[str, Any]]) -> list[list[str]]:
    rows = []
    for run in runs:
        r, m = run["report"], run["router"]
        rows.append([
            str(run["run"]), run.get("target", "router"), f"{r['ok']:,}",
            f"{r['requests_per_s']:,.0f}", _ms(r["p50_us"]),
            _ms(r["p95_us"]), _ms(r["p99_us"]), _ms(r["p999_us"]), _errors(r),
            f"{m['rss_baseline_bytes'] / 2**20:.1f}", f"{m['rss_peak_bytes'] / 2**20:.1f}",
            f"{m['rss_per_connection_bytes'] / 1024:.2f}",
            f"{m['rss_per_open_connection_bytes'] / 1024:.2f}",
            f"{m['max_open_connections_seen']:,}",
        ])
    return rows


def _pairs(runs: list[dict[str, Any]]) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """(router run, HAProxy run) of each repetition that has both."""
    by_index: dict[int, dict[str, dict[str, Any]]] = {}
    for run in runs:
        by_index.setdefault(run["run"], {})[run.get("target", "router")] = run
    return [(pair["router"], pair["haproxy"]) for _, pair in sorted(by_index.items())
            if "router" in pair and "haproxy" in pair]


def ratio_rows(runs: list[dict[str, Any]]) -> list[list[str]]:
    rows = []
    for router, haproxy in _pairs(runs):
        r, h = router["report"], haproxy["report"]
        p99 = (f"{r['p99_us'] / h['p99_us']:.2f}" if r["p99_us"] and h["p99_us"] else "-")
        rows.append([str(router["run"]), f"{r['requests_per_s']:,.0f}",
                     f"{h['requests_per_s']:,.0f}",
                     f"{r['requests_per_s'] / max(h['requests_per_s'], 1e-9):.2f}", p99])
    return rows


def targets(runs: list[dict[str, Any]]) -> dict[str, bool | None]:
    """Each target, met by every router run (None: not measured, no HAProxy run)."""
    mine = [r for r in runs if r.get("target", "router") == "router"]
    pairs = _pairs(runs)
    return {
        "errors": all(r["report"]["error_total"] == 0 and r["report"]["unsent"] == 0
                      for r in mine),
        "p99": all((r["report"]["p99_us"] or 10**9) < 1_000_000 for r in mine),
        "vs_haproxy": all(r["report"]["requests_per_s"] >= h["report"]["requests_per_s"]
                          for r, h in pairs) if pairs else None,
        "rss_per_connection": all(
            r["router"]["rss_per_open_connection_bytes"] <= RSS_TARGET_BYTES for r in mine),
        "all_connections_open_together": all(
            r["router"]["max_open_connections_seen"] >= r["report"]["connections"] for r in mine),
    }


def _verdict(ok: bool | None) -> str:
    return "not measured" if ok is None else "met" if ok else "**not met**"


def docs_command(result: dict[str, Any]) -> str:
    """The command that repeats the run, from the settings it recorded."""
    s = result["settings"]
    return command_line("bench.tenk", [
        ("--clients", s["clients"]), ("--requests", s["requests"]),
        ("--repeat", len(result["runs"])), ("--processes", s["load_processes"]),
        ("--router-config", None if s["router_config"] == ROUTER_CONFIG else "FILE"),
        ("--no-idle-probe", not result.get("idle")),
        ("--no-haproxy", s.get("haproxy") is False), ("--name", result["name"]),
    ])


def docs_block(result: dict[str, Any]) -> str:
    """The run's record for docs/benchmarks.md: command, date, machine, settings, tables."""
    m, k, s = result["machine"], result["kernel"], result["settings"]
    met = result["targets_met"]
    idle = result.get("idle")
    router = ("the router's default config" if s["router_config"] == ROUTER_CONFIG
              else "router config from --router-config")
    machine = (f"{m['nproc']} CPUs, {m['platform']}, Python {m['python']}; kernel: hard nofile "
               f"{k['nofile_hard']}, somaxconn {k['somaxconn']}, ephemeral ports "
               f"{k['ip_local_port_range']}")
    lines = [
        run_header(docs_command(result), result["timestamp"], machine),
        f"{s['clients']:,} persistent connections x {s['requests']} requests "
        f"({s['clients'] * s['requests']:,} round trips, {s['payload_bytes']}-byte payloads, one "
        f"request in flight per connection), {s['load_processes']} load process(es); {router}; "
        "two echo backends; HAProxy (one thread, maxconn "
        f"{s.get('haproxy_maxconn', '-')}) in the same sitting, fresh per run, interleaved.",
        "",
        markdown_table(HEADER, table_rows(result["runs"])),
    ]
    ratios = ratio_rows(result["runs"])
    if ratios:
        lines += ["", markdown_table(RATIO_HEADER, ratios)]
    lines += [
        "",
        "Targets (every router run): " + ", ".join(
            f"{TARGETS.get(name, name)}: {_verdict(ok)}" for name, ok in met.items()) + ".",
    ]
    if idle:
        lines += ["", (
            f"Idle probe (fresh router, {idle['clients']:,} plain sockets): "
            f"{idle['per_connection_unused_bytes'] / 1024:.2f} KiB of RSS per connection open "
            f"and never used, {idle['per_connection_used_once_bytes'] / 1024:.2f} KiB after one "
            f"round trip on each ({idle['answered_once']:,} answered)."
        )]
    return "\n".join(lines)


def update_docs(result: dict[str, Any], path: Path = BENCHMARKS_MD) -> bool:
    return replace_block(DOCS_START, DOCS_END, docs_block(result), path)


# -- main --------------------------------------------------------------------------------------


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.tenk", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=10_000)
    parser.add_argument("--requests", type=int, default=50, help="per connection")
    parser.add_argument("--repeat", type=int, default=1, help="runs, each on a fresh router")
    # One load process by default: over three interleaved pairs of runs it gave 23.2k, 25.1k
    # and 23.7k requests/s against 21.9k, 23.7k and 22.5k with two, since it leaves the router
    # more of the two shared cores.
    parser.add_argument("--processes", type=int, default=1,
                        help="load generator processes (default: 1)")
    parser.add_argument("--no-idle-probe", action="store_true")
    parser.add_argument("--no-haproxy", action="store_true",
                        help="router runs only (by default HAProxy runs beside each)")
    parser.add_argument("--router-config", type=Path, metavar="TOML",
                        help="router config file instead of the default config")
    parser.add_argument("--name", default="tenk", help="bench/results/<name>.json")
    parser.add_argument("--update-docs", action="store_true",
                        help=f"replace the text between {DOCS_START} and {DOCS_END} in "
                             "docs/benchmarks.md")
    args = parser.parse_args(argv)
    if min(args.clients, args.requests, args.repeat, args.processes) < 1:
        parser.error("--clients, --requests, --repeat and --processes must be >= 1")
    if not re.fullmatch(r"[\w.-]+", args.name):
        parser.error("--name: letters, digits, '.', '_' and '-' only")
    args.config_text = (args.router_config.read_text() if args.router_config is not None
                        else ROUTER_CONFIG)
    return args


def main(argv: list[str] | None = None) -> None:
    args = _parse_args(argv)
    raise_nofile_limit()  # before any child starts, so the router inherits it
    limits = kernel_limits()
    problems = check_kernel(limits, args.clients)
    if problems:
        sys.exit("cannot run: " + "; ".join(problems))
    haproxy = None if args.no_haproxy else shutil.which("haproxy")
    runs = []
    for index in range(1, args.repeat + 1):  # interleaved: drift hits both alike
        runs.append(loaded_run(index, args))
        if haproxy is not None:
            runs.append(loaded_run(index, args, haproxy))
    idle = None if args.no_idle_probe else idle_probe(args.clients, args.config_text)
    result: dict[str, Any] = {
        "name": args.name,
        "timestamp": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {"nproc": os.cpu_count(), "platform": platform.platform(),
                    "python": platform.python_version()},
        "kernel": limits,
        "tree": tree_state(),
        "settings": {
            "clients": args.clients, "requests": args.requests, "payload_bytes": PAYLOAD_BYTES,
            "mode": "persistent", "pipeline": 1, "load_processes": args.processes,
            "warmup": f"{WARMUP_CONNECTIONS} x {WARMUP_REQUESTS}",
            "router_config": args.config_text, "rss_interval_s": RSS_INTERVAL_S,
            "haproxy": haproxy is not None,
            "haproxy_maxconn": _haproxy_maxconn() if haproxy is not None else None,
        },
        "targets": TARGETS,
        "targets_met": targets(runs),
        "runs": runs,
        "idle": idle,
    }
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    out = RESULTS_DIR / f"{args.name}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    for run in runs:
        print(f"-- run {run['run']}\n{format_report(run['report'])}")
    print()
    print(text_table(HEADER, table_rows(runs)))
    if ratio_rows(runs):
        print()
        print(text_table(RATIO_HEADER, ratio_rows(runs)))
    print()
    if idle is not None:
        print(docs_block(result).split("\n\n")[-1])
    print("targets met: " + ", ".join(f"{k}={v}" for k, v in result["targets_met"].items()))
    print(f"results: {out.relative_to(ROOT)}")
    if args.update_docs:
        done = update_docs(result)
        print("docs/benchmarks.md updated" if done
              else f"docs/benchmarks.md has no {DOCS_START} markers")
    if any(r["report"]["worker_errors"] or r["report"]["workers_lost"] for r in runs):
        sys.exit(1)


if __name__ == "__main__":
    main()
