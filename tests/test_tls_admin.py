"""Who may call the admin API, end to end over loopback with aiohttp's client: the bearer token
(401 without, 403 wrong, 200 right), reads open on loopback and closed elsewhere but for the
probes, admin over TLS with client certificates and an allow-list, and the token's reload."""

from __future__ import annotations

import ssl
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.conftest import EchoBackend, RouterFactory, RunningRouter
from tests.tls_support import Identity, Pki

RELOAD = "/admin/reload-certificates"
TOKEN = "s3cret-token-for-tests"


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return Pki(tmp_path / "pki")


@pytest.fixture
def token_file(tmp_path: Path) -> Path:
    path = tmp_path / "admin.token"
    path.write_text(f"  {TOKEN}\n")  # surrounding whitespace is not part of it
    return path


def write(path: Path, text: str) -> None:
    path.write_text(text)


async def call(router: RunningRouter, method: str, path: str, *, token: str | None = None,
               ctx: ssl.SSLContext | None = None) -> tuple[int, dict[str, Any], Any]:
    """(status, headers, JSON body or text) of one admin request."""
    scheme = "https" if ctx is not None else "http"
    url = f"{scheme}://127.0.0.1:{router.admin_port}{path}"
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    timeout = aiohttp.ClientTimeout(total=10)
    async with aiohttp.ClientSession(timeout=timeout) as session, session.request(
        method, url, headers=headers, ssl=ctx if ctx is not None else False
    ) as response:
        body: Any = (await response.json() if response.content_type == "application/json"
                     else await response.text())
        return response.status, dict(response.headers), body


async def test_a_mutating_endpoint_needs_the_token_401_without_403_wrong_200_right(
    echo_backend: Callable[..., EchoBackend], router_factory: RouterFactory, token_file: Path
) -> None:
    router = await router_factory([echo_backend().address],
                                  {"admin": {"token_file": str(token_file)}})
    status, headers, body = await call(router, "POST", RELOAD)
    assert (status, body["code"]) == (401, "UNAUTHORIZED")
    assert headers["WWW-Authenticate"].startswith("Bearer")
    assert "bearer token" in body["error"]
    status, _, body = await call(router, "POST", RELOAD, token="not-it")
    assert (status, body["code"]) == (403, "FORBIDDEN")
    status, _, body = await call(router, "POST", RELOAD, token=TOKEN)
    assert (status, body) == (200, {"reloaded": True, "problems": []})
    status, _, text = await call(router, "GET", "/metrics")  # reads stay open on loopback
    assert status == 200
    assert 'router_admin_requests_refused_total{code="UNAUTHORIZED"} 1.0' in text
    assert 'router_admin_requests_refused_total{code="FORBIDDEN"} 1.0' in text


async def test_without_any_credentials_configured_a_mutating_endpoint_is_closed(
    echo_backend: Callable[..., EchoBackend], router_factory: RouterFactory
) -> None:
    router = await router_factory([echo_backend().address])
    status, _, body = await call(router, "POST", RELOAD)
    assert (status, body["code"]) == (401, "UNAUTHORIZED")
    status, _, body = await call(router, "POST", RELOAD, token="anything")
    assert (status, body["code"]) == (403, "FORBIDDEN")
    assert (await call(router, "GET", "/stats"))[0] == 200


async def test_off_loopback_every_read_but_the_probes_needs_the_token(
    echo_backend: Callable[..., EchoBackend], router_factory: RouterFactory, token_file: Path
) -> None:
    # Bound to every interface; the test still only talks to 127.0.0.1.
    router = await router_factory([echo_backend().address], {
        "admin": {"listen": "0.0.0.0:0", "token_file": str(token_file)}})
    for path in ("/metrics", "/stats", "/backends"):
        status, _, body = await call(router, "GET", path)
        assert (status, body["code"]) == (401, "UNAUTHORIZED"), path
        assert (await call(router, "GET", path, token=TOKEN))[0] == 200, path
    assert (await call(router, "GET", "/healthz"))[0] == 200
    assert (await call(router, "GET", "/readyz"))[0] == 200


async def test_admin_over_tls_with_client_certificates_and_the_token_as_fallback(
    echo_backend: Callable[..., EchoBackend], router_factory: RouterFactory, pki: Pki,
    token_file: Path,
) -> None:
    tls = pki.mutual(require_client_cert=False, allowed_client_cns=["batch-worker"])
    router = await router_factory([echo_backend().address], {
        "admin": {"tls": tls, "token_file": str(token_file)}})

    def ctx(identity: Identity | None) -> ssl.SSLContext:
        return pki.client_context(identity)

    # An allowed certificate is enough on its own, mutating endpoints included.
    assert (await call(router, "POST", RELOAD, ctx=ctx(pki.allowed_cn)))[0] == 200
    # A certificate outside the allow-list is refused everywhere, token or not.
    for path, token in (("/healthz", None), ("/metrics", TOKEN)):
        status, _, body = await call(router, "GET", path, token=token, ctx=ctx(pki.intruder))
        assert (status, body["code"]) == (403, "CLIENT_NOT_ALLOWED"), path
        assert "intruder" in body["error"]
    # No certificate: an anonymous TLS client, reads open on loopback, mutations need the token.
    assert (await call(router, "GET", "/stats", ctx=ctx(None)))[0] == 200
    status, _, body = await call(router, "POST", RELOAD, ctx=ctx(None))
    assert (status, body["code"]) == (401, "UNAUTHORIZED")
    assert (await call(router, "POST", RELOAD, token=TOKEN, ctx=ctx(None)))[0] == 200
    with pytest.raises(aiohttp.ClientError):  # plain HTTP to the TLS port gets nowhere
        await call(router, "GET", "/healthz")
    assert router.app.server_tls["admin"].refused == 2


async def test_a_new_token_file_is_read_on_reload(
    echo_backend: Callable[..., EchoBackend], router_factory: RouterFactory, token_file: Path
) -> None:
    router = await router_factory([echo_backend().address],
                                  {"admin": {"token_file": str(token_file)}})
    write(token_file, "rotated-token\n")
    assert (await call(router, "POST", RELOAD, token=TOKEN))[0] == 200  # reloads the token
    assert (await call(router, "POST", RELOAD, token=TOKEN))[0] == 403
    assert (await call(router, "POST", RELOAD, token="rotated-token"))[0] == 200
    write(token_file, "")  # an empty token is refused; the running one stays
    status, _, body = await call(router, "POST", RELOAD, token="rotated-token")
    assert status == 422
    assert body["problems"] == [f"admin.token_file: '{token_file}' is empty"]
    assert (await call(router, "POST", RELOAD, token="rotated-token"))[0] == 422
