"""Reload (SIGHUP, POST /admin/reload), the other signals, and one-line startup errors: the CLI
router as a real process, real echo backends, traffic over loopback."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import orjson
import pytest
import tomli_w

from router.app import RouterApp
from router.client.frames import FrameClient
from router.control.launcher import LaunchedProcess, launch
from router.core.config import RouterConfig, from_mapping, merge
from router.protocol.announce import Banner, parse_banner
from tests.conftest import EchoBackend
from tests.grpc_support import (
    MODEL_INFER,
    KServeBackend,
    grpc_backend,
    infer_request,
    kserve_backend,
    output_values,
)
from tests.support import REPO_ROOT, child_env

__all__ = ["kserve_backend"]  # a fixture, imported for pytest

WAIT_S = 20.0  # bound on every wait; a router process starts in well under a second
ADMIN_TOKEN = "reload-test-token"  # POST /admin/reload is a mutating endpoint

BASE: dict[str, Any] = {
    "listener": {"listen": "127.0.0.1:0"},
    "admin": {"listen": "127.0.0.1:0"},
    "dispatch": {"policy": "round_robin", "request_timeout_s": 10.0},
    "health": {"interval_s": 0.5},
    "drain": {"shutdown_grace_s": 10.0, "linger_s": 0.5},
}


def config(*backends: str | dict[str, Any], **sections: dict[str, Any]) -> dict[str, Any]:
    """BASE with ``sections`` merged in, and these backends."""
    data = merge(BASE, sections)
    data["backends"] = [{"address": b} if isinstance(b, str) else b for b in backends]
    return data


def write_config(path: Path, data: dict[str, Any]) -> None:
    """Write the config, with the admin token that reload calls present."""
    token = path.with_name("admin.token")
    token.write_text(ADMIN_TOKEN)
    path.write_text(tomli_w.dumps(merge(data, {"admin": {"token_file": str(token)}})))


@dataclass
class Served:
    proc: LaunchedProcess[Banner]
    config: Path
    stderr: Path

    @property
    def listen(self) -> tuple[str, int]:
        return self.proc.ready.listen

    def write(self, data: dict[str, Any]) -> None:
        write_config(self.config, data)

    async def request(self, method: str, path: str) -> tuple[int, Any]:
        url = self.proc.ready.admin_url + path
        headers = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
        async with (aiohttp.ClientSession() as session,
                    session.request(method, url, headers=headers) as response):
            body = await response.read()
            if response.content_type == "application/json":
                return response.status, orjson.loads(body)
            return response.status, body.decode()

    async def reload(self) -> tuple[int, Any]:
        return await self.request("POST", "/admin/reload")

    async def backends(self) -> dict[str, dict[str, Any]]:
        _, listed = await self.request("GET", "/backends")
        return {b["address"]: b for b in listed if b["state"] != "draining"}

    async def requests_by_backend(self) -> dict[str, int]:
        return {a: b["requests_total"] for a, b in (await self.backends()).items()}

    async def metric(self, line_start: str) -> float:
        _, text = await self.request("GET", "/metrics")
        [line] = [line for line in text.splitlines() if line.startswith(line_start)]
        return float(line.rsplit(" ", 1)[1])

    async def wait_until(self, condition: Callable[[], Any], what: str) -> None:
        """Poll another process (there is no event to await across processes), bounded."""
        async with asyncio.timeout(WAIT_S):
            while not await condition():  # noqa: ASYNC110
                await asyncio.sleep(0.05)


@contextlib.asynccontextmanager
async def served(tmp_path: Path, data: dict[str, Any], *flags: str) -> AsyncIterator[Served]:
    path, stderr = tmp_path / "router.toml", tmp_path / "router.stderr"
    write_config(path, data)
    proc = await launch(
        [sys.executable, "-m", "router", "serve", "--config", str(path), *flags],
        parse_banner, stderr=stderr, cwd=REPO_ROOT, ready_timeout_s=WAIT_S,
        env=child_env(ROUTER_LOG_DIR=str(tmp_path / "logs")),
    )
    try:
        yield Served(proc, path, stderr)
    finally:
        await proc.stop(WAIT_S)


async def call(served: Served, count: int, prefix: str = "r") -> None:
    """``count`` requests one after another on one connection; each answer is its payload."""
    client = await FrameClient.connect(*served.listen)
    try:
        async with asyncio.timeout(WAIT_S):
            for i in range(count):
                payload = f"{prefix}{i}".encode()
                assert await client.request(payload) == payload
    finally:
        await client.close()


async def wait_accepted(served: Served, count: int) -> None:
    async def accepted() -> bool:
        _, stats = await served.request("GET", "/stats")
        return bool(stats["dispatch"]["accepted"] >= count)

    await served.wait_until(accepted, f"{count} requests accepted")


# -- bug 1: signals ------------------------------------------------------------------------------


async def test_sighup_reloads_and_the_request_in_flight_is_answered(
    echo_backend: Callable[..., EchoBackend], tmp_path: Path
) -> None:
    slow, other = echo_backend("--delay-ms", "1500"), echo_backend()
    async with served(tmp_path, config(slow.address)) as router:
        client = await FrameClient.connect(*router.listen)
        in_flight = client.send(b"sent before SIGHUP")
        await wait_accepted(router, 1)
        router.write(config(slow.address, other.address))
        router.proc.send_signal(signal.SIGHUP)
        async with asyncio.timeout(WAIT_S):
            assert await in_flight == b"sent before SIGHUP"
        await client.close()

        assert router.proc.returncode is None
        await router.wait_until(lambda: _has(router, other.address), "the reload applied")
        assert "SIGHUP: reloading the config" in router.stderr.read_text()
        assert await router.metric('router_config_reloads_total{result="ok"}') == 1
        await call(router, 2)
        router.proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(WAIT_S):
            assert await router.proc.wait() == 0, router.stderr.read_text()


async def _has(router: Served, address: str) -> bool:
    return address in await router.backends()


async def test_usr1_usr2_and_pipe_leave_it_serving_and_sigquit_drains(
    echo_backend: Callable[..., EchoBackend], tmp_path: Path
) -> None:
    async with served(tmp_path, config(echo_backend().address)) as router:
        for signum in (signal.SIGUSR1, signal.SIGUSR2, signal.SIGPIPE):
            router.proc.send_signal(signum)
            await call(router, 1)  # answered after the signal: the process is still there
        assert router.proc.returncode is None
        log = router.stderr.read_text()
        assert "statistics: {" in log and "SIGUSR2: ignored" in log
        router.proc.send_signal(signal.SIGQUIT)
        async with asyncio.timeout(WAIT_S):
            assert await router.proc.wait() == 0, router.stderr.read_text()
        assert "SIGQUIT: draining" in router.stderr.read_text()


# -- bug 9: startup errors and call ----------------------------------------------------------------


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "router", *args], capture_output=True, text=True,
        cwd=REPO_ROOT, env=child_env(), timeout=WAIT_S, check=False,
    )


@pytest.mark.parametrize("key", ["listener.listen", "admin.listen", "grpc.listen"])
def test_a_listen_address_in_use_is_one_line_and_exit_2(key: str) -> None:
    with socket.create_server(("127.0.0.1", 0)) as taken:
        address = f"127.0.0.1:{taken.getsockname()[1]}"
        addresses = {"listener.listen": "127.0.0.1:0", "admin.listen": "127.0.0.1:0",
                     "grpc.listen": "127.0.0.1:0", key: address}
        done = run_cli("serve", "--backend", "127.0.0.1:9",
                       "--listen", addresses["listener.listen"],
                       "--admin", addresses["admin.listen"],
                       "--grpc-listen", addresses["grpc.listen"])
    assert done.returncode == 2, done.stderr
    assert done.stderr.splitlines() == [
        f"inference-router: cannot listen on {address} ({key}): Address already in use"
    ]
    assert done.stdout == ""


def test_the_supervisor_reports_a_port_in_use_in_one_line() -> None:
    with socket.create_server(("127.0.0.1", 0)) as taken:
        address = f"127.0.0.1:{taken.getsockname()[1]}"
        done = run_cli("serve", "--processes", "2", "--backend", "127.0.0.1:9",
                       "--listen", address, "--admin", "127.0.0.1:0")
    assert done.returncode == 2, done.stderr
    assert done.stderr.splitlines() == [
        f"inference-router: cannot listen on {address} (listener.listen): Address already in use"
    ]


def test_call_to_a_router_that_is_not_there_is_one_line_and_exit_1(dead_port: int) -> None:
    done = run_cli("call", "--to", f"127.0.0.1:{dead_port}", "hello")
    assert done.returncode == 1
    assert done.stderr.splitlines() == [
        f"inference-router: cannot reach the router at 127.0.0.1:{dead_port}: Connection refused"
    ]


# -- feature 1: reload -----------------------------------------------------------------------------


async def test_a_reload_adds_a_backend_and_new_requests_reach_it(
    echo_backend: Callable[..., EchoBackend], tmp_path: Path
) -> None:
    first, second = echo_backend(), echo_backend()
    async with served(tmp_path, config(first.address)) as router:
        await call(router, 4)
        router.write(config(first.address, second.address))
        status, body = await router.reload()
        assert (status, body) == (200, {"reloaded": True,
                                        "changes": [f"backend {second.address}: added"]})
        await call(router, 10)
        assert await router.requests_by_backend() == {first.address: 4 + 5, second.address: 5}


async def test_a_new_weight_changes_the_split(
    echo_backend: Callable[..., EchoBackend], tmp_path: Path
) -> None:
    a, b = echo_backend(), echo_backend()
    async with served(tmp_path, config(a.address, b.address)) as router:
        await call(router, 40)
        assert await router.requests_by_backend() == {a.address: 20, b.address: 20}
        router.write(config(a.address, {"address": b.address, "weight": 3}))
        status, body = await router.reload()
        assert status == 200 and body["changes"] == [f"backend {b.address}: weight 1 -> 3"]
        await call(router, 40)
        assert await router.requests_by_backend() == {a.address: 20 + 10, b.address: 20 + 30}


async def test_removing_a_backend_under_load_loses_no_request(
    echo_backend: Callable[..., EchoBackend], tmp_path: Path
) -> None:
    record = tmp_path / "removed.ids"
    kept = [echo_backend("--delay-ms", "30"), echo_backend("--delay-ms", "30")]
    removed = echo_backend("--delay-ms", "30", "--record-ids", str(record))
    everyone = [b.address for b in [*kept, removed]]
    async with served(tmp_path, config(*everyone)) as router:
        phase = ["before"]
        answered: list[int] = []

        async def client(index: int) -> None:
            """120 requests, 4 in flight at a time; every answer must be its payload."""
            conn = await FrameClient.connect(*router.listen)
            try:
                for batch in range(30):
                    payloads = [f"{phase[0]}-{index}-{batch}-{k}".encode() for k in range(4)]
                    answers = await asyncio.gather(*(conn.send(p) for p in payloads))
                    assert answers == payloads
                    answered.append(len(answers))
            finally:
                await conn.close()

        async with asyncio.timeout(WAIT_S * 2), asyncio.TaskGroup() as group:
            for index in range(8):
                group.create_task(client(index))
            await wait_accepted(router, 200)
            router.write(config(*(b.address for b in kept)))
            status, body = await router.reload()
            phase[0] = "after"
            assert status == 200, body
            assert body["changes"] == [f"backend {removed.address}: removed (drains, then leaves)"]

        assert sum(answered) == 8 * 120
        _, stats = await router.request("GET", "/stats")
        dispatch = stats["dispatch"]
        assert (dispatch["completed"], dispatch["errored"]) == (8 * 120, {})
        assert dispatch["retried"] == 0  # nothing in flight on it was cut and sent again
        assert dispatch["dropped"] == 0
        seen = record.read_text().splitlines()
        assert seen and all(line.startswith("before-") for line in seen)
        _, listed = await router.request("GET", "/backends")
        assert sorted(b["address"] for b in listed) == sorted(b.address for b in kept)
        assert await router.metric("router_backends_draining") == 0


async def test_a_listener_change_is_refused_and_the_router_keeps_serving(
    echo_backend: Callable[..., EchoBackend], tmp_path: Path
) -> None:
    backend, extra = echo_backend(), echo_backend()
    async with served(tmp_path, config(backend.address)) as router:
        moved = config(backend.address, extra.address, listener={"listen": "127.0.0.1:1"})
        router.write(moved)
        status, body = await router.reload()
        assert status == 409 and body["code"] == "RESTART_REQUIRED" and not body["reloaded"]
        assert body["problems"] == ["listener.listen: '127.0.0.1:0' -> '127.0.0.1:1' needs a "
                                    "restart"]
        assert list(await router.backends()) == [backend.address]  # nothing else applied
        router.proc.send_signal(signal.SIGHUP)
        await router.wait_until(
            lambda: _refused_twice(router), "the SIGHUP reload refused as well"
        )
        await call(router, 3)
        assert "config reload refused, the running config stays: listener.listen" in (
            router.stderr.read_text()
        )


async def _refused_twice(router: Served) -> bool:
    return await router.metric('router_config_reloads_total{result="restart_required"}') == 2


async def test_an_invalid_file_is_rejected_with_check_config_messages(
    echo_backend: Callable[..., EchoBackend], tmp_path: Path
) -> None:
    backend = echo_backend()
    async with served(tmp_path, config(backend.address)) as router:
        broken = config(backend.address, dispatch={"policy": "fastest", "colour": 1})
        router.write(broken)
        status, body = await router.reload()
        checked = run_cli("check-config", str(router.config))
        assert checked.returncode == 2
        assert status == 400 and body["code"] == "VALIDATION_ERROR" and not body["reloaded"]
        assert body["problems"] == checked.stderr.splitlines()
        assert len(body["problems"]) == 2
        await call(router, 3)
        assert await router.metric('router_config_reloads_total{result="invalid"}') == 1
        assert checked.stderr.splitlines()[0] in router.stderr.read_text()  # logged too

        router.write(config(backend.address, dispatch={"policy": "random"}))
        status, body = await router.reload()  # fixed: the next reload applies
        assert (status, body["changes"]) == (200, ["dispatch.policy: 'round_robin' -> 'random'"])


# -- feature 4a and bug 9: backend host names -----------------------------------------------


async def test_a_host_name_is_resolved_and_an_unresolvable_one_is_a_warning(
    echo_backend: Callable[..., EchoBackend], tmp_path: Path
) -> None:
    backend = echo_backend()
    named = f"localhost:{backend.port}"  # /etc/hosts: 127.0.0.1 (and ::1 where it is listed)
    data = config(named, "no-such-host.invalid:9")
    async with served(tmp_path, data) as router:
        listed = await router.backends()
        assert backend.address in listed
        assert all(address.endswith(f":{backend.port}") for address in listed)
        await call(router, 2)
        log = router.stderr.read_text()
        assert "WARNING router.control.fleet: backends[1]: cannot resolve " in log
        assert "'no-such-host.invalid'" in log and "until it resolves" in log


async def test_a_name_with_two_addresses_is_two_backends_and_one_that_goes_drains(
    echo_backend: Callable[..., EchoBackend],
) -> None:
    """DNS through an injected resolver: two loopback addresses on one port; one leaves DNS
    while clients send, drains and leaves, and no client sees an error."""
    first = echo_backend("--delay-ms", "20")
    second = echo_backend("--host", "127.0.0.2", "--port", str(first.port), "--delay-ms", "20")
    names = {"fleet.test": ["127.0.0.1", "127.0.0.2"]}

    async def resolver(host: str, port: int) -> list[str]:
        return list(names[host])

    entry = {"address": f"fleet.test:{first.port}", "dns_refresh_s": 0.2}
    app = RouterApp(from_mapping(merge(BASE, {"backends": [entry]}), "<test>"),
                    resolver=resolver)
    left = asyncio.Event()
    gone: list[Any] = []
    app.registry.add_leave_listener(lambda backend: (gone.append(backend), left.set()))
    stop = asyncio.Event()
    try:
        bound = await app.start()
        async with asyncio.timeout(WAIT_S * 2), asyncio.TaskGroup() as group:
            group.create_task(app.serve(stop.wait()))
            client = await FrameClient.connect(*bound.listen)
            for i in range(20):
                assert await client.request(f"both{i}".encode()) == f"both{i}".encode()
            assert {b.address: b.requests_total for b in app.registry} == {
                first.address: 10, f"127.0.0.2:{second.port}": 10,
            }
            pending = [client.send(f"during{i}".encode()) for i in range(40)]
            names["fleet.test"] = ["127.0.0.1"]
            await left.wait()
            assert await asyncio.gather(*pending) == [f"during{i}".encode() for i in range(40)]
            assert [b.address for b in app.registry] == [first.address]
            await client.close()
            stop.set()
        assert app.stats.errored == {} and app.stats.retried == 0
    finally:
        stop.set()
        await app.close()


async def test_sighup_to_the_supervisor_reloads_every_process(
    echo_backend: Callable[..., EchoBackend], tmp_path: Path
) -> None:
    a, b = echo_backend(), echo_backend()
    async with served(tmp_path, config(a.address), "--processes", "2") as router:
        router.write(config(a.address, b.address))
        router.proc.send_signal(signal.SIGHUP)

        async def in_every_process() -> bool:
            _, listed = await router.request("GET", "/backends")
            return sorted(e["process"] for e in listed if e["address"] == b.address) == [0, 1]

        await router.wait_until(in_every_process, "both processes reloaded")
        assert router.proc.returncode is None
        await call(router, 4)
        router.write(config(a.address, b.address, admin={"listen": "127.0.0.1:1"}))
        status, body = await router.reload()
        assert status == 409 and body["code"] == "RESTART_REQUIRED"
        assert body["problems"][0].startswith("admin.listen: ")


async def test_a_removed_grpc_backend_finishes_its_call_and_its_channel_closes(
    kserve_backend: Callable[..., KServeBackend], grpc_engine: str,
) -> None:
    slow, other = kserve_backend("--delay-ms", "800"), kserve_backend()
    base = merge(BASE, {"grpc": {"listen": "127.0.0.1:0", "engine": grpc_engine}})
    current = {"backends": [grpc_backend(slow.address, "sum")]}

    def source() -> RouterConfig:
        return from_mapping(merge(base, current), "<test>")

    app = RouterApp(source(), source=source)
    left = asyncio.Event()
    gone: list[Any] = []
    app.registry.add_leave_listener(lambda backend: (gone.append(backend), left.set()))
    stop = asyncio.Event()
    try:
        bound = await app.start()
        assert bound.grpc is not None
        async with (asyncio.timeout(WAIT_S), asyncio.TaskGroup() as group,
                    grpc.aio.insecure_channel(f"{bound.grpc[0]}:{bound.grpc[1]}") as channel):
            group.create_task(app.serve(stop.wait()))
            infer = channel.unary_unary(MODEL_INFER)
            in_flight = asyncio.ensure_future(infer(infer_request("sum", [1.0, 2.0])))
            while app.stats.accepted < 1:  # noqa: ASYNC110 (in process, but nothing to await)
                await asyncio.sleep(0.01)
            current["backends"] = [grpc_backend(other.address, "sum")]
            outcome = await app.reload()
            assert outcome.reloaded and outcome.changes == (
                f"backend {other.address} (grpc): added",
                f"backend {slow.address} (grpc): removed (drains, then leaves)",
            )
            assert [b.address for b in app.registry.draining()] == [slow.address]
            assert output_values(await in_flight) == [3.0]  # answered by the backend leaving
            await left.wait()
            assert output_values(await infer(infer_request("sum", [4.0]))) == [4.0]
            assert app.registry.draining() == []
            if grpc_engine == "grpcio":
                assert app.grpc_channels.statistics()["closed"] == 1
            else:  # the relay's connections to it: GOAWAY, then closed
                upstream = gone[0].upstream
                assert upstream.closed
                while upstream.statistics()["connections"]:  # noqa: ASYNC110 (bounded above)
                    await asyncio.sleep(0.01)
            stop.set()
        assert app.stats.errored == {} and app.stats.retried == 0
    finally:
        stop.set()
        await app.close()


@pytest.mark.grpc_engine("relay", reason="the relay's own backend connections")
async def test_a_reload_gives_the_relays_backend_connections_a_new_idle_timeout(
    kserve_backend: Callable[..., KServeBackend], grpc_engine: str,
) -> None:
    backend = kserve_backend()
    base = merge(BASE, {"grpc": {"listen": "127.0.0.1:0", "engine": grpc_engine}})
    current: dict[str, Any] = {"backends": [grpc_backend(backend.address, "sum")]}

    def source() -> RouterConfig:
        return from_mapping(merge(base, current), "<test>")

    app = RouterApp(source(), source=source)
    stop = asyncio.Event()
    try:
        bound = await app.start()
        assert bound.grpc is not None
        async with (asyncio.timeout(WAIT_S), asyncio.TaskGroup() as group,
                    grpc.aio.insecure_channel(f"{bound.grpc[0]}:{bound.grpc[1]}") as channel):
            group.create_task(app.serve(stop.wait()))
            current["pool"] = {"idle_timeout_s": 0.2}
            current["grpc"] = {"relay_keepalive_s": 0.1, "relay_keepalive_timeout_s": 5.0}
            outcome = await app.reload()
            assert outcome.reloaded, outcome
            infer = channel.unary_unary(MODEL_INFER)
            assert output_values(await infer(infer_request("sum", [1.0, 2.0]))) == [3.0]
            upstream = next(b for b in app.registry.statistics()
                            if b["address"] == backend.address)
            for _ in range(300):  # bounded (3 s): 0.2 s idle, checked every 0.1 s
                upstream = next(b for b in app.registry.statistics()
                                if b["address"] == backend.address)
                if upstream["calls"]["connections_retired"]["idle"]:
                    break
                await asyncio.sleep(0.01)
            assert upstream["calls"]["connections_retired"]["idle"] == 1
            assert output_values(await infer(infer_request("sum", [4.0]))) == [4.0]
            stop.set()
        assert app.stats.errored == {} and app.stats.completed == 2
    finally:
        stop.set()
        await app.close()
