"""Unix-socket backends (``unix:/path``) for both protocols, and a router that starts with no
backends at all: the config rules, the READY line, and real echo and KServe processes on
sockets in tmp_path routed through real routers (in process, and the CLI with SIGHUP)."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pytest

from router.app import RouterApp
from router.client.frames import ErrorReply, FrameClient
from router.core.config import MAX_UNIX_PATH_BYTES, from_mapping
from router.core.errors import ConfigError
from router.core.types import BackendSpec
from router.protocol.announce import format_ready, format_ready_unix, ready_port, ready_unix_path
from tests.conftest import EchoBackend, RouterFactory
from tests.grpc_support import (
    CALL_TIMEOUT_S,
    MODEL_INFER,
    GrpcRouter,
    GrpcRouterFactory,
    KServeBackend,
    grpc_backend,
    infer_request,
    output_values,
)
from tests.support import BASE_CONFIG
from tests.test_reload import Served, config, served

WAIT_S = 20.0
# Probes are run by hand (``check_all``); the loop's own passes stay out of the way.
QUIET_HEALTH = {"health": {"interval_s": 60.0, "failure_threshold": 1},
                "dispatch": {"max_retries": 0}}


def _config(*backends: dict[str, Any], **sections: Any) -> Any:
    return from_mapping({**sections, "backends": list(backends)}, "<test>")


def _problems(*backends: dict[str, Any], **sections: Any) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        _config(*backends, **sections)
    return caught.value.problems


# -- the address, the spec and the READY line ---------------------------------------------------


def test_a_unix_address_is_a_backend_of_either_protocol() -> None:
    cfg = _config({"address": "unix:/run/echo.sock"},
                  {"address": "unix:/run/kserve.sock", "protocol": "grpc", "models": ["m"]})
    assert [b.address for b in cfg.backends] == ["unix:/run/echo.sock", "unix:/run/kserve.sock"]
    assert all(b.is_unix for b in cfg.backends)
    assert cfg.tls_of(cfg.backends[0]) is None


@pytest.mark.parametrize(("address", "why"), [
    ("unix:run/echo.sock", "expected unix:/absolute/path"),
    ("unix://host/echo.sock", "expected unix:/absolute/path"),
    ("unix:", "expected unix:/absolute/path"),
    ("unix:/" + "a" * MAX_UNIX_PATH_BYTES, f"at most {MAX_UNIX_PATH_BYTES} bytes"),
])
def test_a_unix_address_is_absolute_and_fits_sun_path(address: str, why: str) -> None:
    [problem] = _problems({"address": address})
    assert problem.startswith("<test>: backends[0].address: ") and why in problem, problem


def test_a_unix_path_of_exactly_the_limit_is_accepted() -> None:
    path = "/" + "a" * (MAX_UNIX_PATH_BYTES - 1)
    assert _config({"address": f"unix:{path}"}).backends[0].address == f"unix:{path}"


def test_a_unix_backend_has_no_command() -> None:
    [problem] = _problems({"address": "unix:/run/echo.sock", "command": ["echo"]})
    assert "backends[0]" in problem and "command needs a HOST:PORT address" in problem


def test_tls_over_a_unix_socket_is_refused_clearly() -> None:
    own = _problems({"address": "unix:/run/e.sock", "tls": {"ca_file": "ca.pem"}})
    assert own == ["<test>: backends[0].address: TLS over a unix socket is not supported (its "
                   "tls table turns it on): set tls = { enabled = false } on this backend"]
    shared = _problems({"address": "10.0.0.1:9000"}, {"address": "unix:/run/e.sock"},
                       {"address": "unix:/run/f.sock"}, backend_tls={"enabled": True})
    assert [p.split(": TLS")[0] for p in shared] == ["<test>: backends[1].address",
                                                     "<test>: backends[2].address"]
    assert all("([backend_tls] turns it on)" in p for p in shared)
    cfg = _config({"address": "10.0.0.1:9000"},
                  {"address": "unix:/run/e.sock", "tls": {"enabled": False}},
                  backend_tls={"enabled": True})
    assert cfg.tls_of(cfg.backends[0]) is not None and cfg.tls_of(cfg.backends[1]) is None


def test_one_unix_path_twice_is_an_address_in_use() -> None:
    [problem] = _problems({"address": "unix:/run/e.sock"}, {"address": "unix:/run/e.sock"})
    assert "backends[1].address" in problem and "already used by backends[0].address" in problem


def test_a_unix_spec_says_so_and_has_no_host_or_port() -> None:
    spec = BackendSpec(id="u", address="unix:/run/e.sock")
    assert spec.is_unix and spec.unix_path == "/run/e.sock"
    with pytest.raises(ValueError, match="no host"):
        _ = spec.host
    with pytest.raises(ValueError, match="no port"):
        _ = spec.port
    tcp = BackendSpec(id="t", address="[::1]:9000")
    assert not tcp.is_unix and (tcp.host, tcp.port) == ("::1", 9000)
    with pytest.raises(ValueError, match="not a unix socket"):
        _ = tcp.unix_path


def test_the_ready_line_names_a_port_or_a_unix_path() -> None:
    assert ready_unix_path([format_ready_unix("/tmp/x/e.sock")]) == "/tmp/x/e.sock"
    assert ready_port([format_ready(8000)]) == 8000
    assert ready_port([format_ready_unix("/tmp/e.sock")]) is None
    assert ready_unix_path([format_ready(8000)]) is None
    assert ready_unix_path(["READY unix:relative.sock"]) is None
    assert ready_unix_path(["READY unix:/a.sock", "a later line"]) is None
    assert ready_unix_path([]) is None


async def test_a_unix_backend_is_never_resolved_as_a_host_name() -> None:
    asked: list[tuple[str, int]] = []

    async def resolver(host: str, port: int) -> list[str]:
        asked.append((host, port))
        raise OSError("no resolution expected")

    data = {**BASE_CONFIG, "backends": [{"address": "unix:/nonexistent/e.sock"}]}
    app = RouterApp(from_mapping(data, "<test>"), resolver=resolver)
    try:
        await app.start()
        assert [b.address for b in app.registry] == ["unix:/nonexistent/e.sock"]
        assert app.fleet.statistics()["names"] == 0
    finally:
        await app.close()
    assert asked == []


# -- real processes on unix sockets ---------------------------------------------------------------


async def _admin_get(url: str) -> tuple[int, str]:
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        return response.status, await response.text()


async def _probe_until(app: RouterApp, address: str, healthy: bool) -> int:
    """Health passes (bounded) until the backend's state is ``healthy``; how many it took."""
    async with asyncio.timeout(WAIT_S):
        for passes in range(1, 101):
            await app.health.check_all()
            backend = app.registry.get(address)
            assert backend is not None
            if backend.healthy is healthy:
                return passes
            await asyncio.sleep(0.1)  # a gRPC channel's reconnect backoff (0.1 to 0.5 s)
    raise AssertionError(f"{address} never became healthy={healthy}")


async def test_a_frame_backend_on_a_unix_socket_is_routed_probed_and_comes_back(
    echo_backend: Callable[..., EchoBackend], router_factory: RouterFactory, tmp_path: Path
) -> None:
    sock = tmp_path / "echo.sock"
    backend = echo_backend(unix=sock)
    address = f"unix:{sock}"
    assert backend.address == address
    router = await router_factory([address], QUIET_HEALTH)
    client = await router.client()
    async with asyncio.timeout(WAIT_S):
        for i in range(20):
            assert await client.request(b"u%d" % i) == b"u%d" % i
    assert router.backend_stats()[address]["requests_total"] == 20
    await router.app.health.check_all()
    assert router.app.health.statistics()["probes_failed"] == 0
    status, listed = await _admin_get(router.admin_url + "/backends")
    assert status == 200 and f'"address":"{address}"' in listed.replace(" ", "")
    _, metrics = await _admin_get(router.admin_url + "/metrics")
    assert f'router_backend_requests_total{{backend="{address}"}} 20.0' in metrics

    backend.kill()  # its socket file stays behind, as after any crash
    assert sock.is_socket()
    async with asyncio.timeout(WAIT_S):
        with pytest.raises(ErrorReply) as caught:
            await client.request(b"down")
    assert caught.value.code == "BACKEND_UNAVAILABLE"
    assert router.backend_stats()[address]["healthy"] is False
    failed = router.app.health.statistics()["probes_failed"]
    await router.app.health.check_all()
    assert router.app.health.statistics()["probes_failed"] == failed + 1
    assert router.backend_stats()[address]["healthy"] is False

    echo_backend(unix=sock)  # back on the same path (the stale socket file is replaced)
    await _probe_until(router.app, address, healthy=True)
    async with asyncio.timeout(WAIT_S):
        assert await client.request(b"back") == b"back"


async def test_a_unix_backend_added_at_run_time_is_served(
    echo_backend: Callable[..., EchoBackend], router_factory: RouterFactory, tmp_path: Path
) -> None:
    """A spec that comes from no config entry (as a registered backend's) gets its upstream
    from ``backend_of``: a router started with none serves it once it is in the registry."""
    router = await router_factory([])
    client = await router.client()
    async with asyncio.timeout(WAIT_S):
        with pytest.raises(ErrorReply) as caught:
            await client.request(b"early")
        assert caught.value.code == "NO_BACKEND"
        backend = echo_backend(unix=tmp_path / "joined.sock")
        spec = BackendSpec(id="w1", address=backend.address, source="registered")
        router.app.registry.add(router.app.backend_of(spec))
        assert await client.request(b"late") == b"late"
    assert router.backend_stats()[backend.address]["source"] == "registered"
    with pytest.raises(ValueError, match="TLS over a unix socket"):
        router.app.backend_of(spec, tls=object())  # type: ignore[arg-type]


async def _infer(router: GrpcRouter, values: list[float]) -> list[float]:
    async with router.channel() as channel:
        infer = channel.unary_unary(MODEL_INFER)
        return output_values(await infer(infer_request("identity", values),
                                         timeout=CALL_TIMEOUT_S))


async def test_a_kserve_backend_on_a_unix_socket_is_routed_probed_and_comes_back(
    kserve_backend: Callable[..., KServeBackend], grpc_router: GrpcRouterFactory,
    tmp_path: Path,
) -> None:
    sock = tmp_path / "kserve.sock"
    backend = kserve_backend("--models", "identity", unix=sock)
    address = f"unix:{sock}"
    assert backend.address == address
    router = await grpc_router([grpc_backend(address, "identity")], QUIET_HEALTH)
    for i in range(5):
        assert await _infer(router, [float(i), 2.0]) == [float(i), 2.0]
    assert router.backend(address)["requests_total"] == 5
    await router.app.health.check_all()
    assert router.app.health.statistics()["probes_failed"] == 0
    assert router.backend(address)["healthy"] is True
    _, metrics = await _admin_get(router.admin_url + "/metrics")
    assert f'router_backend_requests_total{{backend="{address}"}} 5.0' in metrics

    backend.kill()
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await _infer(router, [1.0])
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE, caught.value
    assert router.backend(address)["healthy"] is False
    failed = router.app.health.statistics()["probes_failed"]
    await router.app.health.check_all()
    assert router.app.health.statistics()["probes_failed"] == failed + 1

    kserve_backend("--models", "identity", unix=sock)  # back on the same path
    await _probe_until(router.app, address, healthy=True)
    assert await _infer(router, [7.0]) == [7.0]


# -- no backends at start -----------------------------------------------------------------------


async def test_with_no_backends_tcp_answers_no_backend_and_readyz_is_503(
    router_factory: RouterFactory,
) -> None:
    router = await router_factory([])
    client = await router.client()
    async with asyncio.timeout(WAIT_S):
        with pytest.raises(ErrorReply) as caught:
            await client.request(b"anyone?")
    assert caught.value.code == "NO_BACKEND"
    status, _ = await _admin_get(router.admin_url + "/readyz")
    assert status == 503
    assert router.app.stats.accepted == 1


async def test_with_no_backends_grpc_answers_unavailable_no_backend(
    grpc_router: GrpcRouterFactory,
) -> None:
    router = await grpc_router([])
    async with router.channel() as channel:
        infer = channel.unary_unary(MODEL_INFER)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await infer(infer_request("identity", [1.0]), timeout=CALL_TIMEOUT_S)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE, caught.value
    assert dict(caught.value.trailing_metadata() or ())["x-router-error"] == "NO_BACKEND"
    status, _ = await _admin_get(router.admin_url + "/readyz")
    assert status == 503


async def _grpc_infer(target: str) -> grpc.aio.AioRpcError | list[float]:
    async with grpc.aio.insecure_channel(target) as channel:
        infer = channel.unary_unary(MODEL_INFER)
        try:
            return output_values(await infer(infer_request("identity", [3.0]),
                                             timeout=CALL_TIMEOUT_S))
        except grpc.aio.AioRpcError as exc:
            return exc


async def _frame(served_router: Served, payload: bytes) -> bytes | ErrorReply:
    client = await FrameClient.connect(*served_router.listen)
    try:
        async with asyncio.timeout(WAIT_S):
            return await client.request(payload)
    except ErrorReply as exc:
        return exc
    finally:
        await client.close()


async def test_the_cli_starts_with_no_backends_and_serves_unix_ones_added_by_sighup(
    echo_backend: Callable[..., EchoBackend], kserve_backend: Callable[..., KServeBackend],
    tmp_path: Path,
) -> None:
    grpc_listen = {"listen": "127.0.0.1:0"}
    async with served(tmp_path, config(grpc=grpc_listen)) as router:
        grpc_target = router.proc.ready.grpc_target
        assert grpc_target is not None
        refused = await _frame(router, b"before")
        assert isinstance(refused, ErrorReply) and refused.code == "NO_BACKEND"
        unavailable = await _grpc_infer(grpc_target)
        assert isinstance(unavailable, grpc.aio.AioRpcError)
        assert unavailable.code() == grpc.StatusCode.UNAVAILABLE
        assert dict(unavailable.trailing_metadata() or ())["x-router-error"] == "NO_BACKEND"
        assert (await router.request("GET", "/readyz"))[0] == 503

        echo = echo_backend(unix=tmp_path / "e.sock")
        kserve = kserve_backend("--models", "identity", unix=tmp_path / "k.sock")
        router.write(config(echo.address, grpc_backend(kserve.address, "identity"),
                            grpc=grpc_listen))
        router.proc.send_signal(signal.SIGHUP)

        async def joined() -> bool:
            return set(await router.backends()) == {echo.address, kserve.address}

        await router.wait_until(joined, "both unix backends joined")
        assert await _frame(router, b"after") == b"after"
        assert await _grpc_infer(grpc_target) == [3.0]
        assert (await router.request("GET", "/readyz"))[0] == 200
