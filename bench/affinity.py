"""Benchmark: model-affinity routing against the seed experiment's baseline (``make
bench-affinity``).

``python -m bench.affinity [--scale 0.1] [--runs 1,2|none] [--policies ...] [--zipf]
[--zipf-heartbeat-s 0.5] [--update-docs]``

The seed's two runs, every time multiplied by ``--scale`` so they take minutes, figures
divided back: 2 ``backends.modelsim`` processes (2 model slots each, one request at a time,
load 0.39 s, service 0.088 s in run 1 and 0.040 s in run 2), 2 closed-loop producers sending
2,400 keyed frames in total, each thinking normal(avg, 1.0) clipped at 0 between requests
(run 1: 5 labels, 2.5 s; run 2: 4 labels, 0.75 s), labels uniform from a seeded RNG, so every
policy sees the same sequence (``bench.affinity_sim.workload``, the same sequence the
simulation plays). One router process per policy (keyed listener, one pipelined connection
per backend: requests wait at the backend, which keeps the models they wait for), the
policies side by side.

``common_queue`` runs first and is checked against the seed's own figures (within 10 %):
the calibration, before anything is compared. Per policy: misses and loads (the backends' own
counts, from their stats files), mean worker-side task time, mean and p99 client latency.

``--zipf``: past the seed, 16 backends x 4 slots, 64 models of Zipf(1.1) popularity,
open-loop Poisson arrivals at 70 % of the fleet's capacity, load 0.4 s, service 0.04 s; per
seed (``--zipf-seeds``, each its own arrivals) every policy on the same arrivals, then
``affinity`` with 2 router processes and with 2 routers sharing one etcd registry. Every
run's backends register (heartbeats every ``--zipf-heartbeat-s``, 0.5 s, carry what they
hold and each model's requests there to every router), so the runs differ only in the
routers. Per run also the misses after a warm-up (the first 20 %
of the requests) and in it, the copies of the hottest model, max/mean backend utilisation,
the load generator's own lag and the machine's load average.

Writes ``bench/results/affinity.json`` and, with ``--update-docs``, the affinity table of
docs/benchmarks.md. Every process it starts is stopped in ``finally``.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import math
import os
import platform
import random
import shutil
import statistics
import sys
import tempfile
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import tomli_w
import uvloop

from bench.affinity_sim import RUNS, SeedRun, workload
from bench.docs import command_line, replace_block
from bench.run import RESULTS_DIR, Service, _spawn, free_port, start_router
from router.client.frames import FrameClient
from router.protocol.announce import ready_port
from router.protocol.keyed import encode_keyed

POLICIES = ("common_queue", "least_connections", "consistent_hash_bounded", "affinity")
# The seed's published figures (misses, mean task time in s) per run.
SEED = {1: {"common_queue": (1448, 0.3231), "routed": (563, 0.1791)},
        2: {"common_queue": (1193, 0.2483), "routed": (138, 0.0639)}}
TARGETS = {1: (530, 0.175), 2: (40, 0.050)}
CALIBRATION_TOLERANCE = 0.10
DOCS_START = "<!-- bench-affinity:start -->"
DOCS_END = "<!-- bench-affinity:end -->"
PAYLOAD = b"x" * 64
STATS_TIMEOUT_S = 15.0
# Registered backends renew their lease, with what they hold, this often (real seconds; the
# default of --zipf-heartbeat-s), on a lease long enough that a router loop stalled for
# seconds on the two shared cores does not expire the whole fleet at once (a 1.5 s lease did).
HEARTBEAT_S = 0.5
LEASE_TTL_S = 10.0


@dataclass(frozen=True, slots=True)
class Fleet:
    """The backends of one scenario."""

    backends: int
    slots: int
    load_s: float
    service_s: float
    concurrency: int = 1


@dataclass
class PolicyResult:
    policy: str
    processes: int
    requests: int
    misses: int
    loads: int
    evictions: int
    mean_task_s: float
    mean_latency_s: float
    p99_latency_s: float
    errors: int = 0
    hottest_copies: int | None = None
    max_over_mean_utilisation: float | None = None
    reasons: dict[str, int] = field(default_factory=dict)
    routers: int = 1  # separate routers sharing one etcd registry
    seed: int | None = None
    # After the warm-up (the Zipf runs): the requests sent and the misses that began then.
    steady_requests: int | None = None
    steady_misses: int | None = None
    overcommits: int = 0  # the backends' loads over their slots (a worker on every model)
    evicted_waiting: int = 0  # the backends' evictions of models whose requests waited
    generator_lag_p99_ms: float | None = None  # real ms a send came after its arrival time
    generator_lag_max_ms: float | None = None
    load_average: tuple[float, float] = (0.0, 0.0)  # 1-minute, before and after the run


@dataclass
class LoadRun:
    """What a load generator saw: latencies (real s), errors, when it began (monotonic) and
    how late each open-loop send was (real s)."""

    latencies: list[float]
    errors: int
    started_at: float
    lags: list[float] = field(default_factory=list)


# -- processes ---------------------------------------------------------------------------------


def start_modelsims(fleet: Fleet, scale: float, log_dir: Path, tag: str,
                    register: Sequence[str] = ()) -> list[Service]:
    """``register``: the flags that make each one register itself (with heartbeats)."""
    started: list[Service] = []
    for index in range(fleet.backends):
        name = f"{tag}-b{index}"
        argv = [sys.executable, "-m", "backends.modelsim", "--port", "0",
                "--slots", str(fleet.slots), "--concurrency", str(fleet.concurrency),
                "--load-ms", f"{fleet.load_s * scale * 1000:.6f}",
                "--service-ms", f"{fleet.service_s * scale * 1000:.6f}",
                "--stats", str(log_dir / f"{name}.json"), *register]
        service = _spawn(name, argv, log_dir, ready_port)
        service.port = service.process.ready
        started.append(service)
    return started


def router_config(policy: str, ports: list[int], fleet: Fleet, scale: float,
                  demand_window_s: float) -> dict[str, Any]:
    return {
        "listener": {"keyed": True, "max_pipelined": 1024},
        "dispatch": {"policy": policy, "queue_size": 100_000, "queue_timeout_s": 600.0,
                     "request_timeout_s": 600.0},
        # One connection per backend, pipelined: requests wait at the backend, which keeps
        # the models they wait for (backends.modelsim), as the router's view expects.
        "pool": {"max_connections": 1, "pipeline_depth": 1024},
        "affinity": {
            "model_slots": fleet.slots, "concurrency": fleet.concurrency,
            "load_time_s": fleet.load_s * scale, "service_time_s": fleet.service_s * scale,
            "min_residency_s": 10 * fleet.load_s * scale, "demand_window_s": demand_window_s,
        },
        "backends": [{"address": f"127.0.0.1:{port}", "models": ["*"]} for port in ports],
    }


def read_stats(backends: list[Service], log_dir: Path) -> list[dict[str, Any]]:
    for backend in backends:
        backend.stop()  # SIGTERM: each writes its stats file on the way out
    return [json.loads((log_dir / f"{b.name}.json").read_text()) for b in backends]


def admin_json(port: int, path: str) -> Any:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as reply:
        return json.loads(reply.read())


# -- load ----------------------------------------------------------------------------------------


async def closed_loop(port: int, work: list[list[tuple[float, str]]], scale: float
                      ) -> LoadRun:
    """Each producer: think, send, wait for the answer."""
    latencies: list[float] = []
    errors = 0
    started_at = time.monotonic()

    async def producer(requests: list[tuple[float, str]]) -> None:
        nonlocal errors
        client = await FrameClient.connect("127.0.0.1", port)
        try:
            for think, label in requests:
                await asyncio.sleep(think * scale)
                began = time.perf_counter()
                try:
                    await client.request(encode_keyed(label, PAYLOAD))
                except Exception:  # counted: a benchmark reports, it does not stop
                    errors += 1
                latencies.append(time.perf_counter() - began)
        finally:
            await client.close()

    await asyncio.gather(*(producer(requests) for requests in work))
    return LoadRun(latencies, errors, started_at)


async def open_loop(ports: list[int], arrivals: list[tuple[float, str]], connections: int = 16
                    ) -> LoadRun:
    """Send each request at its arrival time (seconds from the start), whatever is in
    flight; pipelined over ``connections`` connections, spread over ``ports`` (the routers).
    Each send's lateness is kept: a generator that falls behind bunches its arrivals, and
    the queues it makes are its own, not the policy's."""
    clients = [await FrameClient.connect("127.0.0.1", ports[i % len(ports)])
               for i in range(connections)]
    latencies: list[float] = []
    lags: list[float] = []
    errors = 0
    pending: set[asyncio.Task[None]] = set()
    loop = asyncio.get_running_loop()
    start = loop.time()
    started_at = time.monotonic()

    async def one(client: FrameClient, label: str) -> None:
        nonlocal errors
        began = time.perf_counter()
        try:
            await client.request(encode_keyed(label, PAYLOAD))
        except Exception:  # counted
            errors += 1
        latencies.append(time.perf_counter() - began)

    try:
        for index, (at, label) in enumerate(arrivals):
            delay = start + at - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            lags.append(max(0.0, loop.time() - start - at))
            task = loop.create_task(one(clients[index % connections], label))
            pending.add(task)
            task.add_done_callback(pending.discard)
        await asyncio.gather(*pending)
    finally:
        for client in clients:
            await client.close()
    return LoadRun(latencies, errors, started_at, lags)


def zipf_arrivals(models: int, s: float, rate: float, count: int, seed: int
                  ) -> list[tuple[float, str]]:
    rng = random.Random(seed)
    weights = [1.0 / (k ** s) for k in range(1, models + 1)]
    names = [f"z{k}" for k in range(models)]
    at = 0.0
    out: list[tuple[float, str]] = []
    for label in rng.choices(names, weights, k=count):
        at += rng.expovariate(rate)
        out.append((at, label))
    return out


# -- one policy ----------------------------------------------------------------------------------


def summarise(policy: str, processes: int, stats: list[dict[str, Any]], run: LoadRun,
              scale: float, warmup: tuple[int, float] | None = None) -> PolicyResult:
    """``warmup``: (requests in it, its length in real s from the start of the load)."""
    latencies, errors = run.latencies, run.errors
    requests = sum(s["requests"] for s in stats)
    worker = sum(s["worker_time_s"]["total"] for s in stats)
    ordered = sorted(latencies)
    result = PolicyResult(
        policy=policy, processes=processes, requests=requests,
        misses=sum(s["misses"] for s in stats), loads=sum(s["loads"] for s in stats),
        evictions=sum(s["evictions"] for s in stats),
        mean_task_s=worker / requests / scale if requests else 0.0,
        mean_latency_s=statistics.fmean(ordered) / scale if ordered else 0.0,
        p99_latency_s=ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] / scale
        if ordered else 0.0,
        errors=errors,
        overcommits=sum(s.get("overcommits", 0) for s in stats),
        evicted_waiting=sum(s.get("evicted_waiting", 0) for s in stats),
    )
    if warmup is not None:
        count, length_s = warmup
        boundary = run.started_at + length_s
        result.steady_requests = len(latencies) - count
        result.steady_misses = sum(1 for s in stats for at in s.get("miss_times_s", ())
                                   if at >= boundary)
    if run.lags:
        lags = sorted(run.lags)
        result.generator_lag_p99_ms = lags[int(len(lags) * 0.99)] * 1000
        result.generator_lag_max_ms = lags[-1] * 1000
    busy = [s["worker_time_s"]["total"] for s in stats]
    if busy and statistics.fmean(busy) > 0:
        result.max_over_mean_utilisation = max(busy) / statistics.fmean(busy)
    return result


async def run_policy(policy: str, fleet: Fleet, scale: float, demand_window_s: float,
                     load: Any, log_dir: Path, tag: str, processes: int = 1,
                     registered: bool = False, routers: int = 1,
                     warmup: tuple[int, float] | None = None,
                     heartbeat_s: float = HEARTBEAT_S) -> PolicyResult:
    """One router (``processes`` processes; or ``routers`` separate routers sharing one
    etcd registry) and its fleet under ``load`` (a function of the routers' ports).
    ``registered``: the backends join by registering through the first router, their
    heartbeats (every ``heartbeat_s``) carrying the models they hold to every router process
    and, with ``--report-to``, to every other router; otherwise they are in the config."""
    backends: list[Service] = []
    started: list[tuple[Service, int]] = []
    etcd: Service | None = None
    before = os.getloadavg()[0]
    try:
        if routers > 1:
            etcd = await asyncio.to_thread(start_etcd, log_dir, f"{tag}-etcd")
        if registered or routers > 1:
            started, backends = await _registered_fleet(
                policy, fleet, scale, demand_window_s, log_dir, tag, processes, routers, etcd,
                heartbeat_s)
        else:
            backends = start_modelsims(fleet, scale, log_dir, tag)
            config = log_dir / f"{tag}.toml"
            config.write_text(tomli_w.dumps(router_config(
                policy, [b.port for b in backends], fleet, scale, demand_window_s)))
            started = [await asyncio.to_thread(
                start_router, [], log_dir, config, processes, f"{tag}-router")]
        run: LoadRun = await load([router.port for router, _ in started])
        reasons: dict[str, int] = {}
        if policy == "affinity":
            for _, admin in started:
                for reason, count in _reasons(admin).items():
                    reasons[reason] = reasons.get(reason, 0) + count
        hottest = _hottest_copies(started[0][1], backends) if policy == "affinity" else None
        stats = await asyncio.to_thread(read_stats, backends, log_dir)
    finally:
        for router, _ in started:
            await asyncio.to_thread(router.stop)
        for backend in backends:
            await asyncio.to_thread(backend.stop)
        if etcd is not None:
            await asyncio.to_thread(etcd.stop)
    result = summarise(policy, processes, stats, run, scale, warmup)
    result.routers = routers
    result.reasons = reasons
    result.hottest_copies = hottest if hottest is not None else _served_by(stats, "z0")
    result.load_average = (before, os.getloadavg()[0])
    return result


async def _registered_fleet(policy: str, fleet: Fleet, scale: float, demand_window_s: float,
                            log_dir: Path, tag: str, processes: int, routers: int,
                            etcd: Service | None, heartbeat_s: float
                            ) -> tuple[list[tuple[Service, int]], list[Service]]:
    token = log_dir / "admin.token"
    token.write_text("bench-affinity\n")
    data = router_config(policy, [], fleet, scale, demand_window_s)
    data["admin"] = {"token_file": str(token)}
    if etcd is not None:
        data["registry"] = {"store": "etcd", "etcd_endpoints": [f"127.0.0.1:{etcd.port}"],
                            "etcd_prefix": f"/bench-affinity/{tag}/"}
    config = log_dir / f"{tag}.toml"
    config.write_text(tomli_w.dumps(data))
    started = [await asyncio.to_thread(start_router, [], log_dir, config, processes,
                                       f"{tag}-router{i}") for i in range(routers)]
    urls = [f"http://127.0.0.1:{admin}" for _, admin in started]
    flags = ["--register", urls[0], "--lease-ttl", str(LEASE_TTL_S), "--heartbeat-interval",
             str(heartbeat_s), "--token-file", str(token)]
    for url in urls[1:]:
        flags += ["--report-to", url]
    backends = await asyncio.to_thread(start_modelsims, fleet, scale, log_dir, tag, flags)
    for _, admin in started:
        await asyncio.to_thread(_wait_registered, admin, fleet.backends)
    return started, backends


def start_etcd(log_dir: Path, name: str) -> Service:
    """A single-node etcd (Debian's ``etcd-server``) on free loopback ports, its data under
    ``log_dir``; heartbeat and election timeout shortened as in the tests, so that its
    shortest lease is 1 s."""
    binary = shutil.which("etcd")
    if binary is None:
        raise RuntimeError("etcd is not installed: `make system-packages` installs etcd-server")
    client, peer = f"http://127.0.0.1:{free_port()}", f"http://127.0.0.1:{free_port()}"
    argv = [binary, "--name", name, "--data-dir", str(log_dir / name),
            "--listen-client-urls", client, "--advertise-client-urls", client,
            "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
            "--initial-cluster", f"{name}={peer}", "--heartbeat-interval", "50",
            "--election-timeout", "500", "--logger", "zap", "--log-outputs", "stdout"]
    service = _spawn(name, argv, log_dir, _etcd_serving)
    service.port = int(client.rsplit(":", 1)[1])
    return service


def _etcd_serving(lines: Sequence[str]) -> bool | None:
    return True if any("serving client traffic insecurely" in line for line in lines) else None


def _wait_registered(admin_port: int, count: int) -> None:
    """Until ``count`` backends are healthy in the directory (bounded: 30 s)."""
    deadline = time.monotonic() + 30.0
    while time.monotonic() < deadline:
        listed = admin_json(admin_port, "/v1/backends")
        if sum(1 for b in listed if b["state"] == "healthy") >= count:
            return
        time.sleep(0.1)  # a benchmark's setup, not a test: nothing to wait on but the API
    raise RuntimeError(f"only {len(listed)} of {count} backends registered within 30 s")


def _reasons(admin_port: int) -> dict[str, int]:
    metrics = urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/metrics", timeout=10)
    reasons: dict[str, int] = {}
    for line in metrics.read().decode().splitlines():
        if line.startswith("router_route_decisions_total{"):
            labels, value = line.rsplit(" ", 1)
            reason = labels.split('reason="', 1)[1].split('"', 1)[0]
            reasons[reason] = reasons.get(reason, 0) + int(float(value))
    return reasons


def _hottest_copies(admin_port: int, backends: list[Service]) -> int | None:
    try:
        models = admin_json(admin_port, "/v1/models")
    except (OSError, ValueError):
        return None
    hottest = max(models, key=lambda m: sum(m["requests"].values()), default=None)
    return len(hottest["holders"]) if hottest else None


def _served_by(stats: list[dict[str, Any]], model: str) -> int:
    """Backends that served ``model`` at all (the copies a non-affinity policy made)."""
    return sum(1 for s in stats if s["models"].get(model, {}).get("requests", 0))


# -- scenarios -----------------------------------------------------------------------------------


async def seed_run(number: int, scale: float, seed: int, policies: tuple[str, ...],
                   log_dir: Path, requests: int | None = None) -> dict[str, Any]:
    spec: SeedRun = RUNS[number]
    if requests is not None:
        spec = dataclasses.replace(spec, requests=requests)
    fleet = Fleet(spec.backends, spec.slots, spec.load_s, spec.service_s)
    work = workload(spec, seed)
    window = 10 * spec.wait_avg_s * scale

    async def load_for(ports: list[int]) -> LoadRun:
        return await closed_loop(ports[0], work, scale)

    calibration = await run_policy("common_queue", fleet, scale, window, load_for, log_dir,
                                   f"run{number}-common_queue")
    seed_misses, seed_task = SEED[number]["common_queue"]
    within = (abs(calibration.misses - seed_misses) <= CALIBRATION_TOLERANCE * seed_misses
              and abs(calibration.mean_task_s - seed_task) <= CALIBRATION_TOLERANCE * seed_task)
    others = [p for p in policies if p != "common_queue"]
    results = [calibration, *await asyncio.gather(*(
        run_policy(p, fleet, scale, window, load_for, log_dir, f"run{number}-{p}")
        for p in others))]
    return {"run": number, "spec": asdict(spec), "calibrated": within,
            "results": [asdict(r) for r in results]}


WARMUP_FRACTION = 0.2  # of a Zipf run's requests: cold loads, demand estimates converging


async def zipf_run(scale: float, seeds: Sequence[int], policies: tuple[str, ...],
                   requests: int, log_dir: Path, heartbeat_s: float = HEARTBEAT_S
                   ) -> dict[str, Any]:
    """Per seed, every policy on the same arrivals, then ``affinity`` again with 2 router
    processes and with 2 routers sharing one etcd registry. Every run's backends register
    (their heartbeats tell the routers what they hold), so the runs differ only in the
    routers. Misses are counted after a warm-up (the first ``WARMUP_FRACTION`` of the
    requests) and in it."""
    fleet = Fleet(backends=16, slots=4, load_s=0.4, service_s=0.04)
    capacity = fleet.backends * fleet.concurrency / (fleet.service_s * scale)
    window = 2.0 * scale  # demand over 2 s (5 loads), as bench.affinity_sim
    warm_count = int(requests * WARMUP_FRACTION)
    results = []
    for seed in seeds:
        arrivals = zipf_arrivals(64, 1.1, 0.7 * capacity, requests, seed)
        warmup = (warm_count, arrivals[warm_count][0])

        async def load_for(ports: list[int], arrivals: list[tuple[float, str]] = arrivals
                           ) -> LoadRun:
            return await open_loop(ports, arrivals)

        runs: list[tuple[str, int, int]] = [(p, 1, 1) for p in policies]
        if "affinity" in policies:
            runs += [("affinity", 2, 1), ("affinity", 1, 2)]
        for policy, processes, routers in runs:  # one at a time: 16 backends each
            tag = f"zipf{seed}-{policy}-{processes}p{routers}r"
            result = await run_policy(policy, fleet, scale, window, load_for, log_dir, tag,
                                      processes=processes, registered=True, routers=routers,
                                      warmup=warmup, heartbeat_s=heartbeat_s)
            result.seed = seed
            results.append(result)
            print(zipf_row(asdict(result)), flush=True)
    total = sum(1.0 / k ** 1.1 for k in range(1, 65))
    hottest_share = 1.0 / total
    needed = math.ceil(0.7 * fleet.backends * hottest_share)
    return {"fleet": asdict(fleet), "requests": requests, "seeds": list(seeds),
            "warmup_requests": warm_count, "rate_per_s": 0.7 * capacity,
            "heartbeat_s": heartbeat_s,
            "hottest_share": hottest_share, "hottest_copies_needed": needed,
            "results": [asdict(r) for r in results]}


# -- reporting -----------------------------------------------------------------------------------


def seed_table(run: dict[str, Any]) -> str:
    number = run["run"]
    lines = ["| policy | misses | loads | mean task time | mean latency | p99 latency | errors |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in run["results"]:
        lines.append(f"| `{r['policy']}` | {r['misses']:,} | {r['loads']:,} | "
                     f"{r['mean_task_s']:.4f} s | {r['mean_latency_s']:.4f} s | "
                     f"{r['p99_latency_s']:.4f} s | {r['errors']} |")
    for name, (misses, task) in SEED[number].items():
        lines.append(f"| seed: {name} | {misses:,} | | {task:.4f} s | | | |")
    max_misses, max_task = TARGETS[number]
    lines.append(f"| target: `affinity` | <= {max_misses} | | <= {max_task:.3f} s | below "
                 "`common_queue` | | |")
    return "\n".join(lines)


ZIPF_HEADER = ("| seed | policy | routers | miss rate after warm-up | misses in warm-up | "
               "miss rate, all | mean task time | mean latency | p99 latency | "
               "hottest model's copies | max/mean utilisation | generator lag p99 / max | "
               "load average | errors |\n"
               "|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")


def routers_label(r: dict[str, Any]) -> str:
    if r.get("routers", 1) > 1:
        return f"{r['routers']} routers, one etcd"
    return "1" if r["processes"] == 1 else f"{r['processes']} processes"


def steady_rate(r: dict[str, Any]) -> float:
    """Misses that began after the warm-up's last arrival over the requests that arrived
    after it: above 100 % for a policy so far behind that warm-up requests miss later."""
    return r["steady_misses"] / r["steady_requests"] if r.get("steady_requests") else 0.0


def zipf_row(r: dict[str, Any]) -> str:
    util = r["max_over_mean_utilisation"]
    warm = r["misses"] - (r["steady_misses"] or 0)
    lag = (f"{r['generator_lag_p99_ms']:.1f} / {r['generator_lag_max_ms']:.0f} ms"
           if r.get("generator_lag_p99_ms") is not None else "")
    before, after = r.get("load_average", (0.0, 0.0))
    overall = r["misses"] / r["requests"] if r["requests"] else 0.0
    return (f"| {r.get('seed')} | `{r['policy']}` | {routers_label(r)} | {steady_rate(r):.2%} | "
            f"{warm} | {overall:.2%} | {r['mean_task_s']:.4f} s | {r['mean_latency_s']:.4f} s | "
            f"{r['p99_latency_s']:.4f} s | {r['hottest_copies']} | "
            f"{util if util is None else round(util, 2)} | {lag} | {before:.1f} / {after:.1f} | "
            f"{r['errors']} |")


def zipf_table(run: dict[str, Any]) -> str:
    return "\n".join([ZIPF_HEADER, *(zipf_row(r) for r in run["results"])])


def zipf_comparison(run: dict[str, Any]) -> str:
    """Per seed: the miss rate after warm-up of each many-router run over the one-router
    run's."""
    lines = []
    for seed in run["seeds"]:
        rows = [r for r in run["results"] if r.get("seed") == seed and r["policy"] == "affinity"]
        one = next((r for r in rows if r["processes"] == 1 and r.get("routers", 1) == 1), None)
        if one is None or not steady_rate(one):
            continue
        parts = [f"{routers_label(r)}: {steady_rate(r) / steady_rate(one):.2f}"
                 for r in rows if r is not one]
        lines.append(f"- seed {seed}: misses after warm-up over the one-router run's: "
                     + ", ".join(parts))
    return "\n".join(lines)


def docs_block(result: dict[str, Any]) -> str:
    parts = [f"`{result['command']}` on {result['date']} ({result['machine']}), time scale "
             f"{result['scale']} (figures divided back by it)."]
    for run in result["seed_runs"]:
        calibrated = "within" if run["calibrated"] else "NOT within"
        parts.append(f"\n**Run {run['run']}** ({run['spec']['labels']} labels, think "
                     f"{run['spec']['wait_avg_s']} s, service {run['spec']['service_s']} s; "
                     f"`common_queue` {calibrated} 10 % of the seed's figures):\n\n"
                     + seed_table(run))
    if result.get("zipf"):
        z = result["zipf"]
        parts.append(f"\n**16 x 4 slots, 64 models Zipf(1.1), Poisson at 70 %** "
                     f"({z['requests']:,} requests per run, the first "
                     f"{z['warmup_requests']:,} the warm-up; the hottest model is "
                     f"{z['hottest_share']:.0%} of them and needs "
                     f"{z['hottest_copies_needed']} backends; heartbeats every "
                     f"{z.get('heartbeat_s', HEARTBEAT_S)} s; generator lag in real ms, "
                     "load average the machine's 1-minute figure before / after):\n\n"
                     + zipf_table(z) + "\n\n" + zipf_comparison(z))
    return "\n".join(parts)


def seed_runs_of(text: str) -> list[int]:
    """``--runs``: "1,2", "1", or "none" (only the Zipf scenario)."""
    if text.strip() == "none":
        return []
    runs = [int(r) for r in text.split(",") if r]
    unknown = [r for r in runs if r not in RUNS]
    if unknown:
        raise ValueError(f"--runs: no seed run {unknown[0]} (there are {sorted(RUNS)})")
    return runs


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.affinity", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--runs", default="1,2",
                        help="the seed runs (comma-separated), or none")
    parser.add_argument("--requests", type=int, default=None,
                        help="requests per seed run (default: the seed's 2,400)")
    parser.add_argument("--policies", default=",".join(POLICIES))
    parser.add_argument("--zipf", action="store_true", help="also the 16 x 4 Zipf scenario")
    parser.add_argument("--zipf-requests", type=int, default=20000)
    parser.add_argument("--zipf-seeds", default="0,1",
                        help="one round of every Zipf run per seed (each its own arrivals)")
    parser.add_argument("--zipf-scale", type=float, default=0.5)
    parser.add_argument("--zipf-heartbeat-s", type=float, default=HEARTBEAT_S,
                        help="how often the Zipf runs' backends heartbeat (real seconds): "
                             "what each router learns of the others' requests ages this long")
    parser.add_argument("--update-docs", action="store_true")
    parser.add_argument("--output", type=Path, default=RESULTS_DIR / "affinity.json")
    parser.add_argument("--log-dir", type=Path, default=None,
                        help="keep the processes' logs and stats files here (default: a "
                             "temporary directory, removed)")
    args = parser.parse_args(argv)
    try:
        args.seed_runs = seed_runs_of(args.runs)
    except ValueError as exc:
        parser.error(str(exc))
    if not args.zipf_heartbeat_s > 0:
        parser.error(f"--zipf-heartbeat-s must be > 0, got {args.zipf_heartbeat_s}")
    return args


async def _main(args: argparse.Namespace) -> dict[str, Any]:
    policies = tuple(p for p in args.policies.split(",") if p)
    runs: list[int] = args.seed_runs
    with tempfile.TemporaryDirectory(prefix="bench-affinity-") as tmp:
        log_dir = args.log_dir or Path(tmp)
        log_dir.mkdir(parents=True, exist_ok=True)
        seed_runs = []
        for number in runs:
            seed_runs.append(await seed_run(number, args.scale, args.seed, policies, log_dir,
                                            args.requests))
            print(seed_table(seed_runs[-1]), flush=True)
        zipf = None
        if args.zipf:
            seeds = [int(s) for s in args.zipf_seeds.split(",") if s]
            zipf = await zipf_run(args.zipf_scale, seeds, policies, args.zipf_requests,
                                  log_dir, args.zipf_heartbeat_s)
            print(zipf_table(zipf), zipf_comparison(zipf), sep="\n", flush=True)
    return {"seed_runs": seed_runs, "zipf": zipf}


def main(argv: list[str] | None = None) -> None:
    args = _parse_args(argv)
    # uvloop for the load generator too: its own lag is measured, and kept small.
    result = uvloop.run(_main(args))
    result.update({
        "command": command_line("bench.affinity", [
            ("--scale", args.scale), ("--seed", args.seed), ("--runs", args.runs),
            ("--requests", args.requests),
            ("--policies", args.policies), ("--zipf", args.zipf),
            ("--zipf-requests", args.zipf_requests if args.zipf else None),
            ("--zipf-seeds", args.zipf_seeds if args.zipf else None),
            ("--zipf-scale", args.zipf_scale if args.zipf else None),
            ("--zipf-heartbeat-s", args.zipf_heartbeat_s if args.zipf else None)]),
        "date": datetime.now(UTC).strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {platform.python_version()}",
        "scale": args.scale,
    })
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    if args.update_docs and not replace_block(DOCS_START, DOCS_END, docs_block(result)):
        print(f"docs/benchmarks.md lacks the {DOCS_START} markers", file=sys.stderr)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
