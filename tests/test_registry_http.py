"""The directory over HTTP (``/v1/backends``) on a serving router, with real echo backend
processes: a registered backend takes traffic as soon as its registration answers, an
operator's drain and weight act on the data plane, a deregistration drains with zero client
errors, state is saved and restored, and every error code the routes declare is answered
with its status."""

from __future__ import annotations

import asyncio
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from router.client.frames import ErrorReply
from router.control.state import decode
from tests.conftest import EchoBackend, RouterFactory, RunningRouter

TOKEN = "registry-token"
CALL_TIMEOUT_S = 10.0


class Api:
    def __init__(self, router: RunningRouter, token: str | None = TOKEN) -> None:
        self.base = router.admin_url
        self.token = token

    async def __call__(self, method: str, path: str, body: Any = None,
                       token: str | None = "default") -> tuple[int, Any]:
        token = self.token if token == "default" else token
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(CALL_TIMEOUT_S)) as s, \
                s.request(method, self.base + path, json=body, headers=headers) as response:
            return response.status, await response.json()


def _token_file(tmp_path: Path) -> str:
    path = tmp_path / "admin.token"
    path.write_text(TOKEN)
    return str(path)


async def _router(router_factory: RouterFactory, tmp_path: Path, addresses: list[str],
                  **sections: Any) -> tuple[RunningRouter, Api]:
    overrides = {"admin": {"token_file": _token_file(tmp_path)}, **sections}
    router = await router_factory(addresses, overrides)
    return router, Api(router)


async def test_a_registered_backend_serves_at_once_and_drain_and_weight_act(
        echo_backend: Callable[..., EchoBackend], router_factory: RouterFactory,
        tmp_path: Path) -> None:
    router, api = await _router(router_factory, tmp_path, [])
    client = await router.client()
    with pytest.raises(ErrorReply) as refused:  # no backend yet: answered, not hung
        await client.request(b"x")
    assert refused.value.code == "NO_BACKEND"
    backend = echo_backend()
    status, body = await api("POST", "/v1/backends", {"address": backend.address,
                                                       "models": ["m:1"], "lease_ttl_s": 5})
    assert (status, body["id"], body["heartbeat_interval_s"]) == (201, backend.address,
                                                                  5 / 3)
    assert await client.request(b"hello") == b"hello"  # no wait between the two
    status, info = await api("GET", f"/v1/backends/{backend.address}")
    assert (status, info["state"], info["source"], info["protocol"]) == (
        200, "healthy", "registered", "frames")
    status, info = await api("PUT", f"/v1/backends/{backend.address}/weight", {"weight": 6})
    assert (status, info["weight"]) == (200, 6)
    assert router.app.registry.get(backend.address).weight == 6  # type: ignore[union-attr]
    status, info = await api("POST", f"/v1/backends/{backend.address}/drain")
    assert (status, info["state"], info["drained"]) == (200, "draining", True)
    assert router.app.registry.candidates() == []
    status, info = await api("POST", f"/v1/backends/{backend.address}/undrain")
    assert (status, info["state"]) == (200, "healthy")
    assert await client.request(b"again") == b"again"
    status, body = await api("PUT", f"/v1/backends/{backend.address}/lease",
                             {"inflight": 4, "loaded_models": ["m:1"]})
    assert status == 200
    status, info = await api("GET", f"/v1/backends/{backend.address}")
    assert info["reported"] == {"inflight": 4, "loaded_models": ["m:1"], "model_use": None}


async def test_a_heartbeats_model_use_reaches_the_residency_view_and_bad_ones_are_refused(
        echo_backend: Callable[..., EchoBackend], router_factory: RouterFactory,
        tmp_path: Path) -> None:
    backend = echo_backend()
    router, api = await _router(router_factory, tmp_path, [])
    status, _ = await api("POST", "/v1/backends", {"address": backend.address})
    assert status == 201
    lease = f"/v1/backends/{backend.address}/lease"
    status, _ = await api("PUT", lease, {"loaded_models": ["m", "n"],
                                         "model_use": {"m": 3, "n": 0}})
    assert status == 200
    view = router.app.residency
    # This router sent none of them: all three are another router's.
    assert (view.foreign(backend.address, "m"), view.foreign_load(backend.address)) == (3, 3)
    status, info = await api("GET", f"/v1/backends/{backend.address}")
    assert info["reported"]["model_use"] == {"m": 3, "n": 0}
    status, body = await api("PUT", "/v1/leases", {"leases": [
        {"id": backend.address, "model_use": {"n": 2}}]})
    assert (status, body["renewed"]) == (200, [backend.address])
    assert (view.foreign(backend.address, "m"), view.foreign(backend.address, "n")) == (0, 2)
    too_many = {f"m{i}": 1 for i in range(1025)}
    for bad, field in (({"m": -1}, "model_use.m"), ({"m": "3"}, "model_use.m"),
                       ({"m": 1.5}, "model_use.m"), ({"m": True}, "model_use.m"),
                       ({"m": 1_000_001}, "model_use.m"), ({"": 1}, "model_use"),
                       (too_many, "model_use"), (["m"], "model_use")):
        status, got = await api("PUT", lease, {"model_use": bad})
        assert (status, got["code"]) == (400, "VALIDATION_ERROR"), (bad, got)
        assert field in got["error"], (bad, got["error"])
    assert view.foreign(backend.address, "n") == 2  # a refused report changes nothing


async def test_deregistering_under_load_costs_clients_nothing(
        echo_backend: Callable[..., EchoBackend], router_factory: RouterFactory,
        tmp_path: Path) -> None:
    stays, leaves = echo_backend(), echo_backend()
    router, api = await _router(router_factory, tmp_path, [])
    for backend in (stays, leaves):
        status, _ = await api("POST", "/v1/backends", {"address": backend.address})
        assert status == 201
    clients = [await router.client() for _ in range(8)]
    errors: list[bytes] = []
    answered = 0
    stop = asyncio.Event()

    async def load(client: Any, n: int) -> None:
        nonlocal answered
        for i in range(2000):  # bounded; the test stops it much sooner
            if stop.is_set():
                return
            payload = f"{n}-{i}".encode()
            answer = await client.request(payload)
            if answer != payload:
                errors.append(answer)
            answered += 1

    tasks = [asyncio.create_task(load(c, n)) for n, c in enumerate(clients)]
    await asyncio.sleep(0.3)
    status, info = await api("DELETE", f"/v1/backends/{leaves.address}")
    assert status == 202 and info["state"] in ("draining", "removed")
    before = answered
    await asyncio.sleep(0.3)
    stop.set()
    async with asyncio.timeout(CALL_TIMEOUT_S):
        await asyncio.gather(*tasks)
    assert errors == [] and answered > before
    assert router.app.registry.get(leaves.address) is None
    status, body = await api("GET", f"/v1/backends/{leaves.address}")
    assert (status, body["code"]) == (404, "BACKEND_NOT_FOUND")


async def test_every_error_code_of_the_registry_routes(
        echo_backend: Callable[..., EchoBackend], router_factory: RouterFactory,
        tmp_path: Path) -> None:
    static = echo_backend()
    router, api = await _router(router_factory, tmp_path, [static.address],
                                registry={"max_backends": 2,
                                          "allowed_networks": ["127.0.0.0/8", "::1/128"]})
    cases: list[tuple[str, str, Any, int, str]] = [
        ("POST", "/v1/backends", {"address": "nowhere"}, 400, "VALIDATION_ERROR"),
        ("POST", "/v1/backends", {"address": "127.0.0.1:1", "weight": 0}, 400,
         "VALIDATION_ERROR"),
        ("POST", "/v1/backends", {"address": "unix:relative.sock"}, 400, "VALIDATION_ERROR"),
        ("POST", "/v1/backends", {"address": "127.0.0.1:1", "extra": 1}, 400,
         "VALIDATION_ERROR"),
        ("POST", "/v1/backends", {"address": static.address}, 409, "ADDRESS_CONFLICT"),
        ("POST", "/v1/backends", {"address": "127.0.0.1:2", "id": static.address}, 409,
         "BACKEND_EXISTS"),
        ("POST", "/v1/backends", {"address": "10.0.0.1:9000"}, 403, "ADDRESS_NOT_ALLOWED"),
        ("POST", "/v1/backends", {"address": "localhost:9000"}, 403, "ADDRESS_NOT_ALLOWED"),
        ("PUT", "/v1/backends/nobody/lease", {}, 404, "LEASE_NOT_FOUND"),
        ("PUT", f"/v1/backends/{static.address}/lease", {}, 404, "LEASE_NOT_FOUND"),
        ("DELETE", "/v1/backends/nobody", None, 404, "BACKEND_NOT_FOUND"),
        ("DELETE", f"/v1/backends/{static.address}", None, 409, "BACKEND_IS_STATIC"),
        ("POST", "/v1/backends/nobody/drain", None, 404, "BACKEND_NOT_FOUND"),
        ("PUT", "/v1/backends/nobody/weight", {"weight": 2}, 404, "BACKEND_NOT_FOUND"),
        ("PUT", f"/v1/backends/{static.address}/weight", {"weight": 1001}, 400,
         "VALIDATION_ERROR"),
        ("GET", "/v1/backends/nobody", None, 404, "BACKEND_NOT_FOUND"),
    ]
    for method, path, body, want_status, want_code in cases:
        status, got = await api(method, path, body)
        assert (status, got["code"]) == (want_status, want_code), (method, path, got)
        assert got["timestamp"].endswith("Z") and got["error"]
    status, got = await api("POST", "/v1/backends", {"address": "127.0.0.1:3"}, token=None)
    assert (status, got["code"]) == (401, "UNAUTHORIZED")
    status, got = await api("POST", "/v1/backends", {"address": "127.0.0.1:3"}, token="wrong")
    assert (status, got["code"]) == (403, "FORBIDDEN")
    for port in (3, 4):
        status, _ = await api("POST", "/v1/backends", {"address": f"127.0.0.1:{port}"})
        assert status == 201
    status, got = await api("POST", "/v1/backends", {"address": "127.0.0.1:5"})
    assert (status, got["code"]) == (422, "MAX_BACKENDS_REACHED")
    async with aiohttp.ClientSession() as session, session.get(
            router.admin_url + "/metrics") as response:
        text = await response.text()
    assert 'router_registrations_total{result="rejected"} 5.0' in text
    assert 'router_registrations_total{result="created"} 2.0' in text
    assert 'router_heartbeats_total{result="lease_not_found"} 2.0' in text
    assert 'router_backends{source="registered",state="healthy"} 0.0' not in text
    assert 'router_backends{source="static",state="healthy"} 1.0' in text


async def test_api_backends_and_overrides_are_saved_and_restored_by_a_new_router(
        echo_backend: Callable[..., EchoBackend], router_factory: RouterFactory,
        tmp_path: Path) -> None:
    static, added = echo_backend(), echo_backend()
    state = tmp_path / "state.toml"
    router, api = await _router(router_factory, tmp_path, [static.address],
                                state={"file": str(state)})
    status, _ = await api("POST", "/v1/backends", {"address": added.address, "id": "a1",
                                                   "lease_ttl_s": None, "models": ["m"]})
    assert status == 201
    await api("PUT", f"/v1/backends/{static.address}/weight", {"weight": 3})
    await api("POST", "/v1/backends/a1/drain")
    await router.stop()
    saved = decode(state.read_bytes())
    assert [(b.id, b.drained) for b in saved.backends] == [("a1", True)]
    assert saved.static[static.address].weight == 3

    again, api = await _router(router_factory, tmp_path, [static.address],
                               state={"file": str(state)})
    status, info = await api("GET", "/v1/backends/a1")
    assert (status, info["source"], info["drained"]) == (200, "api", True)
    assert again.app.registry.get(static.address).weight == 3  # type: ignore[union-attr]
    await api("POST", "/v1/backends/a1/undrain")
    await api("POST", f"/v1/backends/{static.address}/drain")
    client = await again.client()
    for i in range(4):  # only the API backend is in rotation now
        assert await client.request(b"%d" % i) == b"%d" % i
    assert again.backend_stats()[added.address]["requests_total"] == 4
    await again.app.directory.flush_state()
    saved = decode(state.read_bytes())
    assert saved.backends[0].drained is False and saved.static[static.address].drained
    async with aiohttp.ClientSession() as session, session.get(
            again.admin_url + "/metrics") as response:
        text = await response.text()
    # Two saves were asked for; one queued behind another may be superseded by it.
    assert re.search(r'router_state_saves_total\{result="ok"\} [12]\.0', text), text
    assert 'router_state_saves_total{result="failed"} 0.0' in text


async def test_a_corrupt_state_file_is_set_aside_and_the_router_starts_from_its_config(
        echo_backend: Callable[..., EchoBackend], router_factory: RouterFactory,
        tmp_path: Path) -> None:
    static = echo_backend()
    state = tmp_path / "state.toml"
    state.write_text("version = 1\n[[backends]]\nid = 'x'\naddress = 42\n")
    router, api = await _router(router_factory, tmp_path, [static.address],
                                state={"file": str(state)})
    status, infos = await api("GET", "/v1/backends")
    assert status == 200 and [i["id"] for i in infos] == [static.address]
    aside = [p for p in os.listdir(tmp_path) if p.startswith("state.toml.corrupt-")]
    assert len(aside) == 1 and "address = 42" in (tmp_path / aside[0]).read_text()
    client = await router.client()
    assert await client.request(b"ok") == b"ok"
