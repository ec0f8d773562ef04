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
