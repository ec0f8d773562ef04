"""Backends that join the fleet by themselves: ``router.client.registration`` and the echo and
KServe backends' ``--register``, against real router processes (the CLI) over loopback.

What is shown: registration makes a backend routable at once and heartbeats keep it; a frozen
backend's lease expires, it drains and is removed, and it registers again once it runs (its
heartbeat gets LEASE_NOT_FOUND); SIGTERM of a backend under steady load costs the clients
nothing; after a router restart the registered backends are back within one heartbeat
interval, and clients that keep the retry contract see no error, only NO_BACKEND answers
(retried) inside that interval; unix-socket backends of both protocols register too; a
router that is down when a backend starts is retried, logged once, until it answers; a
refused registration (token) fails at once.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest

from router.client.frames import ConnectionLost, ErrorReply, RetryingClient
from router.client.registration import Registration, RegistrationRefused, reported_use
from router.control.directory import LoadReport
from router.core.types import MAX_REPORTED_MODELS
from tests.conftest import EchoBackend, RouterFactory
from tests.grpc_support import MODEL_INFER, KServeBackend, infer_request, output_values
from tests.support import REPO_ROOT, child_env
from tests.test_reload import ADMIN_TOKEN, Served, config, served

WAIT_S = 20.0
# A lease short enough that expiry and re-registration take a second or two, long enough
# that a loaded 2-core machine renews it in time: a heartbeat every 0.5 s.
TTL_S = 1.5
# Answers the retry contract says to resend after a pause (docs/protocol.md): the request
# never reached a backend.
RETRIED_CODES = frozenset({"NO_BACKEND", "DRAINING", "OVERLOADED"})
RETRY_PAUSE_S = 0.02


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _token_file(tmp_path: Path) -> Path:
    """The admin token ``tests.test_reload.served`` configures (written beside the config)."""
    path = tmp_path / "admin.token"
    path.write_text(ADMIN_TOKEN)
    return path


def _register(router: Served, tmp_path: Path, ttl_s: float = TTL_S) -> list[str]:
    return ["--register", router.proc.ready.admin_url, "--lease-ttl", str(ttl_s),
            "--token-file", str(_token_file(tmp_path))]


async def _directory(router: Served) -> dict[str, dict[str, Any]]:
    status, listed = await router.request("GET", "/v1/backends")
    assert status == 200, listed
    return {b["id"]: b for b in listed}


async def _wait_for(router: Served, what: str,
                    condition: Callable[[dict[str, dict[str, Any]]], bool]) -> None:
    async def holds() -> bool:
        return condition(await _directory(router))

    await router.wait_until(holds, what)


async def _data_plane_state(router: Served, address: str, state: str | None) -> bool:
    """Whether GET /backends shows the backend at ``address`` in ``state`` (None: absent)."""
    _, listed = await router.request("GET", "/backends")
    states = {b["address"]: b["state"] for b in listed}
    return states.get(address) == state


async def _echo(router: Served, payload: bytes) -> bytes:
    client = RetryingClient([router.listen])
    try:
        async with asyncio.timeout(WAIT_S):
            return await client.request(payload)
    finally:
        await client.close()


async def _wait_exit(backend: EchoBackend | KServeBackend) -> int:
    return await asyncio.to_thread(backend.proc.wait, WAIT_S)


# -- steady client load that keeps the retry contract ----------------------------------------------


@dataclass
class Load:
    """``clients`` connections sending one request after another (unique payloads, each
    answer checked). A request answered NO_BACKEND/DRAINING/OVERLOADED, or whose router
    cannot be reached, is resent after a short pause (the retry contract; ``retried`` keeps
    when and why); anything else is an error."""

    addresses: list[tuple[str, int]]
    clients: int = 4
    answered: int = 0
    retried: list[tuple[float, str]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    _stop: asyncio.Event = field(default_factory=asyncio.Event)
    _progress: asyncio.Event = field(default_factory=asyncio.Event)  # an answer, or an error
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._run(i)) for i in range(self.clients)]

    async def answered_at_least(self, count: int) -> None:
        """Until ``count`` requests are answered in all (or a client failed)."""
        async with asyncio.timeout(WAIT_S):
            while self.answered < count and not self.errors:
                self._progress.clear()
                await self._progress.wait()

    async def stop(self) -> None:
        self._stop.set()
        async with asyncio.timeout(WAIT_S):
            await asyncio.gather(*self._tasks)

    async def _run(self, index: int) -> None:
        client = RetryingClient(self.addresses, connect_timeout_s=1.0)
        sent = 0
        try:
            while not self._stop.is_set():
                payload = f"c{index}-{sent}".encode()
                sent += 1
                try:
                    answer = await self._call(client, payload)
                except Exception as exc:  # every failure is recorded: the test asserts none
                    self._fail(f"{payload!r}: {type(exc).__name__}: {exc}")
                    return
                if answer != payload:
                    self._fail(f"{payload!r} answered {answer!r}")
                    return
                self.answered += 1
                self._progress.set()
        finally:
            await client.close()

    def _fail(self, error: str) -> None:
        self.errors.append(error)
        self._progress.set()

    async def _call(self, client: RetryingClient, payload: bytes) -> bytes:
        async with asyncio.timeout(WAIT_S):
            while True:
                try:
                    return await client.request(payload)
                except ErrorReply as exc:
                    if exc.code not in RETRIED_CODES:
                        raise
                    self.retried.append((time.monotonic(), exc.code))
                except ConnectionLost:
                    self.retried.append((time.monotonic(), "UNREACHABLE"))
                await asyncio.sleep(RETRY_PAUSE_S)


@pytest.fixture
async def load() -> AsyncIterator[Callable[..., Load]]:
    started: list[Load] = []

    def start(addresses: list[tuple[str, int]], clients: int = 4) -> Load:
        running = Load(addresses, clients)
        running.start()
        started.append(running)
        return running

    yield start
    for running in started:
        await running.stop()


# -- register, heartbeat, expiry -------------------------------------------------------------------


async def test_a_registered_backend_is_routable_at_once_and_heartbeats_keep_it(
    echo_backend: Callable[..., EchoBackend], tmp_path: Path
) -> None:
    async with served(tmp_path, config()) as router:
        backend = echo_backend(*_register(router, tmp_path), "--models", "echo")
        # READY comes after the registration answered: no wait before the first request.
        assert await _echo(router, b"at once") == b"at once"
        [info] = (await _directory(router)).values()
        assert (info["id"], info["address"], info["source"]) == (
            backend.address, backend.address, "registered")
        assert (info["models"], info["lease_ttl_s"], info["state"]) == (["echo"], TTL_S,
                                                                          "healthy")

        # Three lease lifetimes later it is still there, renewed about every TTL/3.
        async def renewed_six_times() -> bool:
            return await router.metric('router_heartbeats_total{result="ok"}') >= 6

        await router.wait_until(renewed_six_times, "six heartbeats")
        assert (await _directory(router))[backend.address]["reported"] == {
            "inflight": 0, "loaded_models": None, "model_use": None}
        assert await router.metric("router_lease_expirations_total") == 0
        assert await _echo(router, b"still") == b"still"


async def test_a_frozen_backend_expires_drains_is_removed_and_registers_again_once_thawed(
    echo_backend: Callable[..., EchoBackend], tmp_path: Path
) -> None:
    data = config(dispatch={"request_timeout_s": 2.0, "max_retries": 0},
                  health={"interval_s": 60.0})  # the lease, not a probe, takes it out
    async with served(tmp_path, data) as router:
        backend = echo_backend(*_register(router, tmp_path))
        backend.proc.send_signal(signal.SIGSTOP)
        try:
            client = RetryingClient([router.listen])
            stuck = asyncio.ensure_future(client.request(b"to a frozen backend"))
            # The lease expired: draining while the request in flight there lasts.
            await router.wait_until(lambda: _data_plane_state(router, backend.address,
                                                              "draining"), "draining")
            assert (await _directory(router))[backend.address]["state"] == "draining"
            _, plane = await router.request("GET", f"/backends/{backend.address}")
            assert (plane["state"], plane["inflight"]) == ("draining", 1)
            assert await router.metric("router_lease_expirations_total") == 1
            with pytest.raises(ErrorReply) as timed_out:  # request_timeout_s, then it leaves
                async with asyncio.timeout(WAIT_S):
                    await stuck
            assert timed_out.value.code == "BACKEND_TIMEOUT"
            await router.wait_until(lambda: _data_plane_state(router, backend.address, None),
                                    "removed")
        finally:
            backend.proc.send_signal(signal.SIGCONT)
        # Its next heartbeat is answered LEASE_NOT_FOUND: it registers again, and is routed.
        await _wait_for(router, "registered again",
                        lambda d: d.get(backend.address, {}).get("state") == "healthy")
        assert await router.metric('router_heartbeats_total{result="lease_not_found"}') >= 1
        assert await router.metric('router_registrations_total{result="created"}') == 2
        assert await client.request(b"thawed") == b"thawed"
        await client.close()


# -- leaving -----------------------------------------------------------------------------------


async def test_sigterm_of_a_registered_backend_under_load_costs_the_clients_nothing(
    echo_backend: Callable[..., EchoBackend], load: Callable[..., Load], tmp_path: Path
) -> None:
    # No retries in the router: a request lost by the leaving backend would reach a client.
    async with served(tmp_path, config(dispatch={"max_retries": 0})) as router:
        leaving = echo_backend(*_register(router, tmp_path), "--delay-ms", "20")
        staying = echo_backend(*_register(router, tmp_path), "--delay-ms", "20")
        running = load([router.listen], clients=8)
        await running.answered_at_least(200)
        served_before = (await router.requests_by_backend())[leaving.address]
        assert served_before > 0

        leaving.proc.terminate()  # deregister, then finish what is in flight, then exit
        assert await _wait_exit(leaving) == 0
        assert leaving.address not in await _directory(router)
        after = running.answered
        await running.answered_at_least(after + 200)
        await running.stop()

        assert running.errors == []
        assert running.retried == []  # not even a NO_BACKEND: the other backend took it all
        assert (await _directory(router))[staying.address]["state"] == "healthy"
        assert leaving.address not in await router.backends()
        assert await router.metric("router_requests_dropped_total") == 0


async def test_after_a_router_restart_registered_backends_are_back_within_one_interval(
    echo_backend: Callable[..., EchoBackend], load: Callable[..., Load], tmp_path: Path
) -> None:
    """Only registered backends: the restarted router knows none of them until their next
    heartbeat gets LEASE_NOT_FOUND and they register again, at most one heartbeat interval
    (TTL/3 = 1 s here) after it is up. Clients keeping the retry contract see no error: the
    requests answered NO_BACKEND in that window (and those refused while no router listened)
    are resent and answered. The test measures the window and requires it under the interval
    plus 1 s of slack for a loaded machine."""
    ttl_s, interval_s = 3.0, 1.0
    ports = {"listener": {"listen": f"127.0.0.1:{_free_port()}"},
             "admin": {"listen": f"127.0.0.1:{_free_port()}"},
             "drain": {"shutdown_grace_s": 5.0, "linger_s": 0.2}}
    async with served(tmp_path, config(**ports)) as router:
        backends = [echo_backend(*_register(router, tmp_path, ttl_s)) for _ in range(2)]
        address = router.listen
        running = load([address])
        await running.answered_at_least(100)
    down_at = time.monotonic()
    async with served(tmp_path, config(**ports)) as router:
        up_at = time.monotonic()
        await _wait_for(router, "both registered again",
                        lambda d: {b.address for b in backends} <= d.keys())
        back_at = time.monotonic()
        answered = running.answered
        await running.answered_at_least(answered + 100)
        await running.stop()
        assert await router.metric('router_registrations_total{result="created"}') == 2

    no_backend = [at for at, code in running.retried if code == "NO_BACKEND"]
    window_s = max(no_backend, default=up_at) - up_at
    figures = (f"router down {up_at - down_at:.2f} s; backends back {back_at - up_at:.2f} s "
               f"after it was up; NO_BACKEND answered for {window_s:.2f} s "
               f"({len(no_backend)} retries); {running.answered} answered, 0 lost")
    print(figures)
    assert running.errors == [], figures
    assert {code for _, code in running.retried} <= {"NO_BACKEND", "DRAINING",
                                                     "UNREACHABLE"}, running.retried
    assert back_at - up_at <= interval_s + 1.0, figures
    assert window_s <= interval_s + 1.0, figures
    assert all(at >= down_at - 1.0 for at, _ in running.retried), figures


# -- unix sockets, both protocols ------------------------------------------------------------------


async def test_unix_socket_backends_of_both_protocols_register_and_deregister(
    echo_backend: Callable[..., EchoBackend], kserve_backend: Callable[..., KServeBackend],
    tmp_path: Path
) -> None:
    data = config(grpc={"listen": "127.0.0.1:0"})
    async with served(tmp_path, data) as router:
        frames = echo_backend(*_register(router, tmp_path), unix=tmp_path / "echo.sock")
        kserve = kserve_backend(*_register(router, tmp_path), "--models", "sum",
                                unix=tmp_path / "kserve.sock")
        listed = await _directory(router)
        assert listed[f"unix:{tmp_path}/echo.sock"]["protocol"] == "frames"
        assert listed[f"unix:{tmp_path}/kserve.sock"]["protocol"] == "grpc"
        assert listed[f"unix:{tmp_path}/kserve.sock"]["models"] == ["sum"]

        assert await _echo(router, b"over a unix socket") == b"over a unix socket"
        target = router.proc.ready.grpc_target
        assert target is not None
        async with grpc.aio.insecure_channel(target) as channel:
            infer = channel.unary_unary(MODEL_INFER)
            answer = await infer(infer_request("sum", [1.0, 2.0]), timeout=WAIT_S)
        assert output_values(answer) == [3.0]
        await _wait_for(router, "the KServe backend's load report",
                        lambda d: d[kserve.address]["reported"] is not None)
        assert (await _directory(router))[kserve.address]["reported"] == {
            "inflight": 0, "loaded_models": ["sum"], "model_use": {}}

        for backend in (kserve, frames):
            backend.proc.terminate()
            assert await _wait_exit(backend) == 0
            assert backend.address not in await _directory(router)
        assert await router.metric('router_registrations_total{result="created"}') == 2


# -- the client in process: a router that is down, a refusal ---------------------------------------


async def test_a_router_down_at_start_is_retried_logged_once_and_joined_when_up(
    echo_backend: Callable[..., EchoBackend], router_factory: RouterFactory, tmp_path: Path,
    caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="router.client.registration")
    backend = echo_backend()
    admin_port = _free_port()
    url = f"http://127.0.0.1:{admin_port}"
    async with Registration(url, address=backend.address, lease_ttl_s=0.9,
                            token=ADMIN_TOKEN) as registration:
        assert registration.state == "unreachable"  # entering does not wait for the router
        await asyncio.sleep(1.0)  # the router stays down a while: several retries
        assert registration.statistics()["failed"] >= 3
        router = await router_factory([], {"admin": {
            "listen": f"127.0.0.1:{admin_port}", "token_file": str(_token_file(tmp_path))}})
        up_at = time.monotonic()
        async with asyncio.timeout(WAIT_S):
            await registration.wait_registered()
        # Retries are at most one heartbeat interval (0.3 s) apart; slack for the machine.
        assert time.monotonic() - up_at <= 0.3 + 1.0
        assert [b.address for b in router.app.registry] == [backend.address]
        client = await router.client()
        assert await client.request(b"joined") == b"joined"
    assert registration.deregistered
    assert backend.address not in [b.address for b in router.app.registry if not b.draining]
    logged = [(r.levelname, r.getMessage()) for r in caplog.records
              if r.name == "router.client.registration"]
    assert [level for level, _ in logged] == ["WARNING", "INFO", "INFO"], logged
    assert "cannot register" in logged[0][1] and "registered" in logged[1][1]
    assert "deregistered" in logged[2][1]


async def test_each_heartbeat_carries_the_model_use_the_caller_counts(
    echo_backend: Callable[..., EchoBackend], router_factory: RouterFactory, tmp_path: Path
) -> None:
    backend = echo_backend()
    router = await router_factory([], {"admin": {"token_file": str(_token_file(tmp_path))}})
    reports: asyncio.Queue[LoadReport] = asyncio.Queue()
    router.app.directory.add_report_listener(lambda _, report: reports.put_nowait(report))
    use = {"m": 2, "idle": 0}
    async with Registration(router.admin_url, address=backend.address, token=ADMIN_TOKEN,
                            heartbeat_interval_s=0.1, model_use=lambda: use):
        async with asyncio.timeout(WAIT_S):
            first = await reports.get()
            use = {"m": 1, "n": 4}
            while (report := await reports.get()).model_use != use:  # bounded by the timeout
                assert report.model_use == {"m": 2}
        # None of them came through this router: all another's, as its view keeps them.
        assert router.app.residency.foreign(backend.address, "n") == 4
    assert first.model_use == {"m": 2}  # a model with no request is left out


async def test_report_soon_sends_the_next_heartbeat_now_and_at_most_once_a_gap(
    echo_backend: Callable[..., EchoBackend], router_factory: RouterFactory, tmp_path: Path
) -> None:
    backend = echo_backend()
    router = await router_factory([], {"admin": {"token_file": str(_token_file(tmp_path))}})
    reports: asyncio.Queue[tuple[float, LoadReport]] = asyncio.Queue()
    router.app.directory.add_report_listener(
        lambda _, report: reports.put_nowait((time.monotonic(), report)))
    held = ["a"]
    gap_s = 0.3
    # Heartbeats 60 s apart: every report in this test is one report_soon() brought forward.
    async with Registration(router.admin_url, address=backend.address, token=ADMIN_TOKEN,
                            lease_ttl_s=90.0, heartbeat_interval_s=60.0, min_report_gap_s=gap_s,
                            loaded_models=lambda: held) as registration:
        async with asyncio.timeout(WAIT_S):
            registration.report_soon()
            first_at, first = await reports.get()
            held = ["a", "b"]
            registration.report_soon()
            registration.report_soon()  # asked twice before it was due: one heartbeat
            second_at, second = await reports.get()
        assert (first.loaded_models, second.loaded_models) == (("a",), ("a", "b"))
        # Sent gap_s apart (the client's clock); each arrives within ms of its send.
        assert second_at - first_at >= gap_s - 0.02


def test_a_report_keeps_the_largest_counts_when_more_models_are_in_use_than_it_holds() -> None:
    use = {f"m{i}": i for i in range(MAX_REPORTED_MODELS + 10)}
    kept = reported_use(use)
    assert len(kept) == MAX_REPORTED_MODELS
    assert min(kept.values()) == 10 and "m0" not in kept
    assert LoadReport(model_use=kept).model_use == kept  # what the router accepts


@pytest.mark.parametrize(("token", "code"), [(None, "UNAUTHORIZED"), ("wrong", "FORBIDDEN")])
async def test_a_refused_registration_fails_at_once(
    router_factory: RouterFactory, tmp_path: Path, token: str | None, code: str
) -> None:
    router = await router_factory([], {"admin": {"token_file": str(_token_file(tmp_path))}})
    with pytest.raises(RegistrationRefused) as refused:
        async with Registration(router.admin_url, address="127.0.0.1:9", token=token):
            pytest.fail("entered a refused registration")
    assert refused.value.code == code
    assert list(router.app.registry) == []


async def test_a_backend_whose_registration_is_refused_exits_saying_why(
    router_factory: RouterFactory, tmp_path: Path
) -> None:
    router = await router_factory([], {"admin": {"token_file": str(_token_file(tmp_path))}})
    wrong = tmp_path / "wrong.token"
    wrong.write_text("not the token\n")
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "backends.echo", "--port", "0", "--register", router.admin_url,
        "--token-file", str(wrong), cwd=REPO_ROOT, env=child_env(),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    async with asyncio.timeout(WAIT_S):
        stdout, stderr = await process.communicate()
    assert process.returncode == 1
    assert "READY" not in stdout.decode()
    assert "refused" in stderr.decode() and "FORBIDDEN" in stderr.decode()


def test_a_router_url_is_the_admin_apis_http_url() -> None:
    with pytest.raises(ValueError, match="http"):
        Registration("127.0.0.1:7072", address="127.0.0.1:9001")
