"""gRPC benchmark: unary ModelInfer through the router versus directly to the backend.

One ``backends.kserve`` process, one router (``inference-router serve``, its gRPC front door
in front of that backend), both started here on free loopback ports. For each caller count,
the same load runs against ``direct`` (the backend's port) and ``router`` (the router's gRPC
port), in that order, in the same run: ``callers`` concurrent coroutines, spread over
``--procs`` client processes (grpc.aio, one channel per process, so one Python client process
is not the bottleneck), each sending ModelInfer to the ``identity`` model with one FP32 tensor
of ``--elements`` values in ``raw_input_contents`` and waiting for the answer before the next
(closed loop). After ``--warmup-s`` the calls of ``--duration-s`` are counted; latency is
measured per call in the client. Requests are serialised once, before the run; answers are
checked by length only, so client CPU goes to gRPC, not protobuf.

Everything shares the machine's CPUs (2 on the reference machine): clients, router and
backend compete, so compare the router/direct ratio, not absolute figures, across machines.

Run: ``python -m bench.grpc_bench [--callers 1,64] [--duration-s 5] [--procs 2]
[--update-docs]``; results go to ``bench/results/grpc.json``, the table (with
``--update-docs``) to docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from array import array
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import uvloop

from bench.docs import BENCHMARKS_MD, command_line, replace_block, run_header
from router.control.launcher import BlockingProcess, launch_blocking
from router.protocol.announce import Banner, parse_banner, ready_port
from router.protocol.proto import grpc_predict_v2_pb2 as pb

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS = REPO_ROOT / "bench" / "results" / "grpc.json"
MARK_START, MARK_END = "<!-- grpc-bench:start -->", "<!-- grpc-bench:end -->"
MODEL_INFER = "/inference.GRPCInferenceService/ModelInfer"
STARTUP_TIMEOUT_S = 15.0
STOP_TIMEOUT_S = 10.0


@dataclass(frozen=True, slots=True)
class LoadSpec:
    target: str  # HOST:PORT
    callers: int
    warmup_s: float
    duration_s: float
    payload: bytes
    expect_min: int  # bytes an answer must have at least


def make_request(elements: int) -> bytes:
    request = pb.ModelInferRequest(model_name="identity", id="bench")
    tensor = request.inputs.add(name="INPUT0", datatype="FP32")
    tensor.shape.append(elements)
    request.raw_input_contents.append(array("f", range(elements)).tobytes())
    return request.SerializeToString()


async def _caller(
    call: Any, spec: LoadSpec, start_at: float, stop_at: float, out: list[float],
    errors: list[int],
) -> None:  # errors: [counted errors, every call made]
    # perf_counter, not loop.time(): uvloop's clock has millisecond resolution.
    now = time.perf_counter()
    while now < stop_at:
        sent = now
        try:
            answer = await call(spec.payload, timeout=30.0)
            ok = len(answer) >= spec.expect_min
        except grpc.aio.AioRpcError:
            ok = False
        now = time.perf_counter()
        errors[1] += 1
        if sent >= start_at and now <= stop_at:
            if ok:
                out.append(now - sent)
            else:
                errors[0] += 1


async def _load_async(spec: LoadSpec) -> tuple[list[float], int, int]:
    options = [("grpc.max_send_message_length", 64 << 20),
               ("grpc.max_receive_message_length", 64 << 20)]
    async with grpc.aio.insecure_channel(spec.target, options=options) as channel:
        await asyncio.wait_for(channel.channel_ready(), STARTUP_TIMEOUT_S)
        call = channel.unary_unary(MODEL_INFER)
        start_at = time.perf_counter() + spec.warmup_s
        stop_at = start_at + spec.duration_s
        latencies: list[float] = []
        errors = [0, 0]
        async with asyncio.TaskGroup() as group:
            for _ in range(spec.callers):
                group.create_task(_caller(call, spec, start_at, stop_at, latencies, errors))
    return latencies, errors[0], errors[1]


def load_process(spec: LoadSpec) -> tuple[list[float], int, int]:
    """One client process's share of the load (runs in a worker process)."""
    return uvloop.run(_load_async(spec))


def _percentile(sorted_values: list[float], fraction: float) -> float:
    if not sorted_values:
        return float("nan")
    index = min(len(sorted_values) - 1, int(fraction * len(sorted_values)))
    return sorted_values[index]


def run_load(
    pool: ProcessPoolExecutor, target: str, callers: int, procs: int, args: argparse.Namespace,
    payload: bytes, elements: int,
) -> dict[str, Any]:
    procs = max(1, min(procs, callers))
    shares = [callers // procs + (1 if i < callers % procs else 0) for i in range(procs)]
    specs = [
        LoadSpec(target, share, args.warmup_s, args.duration_s, payload, elements * 4)
        for share in shares
    ]
    latencies: list[float] = []
    errors = 0
    all_calls = 0
    for lat, err, total in pool.map(load_process, specs):
        latencies.extend(lat)
        errors += err
        all_calls += total
    latencies.sort()
    return {
        "callers": callers,
        "all_calls": all_calls,  # warm-up included: the CPU reading spans it too
        "calls": len(latencies),
        "errors": errors,
        "rps": len(latencies) / args.duration_s,
        "p50_ms": _percentile(latencies, 0.50) * 1000,
        "p99_ms": _percentile(latencies, 0.99) * 1000,
    }


def start_backend() -> tuple[BlockingProcess[int], int]:
    proc = launch_blocking(
        [sys.executable, "-m", "backends.kserve", "--port", "0", "--models", "identity"],
        ready_port, cwd=REPO_ROOT, ready_timeout_s=STARTUP_TIMEOUT_S,
    )
    return proc, proc.ready


def start_router(
    backend_port: int, config_dir: Path, log: Path, engine: str
) -> tuple[BlockingProcess[Banner], str]:
    config = config_dir / f"router-{engine}.toml"
    config.write_text(
        '[listener]\nlisten = "127.0.0.1:0"\n[admin]\nlisten = "127.0.0.1:0"\n'
        f'[grpc]\nlisten = "127.0.0.1:0"\nengine = "{engine}"\n'
        f'[[backends]]\naddress = "127.0.0.1:{backend_port}"\nprotocol = "grpc"\n'
        'models = ["identity"]\n'
    )
    proc = launch_blocking(
        [sys.executable, "-m", "router", "serve", "--config", str(config),
         "--log-level", "WARNING"],
        parse_banner, cwd=REPO_ROOT, stderr=log, ready_timeout_s=STARTUP_TIMEOUT_S,
    )
    target = proc.ready.grpc_target
    if target is None:
        proc.stop(STOP_TIMEOUT_S)
        raise RuntimeError("the router printed no gRPC listen line")
    return proc, target


# -- peers: nginx grpc_pass and HAProxy h2, each one worker/thread, upstream keep-alive --------


def nginx_config(port: int, backend_port: int, tmp: Path) -> str:
    return f"""\
daemon off;
master_process off;
worker_processes 1;
pid {tmp}/nginx.pid;
error_log {tmp}/nginx.error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {tmp}/body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    client_max_body_size 64m;
    upstream backend {{ server 127.0.0.1:{backend_port}; keepalive 64; }}
    server {{
        listen 127.0.0.1:{port} http2;
        location / {{ grpc_pass grpc://backend; }}
    }}
}}
"""


def haproxy_config(port: int, backend_port: int) -> str:
    return f"""\
global
    nbthread 1
    maxconn 4096

defaults
    mode http
    timeout connect 5s
    timeout client 60s
    timeout server 60s

frontend grpc
    bind 127.0.0.1:{port} proto h2
    default_backend backend

backend backend
    server b1 127.0.0.1:{backend_port} proto h2
"""


@dataclass
class Proxy:
    """A proxy under test: its gRPC target and the process whose CPU is its cost."""

    name: str
    target: str
    pid: int
    stop: Any  # () -> None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_accepting(port: int, proc: subprocess.Popen[bytes], name: str) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:  # bounded: STARTUP_TIMEOUT_S
        if proc.poll() is not None:
            raise RuntimeError(f"{name} exited with rc={proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1.0):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{name} did not accept on port {port}")


def _start_peer(name: str, argv: list[str], port: int, log: Path) -> Proxy:
    with log.open("wb") as err:
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=err,
                                start_new_session=True)
    _wait_accepting(port, proc, name)

    def stop() -> None:
        proc.terminate()
        try:
            proc.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(STOP_TIMEOUT_S)

    return Proxy(name, f"127.0.0.1:{port}", proc.pid, stop)


def start_peers(backend_port: int, tmp: Path) -> list[Proxy]:
    peers = []
    nginx = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists()
                                      else None)
    if nginx:
        port = _free_port()
        cfg = tmp / "nginx.conf"
        cfg.write_text(nginx_config(port, backend_port, tmp))
        peers.append(_start_peer("nginx", [nginx, "-c", str(cfg), "-e", str(tmp / "ngx.err")],
                                 port, tmp / "nginx.stderr"))
    haproxy = shutil.which("haproxy") or ("/usr/sbin/haproxy"
                                          if Path("/usr/sbin/haproxy").exists() else None)
    if haproxy:
        port = _free_port()
        cfg = tmp / "haproxy.cfg"
        cfg.write_text(haproxy_config(port, backend_port))
        peers.append(_start_peer("haproxy", [haproxy, "-f", str(cfg), "-db"], port,
                                 tmp / "haproxy.stderr"))
    return peers


def cpu_seconds(pid: int) -> float:
    """utime + stime of ``pid`` (/proc/<pid>/stat fields 14 and 15), in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# -- the run ---------------------------------------------------------------------------------


WORKLOADS = (  # (name, FP32 elements, callers)
    ("16 FP32", 16, 1), ("16 FP32", 16, 64), ("1 MiB", 1 << 18, 8),
)


def measure(args: argparse.Namespace) -> dict[str, Any]:
    rows: list[dict[str, Any]] = []
    backend, port = start_backend()
    proxies: list[Proxy] = [Proxy("direct", f"127.0.0.1:{port}", backend.pid, lambda: None)]
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        try:
            for engine in args.engines:
                router, target = start_router(port, tmp, tmp / f"router-{engine}.log", engine)
                proxies.append(Proxy(f"router ({engine})", target, router.pid,
                                     lambda r=router: r.stop(STOP_TIMEOUT_S)))
            if not args.no_peers:
                proxies += start_peers(port, tmp)
            context = multiprocessing.get_context("spawn")
            with ProcessPoolExecutor(args.procs, mp_context=context) as pool:
                for workload, elements, callers in WORKLOADS:
                    if callers not in args.callers and elements == 16:
                        continue
                    if elements > 16 and args.no_large:
                        continue
                    payload = make_request(elements)
                    for round_no in range(1, args.rounds + 1):
                        for proxy in proxies:  # interleaved: every target once per round
                            before = cpu_seconds(proxy.pid)
                            row = run_load(pool, proxy.target, callers, args.procs, args,
                                           payload, elements)
                            spent = cpu_seconds(proxy.pid) - before
                            row["cpu_us_per_call"] = (
                                spent / row["all_calls"] * 1e6 if row["all_calls"] else None)
                            rows.append({"target": proxy.name, "workload": workload,
                                         "round": round_no, **row})
                            print(_row_text(rows[-1]), flush=True)
        finally:
            for proxy in proxies:
                proxy.stop()
            backend.stop(STOP_TIMEOUT_S)
    return {
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": f"{os.cpu_count()} CPUs, {platform.platform()}, "
                   f"Python {platform.python_version()}, grpcio {grpc.__version__}",
        "settings": {
            "duration_s": args.duration_s, "warmup_s": args.warmup_s, "procs": args.procs,
            "rounds": args.rounds, "engines": args.engines,
        },
        "rows": rows,
    }


def _row_text(row: dict[str, Any]) -> str:
    cpu = row["cpu_us_per_call"]
    return (
        f"round {row['round']} {row['workload']:>8} callers={row['callers']:>3} "
        f"{row['target']:>16} rps={row['rps']:>7.0f} p50={row['p50_ms']:.2f}ms "
        f"p99={row['p99_ms']:.2f}ms cpu/call={cpu or 0:.0f}us errors={row['errors']}"
    )


def docs_command(result: dict[str, Any]) -> str:
    """The command that repeats the run, from the settings it recorded."""
    s = result["settings"]
    return command_line("bench.grpc_bench", [
        ("--rounds", s["rounds"]), ("--duration-s", s["duration_s"]),
        ("--warmup-s", s["warmup_s"]), ("--procs", s["procs"]),
    ])


def markdown(result: dict[str, Any]) -> str:
    """The run's record for docs/benchmarks.md: command, date, machine, settings, every
    round, then the ratios the targets are judged by (medians over the rounds)."""
    s = result["settings"]
    lines = [
        run_header(docs_command(result), result["measured_at"], result["machine"]),
        f"Unary ModelInfer, model `identity`, one FP32 tensor; {s['procs']} client processes "
        f"(grpc.aio); {s['warmup_s']} s warm-up, then {s['duration_s']} s counted per row; "
        "every target once per round, in the same order. CPU per call: the proxy process's "
        "utime + stime (/proc/PID/stat) over the row's calls (warm-up included); for direct, "
        "the backend's own.",
        "",
        "| round | tensor | callers | target | calls/s | p50 ms | p99 ms | CPU us/call | errors |",
        "|---:|---|---:|---|---:|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        cpu = r["cpu_us_per_call"]
        lines.append(
            f"| {r['round']} | {r['workload']} | {r['callers']} | {r['target']} | "
            f"{r['rps']:.0f} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | "
            f"{'' if cpu is None else f'{cpu:.0f}'} | {r['errors']} |"
        )
    lines += ["", "| tensor | callers | target | CPU/call vs nginx | calls/s vs direct | "
              "p50 added ms |", "|---|---:|---|---:|---:|---:|"]
    groups: dict[tuple[str, int, str], list[dict[str, Any]]] = {}
    for r in result["rows"]:
        groups.setdefault((r["workload"], r["callers"], r["target"]), []).append(r)

    def median(values: list[float]) -> float:
        values = sorted(values)
        return values[len(values) // 2] if values else float("nan")

    for (workload, callers, target), rows in groups.items():
        if target == "direct":
            continue
        direct = groups.get((workload, callers, "direct"), [])
        nginx = groups.get((workload, callers, "nginx"), [])
        cpu = median([r["cpu_us_per_call"] or 0 for r in rows])
        cpu_nginx = median([r["cpu_us_per_call"] or 0 for r in nginx]) if nginx else None
        rps = median([r["rps"] for r in rows])
        rps_direct = median([r["rps"] for r in direct]) if direct else None
        added = median([r["p50_ms"] for r in rows]) - median([r["p50_ms"] for r in direct])
        vs_nginx = f"{cpu / cpu_nginx:.2f}" if cpu_nginx else ""
        vs_direct = f"{rps / rps_direct:.2f}" if rps_direct else ""
        lines.append(f"| {workload} | {callers} | {target} | {vs_nginx} | {vs_direct} | "
                     f"{added:.2f} |")
    return "\n".join(lines)


def update_docs(block: str, path: Path = BENCHMARKS_MD) -> None:
    if not replace_block(MARK_START, MARK_END, block, path):
        raise SystemExit(f"{path.name} has no {MARK_START} ... {MARK_END} markers")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.grpc_bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--callers", default="1,64",
                        type=lambda v: [int(x) for x in v.split(",")])
    parser.add_argument("--duration-s", type=float, default=5.0)
    parser.add_argument("--warmup-s", type=float, default=1.0)
    parser.add_argument("--procs", type=int, default=2, help="client processes")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds")
    parser.add_argument("--engines", default="relay,grpcio", type=lambda v: v.split(","),
                        help="router engines to run (grpc.engine)")
    parser.add_argument("--no-peers", action="store_true", help="skip nginx and HAProxy")
    parser.add_argument("--no-large", action="store_true", help="skip the 1 MiB rows")
    parser.add_argument("--json", type=Path, default=RESULTS)
    parser.add_argument("--update-docs", action="store_true",
                        help=f"replace the text between {MARK_START} and {MARK_END} in "
                             "docs/benchmarks.md")
    args = parser.parse_args(argv)
    result = measure(args)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    block = markdown(result)
    print(block)
    if args.update_docs:
        update_docs(block)
    return 0


if __name__ == "__main__":
    sys.exit(main())
