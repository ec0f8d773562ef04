"""The replica manager end to end: real replica processes behind an in-process router, driven
through the admin API (/v1/instances), with traffic through the router where the point is
that clients see no errors."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client.registry import CollectorRegistry

from router.app import RouterApp
from router.client.frames import FrameClient
from router.control.admin import AdminAuth, AdminServer
from router.control.directory import BackendDirectory
from router.control.instances.replica import Replica
from router.control.launcher import launch
from router.control.store import MemoryStore
from router.core import config as config_mod
from router.core.clock import MonotonicClock
from router.core.config import AdminConfig
from router.core.config_diff import ReloadOutcome
from router.dispatch.backends import Backend, Registry
from router.lifecycle.readiness import Readiness
from router.lifecycle.state import Lifecycle
from router.protocol.announce import parse_banner
from router.upstream.grpc_limiter import GrpcCallLimiter
from tests.conftest import RouterFactory, RunningRouter
from tests.support import BASE_CONFIG, REPO_ROOT

WAIT_S = 30.0
TOKEN = "instances-token"
ECHO = ["{python}", "-m", "backends.echo", "--port", "{port}"]
# The manager at test speed: checks every 0.2 s, restarts after 0.1 s doubling to 0.8 s.
FAST: dict[str, Any] = {"manager": {
    "startup_timeout_s": 20.0, "startup_probe_interval_s": 0.1, "stop_timeout_s": 2.0,
    "drain_timeout_s": 5.0,
    "health": {"initial_delay_s": 0.2, "interval_s": 0.2, "timeout_s": 0.5,
               "max_failures_before_restart": 3},
    "restart": {"backoff_initial_s": 0.1, "backoff_max_s": 0.8, "crash_loop_exits": 4,
                "crash_loop_window_s": 10.0},
}}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def wait_for(predicate: Callable[[], bool], what: str, timeout_s: float = WAIT_S) -> None:
    """Poll an in-process condition (bounded in time and count)."""
    async with asyncio.timeout(timeout_s):
        for _ in range(100_000):
            if predicate():
                return
            await asyncio.sleep(0.01)
    raise AssertionError(f"never became true: {what}")


class Api:
    """The admin API with the token."""

    def __init__(self, router: RunningRouter) -> None:
        self.router = router
        self._session = aiohttp.ClientSession(router.admin_url,
                                              headers={"Authorization": f"Bearer {TOKEN}"})

    async def call(self, method: str, path: str, body: Any = None,
                   params: dict[str, str] | None = None) -> tuple[int, Any]:
        async with asyncio.timeout(WAIT_S), self._session.request(
                method, path, json=body, params=params) as response:
            if response.content_type == "application/json":
                return response.status, await response.json()
            return response.status, await response.text()

    async def close(self) -> None:
        await self._session.close()


@contextlib.asynccontextmanager
async def managed(router_factory: RouterFactory, tmp_path: Path,
                  instances: list[dict[str, Any]] | None = None,
                  **sections: Any) -> AsyncIterator[tuple[RunningRouter, Api]]:
    token = tmp_path / "admin.token"
    token.write_text(TOKEN)
    overrides = config_mod.merge(FAST, {"admin": {"token_file": str(token)},
                                        "manager": {"log_dir": str(tmp_path / "logs")}})
    overrides = config_mod.merge(overrides, sections)
    overrides["instances"] = instances or []
    router = await router_factory([], overrides)
    api = Api(router)
    try:
        yield router, api
    finally:
        await api.close()


def replicas(router: RunningRouter, name: str) -> list[Replica]:
    return [r for r in router.app.instances.replicas() if r.instance.name == name]


def pids(router: RunningRouter, name: str) -> list[int | None]:
    return [r.pid for r in replicas(router, name)]


def all_ready(router: RunningRouter, name: str, count: int) -> Callable[[], bool]:
    def ready() -> bool:
        found = replicas(router, name)
        routable = {b["id"] for b in router.app.registry.statistics() if b["healthy"]}
        return len(found) == count and all(
            r.state == "ready" and r.id in routable for r in found)
    return ready


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with contextlib.suppress(OSError), open(f"/proc/{pid}/stat") as stat:
        return stat.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie is not alive
    return True


def environment_of(pid: int) -> list[bytes]:
    with open(f"/proc/{pid}/environ", "rb") as environ:
        return environ.read().split(b"\0")


class Traffic:
    """Clients requesting through the router, each on its own connection, until stopped
    (bounded in count); every failure is kept."""

    def __init__(self, router: RunningRouter, clients: int = 6, limit: int = 200_000) -> None:
        self._router = router
        self._clients = clients
        self._limit = limit
        self._stop = asyncio.Event()
        self.ok = 0
        self.errors: list[BaseException] = []
        self._tasks: list[asyncio.Task[None]] = []

    async def __aenter__(self) -> Traffic:
        for n in range(self._clients):
            client = await FrameClient.connect(self._router.host, self._router.port)
            self._tasks.append(asyncio.create_task(self._run(client, n)))
        await wait_for(lambda: self.ok >= self._clients or bool(self.errors), "traffic flows")
        return self

    async def _run(self, client: FrameClient, n: int) -> None:
        try:
            for i in range(self._limit):
                if self._stop.is_set():
                    return
                payload = f"c{n}-{i}".encode()
                try:
                    async with asyncio.timeout(WAIT_S):
                        answer = await client.request(payload)
                except Exception as exc:
                    self.errors.append(exc)
                    return
                if answer != payload:
                    self.errors.append(AssertionError(f"{payload!r} answered {answer!r}"))
                    return
                self.ok += 1
        finally:
            await client.close()

    async def settle(self, more: int) -> None:
        """Wait until ``more`` requests have been answered since now."""
        target = self.ok + more
        await wait_for(lambda: self.ok >= target or bool(self.errors), f"{more} more answers")

    async def __aexit__(self, *exc_info: object) -> None:
        self._stop.set()
        async with asyncio.timeout(WAIT_S):
            await asyncio.gather(*self._tasks)


# -- the API ---------------------------------------------------------------------------------


async def test_create_route_read_logs_scale_and_delete(
        router_factory: RouterFactory, tmp_path: Path) -> None:
    async with managed(router_factory, tmp_path) as (router, api):
        status, body = await api.call("POST", "/v1/instances", {
            "name": "echo", "command": ECHO, "replicas": 2, "models": ["m"]})
        assert status == 201, body
        assert body["origin"] == "api" and len(body["replicas"]) == 2
        await wait_for(all_ready(router, "echo", 2), "2 replicas ready")
        status, listed = await api.call("GET", "/v1/instances")
        assert status == 200 and [i["name"] for i in listed] == ["echo"]
        status, backends = await api.call("GET", "/v1/backends")
        managed_ids = {b["id"]: b for b in backends if b["source"] == "managed"}
        assert set(managed_ids) == {"echo-0", "echo-1"}
        assert managed_ids["echo-0"]["labels"] == {"instance": "echo", "replica": "0"}
        assert managed_ids["echo-0"]["lease_ttl_s"] == 10.0  # renewed by the manager

        client = await router.client()
        for i in range(20):
            assert await client.request(f"r{i}".encode()) == f"r{i}".encode()
        served = {b["id"]: b["requests_total"] for b in router.app.registry.statistics()}
        assert served["echo-0"] > 0 and served["echo-1"] > 0

        # Logs: the replica's output lines, sliced as Python slices a list.
        log_file = tmp_path / "logs" / "echo" / "0.log"
        lines = log_file.read_text().splitlines()
        assert any(line.startswith("READY ") for line in lines), lines
        for start, end in [(None, None), (0, 1), (-1, None), (-100, None), (1, -1), (5, 2)]:
            params = {k: str(v) for k, v in (("start", start), ("end", end)) if v is not None}
            if start is None:
                params["start"] = ""  # empty: the first line (the default is -100)
            status, got = await api.call("GET", "/v1/instances/echo/logs",
                                         params={"replica": "0", **params})
            assert status == 200, got
            assert got["lines"] == lines[start:end], (start, end)
            assert got["total"] == len(lines)

        status, body = await api.call("PUT", "/v1/instances/echo/replicas", {"replicas": 3})
        assert status == 202, body
        await wait_for(all_ready(router, "echo", 3), "scaled up to 3")
        before = pids(router, "echo")
        status, body = await api.call("PUT", "/v1/instances/echo/replicas", {"replicas": 1})
        assert status == 202 and body["definition"]["replicas"] == 1
        await wait_for(lambda: len(replicas(router, "echo")) == 1, "scaled down to 1")
        assert pids(router, "echo") == before[:1]  # the highest were the ones stopped
        assert not any(alive(pid) for pid in before[1:] if pid is not None)
        status, backends = await api.call("GET", "/v1/backends")
        assert [b["id"] for b in backends if b["source"] == "managed"] == ["echo-0"]
        assert await client.request(b"after") == b"after"

        metrics = await api.call("GET", "/metrics")
        assert 'router_instances_created_total 1.0' in metrics[1]
        assert 'router_instance_state{instance="echo",replica="0",state="ready"} 1.0' in metrics[1]

        status, body = await api.call("DELETE", "/v1/instances/echo")
        assert status == 200 and body["replicas"][0]["state"] == "stopped"
        assert not alive(before[0] or 0)  # stopped before the answer
        assert (await api.call("GET", "/v1/instances/echo"))[0] == 404
        metrics = await api.call("GET", "/metrics")
        assert 'router_instances_deleted_total 1.0' in metrics[1]
        assert 'router_instances_active 0.0' in metrics[1]


async def test_every_error_code_of_the_instances_api(
        router_factory: RouterFactory, tmp_path: Path) -> None:
    taken = socket.create_server(("127.0.0.1", 0))  # something else listens here
    busy = taken.getsockname()[1]
    static_base = free_port()
    good = {"name": "ok", "command": ECHO}
    with taken:
        async with managed(
                router_factory, tmp_path,
                [{"name": "static", "command": ECHO, "base_port": static_base - 1}],
                manager={"max_instances": 3, "gpus": 1, "port_range": [busy, busy]},
        ) as (router, api):
            async def error(method: str, path: str, body: Any = None,
                            params: dict[str, str] | None = None) -> tuple[int, str]:
                status, answer = await api.call(method, path, body, params)
                assert set(answer) == {"error", "code", "timestamp"}, answer
                return status, answer["code"]

            create = "/v1/instances"
            cases = [
                (("GET", "/v1/instances/nope"), (404, "INSTANCE_NOT_FOUND")),
                (("DELETE", "/v1/instances/nope"), (404, "INSTANCE_NOT_FOUND")),
                (("POST", "/v1/instances/nope/restart"), (404, "INSTANCE_NOT_FOUND")),
                (("GET", "/v1/instances/static/logs", None, {"replica": "7"}),
                 (404, "INSTANCE_NOT_FOUND")),
                (("DELETE", "/v1/instances/static"), (409, "INSTANCE_IS_STATIC")),
                (("POST", create, {"name": "static", "command": ECHO}),
                 (409, "INSTANCE_EXISTS")),
                (("POST", create, {**good, "base_port": busy - 1}), (409, "PORT_CONFLICT")),
                (("POST", create, good), (422, "PORT_ALLOCATION_FAILED")),
                (("POST", create, {**good, "command": ["x", "{prot}"]}),
                 (400, "INVALID_CONFIG")),
                (("POST", create, {**good, "command": ["no-such-program-here", "{port}"]}),
                 (400, "INVALID_CONFIG")),
                (("POST", create, {**good, "workdir": str(tmp_path / "absent")}),
                 (400, "INVALID_CONFIG")),
                (("POST", create, {**good, "base_port": 80}), (400, "INVALID_PORT")),
                (("POST", create, {**good, "base_port": 20000, "gpu": 1}),
                 (400, "INVALID_GPU_ID")),
                (("POST", create, {**good, "replicas": "2"}), (400, "VALIDATION_ERROR")),
                (("POST", create, {**good, "name": "../etc"}), (400, "VALIDATION_ERROR")),
                (("GET", "/v1/instances/static/logs", None, {"start": "x"}),
                 (400, "VALIDATION_ERROR")),
                (("GET", "/v1/instances/static/logs", None, {"tail": "1"}),
                 (400, "VALIDATION_ERROR")),
                (("POST", create, {**good, "base_port": 20000, "replicas": 3}),
                 (422, "MAX_INSTANCES_REACHED")),
                (("PUT", "/v1/instances/static/replicas", {"replicas": 4}),
                 (422, "MAX_INSTANCES_REACHED")),
                (("PUT", "/v1/instances/static/replicas", {"replicas": -1}),
                 (400, "VALIDATION_ERROR")),
            ]
            for request, expected in cases:
                assert await error(*request) == expected, request
            assert [i["name"] for i in (await api.call("GET", create))[1]] == ["static"]
            # A GPU that is present is given to the replica.
            status, body = await api.call("POST", create, {
                "name": "gpu", "command": ECHO, "base_port": free_port() - 1, "gpu": 0,
                "env": {"WHICH": "{name}-{replica}"}})
            assert status == 201, body
            await wait_for(all_ready(router, "gpu", 1), "the GPU replica")
            [replica] = replicas(router, "gpu")
            assert replica.pid is not None
            environ = environment_of(replica.pid)
            assert b"CUDA_VISIBLE_DEVICES=0" in environ and b"WHICH=gpu-0" in environ
            # Without the token, nothing changes.
            async with aiohttp.ClientSession() as session, session.post(
                    f"{router.admin_url}/v1/instances", json=good) as response:
                assert response.status == 401


# -- failures --------------------------------------------------------------------------------


async def test_kill_9_of_a_replica_under_load_costs_no_client_errors(
        router_factory: RouterFactory, tmp_path: Path) -> None:
    async with managed(router_factory, tmp_path,
                       [{"name": "echo", "command": ECHO, "replicas": 3}]) as (router, api):
        await wait_for(all_ready(router, "echo", 3), "3 replicas ready")
        victim = replicas(router, "echo")[1]
        old_pid = victim.pid
        assert old_pid is not None
        async with Traffic(router) as traffic:
            await traffic.settle(200)
            killed_at = time.monotonic()
            os.kill(old_pid, signal.SIGKILL)
            await wait_for(lambda: victim.pid not in (None, old_pid)
                           and all_ready(router, "echo", 3)(), "the replica serves again")
            back_in = time.monotonic() - killed_at
            await traffic.settle(200)
        assert traffic.errors == []
        assert victim.restarts["exited"] == 1
        served = {b["id"]: b["requests_total"] for b in router.app.registry.statistics()}
        assert served["echo-1"] > 0  # the new process serves
        print(f"kill -9 to serving again: {back_in:.2f} s "
              f"({traffic.ok} requests, 0 errors)")
        metrics = (await api.call("GET", "/metrics"))[1]
        assert 'router_instance_restarts_total{instance="echo",reason="exited"} 1.0' in metrics


async def test_a_command_that_exits_at_once_is_a_bounded_crash_loop(
        router_factory: RouterFactory, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    spawns = tmp_path / "spawns"
    command = ["sh", "-c", f"echo started >> {spawns}; echo dying >&2; exit 3"]
    window_s = 6.0
    async with managed(router_factory, tmp_path) as (_router, api):
        status, body = await api.call("POST", "/v1/instances", {
            "name": "broken", "command": command, "env": {"PORT": "{port}"}})
        assert status == 201, body
        await asyncio.sleep(window_s)  # the observation window itself
        count = len(spawns.read_text().splitlines())
        # 0.1 s doubling: starts at 0, 0.1, 0.3, 0.7 s; the 4th exit makes it crash_loop,
        # from then on one start per 0.8 s backoff (plus the start itself).
        bound = 4 + int(window_s / 0.8) + 1
        assert 4 <= count <= bound, count
        status, body = await api.call("GET", "/v1/instances/broken")
        [replica] = body["replicas"]
        assert replica["crash_loop"] is True
        assert replica["state"] in ("crash_loop", "starting")
        assert "exited with status 3" in replica["last_error"]
        assert replica["last_error_log"] == ["dying"]  # the tail of its output
        assert replica["restarts_by_reason"]["startup"] >= count - 1
        metrics = (await api.call("GET", "/metrics"))[1]
        assert 'router_instance_restarts_total{instance="broken",reason="startup"}' in metrics
        assert any("crash_loop" in r.getMessage() for r in caplog.records)
        print(f"spawns in {window_s:g} s: {count} (bound {bound})")


async def test_a_hung_replica_is_restarted_after_the_failure_threshold(
        router_factory: RouterFactory, tmp_path: Path) -> None:
    async with managed(router_factory, tmp_path,
                       [{"name": "echo", "command": ECHO}]) as (router, api):
        await wait_for(all_ready(router, "echo", 1), "ready")
        [replica] = replicas(router, "echo")
        hung = replica.pid
        assert hung is not None
        os.kill(hung, signal.SIGSTOP)  # alive, listening, answering nothing
        try:
            await wait_for(lambda: replica.restarts["health"] == 1, "restarted for its checks")
            assert replica.health_failures_total >= 3
            await wait_for(lambda: replica.pid not in (None, hung) and replica.state == "ready",
                           "a new process serves")
            assert not alive(hung)  # SIGTERM waits on a stopped process: it was killed
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.kill(hung, signal.SIGKILL)
        client = await router.client()
        assert await client.request(b"back") == b"back"
        metrics = (await api.call("GET", "/metrics"))[1]
        assert 'router_instance_health_check_failures_total{instance="echo"} 3.0' in metrics
        assert 'router_instance_restarts_total{instance="echo",reason="health"} 1.0' in metrics


async def test_rolling_restart_of_three_replicas_under_load_costs_no_client_errors(
        router_factory: RouterFactory, tmp_path: Path) -> None:
    async with managed(router_factory, tmp_path,
                       [{"name": "echo", "command": ECHO, "replicas": 3}]) as (router, api):
        await wait_for(all_ready(router, "echo", 3), "3 replicas ready")
        before = pids(router, "echo")
        async with Traffic(router) as traffic:
            await traffic.settle(200)
            status, body = await api.call("POST", "/v1/instances/echo/restart")
            assert status == 202 and body["rollout"]["state"] == "running", body
            await wait_for(lambda: router.app.instances.info("echo").rollout is not None
                           and router.app.instances.info("echo").rollout.state != "running",
                           "the rollout ends")
            await traffic.settle(200)
        assert traffic.errors == []
        info = router.app.instances.info("echo")
        assert info.rollout is not None and (info.rollout.state, info.rollout.done) == ("done", 3)
        after = pids(router, "echo")
        assert len(set(after)) == 3 and not set(after) & set(before)
        assert not any(alive(pid) for pid in before if pid is not None)
        assert [r.restarts["requested"] for r in replicas(router, "echo")] == [1, 1, 1]
        print(f"rolling restart of 3 replicas: {traffic.ok} requests, 0 errors")


# -- state, reload -----------------------------------------------------------------------------


async def test_a_restarted_router_starts_its_instances_again_from_the_state_file(
        router_factory: RouterFactory, tmp_path: Path) -> None:
    state = {"file": str(tmp_path / "state.toml")}
    configured = [{"name": "static", "command": ECHO}]
    async with managed(router_factory, tmp_path, configured, state=state) as (router, api):
        status, body = await api.call("POST", "/v1/instances", {
            "name": "added", "command": ECHO, "replicas": 2})
        assert status == 201, body
        assert (await api.call("PUT", "/v1/instances/static/replicas", {"replicas": 2}))[0] == 202
        await wait_for(all_ready(router, "added", 2), "added ready")
        await wait_for(all_ready(router, "static", 2), "static scaled")
        first = pids(router, "added") + pids(router, "static")
        await router.stop()
        assert not any(alive(pid) for pid in first if pid is not None)
    async with managed(router_factory, tmp_path, configured, state=state) as (router, api):
        await wait_for(all_ready(router, "added", 2), "added restored")
        await wait_for(all_ready(router, "static", 2), "static restored at its scale")
        status, listed = await api.call("GET", "/v1/instances")
        assert {(i["name"], i["origin"]) for i in listed} == {("static", "config"),
                                                              ("added", "api")}
        client = await router.client()
        assert await client.request(b"restored") == b"restored"


async def test_a_reload_adds_scales_and_removes_config_instances(tmp_path: Path) -> None:
    def config(instances: list[dict[str, Any]]) -> config_mod.RouterConfig:
        data = config_mod.merge(config_mod.merge(BASE_CONFIG, FAST),
                                {"manager": {"log_dir": str(tmp_path / "logs")}})
        return config_mod.from_mapping({**data, "instances": instances}, "<test>")

    kept = {"name": "d", "command": ECHO}  # unchanged by the reload, scaled by the API
    current = [config([{"name": "a", "command": ECHO}, {"name": "b", "command": ECHO}, kept])]
    app = RouterApp(current[0], source=lambda: current[0])
    try:
        async with asyncio.timeout(WAIT_S):
            await app.start()
        manager = app.instances
        assert [i.ready for i in manager.list_instances()] == [1, 1, 1]
        manager.scale("d", 2)
        assert manager.desired_state().scaled == {"d": 2}
        [b] = [r for r in manager.replicas() if r.instance.name == "b"]
        b_pid = b.pid
        current[0] = config([{"name": "a", "command": ECHO, "replicas": 2},
                             {"name": "c", "command": ECHO}, kept])
        outcome = await app.reload()
        assert outcome.error is None
        assert set(outcome.changes) == {"instance b: removed (drains, then stops)",
                                        "instance a: scaled to 2 replicas", "instance c: added"}

        def counts() -> dict[str, int]:
            return {i.name: i.ready for i in manager.list_instances()}
        await wait_for(lambda: counts() == {"a": 2, "c": 1, "d": 2},
                       "a scaled, b removed, c added, d as the API left it")
        assert manager.desired_state().scaled == {"d": 2}  # a follows the file: not saved
        await wait_for(lambda: not any(r.instance.name == "b" for r in manager.replicas()),
                       "b stopped")
        assert b_pid is not None and not alive(b_pid)
    finally:
        await app.close()


# -- the command line --------------------------------------------------------------------------


async def test_serve_replicas_for_kserve_answers_tritonclient_and_dies_with_the_router(
        tmp_path: Path) -> None:
    """``serve --replicas 3 -- CMD``: three KServe replicas behind the router, queried with
    tritonclient; a SIGKILL of the router takes every replica with it."""
    import numpy as np
    import tritonclient.grpc as triton

    proc = await launch(
        [sys.executable, "-m", "router", "serve", "--listen", "127.0.0.1:0",
         "--admin", "127.0.0.1:0", "--grpc-listen", "127.0.0.1:0",
         "--replicas", "3", "--protocol", "grpc", "--model", "sum",
         "--", "{python}", "-m", "backends.kserve", "--port", "{port}", "--models", "sum"],
        parse_banner, stderr=tmp_path / "router.stderr", cwd=REPO_ROOT,
        env={"PYTHONPATH": str(REPO_ROOT), "ROUTER_LOG_DIR": str(tmp_path / "logs"),
             "PATH": os.environ.get("PATH", "/usr/bin:/bin")},
        ready_timeout_s=WAIT_S)
    try:
        banner = proc.ready
        assert banner.grpc_target is not None
        async with aiohttp.ClientSession() as session, session.get(
                f"{banner.admin_url}/v1/instances/main") as response:
            info = await response.json()
        assert [r["state"] for r in info["replicas"]] == ["ready"] * 3
        replica_pids = [r["pid"] for r in info["replicas"]]

        def infer() -> list[float]:
            client = triton.InferenceServerClient(banner.grpc_target)
            try:
                tensor = triton.InferInput("INPUT0", [3], "FP32")
                tensor.set_data_from_numpy(np.array([1.0, 2.0, 3.0], dtype=np.float32))
                answers = [client.infer("sum", [tensor]).as_numpy("OUTPUT0").tolist()
                           for _ in range(12)]
            finally:
                client.close()
            assert all(a == answers[0] for a in answers)
            return list(answers[0])

        async with asyncio.timeout(WAIT_S):
            assert await asyncio.to_thread(infer) == [6.0]
        assert all(alive(pid) for pid in replica_pids)
        proc.kill()  # SIGKILL: the router cannot stop anything itself
        async with asyncio.timeout(WAIT_S):
            await proc.wait()
        await wait_for(lambda: not any(alive(pid) for pid in replica_pids),
                       "every replica gone with the router", timeout_s=10.0)
    finally:
        proc.kill()
        await proc.stop()


async def test_an_admin_api_without_a_replica_manager_answers_not_supported() -> None:
    registry = Registry()
    directory = BackendDirectory(registry, MemoryStore(MonotonicClock(asyncio.get_running_loop)),
                                 lambda spec: Backend(spec, GrpcCallLimiter(1, spec.address)))
    await directory.start()
    server = AdminServer(registry, CollectorRegistry(), Readiness(registry, Lifecycle()), dict,
                         _never_reload, AdminAuth(AdminConfig(), None), reload_certificates=list,
                         directory=directory)
    host, port = await server.start("127.0.0.1", 0)
    try:
        async with aiohttp.ClientSession() as session, session.get(
                f"http://{host}:{port}/v1/instances/x/logs") as response:
            assert response.status == 501
            assert (await response.json())["code"] == "NOT_SUPPORTED"
    finally:
        await server.close()
        await directory.close()


async def _never_reload() -> ReloadOutcome:
    raise AssertionError("this test never reloads")


def test_the_kserve_example_runs_its_backends_as_managed_replicas() -> None:
    config = config_mod.load(REPO_ROOT / "examples" / "kserve.toml")
    [instance] = config.instances
    assert (instance.protocol, instance.replicas, instance.models) == (
        "grpc", 2, ("identity", "sum"))
    assert config.backends == ()


async def test_a_replica_on_a_unix_socket_and_one_ready_by_its_probe(
        router_factory: RouterFactory, tmp_path: Path) -> None:
    quiet = ["sh", "-c", 'exec "$PY" -m backends.echo --port "$PORT" > /dev/null']
    async with managed(router_factory, tmp_path) as (router, api):
        status, body = await api.call("POST", "/v1/instances", {
            "name": "sock", "command": ["{python}", "-m", "backends.echo", "--unix", "{unix}"]})
        assert status == 201, body
        # Prints no READY line (stdout is /dev/null): ready once its probe answers.
        status, body = await api.call("POST", "/v1/instances", {
            "name": "quiet", "command": quiet, "env": {"PY": "{python}", "PORT": "{port}"}})
        assert status == 201, body
        await wait_for(all_ready(router, "sock", 1), "the unix socket replica")
        await wait_for(all_ready(router, "quiet", 1), "the replica without a READY line")
        [sock] = replicas(router, "sock")
        assert sock.address.startswith("unix:/") and sock.address.endswith("/sock-0.sock")
        client = await router.client()
        for i in range(20):
            assert await client.request(f"u{i}".encode()) == f"u{i}".encode()
        served = {b["id"] for b in router.app.registry.statistics() if b["requests_total"]}
        assert served == {"sock-0", "quiet-0"}


async def test_following_a_log_streams_new_lines_until_the_replica_goes(
        router_factory: RouterFactory, tmp_path: Path) -> None:
    chatty = ["sh", "-c", 'echo "READY $PORT"; i=0; while [ $i -lt 600 ]; do '
              'echo "line $i"; i=$((i+1)); sleep 0.05; done; sleep 60']
    async with managed(router_factory, tmp_path,
                       manager={"health": {"max_failures_before_restart": 0}}
                       ) as (router, api):
        status, body = await api.call("POST", "/v1/instances", {
            "name": "chatty", "command": chatty, "env": {"PORT": "{port}"}})
        assert status == 201, body
        await wait_for(lambda: any(r.state in ("ready", "unhealthy")
                                   for r in replicas(router, "chatty")), "announced")
        headers = {"Authorization": f"Bearer {TOKEN}"}
        async with aiohttp.ClientSession(router.admin_url, headers=headers) as session, \
                session.get("/v1/instances/chatty/logs",
                            params={"follow": "true", "start": "-2"}) as response:
            assert response.status == 200
            assert response.content_type == "text/plain"
            seen: list[str] = []
            async with asyncio.timeout(WAIT_S):
                while len(seen) < 12:
                    seen.append((await response.content.readline()).decode().rstrip("\n"))
            numbers = [int(line.split()[1]) for line in seen if line.startswith("line ")]
            assert len(numbers) >= 10
            assert numbers == list(range(numbers[0], numbers[0] + len(numbers)))  # no gaps
            status, _ = await api.call("DELETE", "/v1/instances/chatty")
            assert status == 200
            async with asyncio.timeout(WAIT_S):
                rest = await response.content.read()  # the stream ends with the replica
            assert rest.count(b"\n") < 100
