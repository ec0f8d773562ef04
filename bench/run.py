"""Benchmark: the router against direct connections, HAProxy and the C++ router, same load.

``python -m bench.run [--clients 50,200] [--mode persistent|per-request] [--requests N]
[--processes K] [--cxx-build DIR] [--name NAME] [--update-docs]``

Starts two echo backends, the router (a subprocess, ``--backend`` flags, no config file) and,
when ``haproxy`` is on PATH, an HAProxy in TCP mode (``balance leastconn``, one thread) in
front of the same two backends. For each client count it runs the same load against every
target, ``--rounds`` times, interleaved:

- ``direct``: half the clients to each backend (lane k goes to backend k mod 2), started
  together and merged into one report, so latencies are exact percentiles over all requests;
- ``router``: every client to the router (``router-Np``: N router processes on one port);
- ``router+tls``: every client to a router whose listener speaks TLS (a certificate made for
  the run with trustme; the clients verify it), at the ``--tls-clients`` counts only (default
  50; persistent mode); its ratio to ``router`` is the cost of TLS;
- ``haproxy``: every client to HAProxy;
- ``cxx-router``: the C++ inference-router (github.com/SAY-5/inference-router), in
  ``--mode per-request`` only, when its build directory (``--cxx-build``, default
  ``bench/peers/inference-router/build``; ``make bench-peer`` builds it) holds it. Nothing is
  fetched at run time: without the build the row is skipped.

``--mode persistent`` (default): ``bench.load``, 64-byte payloads, one request in flight per
connection, ``N`` requests per connection. ``--mode per-request``: one connection per request
(connect, send, read, close), from the C++ router's own load tool (``load_bench`` in the same
build directory, SO_LINGER 0 on close, as that project measures itself) when it is built, else
from ``bench.load``'s per-request mode; either way one tool drives every target of the run.

One load generator for every target: ``--processes`` load processes (default 2) for all of
them, direct included. Every target's CPU time is read from ``/proc/<pid>/stat`` (utime +
stime of the process and its children that are still running) before and after each round:
the report gives microseconds of target CPU per request (for ``direct``, the two backends'),
and of the backends' CPU per request for every target (a proxy that pipelines saves them
work), for every round.

It prints a table and the ratios of each router variant to direct, HAProxy and the C++
router, and writes ``bench/results/<name>.json`` with every round's figures, the machine and
a timestamp. Every wait is bounded, and every process it started is stopped in ``finally``.
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
CXX_BUILD = ROOT / "bench" / "peers" / "inference-router" / "build"
CXX_LOAD_TIMEOUT_S = 600.0
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


def haproxy_config(port: int, backends: list[int], maxconn: int = 4096) -> str:
    """``maxconn``: each connection costs HAProxy two fds; 4096 fits a 20,000-fd hard limit
    with room."""
    servers = "\n".join(f"    server b{i} 127.0.0.1:{p}" for i, p in enumerate(backends, 1))
    return f"""\
global
    maxconn {maxconn}
    # One thread, like the router's one event loop: CPU per request compares like with like.
    nbthread 1

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


def start_haproxy(binary: str, backends: list[int], log_dir: Path, maxconn: int = 4096
                  ) -> Service:
    port = free_port()
    cfg = log_dir / "haproxy.cfg"
    cfg.write_text(haproxy_config(port, backends, maxconn))
    service = _spawn("haproxy", [binary, "-f", str(cfg), "-db"], log_dir, started)
    service.port = port
    wait_accepting(service, READY_TIMEOUT_S)
    return service


def start_cxx_router(build: Path, backends: list[int], log_dir: Path) -> Service:
    """The C++ inference-router from ``build`` in front of the same backends."""
    port = free_port()
    argv = [str(build / "inference-router"), "--listen", f"127.0.0.1:{port}", "--log-level", "0"]
    for backend in backends:
        argv += ["--backend", f"127.0.0.1:{backend}"]
    service = _spawn("cxx-router", argv, log_dir, started)
    service.port = port
    wait_accepting(service, READY_TIMEOUT_S)
    return service


def cpu_seconds(pid: int) -> float:
    """utime + stime of ``pid`` and of its live children (a supervisor's router processes)."""
    total = 0.0
    for each in [pid, *_children(pid)]:
        try:
            fields = Path(f"/proc/{each}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # exited meanwhile
        total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def _children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(child) for child in text.split()]


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


def run_cxx_load(build: Path, port: int, connections: int, requests: int) -> LoadReport:
    """The C++ router's ``load_bench``: ``connections`` client threads, each ``requests``
    times connect, send 64 bytes, read the echo, close; its JSON as a ``LoadReport``."""
    with tempfile.TemporaryDirectory(prefix="bench-cxx-") as tmp:
        out = Path(tmp) / "result.json"
        subprocess.run(
            [str(build / "load_bench"), "--no-inproc", "--port", str(port), "--clients",
             str(connections), "--reqs-per-client", str(requests), "--payload-bytes",
             str(PAYLOAD_BYTES), "--out", str(out)],
            check=True, capture_output=True, timeout=CXX_LOAD_TIMEOUT_S,
        )
        body = json.loads(out.read_text())
    ok, errors = int(body["ok"]), int(body["err"])
    elapsed = float(body["total_ms"]) / 1000.0
    return LoadReport(
        mode="per-request", connections=connections, requests_per_connection=requests,
        pipeline=1, payload_bytes=PAYLOAD_BYTES, processes=1, ok=ok,
        errors={"failed": errors} if errors else {}, error_total=errors,
        connect_failures=0, sent=ok + errors, unsent=connections * requests - ok - errors,
        connections_opened=ok + errors, elapsed_s=elapsed,
        requests_per_s=float(body["throughput_rps"]), p50_us=int(body["p50_us"]),
        p95_us=int(body["p95_us"]), p99_us=int(body["p99_us"]), p999_us=int(body["p999_us"]),
        max_us=None, mean_us=None, timed_out=False, workers_lost=0, worker_errors=[],
    )


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
    """Each router variant ("router", "router-2p", ...) against direct, HAProxy and the C++
    router, and "router+tls" against the plain "router": req/s, latency and CPU per request
    of the median rounds."""
    by_key = {(r["target"], r["clients"]): r for r in runs}
    variants = sorted({r["target"] for r in runs if r["target"].startswith("router")})
    out = []
    for clients in sorted({r["clients"] for r in runs}):
        for variant in variants:
            router = by_key.get((variant, clients))
            if router is None:
                continue
            others = (("router",) if variant.endswith("+tls")
                      else ("direct", "haproxy", "cxx-router"))
            for other in others:
                base = by_key.get((other, clients))
                if base is None:
                    continue
                mine, theirs = router["report"], base["report"]
                out.append({
                    "clients": clients, "ratio": f"{variant}/{other}",
                    "requests_per_s": _ratio(mine["requests_per_s"], theirs["requests_per_s"]),
                    "p50": _ratio(mine["p50_us"], theirs["p50_us"]),
                    "p99": _ratio(mine["p99_us"], theirs["p99_us"]),
                    "cpu_per_request": _ratio(router["cpu_us_per_request"],
                                              base["cpu_us_per_request"]),
                })
    return out


def median_index(rounds: list[dict[str, Any]]) -> int:
    """The round with the median throughput (the lower middle for an even count)."""
    ranked = sorted(range(len(rounds)), key=lambda i: rounds[i]["report"]["requests_per_s"])
    return ranked[(len(ranked) - 1) // 2]


def _us(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def table_rows(runs: list[dict[str, Any]]) -> list[list[str]]:
    rows = []
    for run in runs:
        r = run["report"]
        rounds = run.get("rounds", [])
        rows.append([
            run["target"], str(run["clients"]), f"{r['requests_per_s']:.0f}",
            _ms(r["p50_us"]), _ms(r["p99_us"]), str(r["error_total"]),
            _us(run.get("cpu_us_per_request")), _us(run.get("backend_cpu_us_per_request")),
            " / ".join(f"{x['requests_per_s']:.0f}" for x in rounds) or "-",
            " / ".join(_us(x["cpu_us_per_request"]) for x in rounds) or "-",
        ])
    return rows


HEADER = ["target", "clients", "req/s", "p50 ms", "p99 ms", "errors", "CPU us/req",
          "backends CPU us/req", "every round: req/s", "every round: CPU us/req"]
RATIO_HEADER = ["clients", "ratio", "req/s", "p50", "p99", "CPU/req"]


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def ratio_rows(items: list[dict[str, Any]]) -> list[list[str]]:
    return [[str(i["clients"]), i["ratio"], _fmt(i["requests_per_s"]), _fmt(i["p50"]),
             _fmt(i["p99"]), _fmt(i.get("cpu_per_request"))] for i in items]


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
    processes = s.get("load_processes")
    if isinstance(processes, list):  # older results: one count per target, the best kept
        processes = ",".join(map(str, processes))
    return command_line("bench.run", [
        ("--mode", None if s.get("mode", "persistent") == "persistent" else s["mode"]),
        ("--clients", s.get("clients")), ("--requests", s["requests_per_connection"]),
        ("--max-seconds", s.get("max_seconds")), ("--processes", processes),
        ("--router-processes", s.get("router_processes")), ("--rounds", s.get("rounds")),
        ("--tls-clients", s.get("tls_clients")), ("--name", result["name"]),
    ])


def docs_block(result: dict[str, Any]) -> str:
    """The run's record for docs/benchmarks.md: command, date, machine, settings, tables."""
    m = result["machine"]
    s = result["settings"]
    haproxy = f", {m['haproxy']}" if m.get("haproxy") else ", no HAProxy"
    cxx = ", the C++ inference-router" if m.get("cxx_router") else ""
    machine = f"{m['nproc']} CPUs, {m['platform']}, Python {m['python']}{haproxy}{cxx}"
    per_request = s.get("mode") == "per-request"
    shape = ("one connection per request" if per_request
             else "one request in flight per connection")
    load = s.get("load_tool", "bench.load")
    return "\n".join([
        run_header(docs_command(result), result["timestamp"], machine),
        f"{s['payload_bytes']}-byte payloads, {shape}, {s['requests_per_connection']} "
        f"requests per {'client' if per_request else 'connection'}; load from {load} "
        f"({s.get('load_processes')} processes) for every target; direct = {s['direct']}; "
        f"median of {s.get('rounds', 1)} interleaved rounds, every round listed; CPU from "
        "/proc/<pid>/stat.",
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
    parser.add_argument("--mode", choices=["persistent", "per-request"], default="persistent",
                        help="persistent connections, or one connection per request")
    parser.add_argument("--requests", type=int, default=None,
                        help="requests per connection (persistent, default 2000) or per "
                             "client (per-request, default 200)")
    parser.add_argument("--max-seconds", type=float, default=30.0,
                        help="stop sending after this long in one run (default: 30)")
    parser.add_argument("--processes", type=int, default=2,
                        help="load generator processes, the same for every target "
                             "(default: 2)")
    parser.add_argument("--name", default="latest", help="bench/results/<name>.json")
    parser.add_argument("--no-haproxy", action="store_true", help="skip HAProxy")
    parser.add_argument("--cxx-build", type=Path, default=CXX_BUILD,
                        help="build directory of the C++ inference-router (its "
                             "inference-router and load_bench binaries); skipped if absent")
    parser.add_argument("--router-processes", default="1,2",
                        help="comma-separated router process counts, one router each "
                             "(default: 1,2; 'router' is 1, 'router-Np' is N)")
    parser.add_argument("--rounds", type=int, default=3,
                        help="measure every target this many times, interleaved, and report "
                             "the median round beside every round (default: 3)")
    parser.add_argument("--tls-clients", default="50",
                        help="comma-separated client counts (of --clients) at which the "
                             "router+tls target runs too, persistent mode; '' for none "
                             "(default: 50)")
    parser.add_argument("--update-docs", action="store_true",
                        help=f"replace the text between {DOCS_START} and {DOCS_END} in "
                             "docs/benchmarks.md")
    args = parser.parse_args(argv)
    if args.requests is None:
        args.requests = 200 if args.mode == "per-request" else 2000
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
    if args.processes < 1:
        parser.error("--processes must be >= 1")
    try:
        args.tls_counts = [int(c) for c in args.tls_clients.split(",") if c.strip()]
    except ValueError:
        parser.error(f"--tls-clients: expected integers, got {args.tls_clients!r}")
    if args.mode == "per-request":
        args.tls_counts = []
    if not re.fullmatch(r"[\w.-]+", args.name):
        parser.error("--name: letters, digits, '.', '_' and '-' only")
    return args


@dataclass
class Target:
    """One thing measured: where the load goes, and whose CPU it costs."""

    name: str
    port: int  # 0 for direct (the backends' own ports)
    pids: list[int]
    tls_ca: Path | None = None


def cxx_available(build: Path) -> bool:
    return all(os.access(build / tool, os.X_OK) for tool in ("inference-router", "load_bench"))


def _one_run(target: Target, clients: int, backends: list[int], args: argparse.Namespace,
             cxx_load: Path | None) -> LoadReport:
    if cxx_load is not None:  # per-request mode with the C++ load tool: for every target
        if target.name == "direct":
            raise ValueError("direct has no single port for load_bench")
        return run_cxx_load(cxx_load, target.port, clients, args.requests)
    if target.name == "direct":
        return run_split(backends, clients, args.requests, args.processes, args.max_seconds)
    return run_load("127.0.0.1", target.port, connections=clients, requests=args.requests,
                    duration_s=args.max_seconds, payload_bytes=PAYLOAD_BYTES,
                    mode=args.mode, processes=args.processes,
                    tls_ca=str(target.tls_ca) if target.tls_ca is not None else None)


def measure_round(target: Target, clients: int, backends: list[int], backend_pids: list[int],
                  args: argparse.Namespace, cxx_load: Path | None) -> dict[str, Any]:
    """One round of one target: its report and CPU per request, its own and the backends'."""
    before = [cpu_seconds(pid) for pid in target.pids]
    backends_before = [cpu_seconds(pid) for pid in backend_pids]
    report = _one_run(target, clients, backends, args, cxx_load)
    spent = sum(cpu_seconds(pid) for pid in target.pids) - sum(before)
    backends_spent = sum(cpu_seconds(pid) for pid in backend_pids) - sum(backends_before)
    ok = report["ok"]
    return {
        "report": report,
        "requests_per_s": report["requests_per_s"],
        "cpu_us_per_request": round(spent / ok * 1e6, 2) if ok else None,
        "backend_cpu_us_per_request": round(backends_spent / ok * 1e6, 2) if ok else None,
    }


def _summary(target: str, clients: int, rounds: list[dict[str, Any]]) -> dict[str, Any]:
    median = rounds[median_index(rounds)]
    return {
        "target": target, "clients": clients, "report": median["report"],
        "cpu_us_per_request": median["cpu_us_per_request"],
        "backend_cpu_us_per_request": median["backend_cpu_us_per_request"],
        "rounds": [{k: v for k, v in r.items() if k != "report"} | {
            "p50_us": r["report"]["p50_us"], "p99_us": r["report"]["p99_us"],
            "errors": r["report"]["error_total"]} for r in rounds],
    }


def start_targets(args: argparse.Namespace, backends: list[Service], log_dir: Path,
                  services: list[Service]) -> tuple[dict[str, Target], int]:
    """Every target of the run (started, appended to ``services``) and the admin port of
    the first router."""
    ports = [b.port for b in backends]
    targets = {"direct": Target("direct", 0, [b.process.pid for b in backends])}
    admin_port = 0
    for count in args.process_counts:
        router, admin = start_router(ports, log_dir, processes=count)
        services.append(router)
        name = "router" if count == 1 else f"router-{count}p"
        targets[name] = Target(name, router.port, [router.process.pid])
        admin_port = admin_port or admin
    if set(args.tls_counts) & set(args.client_counts):
        tls_router, tls_ca = start_tls_router(ports, log_dir)
        services.append(tls_router)
        targets["router+tls"] = Target("router+tls", tls_router.port, [tls_router.process.pid],
                                       tls_ca)
    binary = None if args.no_haproxy else shutil.which("haproxy")
    if binary is not None:
        haproxy = start_haproxy(binary, ports, log_dir)
        services.append(haproxy)
        targets["haproxy"] = Target("haproxy", haproxy.port, [haproxy.process.pid])
    else:
        print("haproxy not found (or --no-haproxy): skipping it", file=sys.stderr)
    if args.mode == "per-request" and cxx_available(args.cxx_build):
        cxx = start_cxx_router(args.cxx_build, ports, log_dir)
        services.append(cxx)
        targets["cxx-router"] = Target("cxx-router", cxx.port, [cxx.process.pid])
    elif args.mode == "per-request":
        print(f"no C++ inference-router build in {args.cxx_build} (make bench-peer): "
              "skipping it", file=sys.stderr)
    return targets, admin_port


def main(argv: list[str] | None = None) -> None:
    args = _parse_args(argv)
    binary = None if args.no_haproxy else shutil.which("haproxy")
    cxx_load = (args.cxx_build if args.mode == "per-request" and cxx_available(args.cxx_build)
                else None)
    services: list[Service] = []
    runs: list[dict[str, Any]] = []
    router_stats: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="bench-run-") as tmp:
        log_dir = Path(tmp)
        try:
            backends = [start_echo(f"echo{index}", log_dir) for index in (1, 2)]
            services += backends
            backend_pids = [b.process.pid for b in backends]
            targets, admin_port = start_targets(args, backends, log_dir, services)
            if cxx_load is not None:
                del targets["direct"]  # load_bench drives one port
            for clients in args.client_counts:
                rounds: dict[str, list[dict[str, Any]]] = {
                    name: [] for name in targets
                    if name != "router+tls" or clients in args.tls_counts
                }
                for round_no in range(args.rounds):  # interleaved: drift hits every target
                    for name, measured in rounds.items():
                        print(f"running {name} with {clients} clients ({args.mode}, round "
                              f"{round_no + 1}/{args.rounds}) ...", file=sys.stderr, flush=True)
                        measured.append(measure_round(
                            targets[name], clients, [b.port for b in backends], backend_pids,
                            args, cxx_load))
                runs += [_summary(name, clients, measured) for name, measured in rounds.items()]
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
            "cxx_router": str(args.cxx_build) if cxx_load is not None else None,
            "load_before": os.getloadavg()[0],
        },
        "settings": {
            "mode": args.mode, "pipeline": 1, "payload_bytes": PAYLOAD_BYTES,
            "requests_per_connection": args.requests, "max_seconds": args.max_seconds,
            "load_processes": args.processes, "clients": args.client_counts,
            "load_tool": "load_bench (the C++ router's)" if cxx_load is not None else "bench.load",
            "router_processes": args.process_counts, "rounds": args.rounds,
            "tls_clients": args.tls_counts,
            "direct": DIRECT_SPLIT,
            "haproxy": "mode tcp, balance leastconn, no health checks, nbthread 1",
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
