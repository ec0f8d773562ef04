"""Smoke run of the drain chaos scenario: SIGTERM the router under load, nothing dropped."""

from __future__ import annotations

import time

from chaos.drain import run


def test_drain_chaos_smoke() -> None:
    started = time.monotonic()
    result = run(clients=10, requests=30, seed=1)
    assert result["passed"], result
    assert result["dropped"] == 0
    assert result["lost"] + result["refused"] + result["ok"] == 300
    assert time.monotonic() - started < 20


def test_drain_chaos_smoke_with_two_router_processes() -> None:
    """The drain contract holds when several router processes share the port."""
    result = run(clients=10, requests=30, seed=2, processes=2)
    assert result["passed"], result
    assert (result["dropped"], result["drain_log_lines"]) == (0, 2)
    assert result["lost"] + result["refused"] + result["ok"] == 300


def test_backend_crash_chaos_smoke() -> None:
    """kill -9 two of three backends under load: retries hide it, health marks down and up."""
    from chaos.backend_crash import run as run_backend_crash

    started = time.monotonic()
    result = run_backend_crash(clients=8, requests=100, seed=1)
    assert result["passed"], result
    assert result["errors"] == 0
    assert all(b["time_to_mark_down_ms"] is not None for b in result["backends"] if b["killed"])
    assert time.monotonic() - started < 20


def test_hung_backend_chaos_smoke() -> None:
    """A hung backend: BACKEND_TIMEOUT within the bound, then marked down and avoided."""
    from chaos.hung_backend import run as run_hung_backend

    started = time.monotonic()
    result = run_hung_backend(clients=8, requests=60, seed=1)
    assert result["passed"], result
    assert set(result["error_codes"]) <= {"BACKEND_TIMEOUT"}
    assert result["last_third"]["ok_fraction"] == 1.0
    assert time.monotonic() - started < 20


def test_hostile_clients_chaos_smoke() -> None:
    """Slow, oversize, garbage, reset and idle connections: normal clients see no errors."""
    from chaos.hostile_clients import run as run_hostile_clients

    started = time.monotonic()
    result = run_hostile_clients(clients=4, requests=60, hostiles=30, seed=1)
    assert result["passed"], result
    assert result["errors"] == 0
    assert result["ok"] == 240
    assert time.monotonic() - started < 20


def test_rolling_restart_chaos_smoke() -> None:
    """Router B takes over router A's port (SO_REUSEPORT) under load: nothing lost or repeated."""
    from chaos.rolling_restart import run as run_rolling_restart

    started = time.monotonic()
    result = run_rolling_restart(clients=6, requests=60, seed=1)
    assert result["passed"], result
    assert result["ok"] == 360
    assert result["processed_duplicates"] == 0
    assert result["a_dropped"] == 0 and result["b_dropped"] == 0
    assert time.monotonic() - started < 20


def test_frame_flood_chaos_smoke() -> None:
    """150 connections trickle 15 MiB frames at once, reconnecting for 4 s: the router's RSS
    grows by less than the stated bound, the read budget holds, and normal clients see no
    error. (``make chaos`` runs 2,000 for 30 s.)"""
    from chaos.frame_flood import run as run_frame_flood

    started = time.monotonic()
    result = run_frame_flood(clients=4, hostiles=150, attack_s=4.0, read_timeout_s=2.0,
                             interval_ms=2.0)
    assert result["passed"], result
    assert result["errors"] == 0 and result["ok"] == result["normal_requests"] > 0
    assert result["rss_growth_mib"] < result["rss_bound_mib"]
    assert result["read_budget"]["peak_bytes"] <= result["read_budget"]["limit_bytes"] + 256_000
    assert time.monotonic() - started < 30
