"""Benchmark: the router against direct connections and HAProxy, same backends, same load.

``python -m bench.run [--clients 50,200] [--requests N] [--name NAME] [--update-docs]``

Starts two echo backends, the router (a subprocess, ``--backend`` flags, no config file) and,
when ``haproxy`` is on PATH, an HAProxy in TCP mode (``balance leastconn``) in front of the
same two backends. For each client count it runs ``bench.load`` in persistent mode (64-byte
payloads, no pipelining, ``N`` requests per connection) against:

- ``direct``: half the clients to each backend (lane k goes to backend k mod 2), started
  together and merged into one report, so latencies are exact percentiles over all requests;
- ``router``: every client to the router;
- ``router+tls``: every client to a router whose listener speaks TLS (a certificate made for
  the run with trustme; the clients verify it), at the ``--tls-clients`` counts only (default
  50); its ratio to ``router`` is the cost of TLS;
- ``haproxy``: every client to HAProxy.

Every target is measured at each load-generator process count in ``--processes`` (default
1 and 2) and keeps the count that served it best. On two shared cores the load generator's
split moves CPU between it and the target: one load process leaves a whole core to the router,
while HAProxy, cheaper per request, is held back by one load process and does best with two.
``direct`` always runs one load process per backend.

It prints a table and the ratios router/direct and router/haproxy, and writes
``bench/results/<name>.json`` with every figure, the machine and a timestamp. Every wait is
bounded, and every process it started is stopped in ``finally``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.docs import BENCHMARKS_MD, command_line, replace_block, run_header
from bench.load import (
    LoadReport,
    LoadSpec,
    run_load,
    run_specs,
)
from router.control.launcher import BlockingProcess, ReadyReader, launch_blocking, started
from router.protocol.announce import Banner, parse_banner, ready_port

ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = ROOT / "bench" / "results"
DOCS_START = "<!-- bench:start -->"
DOCS_END = "<!-- bench:end -->"

PAYLOAD_BYTES = 64
# A Python process (router or echo) starts in well under a second; allow a loaded machine 20 s.
READY_TIMEOUT_S = 20.0
STOP_TIMEOUT_S = 10.0
ROUTER_GRACE_S = 5.0
DIRECT_SPLIT = "half the clients to each backend (lane k -> backend k mod 2), merged"


# -- processes ---------------------------------------------------------------------------------


@dataclass
class Service:
    """One process this script started (by ``router.control.launcher``) and where it listens."""

    name: str
    process: BlockingProcess[Any]
    port: int = 0
    stderr_path: Path | None = None

    def stderr_tail(self, lines: int = 5) -> str:
        try:
            text = self.stderr_path.read_text(errors="replace") if self.stderr_path else ""
        except OSError:
            return ""
        return " | ".join(text.strip().splitlines()[-lines:])

    def stop(self) -> None:
        self.process.stop(STOP_TIMEOUT_S)


def _spawn(name: str, argv: list[str], log_dir: Path, ready: ReadyReader[Any]) -> Service:
    """Start ``argv`` and wait for ``ready``; its stderr goes to ``log_dir`` (a temp dir)."""
    stderr_path = log_dir / f"{name}.stderr.log"
    process = launch_blocking(
        argv, ready, cwd=ROOT, stderr=stderr_path, ready_timeout_s=READY_TIMEOUT_S,
        new_session=True,  # a Ctrl-C here is this script's to handle
    )
    return Service(name, process, stderr_path=stderr_path)


def start_echo(name: str, log_dir: Path) -> Service:
    service = _spawn(name, [sys.executable, "-m", "backends.echo", "--port", "0"], log_dir,
                     ready_port)
    service.port = service.process.ready
    return service


def start_router(backends: list[int], log_dir: Path, config: Path | None = None,
                 processes: int = 1, name: str | None = None) -> tuple[Service, int]:
    """The router on free ports; returns it and its admin port.

    ``config``: a TOML file for the settings the flags do not cover (the flags still win).
    ``processes`` > 1: that many router processes on the port, under one supervisor.
    """
    argv = [sys.executable, "-m", "router", "serve", "--listen", "127.0.0.1:0",
            "--admin", "127.0.0.1:0", "--log-level", "WARNING",
            "--shutdown-grace", str(ROUTER_GRACE_S)]
    if config is not None:
        argv += ["--config", str(config)]
    if processes > 1:
        argv += ["--processes", str(processes)]
    for port in backends:
        argv += ["--backend", f"127.0.0.1:{port}"]
    name = name or ("router" if processes == 1 else f"router-{processes}p")
    service = _spawn(name, argv, log_dir, parse_banner)
    banner: Banner = service.process.ready
    service.port = banner.listen[1]
    return service, banner.admin[1]


def start_tls_router(backends: list[int], log_dir: Path) -> tuple[Service, Path]:
    """A router whose listener speaks TLS with a certificate for 127.0.0.1 made for this run;
    returns it and the CA file its clients verify it with."""
    import trustme  # the test extra, which `make bench` installs

    ca = trustme.CA()
    leaf = ca.issue_cert("127.0.0.1", "localhost")
    ca_file, cert, key = log_dir / "ca.pem", log_dir / "router.pem", log_dir / "router.key"
    ca.cert_pem.write_to_path(str(ca_file))
    leaf.cert_chain_pems[0].write_to_path(str(cert))
    leaf.private_key_pem.write_to_path(str(key))
    config = log_dir / "router-tls.toml"
    config.write_text(f'[listener.tls]\ncert_file = "{cert}"\nkey_file = "{key}"\n')
    service, _ = start_router(backends, log_dir, config=config, name="router+tls")
    return service, ca_file


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def haproxy_config(port: int, backends: list[int]) -> str:
    servers = "\n".join(f"    server b{i} 127.0.0.1:{p}" for i, p in enumerate(backends, 1))
    return f"""\
global
    # Each connection costs HAProxy two fds; 4096 fits a 20,000-fd hard limit with room.
    maxconn 4096

defaults
    mode tcp
    timeout connect 5s
    timeout client 60s
    timeout server 60s

listen bench
    bind 127.0.0.1:{port}
    balance leastconn
{servers}
"""


def wait_accepting(service: Service, timeout_s: float) -> None:
    """Until the port takes a connection; HAProxy prints no readiness line."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if service.process.poll() is not None:
            raise RuntimeError(f"{service.name} exited with rc={service.process.returncode}: "
                               f"{service.stderr_tail()}")
        try:
            with socket.create_connection(("127.0.0.1", service.port), timeout=1.0):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{service.name} did not accept on port {service.port} in {timeout_s}s")


def start_haproxy(binary: str, backends: list[int], log_dir: Path) -> Service:
    port = free_port()
    cfg = log_dir / "haproxy.cfg"
    cfg.write_text(haproxy_config(port, backends))
    service = _spawn("haproxy", [binary, "-f", str(cfg), "-db"], log_dir, started)
    service.port = port
    wait_accepting(service, READY_TIMEOUT_S)
    return service


def haproxy_version(binary: str) -> str:
    try:
        out = subprocess.run([binary, "-v"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return out.splitlines()[0].split(" - ")[0] if out else "unknown"  # drop the URL


# -- load --------------------------------------------------------------------------------------


def run_split(ports: list[int], connections: int, requests: int, processes: int,
              duration_s: float | None) -> LoadReport:
    """Like ``run_load``, but lane k connects to ``ports[k % len(ports)]``; one merged report.

    Built from ``bench.load``'s own worker and summary so the counting rules are the same and
    the percentiles are exact over all requests; all workers start on one signal.
    """
    # A multiple of len(ports), so every process serves the lanes of one backend only.
    nproc = len(ports) * max(1, min(processes, connections) // len(ports))
    specs = [LoadSpec(host="127.0.0.1", port=ports[k % len(ports)], connections=connections,
                      requests=requests, duration_s=duration_s, payload_bytes=PAYLOAD_BYTES)
             for k in range(nproc)]
    return run_specs(specs)


def admin_stats(port: int) -> dict[str, Any]:
    url = f"http://127.0.0.1:{port}/stats"
    with urllib.request.urlopen(url, timeout=5.0) as response:
        body: dict[str, Any] = json.load(response)
    return body


# -- output ------------------------------------------------------------------------------------


def _ms(us: int | None) -> str:
    return "-" if us is None else f"{us / 1000:.2f}"


def _ratio(a: float | int | None, b: float | int | None) -> float | None:
    return round(a / b, 3) if a is not None and b else None


def ratios(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each router variant ("router", "router-2p", ...) against direct and HAProxy, and
    "router+tls" against the plain "router"."""
    by_key = {(r["target"], r["clients"]): r["report"] for r in runs}
    variants = sorted({r["target"] for r in runs if r["target"].startswith("router")})
    out = []
    for clients in sorted({r["clients"] for r in runs}):
        for variant in variants:
            router = by_key.get((variant, clients))
            if router is None:
                continue
            others = ("router",) if variant.endswith("+tls") else ("direct", "haproxy")
            for other in others:
                base = by_key.get((other, clients))
                if base is None:
                    continue
                out.append({
                    "clients": clients, "ratio": f"{variant}/{other}",
                    "requests_per_s": _ratio(router["requests_per_s"], base["requests_per_s"]),
                    "p50": _ratio(router["p50_us"], base["p50_us"]),
                    "p99": _ratio(router["p99_us"], base["p99_us"]),
                })
    return out


def median_run(reports: list[LoadReport]) -> LoadReport:
    """The round with the median throughput (the lower middle for an even count)."""
    ranked = sorted(reports, key=lambda r: r["requests_per_s"])
    return ranked[(len(ranked) - 1) // 2]


def table_rows(runs: list[dict[str, Any]]) -> list[list[str]]:
    rows = []
    for run in runs:
        r = run["report"]
        rows.append([run["target"], str(run["clients"]), str(run.get("load_processes", "-")),
                     f"{r['requests_per_s']:.0f}",
                     _ms(r["p50_us"]), _ms(r["p99_us"]), str(r["error_total"])])
    return rows


HEADER = ["target", "clients", "load procs", "req/s", "p50 ms", "p99 ms", "errors"]
RATIO_HEADER = ["clients", "ratio", "req/s", "p50", "p99"]


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def ratio_rows(items: list[dict[str, Any]]) -> list[list[str]]:
    return [[str(i["clients"]), i["ratio"], _fmt(i["requests_per_s"]), _fmt(i["p50"]),
             _fmt(i["p99"])] for i in items]


def text_table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in
                       enumerate(zip(row, widths, strict=True))) for row in [header, *rows]]
    return "\n".join(lines)


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |",
             "|" + "|".join("---" if i == 0 else "---:" for i in range(len(header))) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def docs_command(result: dict[str, Any]) -> str:
    """The command that repeats the run, from the settings it recorded."""
    s = result["settings"]
    return command_line("bench.run", [
        ("--clients", s.get("clients")), ("--requests", s["requests_per_connection"]),
        ("--max-seconds", s.get("max_seconds")), ("--processes", s.get("load_processes")),
        ("--router-processes", s.get("router_processes")), ("--rounds", s.get("rounds")),
        ("--tls-clients", s.get("tls_clients")), ("--name", result["name"]),
    ])


def docs_block(result: dict[str, Any]) -> str:
    """The run's record for docs/benchmarks.md: command, date, machine, settings, tables."""
    m = result["machine"]
    s = result["settings"]
    haproxy = f", {m['haproxy']}" if m.get("haproxy") else ", no HAProxy"
    machine = f"{m['nproc']} CPUs, {m['platform']}, Python {m['python']}{haproxy}"
    return "\n".join([
        run_header(docs_command(result), result["timestamp"], machine),
        f"{s['payload_bytes']}-byte payloads, one request in flight per connection, "
        f"{s['requests_per_connection']} requests per connection; direct = {s['direct']}; "
        f"median of {s.get('rounds', 1)} interleaved rounds, at the load process count (of "
        f"{', '.join(map(str, s.get('load_processes') or []))}) that served the target best.",
        "",
        markdown_table(HEADER, table_rows(result["runs"])),
        "",
        markdown_table(RATIO_HEADER, ratio_rows(result["ratios"])),
    ])


def update_docs(result: dict[str, Any], path: Path = BENCHMARKS_MD) -> bool:
    """The run's block: ``bench:start`` for the default name, ``bench:NAME:start`` else."""
    name = result["name"]
    start, end = ((DOCS_START, DOCS_END) if name == "latest"
                  else (f"<!-- bench:{name}:start -->", f"<!-- bench:{name}:end -->"))
    return replace_block(start, end, docs_block(result), path)


# -- main --------------------------------------------------------------------------------------


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", default="50,200",
                        help="comma-separated client (connection) counts (default: 50,200)")
    parser.add_argument("--requests", type=int, default=2000,
                        help="requests per connection (default: 2000)")
    parser.add_argument("--max-seconds", type=float, default=30.0,
                        help="stop sending after this long in one run (default: 30)")
    parser.add_argument("--processes", default="1,2",
                        help="comma-separated load generator process counts; each target "
                             "keeps its best (default: 1,2)")
    parser.add_argument("--name", default="latest", help="bench/results/<name>.json")
    parser.add_argument("--no-haproxy", action="store_true", help="skip HAProxy")
    parser.add_argument("--router-processes", default="1,2",
                        help="comma-separated router process counts, one router each "
                             "(default: 1,2; 'router' is 1, 'router-Np' is N)")
    parser.add_argument("--rounds", type=int, default=3,
                        help="measure every target this many times, interleaved, and keep "
                             "the median round (default: 3)")
    parser.add_argument("--tls-clients", default="50",
                        help="comma-separated client counts (of --clients) at which the "
                             "router+tls target runs too; '' for none (default: 50)")
    parser.add_argument("--update-docs", action="store_true",
                        help=f"replace the text between {DOCS_START} and {DOCS_END} in "
                             "docs/benchmarks.md")
    args = parser.parse_args(argv)
    try:
        args.client_counts = [int(c) for c in args.clients.split(",") if c.strip()]
    except ValueError:
        parser.error(f"--clients: expected comma-separated integers, got {args.clients!r}")
    if not args.client_counts or min(args.client_counts) < 1 or args.requests < 1:
        parser.error("client counts and --requests must be >= 1")
    try:
        args.process_counts = [int(p) for p in args.router_processes.split(",") if p.strip()]
    except ValueError:
        parser.error(f"--router-processes: expected integers, got {args.router_processes!r}")
    if not args.process_counts or min(args.process_counts) < 1 or args.rounds < 1:
        parser.error("--router-processes and --rounds must be >= 1")
    try:
        args.load_counts = sorted({int(p) for p in args.processes.split(",") if p.strip()})
    except ValueError:
        parser.error(f"--processes: expected integers, got {args.processes!r}")
    if not args.load_counts or min(args.load_counts) < 1:
        parser.error("--processes must be >= 1")
    try:
        args.tls_counts = [int(c) for c in args.tls_clients.split(",") if c.strip()]
    except ValueError:
        parser.error(f"--tls-clients: expected integers, got {args.tls_clients!r}")
    if not re.fullmatch(r"[\w.-]+", args.name):
        parser.error("--name: letters, digits, '.', '_' and '-' only")
    return args


def load_counts_for(target: str, counts: list[int], backends: int) -> list[int]:
    """The load process counts to measure ``target`` at (direct: one per backend)."""
    return [backends] if target == "direct" else counts


def _one_run(target: str, clients: int, port: int, backends: list[int], processes: int,
             args: argparse.Namespace, tls_ca: Path | None = None) -> LoadReport:
    if target == "direct":
        return run_split(backends, clients, args.requests, processes, args.max_seconds)
    return run_load("127.0.0.1", port, connections=clients, requests=args.requests,
                    duration_s=args.max_seconds, payload_bytes=PAYLOAD_BYTES,
                    mode="persistent", processes=processes,
                    tls_ca=str(tls_ca) if tls_ca is not None else None)


def best_split(rounds: dict[int, list[LoadReport]]) -> tuple[int, LoadReport]:
    """(load processes, median report) of the process count whose median round was fastest."""
    medians = {count: median_run(reports) for count, reports in rounds.items()}
    best = max(medians, key=lambda count: medians[count]["requests_per_s"])
    return best, medians[best]


def main(argv: list[str] | None = None) -> None:
    args = _parse_args(argv)
    binary = None if args.no_haproxy else shutil.which("haproxy")
    services: list[Service] = []
    runs: list[dict[str, Any]] = []
    router_stats: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="bench-run-") as tmp:
        log_dir = Path(tmp)
        try:
            backends = []
            for index in (1, 2):
                echo = start_echo(f"echo{index}", log_dir)
                services.append(echo)
                backends.append(echo.port)
            targets = {"direct": 0}
            admin_port = 0
            for count in args.process_counts:
                router, admin = start_router(backends, log_dir, processes=count)
                services.append(router)
                targets["router" if count == 1 else f"router-{count}p"] = router.port
                admin_port = admin_port or admin
            tls_ca: Path | None = None
            if set(args.tls_counts) & set(args.client_counts):
                tls_router, tls_ca = start_tls_router(backends, log_dir)
                services.append(tls_router)
                targets["router+tls"] = tls_router.port
            if binary is not None:
                haproxy = start_haproxy(binary, backends, log_dir)
                services.append(haproxy)
                targets["haproxy"] = haproxy.port
            else:
                print("haproxy not found (or --no-haproxy): skipping it", file=sys.stderr)
            for clients in args.client_counts:
                rounds: dict[str, dict[int, list[LoadReport]]] = {
                    target: {n: [] for n in load_counts_for(target, args.load_counts,
                                                            len(backends))}
                    for target in targets
                    if target != "router+tls" or clients in args.tls_counts
                }
                for round_no in range(args.rounds):  # interleaved: drift hits every target
                    for target, by_procs in rounds.items():
                        port = targets[target]
                        for procs, reports in by_procs.items():
                            print(f"running {target} with {clients} clients, {procs} load "
                                  f"processes (round {round_no + 1}/{args.rounds}) ...",
                                  file=sys.stderr, flush=True)
                            reports.append(_one_run(
                                target, clients, port, backends, procs, args,
                                tls_ca if target == "router+tls" else None,
                            ))
                for target, by_count in rounds.items():
                    procs, report = best_split(by_count)
                    runs.append({
                        "target": target, "clients": clients, "load_processes": procs,
                        "report": report,
                        "rounds_requests_per_s": {
                            str(n): [r["requests_per_s"] for r in reports]
                            for n, reports in by_count.items()
                        },
                    })
            if admin_port:
                router_stats = admin_stats(admin_port)
        finally:
            for service in reversed(services):
                service.stop()
    result: dict[str, Any] = {
        "name": args.name,
        "timestamp": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {
            "nproc": os.cpu_count(), "platform": platform.platform(),
            "python": platform.python_version(),
            "haproxy": haproxy_version(binary) if binary else None,
        },
        "settings": {
            "mode": "persistent", "pipeline": 1, "payload_bytes": PAYLOAD_BYTES,
            "requests_per_connection": args.requests, "max_seconds": args.max_seconds,
            "load_processes": args.load_counts, "clients": args.client_counts,
            "router_processes": args.process_counts, "rounds": args.rounds,
            "tls_clients": args.tls_counts,
            "direct": DIRECT_SPLIT, "haproxy": "mode tcp, balance leastconn, no health checks",
        },
        "runs": runs,
        "ratios": ratios(runs),
        "router_stats": router_stats,
    }
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    out = RESULTS_DIR / f"{args.name}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(text_table(HEADER, table_rows(runs)))
    print()
    print(text_table(RATIO_HEADER, ratio_rows(result["ratios"])))
    print(f"\ndirect = {DIRECT_SPLIT}; results: {out.relative_to(ROOT)}")
    if args.update_docs:
        done = update_docs(result)
        print("docs/benchmarks.md updated" if done
              else f"docs/benchmarks.md has no {DOCS_START} markers")
    if any(r["report"]["worker_errors"] or r["report"]["workers_lost"] for r in runs):
        sys.exit(1)


if __name__ == "__main__":
    main()
