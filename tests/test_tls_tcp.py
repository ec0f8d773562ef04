"""TLS on the length-prefixed listener, end to end over loopback with real echo backends: the
handshake, mutual TLS and its allow-list (CN, DNS SAN, URI SAN), refused, expired and untrusted
clients, certificate reload with a connection open, and TLS from the router to a backend."""

from __future__ import annotations

import asyncio
import shutil
import ssl
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from router.client.frames import ConnectionLost, ErrorReply, FrameClient
from router.protocol.frames import ERROR_FLAG, LENGTH_MASK, decode_error, encode_frame
from tests.conftest import EchoBackend, RouterFactory, RunningRouter
from tests.tls_support import Identity, Pki

WAIT_S = 10.0


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return Pki(tmp_path / "pki")


async def tls_client(router: RunningRouter, ctx: ssl.SSLContext,
                     server_hostname: str = "localhost") -> FrameClient:
    async with asyncio.timeout(WAIT_S):
        return await FrameClient.connect(router.host, router.port, ssl=ctx,
                                         server_hostname=server_hostname)


async def read_to_eof(reader: asyncio.StreamReader) -> bytes:
    async with asyncio.timeout(WAIT_S):
        return await reader.read()


def subject_cn(cert: dict[str, Any] | None) -> str:
    assert cert is not None
    return next(v for rdn in cert["subject"] for k, v in rdn if k == "commonName")


async def metric(router: RunningRouter, name: str, **labels: str) -> float:
    """One sample of the router's own /metrics exposition (loopback admin: open to reads)."""
    import aiohttp

    async with aiohttp.ClientSession() as session, session.get(router.admin_url + "/metrics"
                                                               ) as response:
        text = await response.text()
    wanted = ",".join(f'{k}="{v}"' for k, v in labels.items())
    for line in text.splitlines():
        if line.startswith(f"{name}{{{wanted}}} "):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"no sample {name}{{{wanted}}} in /metrics")


# -- server TLS --------------------------------------------------------------------------------


async def test_a_tls_client_is_served_and_sees_the_routers_certificate(
    echo_backend: Callable[..., EchoBackend], router_factory: RouterFactory, pki: Pki
) -> None:
    router = await router_factory([echo_backend().address],
                                  {"listener": {"tls": pki.server_only()}})
    client = await tls_client(router, pki.client_context())
    try:
        assert await client.request(b"over tls") == b"over tls"
        assert subject_cn(client.peer_certificate) == "router-1"
    finally:
        await client.close()


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1_1 is deprecated")
async def test_tls_1_1_and_plaintext_are_refused_and_counted_and_others_are_unaffected(
    echo_backend: Callable[..., EchoBackend], router_factory: RouterFactory, pki: Pki
) -> None:
    router = await router_factory([echo_backend().address],
                                  {"listener": {"tls": pki.server_only()}})
    good = await tls_client(router, pki.client_context())
    old = pki.client_context()
    old.minimum_version = old.maximum_version = ssl.TLSVersion.TLSv1_1
    with pytest.raises((ssl.SSLError, ConnectionError)):
        await tls_client(router, old)
    reader, writer = await router.open_raw()  # plaintext to the TLS port
    writer.write(encode_frame(b"plain"))
    assert await read_to_eof(reader) == b""  # no answer: the handshake failed, closed
    writer.close()
    assert await good.request(b"still here") == b"still here"
    await good.close()
    assert router.app.front_door.tls is not None
    assert router.app.front_door.tls.handshake_failures == 2
    assert await metric(router, "router_tls_handshake_failures_total", listener="tcp") == 2


# -- mutual TLS --------------------------------------------------------------------------------

ALLOW = {"allowed_client_cns": ["batch-worker"], "allowed_client_dns": ["worker.example.org"],
         "allowed_client_uris": ["spiffe://example.org/ns/prod/sa/worker"]}


@pytest.mark.parametrize("who", ["allowed_cn", "allowed_dns", "allowed_uri"])
async def test_a_client_on_the_allow_list_is_served(
    echo_backend: Callable[..., EchoBackend], router_factory: RouterFactory, pki: Pki, who: str
) -> None:
    router = await router_factory([echo_backend().address],
                                  {"listener": {"tls": pki.mutual(**ALLOW)}})
    identity: Identity = getattr(pki, who)
    client = await tls_client(router, pki.client_context(identity))
    try:
        assert await client.request(who.encode()) == who.encode()
    finally:
        await client.close()
    assert router.app.front_door.tls is not None
    assert router.app.front_door.tls.refused == 0


async def test_a_client_outside_the_allow_list_gets_client_not_allowed_then_eof(
    echo_backend: Callable[..., EchoBackend], router_factory: RouterFactory, pki: Pki
) -> None:
    backend = echo_backend()
    router = await router_factory([backend.address], {"listener": {"tls": pki.mutual(**ALLOW)}})
    reader, writer = await asyncio.open_connection(
        router.host, router.port, ssl=pki.client_context(pki.intruder),
        server_hostname="localhost",
    )
    writer.write(encode_frame(b"let me in"))
    data = await read_to_eof(reader)
    writer.close()
    word = int.from_bytes(data[:4], "big")
    assert word & ERROR_FLAG
    code, message = decode_error(data[4:4 + (word & LENGTH_MASK)])
    assert code == "CLIENT_NOT_ALLOWED"
    assert "intruder" in message
    assert len(data) == 4 + (word & LENGTH_MASK)  # nothing else: the request was never read
    assert router.app.stats.accepted == 0
    assert await metric(router, "router_tls_clients_refused_total", listener="tcp") == 1


@pytest.mark.parametrize("who", ["expired", "untrusted", None])
async def test_expired_untrusted_and_missing_client_certificates_fail_the_handshake(
    echo_backend: Callable[..., EchoBackend], router_factory: RouterFactory, pki: Pki,
    who: str | None,
) -> None:
    router = await router_factory([echo_backend().address],
                                  {"listener": {"tls": pki.mutual(**ALLOW)}})
    identity = getattr(pki, who) if who is not None else None
    # TLS 1.3: the client finishes its side before the router has checked its certificate,
    # so the refusal may come as an alert on the first read rather than from connect.
    with pytest.raises((ssl.SSLError, ConnectionError, ConnectionLost)):
        client = await tls_client(router, pki.client_context(identity))
        try:
            await asyncio.wait_for(client.request(b"x"), WAIT_S)
        finally:
            await client.close()
    tls = router.app.front_door.tls
    assert tls is not None
    async with asyncio.timeout(WAIT_S):
        # The router's side of the failed handshake has no public event: bounded re-check.
        while tls.handshake_failures == 0:  # noqa: ASYNC110
            await asyncio.sleep(0.01)
    assert router.app.stats.accepted == 0


# -- reload ------------------------------------------------------------------------------------


async def test_a_rotated_certificate_is_used_by_new_connections_and_open_ones_go_on(
    echo_backend: Callable[..., EchoBackend], router_factory: RouterFactory, pki: Pki,
    tmp_path: Path,
) -> None:
    live = Identity(tmp_path / "live.pem", tmp_path / "live.key")
    shutil.copy(pki.server.cert, live.cert)
    shutil.copy(pki.server.key, live.key)
    tls_table = {"cert_file": str(live.cert), "key_file": str(live.key)}
    router = await router_factory([echo_backend().address], {"listener": {"tls": tls_table}})
    before = await tls_client(router, pki.client_context())
    assert subject_cn(before.peer_certificate) == "router-1"

    rotated = pki.issue("rotated", "localhost", "127.0.0.1", common_name="router-2")
    shutil.copy(rotated.cert, live.cert)
    shutil.copy(rotated.key, live.key)
    assert router.app.reload_certificates() == []

    after = await tls_client(router, pki.client_context())
    assert subject_cn(after.peer_certificate) == "router-2"
    assert await before.request(b"old connection") == b"old connection"
    assert await after.request(b"new connection") == b"new connection"

    live.key.write_text("not a key")  # a broken rotation: refused, the running one stays
    [problem] = router.app.reload_certificates()
    assert problem.startswith("listener.tls.cert_file: cannot load"), problem
    third = await tls_client(router, pki.client_context())
    assert subject_cn(third.peer_certificate) == "router-2"
    for client in (before, after, third):
        await client.close()
    assert await metric(router, "router_tls_reloads_total", listener="tcp", result="ok") == 1
    assert await metric(router, "router_tls_reloads_total", listener="tcp", result="failed") == 1


# -- TLS to backends ---------------------------------------------------------------------------


def backend_tls(pki: Pki, **extra: object) -> dict[str, object]:
    return {"enabled": True, "ca_file": str(pki.ca_file), "server_name": "echo.test", **extra}


async def test_the_router_speaks_tls_to_a_backend_and_presents_its_client_certificate(
    echo_backend: Callable[..., EchoBackend], router_factory: RouterFactory, pki: Pki
) -> None:
    backend = echo_backend("--tls-cert", str(pki.backend.cert), "--tls-key",
                           str(pki.backend.key), "--tls-client-ca", str(pki.ca_file))
    router = await router_factory([backend.address], {"backend_tls": backend_tls(
        pki, cert_file=str(pki.router_client.cert), key_file=str(pki.router_client.key))})
    client = await router.client()
    assert await client.request(b"to a tls backend") == b"to a tls backend"
    assert router.backend_stats()[backend.address]["failures_total"] == 0


@pytest.mark.parametrize("mistake", ["wrong server name", "no client certificate",
                                     "plaintext to a tls backend"])
async def test_a_backend_whose_tls_does_not_check_out_is_never_used(
    echo_backend: Callable[..., EchoBackend], router_factory: RouterFactory, pki: Pki,
    mistake: str,
) -> None:
    backend = echo_backend("--tls-cert", str(pki.backend.cert), "--tls-key",
                           str(pki.backend.key), "--tls-client-ca", str(pki.ca_file))
    settings = {
        "wrong server name": backend_tls(pki, server_name="other.test",
                                         cert_file=str(pki.router_client.cert),
                                         key_file=str(pki.router_client.key)),
        "no client certificate": backend_tls(pki),
        "plaintext to a tls backend": {"enabled": False},
    }[mistake]
    router = await router_factory([backend.address], {"backend_tls": settings,
                                                      "dispatch": {"max_retries": 0}})
    client = await router.client()
    with pytest.raises(ErrorReply) as info:
        await asyncio.wait_for(client.request(b"x"), WAIT_S)
    assert info.value.code in {"BACKEND_UNAVAILABLE", "NO_BACKEND", "BACKEND_PROTOCOL_ERROR"}
    assert router.app.stats.completed == 0


async def test_the_load_generator_speaks_tls_to_the_router(
    echo_backend: Callable[..., EchoBackend], router_factory: RouterFactory, pki: Pki
) -> None:
    from bench.load import run_load

    router = await router_factory([echo_backend().address],
                                  {"listener": {"tls": pki.server_only()}})
    report = await asyncio.to_thread(
        run_load, router.host, router.port, connections=4, requests=25, processes=1,
        timeout_s=WAIT_S, hard_timeout_s=60.0, tls_ca=str(pki.ca_file),
        tls_server_name="localhost",
    )
    assert (report["ok"], report["error_total"]) == (100, 0)
    assert router.app.front_door.connections_total == 4


def _write_config(path: Path, text: str) -> None:
    path.write_text(text)


async def test_sighup_reloads_a_running_routers_certificate_and_keeps_its_connections(
    echo_backend: Callable[..., EchoBackend], pki: Pki, tmp_path: Path
) -> None:
    import signal
    import sys

    import aiohttp

    from router.control.launcher import launch
    from router.protocol.announce import parse_banner
    from tests.support import REPO_ROOT, child_env

    live = Identity(tmp_path / "live.pem", tmp_path / "live.key")
    shutil.copy(pki.server.cert, live.cert)
    shutil.copy(pki.server.key, live.key)
    config = tmp_path / "router.toml"
    _write_config(config, (
        '[listener]\nlisten = "127.0.0.1:0"\n[admin]\nlisten = "127.0.0.1:0"\n'
        f'[listener.tls]\ncert_file = "{live.cert}"\nkey_file = "{live.key}"\n'
        f'[[backends]]\naddress = "{echo_backend().address}"\n'))
    proc = await launch([sys.executable, "-m", "router", "serve", "--config", str(config)],
                        parse_banner, cwd=REPO_ROOT, env=child_env(),
                        stderr=tmp_path / "router.stderr", ready_timeout_s=WAIT_S)
    try:
        (host, port), admin = proc.ready.listen, proc.ready.admin_url
        before = await FrameClient.connect(host, port, ssl=pki.client_context(),
                                           server_hostname="localhost")
        assert await before.request(b"before") == b"before"
        rotated = pki.issue("rotated", "localhost", "127.0.0.1", common_name="router-2")
        shutil.copy(rotated.cert, live.cert)
        shutil.copy(rotated.key, live.key)
        proc.send_signal(signal.SIGHUP)
        async with asyncio.timeout(WAIT_S), aiohttp.ClientSession() as session:
            while True:  # another process: no event to await
                async with session.get(f"{admin}/stats") as response:
                    stats = await response.json()
                if stats["listener"]["tls"]["generation"] == 1:
                    break
                await asyncio.sleep(0.02)
        after = await FrameClient.connect(host, port, ssl=pki.client_context(),
                                          server_hostname="localhost")
        assert subject_cn(after.peer_certificate) == "router-2"
        assert subject_cn(before.peer_certificate) == "router-1"
        assert await before.request(b"still open") == b"still open"
        assert await after.request(b"after") == b"after"
        assert proc.returncode is None  # SIGHUP no longer ends the process
        await before.close()
        await after.close()
        call = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "router", "call", "--to", f"{host}:{port}",
            "--tls-ca", str(pki.ca_file), "--tls-server-name", "localhost", "hello",
            cwd=REPO_ROOT, env=child_env(), stdout=asyncio.subprocess.PIPE,
        )
        async with asyncio.timeout(WAIT_S * 2):
            out, _ = await call.communicate()
        assert (call.returncode, out) == (0, b"hello\n")
    finally:
        proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(WAIT_S * 2):
            assert await proc.wait() == 0
