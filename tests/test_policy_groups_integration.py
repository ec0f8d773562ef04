"""Policies per model group end to end: a real router and ``backends.modelsim`` processes,
two model groups with different policies on one listener (keyed frames, and KServe gRPC on
both engines), placement read from the backends' own statistics; and a router process whose
groups and listener policies change on reload."""

from __future__ import annotations

import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp

from router.protocol.keyed import encode_keyed
from router.protocol.proto import grpc_predict_v2_pb2 as pb
from tests.conftest import RouterFactory
from tests.grpc_support import MODEL_INFER, GrpcRouterFactory, grpc_backend, infer_request
from tests.support import BackendProcess
from tests.test_affinity_integration import AFFINITY, IO_TIMEOUT_S, get_json, modelsim, stats_of
from tests.test_reload import config, served

__all__ = ["modelsim"]  # a fixture, imported for pytest

ROUNDS = 10
# dispatch.policy stays least_connections: each group's own policy decides its models.
GROUPED: dict[str, Any] = {
    **{key: value for key, value in AFFINITY.items() if key != "dispatch"},
    "model_groups": [
        {"name": "warm", "models": ["warm-*"], "policy": "affinity"},
        {"name": "spread", "models": ["spread-a", "other-*"], "policy": "round_robin"},
    ],
}


def per_backend(stats: list[dict[str, Any]], model: str) -> list[int]:
    """Requests for ``model`` each backend served, by its own count."""
    return [s["models"].get(model, {}).get("requests", 0) for s in stats]


async def check_routes(admin_url: str, kind: str) -> None:
    warm = await get_json(f"{admin_url}/v1/debug/route?model=warm-a&kind={kind}")
    assert (warm["policy"], warm["decided_by"], warm["group"]) == (
        "affinity", "model_group", "warm")
    assert warm["reason"] == "hit"
    spread = await get_json(f"{admin_url}/v1/debug/route?model=spread-a&kind={kind}")
    assert (spread["policy"], spread["decided_by"], spread["group"]) == (
        "round_robin", "model_group", "spread")
    rest = await get_json(f"{admin_url}/v1/debug/route?model=elsewhere&kind={kind}")
    assert (rest["policy"], rest["decided_by"], rest["group"]) == (
        "least_connections", "dispatch", None)
    models = {m["model"]: m for m in await get_json(f"{admin_url}/v1/models")}
    assert models["warm-a"]["group"] == "warm"
    assert models["warm-a"]["requests"]["hit"] == ROUNDS - 1  # the first one loaded it
    async with aiohttp.ClientSession() as session, session.get(
            f"{admin_url}/metrics") as response:
        metrics = await response.text()
    # The group's policy is counted under its own name, whatever dispatch.policy says.
    assert f'router_route_decisions_total{{policy="affinity",reason="hit"}} {ROUNDS - 1}.0' \
        in metrics
    assert 'router_route_decisions_total{policy="affinity",reason="load"} 1.0' in metrics


def check_placement(stats: list[dict[str, Any]]) -> None:
    # Affinity: every request for warm-a where it was loaded first, one load in all.
    assert sorted(per_backend(stats, "warm-a")) == [0, ROUNDS], stats
    assert sum(s["models"].get("warm-a", {}).get("loads", 0) for s in stats) == 1
    # Round robin: spread-a alternates between the two, loaded on both.
    assert per_backend(stats, "spread-a") == [ROUNDS // 2, ROUNDS // 2], stats


async def test_two_groups_place_keyed_frames_by_their_own_policies(
    modelsim: Callable[..., BackendProcess], router_factory: RouterFactory, tmp_path: Path
) -> None:
    a, b = modelsim("a"), modelsim("b")
    router = await router_factory(
        [{"address": s.address, "models": ["*"]} for s in (a, b)],
        {**GROUPED, "listener": {"keyed": True}},
    )
    client = await router.client()
    for i in range(ROUNDS):
        for model in ("warm-a", "spread-a"):
            body = f"{model}-{i}".encode()
            assert await client.request(encode_keyed(model, body)) == body
    await check_routes(router.admin_url, "tcp")
    check_placement([await stats_of(a, tmp_path, "a"), await stats_of(b, tmp_path, "b")])


async def test_two_groups_place_kserve_calls_by_their_own_policies(
    modelsim: Callable[..., BackendProcess], grpc_router: GrpcRouterFactory, tmp_path: Path
) -> None:
    a, b = modelsim("a", "--protocol", "grpc"), modelsim("b", "--protocol", "grpc")
    router = await grpc_router([grpc_backend(s.address, "*") for s in (a, b)], GROUPED)
    async with router.channel() as channel:
        infer = channel.unary_unary(MODEL_INFER)
        for i in range(ROUNDS):
            for model in ("warm-a", "spread-a"):
                reply = await infer(infer_request(model, [float(i)], id=f"{model}-{i}"),
                                    timeout=IO_TIMEOUT_S)
                assert pb.ModelInferResponse.FromString(reply).id == f"{model}-{i}"
    await check_routes(router.admin_url, "grpc")
    check_placement([await stats_of(a, tmp_path, "a"), await stats_of(b, tmp_path, "b")])


async def test_reload_applies_changed_groups_and_listener_policies(tmp_path: Path) -> None:
    """A router process: POST /admin/reload, then SIGHUP, each change seen by the debug
    route at once (requests placed from then on)."""
    groups = [{"name": "first", "models": ["m-*"], "policy": "affinity"}]
    async with served(tmp_path, config(model_groups=groups)) as router:
        async def route(model: str, kind: str = "tcp") -> tuple[str, str, str | None]:
            status, body = await router.request(
                "GET", f"/v1/debug/route?model={model}&kind={kind}")
            assert status == 200, body
            return body["policy"], body["decided_by"], body["group"]

        assert await route("m-1") == ("affinity", "model_group", "first")
        assert await route("x") == ("round_robin", "dispatch", None)

        groups = [{"name": "second", "models": ["x", "y-?"],
                   "policy": "consistent_hash_bounded", "load_bound": 2.0}]
        router.write(config(model_groups=groups, listener={"policy": "random"}))
        status, outcome = await router.reload()
        assert status == 200, outcome
        changed = " ".join(outcome["changes"])
        assert "model_groups" in changed and "listener.policy" in changed, outcome
        assert await route("m-1") == ("random", "listener", None)
        assert await route("m-1", "grpc") == ("round_robin", "dispatch", None)
        assert await route("y-2") == ("consistent_hash_bounded", "model_group", "second")

        router.write(config(model_groups=[], grpc={"policy": "affinity"}))
        router.proc.send_signal(signal.SIGHUP)

        async def grpc_is_affinity() -> bool:
            return await route("y-2", "grpc") == ("affinity", "listener", None)

        await router.wait_until(grpc_is_affinity, "the SIGHUP reload")
        assert await route("y-2") == ("round_robin", "dispatch", None)
