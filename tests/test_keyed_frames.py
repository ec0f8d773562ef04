"""Keyed mode of the length-prefixed listener, through a real router and echo backends."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from router.client.frames import ErrorReply
from router.protocol.keyed import encode_keyed
from tests.conftest import EchoBackend, RouterFactory

KEYED = {"listener": {"keyed": True}}


async def test_a_keyed_frame_goes_only_to_backends_serving_its_model_and_is_forwarded_whole(
    echo_backend: Callable[..., EchoBackend], router_factory: RouterFactory
) -> None:
    a, b, anything = echo_backend(), echo_backend(), echo_backend()
    router = await router_factory([
        {"address": a.address, "models": ["alpha"]},
        {"address": b.address, "models": ["beta:2"]},
        {"address": anything.address, "models": ["*"]},
    ], KEYED)
    client = await router.client()
    for i in range(20):
        payload = encode_keyed("alpha", f"a{i}".encode())
        assert await client.request(payload) == payload  # the key is forwarded, unchanged
    for i in range(20):
        payload = encode_keyed("beta", f"b{i}".encode())  # "beta:2" serves key "beta"
        assert await client.request(payload) == payload
    for _ in range(20):
        assert await client.request(encode_keyed("gamma:7", b"g")) == encode_keyed("gamma:7", b"g")
    served = {address: s["requests_total"] for address, s in router.backend_stats().items()}
    # "*" serves every model, so alpha and beta went to it too, gamma only to it.
    assert served[a.address] + served[b.address] + served[anything.address] == 60
    assert served[a.address] > 0 and served[b.address] > 0
    assert served[anything.address] >= 20


async def test_bad_keys_and_unknown_models_are_answered_and_the_connection_goes_on(
    echo_backend: Callable[..., EchoBackend], router_factory: RouterFactory
) -> None:
    backend = echo_backend()
    router = await router_factory([{"address": backend.address, "models": ["alpha"]}], KEYED)
    client = await router.client()
    for bad in (b"\x09short", b"\x03a b", b"\x02:x"):
        with pytest.raises(ErrorReply) as refused:
            await client.request(bad)
        assert refused.value.code == "BAD_ROUTING_KEY"
    with pytest.raises(ErrorReply) as unknown:
        await client.request(encode_keyed("nope", b"x"))
    assert unknown.value.code == "UNKNOWN_MODEL"
    # No key: any backend; the same connection still works after every refusal.
    assert await client.request(encode_keyed(None, b"free")) == b"\x00free"
    assert await client.request(b"") == b""  # the zero-length frame has no key either
    assert router.backend_stats()[backend.address]["requests_total"] == 2
    stats = router.app.stats.statistics()
    assert stats["accepted"] == 6
    assert stats["errored"]["BAD_ROUTING_KEY"] == 3 and stats["errored"]["UNKNOWN_MODEL"] == 1


async def test_plain_mode_never_reads_a_key(
    echo_backend: Callable[..., EchoBackend], router_factory: RouterFactory
) -> None:
    backend = echo_backend()
    router = await router_factory([{"address": backend.address, "models": ["alpha"]}])
    client = await router.client()
    for payload in (encode_keyed("nope", b"x"), b"\x09short"):
        assert await client.request(payload) == payload
