"""Smoke run of the drain chaos scenario with gRPC clients beside the TCP ones."""

from __future__ import annotations

import pytest

from chaos.drain import run
from tests.grpc_support import ENGINES


@pytest.mark.parametrize("engine", ENGINES)
def test_drain_chaos_smoke_with_grpc_clients(engine: str) -> None:
    result = run(clients=5, requests=30, seed=4, grpc_clients=5, grpc_engine=engine)
    assert result["passed"], result
    assert result["dropped"] == 0
    assert result["grpc_ok"] > 0
    assert result["lost"] + result["refused"] + result["ok"] == 300
    if engine == "relay":  # GOAWAY first: a call that raced the drain is answered, not lost
        assert result["grpc_lost"] == 0, result
