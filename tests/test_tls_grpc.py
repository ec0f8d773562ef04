"""TLS on the gRPC front door and towards gRPC backends, end to end over loopback: Triton's own
client with mutual TLS, a client outside the allow-list refused PERMISSION_DENIED, an untrusted
client failing the handshake, a rotated certificate, and a KServe backend reached over TLS."""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton

from router.frontdoor.grpc.server import ROUTER_ERROR_HEADER
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
from tests.tls_support import Identity, Pki

Backends = Callable[..., KServeBackend]
ALLOW = {"allowed_client_cns": ["batch-worker"],
         "allowed_client_uris": ["spiffe://example.org/ns/prod/sa/worker"]}


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return Pki(tmp_path / "pki")


def triton_client(router: GrpcRouter, pki: Pki, identity: Identity) -> triton.InferenceServerClient:
    return triton.InferenceServerClient(
        router.target, ssl=True, root_certificates=str(pki.ca_file),
        private_key=str(identity.key), certificate_chain=str(identity.cert),
    )


def secure_channel(target: str, pki: Pki, identity: Identity | None, *,
                   trust: Path | None = None) -> grpc.aio.Channel:
    credentials = grpc.ssl_channel_credentials(
        root_certificates=(trust or pki.ca_file).read_bytes(),
        private_key=identity.key.read_bytes() if identity is not None else None,
        certificate_chain=identity.cert.read_bytes() if identity is not None else None,
    )
    return grpc.aio.secure_channel(target, credentials)


async def infer(channel: grpc.aio.Channel, values: list[float]) -> list[float]:
    call = channel.unary_unary(MODEL_INFER)
    return output_values(await call(infer_request("sum", values), timeout=CALL_TIMEOUT_S))


def _sum_input(values: list[float]) -> triton.InferInput:
    tensor = triton.InferInput("INPUT0", [len(values)], "FP32")
    tensor.set_data_from_numpy(np.array(values, dtype=np.float32))
    return tensor


async def _in_thread(fn: Callable[..., Any], *args: Any) -> Any:
    async with asyncio.timeout(CALL_TIMEOUT_S):
        return await asyncio.to_thread(fn, *args)


async def test_tritonclient_over_mutual_tls_is_served(
    kserve_backend: Backends, grpc_router: GrpcRouterFactory, pki: Pki
) -> None:
    backend = kserve_backend()
    router = await grpc_router([grpc_backend(backend.address, "sum")],
                               {"grpc": {"tls": pki.mutual(**ALLOW)}})
    for identity in (pki.allowed_cn, pki.allowed_uri):
        client = triton_client(router, pki, identity)
        try:
            assert await _in_thread(client.is_server_live)
            result = await _in_thread(client.infer, "sum", [_sum_input([1.0, 2.5])])
            assert result.as_numpy("OUTPUT0").tolist() == [3.5]
        finally:
            client.close()
    assert router.app.server_tls["grpc"].refused == 0


async def test_a_client_outside_the_allow_list_is_permission_denied_and_counted(
    kserve_backend: Backends, grpc_router: GrpcRouterFactory, pki: Pki
) -> None:
    backend = kserve_backend()
    router = await grpc_router([grpc_backend(backend.address, "sum")],
                               {"grpc": {"tls": pki.mutual(**ALLOW)}})
    async with secure_channel(router.target, pki, pki.intruder) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await infer(channel, [1.0])
    error = caught.value
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED
    assert (ROUTER_ERROR_HEADER, "CLIENT_NOT_ALLOWED") in tuple(error.trailing_metadata() or ())
    assert "not on the allow-list" in (error.details() or "")
    assert router.app.server_tls["grpc"].refused == 1
    assert router.backend(backend.address)["requests_total"] == 0


@pytest.mark.parametrize("who", ["untrusted", "expired", None])
async def test_untrusted_expired_and_missing_client_certificates_never_reach_a_handler(
    kserve_backend: Backends, grpc_router: GrpcRouterFactory, pki: Pki, who: str | None
) -> None:
    backend = kserve_backend()
    router = await grpc_router([grpc_backend(backend.address, "sum")],
                               {"grpc": {"tls": pki.mutual()}})
    identity = getattr(pki, who) if who is not None else None
    async with secure_channel(router.target, pki, identity) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await infer(channel, [1.0])
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE  # the handshake failed
    assert router.app.grpc_front is not None
    assert router.app.grpc_front.calls_total == 0


async def test_a_rotated_certificate_reaches_new_connections_while_an_open_one_goes_on(
    kserve_backend: Backends, grpc_router: GrpcRouterFactory, pki: Pki, tmp_path: Path
) -> None:
    live = Identity(tmp_path / "live.pem", tmp_path / "live.key")
    shutil.copy(pki.server.cert, live.cert)
    shutil.copy(pki.server.key, live.key)
    backend = kserve_backend()
    router = await grpc_router([grpc_backend(backend.address, "sum")], {"grpc": {"tls": {
        "cert_file": str(live.cert), "key_file": str(live.key)}}})
    async with secure_channel(router.target, pki, None) as old:
        assert await infer(old, [1.0, 1.0]) == [2.0]
        # The new certificate is signed by another CA: only a client trusting that CA alone
        # can tell which certificate a handshake got.
        rotated = pki.issue("rotated", "localhost", "127.0.0.1", ca=pki.other_ca)
        async with secure_channel(router.target, pki, None, trust=pki.other_ca_file) as early:
            with pytest.raises(grpc.aio.AioRpcError):
                await infer(early, [1.0])
        shutil.copy(rotated.cert, live.cert)
        shutil.copy(rotated.key, live.key)
        assert router.app.reload_certificates() == []
        async with secure_channel(router.target, pki, None, trust=pki.other_ca_file) as new:
            assert await infer(new, [2.0, 3.0]) == [5.0]
        assert await infer(old, [4.0]) == [4.0]  # the connection made before goes on


async def test_the_router_reaches_a_kserve_backend_over_mutual_tls(
    kserve_backend: Backends, grpc_router: GrpcRouterFactory, pki: Pki
) -> None:
    backend = kserve_backend("--tls-cert", str(pki.backend.cert), "--tls-key",
                             str(pki.backend.key), "--tls-client-ca", str(pki.ca_file))
    tls = {"ca_file": str(pki.ca_file), "server_name": "echo.test",
           "cert_file": str(pki.router_client.cert), "key_file": str(pki.router_client.key)}
    router = await grpc_router([grpc_backend(backend.address, "sum", tls=tls)])
    async with grpc.aio.insecure_channel(router.target) as channel:
        assert await infer(channel, [1.0, 2.0]) == [3.0]
    assert router.backend(backend.address)["failures_total"] == 0


async def test_a_kserve_backend_without_the_routers_client_certificate_fails(
    kserve_backend: Backends, grpc_router: GrpcRouterFactory, pki: Pki
) -> None:
    backend = kserve_backend("--tls-cert", str(pki.backend.cert), "--tls-key",
                             str(pki.backend.key), "--tls-client-ca", str(pki.ca_file))
    tls = {"ca_file": str(pki.ca_file), "server_name": "echo.test"}  # no client certificate
    router = await grpc_router([grpc_backend(backend.address, "sum", tls=tls)],
                               {"dispatch": {"max_retries": 0}})
    async with grpc.aio.insecure_channel(router.target) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await infer(channel, [1.0])
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert router.app.stats.completed == 0
