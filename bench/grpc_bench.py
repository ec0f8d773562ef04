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
) -> None:
    # perf_counter, not loop.time(): uvloop's clock has millisecond resolution.
    now = time.perf_counter()
    while now < stop_at:
        sent = now
        try:
            answer = await call(spec.payload, timeout=10.0)
            ok = len(answer) >= spec.expect_min
        except grpc.aio.AioRpcError:
            ok = False
        now = time.perf_counter()
        if sent >= start_at and now <= stop_at:
            if ok:
                out.append(now - sent)
            else:
                errors[0] += 1


async def _load_async(spec: LoadSpec) -> tuple[list[float], int]:
    async with grpc.aio.insecure_channel(spec.target) as channel:
        await asyncio.wait_for(channel.channel_ready(), STARTUP_TIMEOUT_S)
        call = channel.unary_unary(MODEL_INFER)
        start_at = time.perf_counter() + spec.warmup_s
        stop_at = start_at + spec.duration_s
        latencies: list[float] = []
        errors = [0]
        async with asyncio.TaskGroup() as group:
            for _ in range(spec.callers):
                group.create_task(_caller(call, spec, start_at, stop_at, latencies, errors))
    return latencies, errors[0]


def load_process(spec: LoadSpec) -> tuple[list[float], int]:
    """One client process's share of the load (runs in a worker process)."""
    return uvloop.run(_load_async(spec))


def _percentile(sorted_values: list[float], fraction: float) -> float:
    if not sorted_values:
        return float("nan")
    index = min(len(sorted_values) - 1, int(fraction * len(sorted_values)))
    return sorted_values[index]


def run_load(
    pool: ProcessPoolExecutor, target: str, callers: int, procs: int, args: argparse.Namespace,
    payload: bytes,
) -> dict[str, Any]:
    procs = max(1, min(procs, callers))
    shares = [callers // procs + (1 if i < callers % procs else 0) for i in range(procs)]
    specs = [
        LoadSpec(target, share, args.warmup_s, args.duration_s, payload, args.elements * 4)
        for share in shares
    ]
    latencies: list[float] = []
    errors = 0
    for lat, err in pool.map(load_process, specs):
        latencies.extend(lat)
        errors += err
    latencies.sort()
    return {
        "callers": callers,
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
    backend_port: int, config_dir: Path, log: Path
) -> tuple[BlockingProcess[Banner], str]:
    config = config_dir / "router.toml"
    config.write_text(
        '[listener]\nlisten = "127.0.0.1:0"\n[admin]\nlisten = "127.0.0.1:0"\n'
        '[grpc]\nlisten = "127.0.0.1:0"\n'
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


def measure(args: argparse.Namespace) -> dict[str, Any]:
    payload = make_request(args.elements)
    rows: list[dict[str, Any]] = []
    backend, port = start_backend()
    with tempfile.TemporaryDirectory() as tmp:
        try:
            router, router_target = start_router(port, Path(tmp), Path(tmp) / "router.log")
        except BaseException:
            backend.stop(STOP_TIMEOUT_S)
            raise
        try:
            context = multiprocessing.get_context("spawn")
            with ProcessPoolExecutor(args.procs, mp_context=context) as pool:
                for callers in args.callers:
                    for target_name, target in (
                        ("direct", f"127.0.0.1:{port}"), ("router", router_target)
                    ):
                        row = run_load(pool, target, callers, args.procs, args, payload)
                        rows.append({"target": target_name, **row})
                        print(_row_text(rows[-1]), flush=True)
        finally:
            router.stop(STOP_TIMEOUT_S)
            backend.stop(STOP_TIMEOUT_S)
    return {
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": f"{os.cpu_count()} CPUs, {platform.platform()}, "
                   f"Python {platform.python_version()}, grpcio {grpc.__version__}",
        "settings": {
            "elements": args.elements, "duration_s": args.duration_s,
            "warmup_s": args.warmup_s, "procs": args.procs,
        },
        "rows": rows,
    }


def _row_text(row: dict[str, Any]) -> str:
    return (
        f"{row['target']:>6} callers={row['callers']:>3} rps={row['rps']:>8.0f} "
        f"p50={row['p50_ms']:.2f}ms p99={row['p99_ms']:.2f}ms errors={row['errors']}"
    )


def docs_command(result: dict[str, Any]) -> str:
    """The command that repeats the run, from the settings it recorded."""
    s = result["settings"]
    callers = sorted({r["callers"] for r in result["rows"]})
    return command_line("bench.grpc_bench", [
        ("--callers", callers), ("--duration-s", s["duration_s"]), ("--warmup-s", s["warmup_s"]),
        ("--procs", s["procs"]), ("--elements", s["elements"]),
    ])


def markdown(result: dict[str, Any]) -> str:
    """The run's record for docs/benchmarks.md: command, date, machine, settings, tables."""
    s = result["settings"]
    lines = [
        run_header(docs_command(result), result["measured_at"], result["machine"]),
        f"Unary ModelInfer, model `identity`, one FP32 tensor of {s['elements']} values; "
        f"{s['procs']} client processes (grpc.aio); {s['warmup_s']} s warm-up, then "
        f"{s['duration_s']} s counted per row.",
        "",
        "| target | callers | calls/s | p50 ms | p99 ms | errors |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    by_key = {(r["target"], r["callers"]): r for r in result["rows"]}
    for r in result["rows"]:
        lines.append(
            f"| {r['target']} | {r['callers']} | {r['rps']:.0f} | {r['p50_ms']:.2f} | "
            f"{r['p99_ms']:.2f} | {r['errors']} |"
        )
    lines += ["", "| callers | router/direct calls/s | router cost |", "|---:|---:|---:|"]
    for callers in sorted({r["callers"] for r in result["rows"]}):
        direct, router = by_key.get(("direct", callers)), by_key.get(("router", callers))
        if direct and router and direct["rps"]:
            ratio = router["rps"] / direct["rps"]
            lines.append(f"| {callers} | {ratio:.2f} | {100 * (1 - ratio):.0f} % |")
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
    parser.add_argument("--elements", type=int, default=16, help="FP32 values in the tensor")
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
