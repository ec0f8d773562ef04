"""A compressed first message routed by model (``grpc-encoding`` gzip or deflate): its start
decompressed within a bound for the KServe field reader (router/protocol/grpc_compression.py,
hypothesis), and end to end through the relay with grpcio clients that compress."""

from __future__ import annotations

import asyncio
import gzip
import zlib
from collections.abc import Callable

import grpc
import pytest
from hypothesis import given
from hypothesis import strategies as st

from router.core.errors import BadCompressedMessage, UnsupportedEncoding
from router.protocol import h2frames as f
from router.protocol.grpc_compression import PREFIX_BYTES, decompressed_start
from router.protocol.h2headers import HeaderDecoder, encode_block
from router.protocol.kserve import read_model, whole_fields
from tests.grpc_support import (
    CALL_TIMEOUT_S,
    MODEL_INFER,
    GrpcRouterFactory,
    KServeBackend,
    grpc_backend,
    infer_request,
    output_values,
)

Backends = Callable[..., KServeBackend]
COMPRESS = {"gzip": gzip.compress, "deflate": zlib.compress}


@given(st.binary(max_size=3000), st.sampled_from(sorted(COMPRESS)),
       st.integers(min_value=1, max_value=2000))
def test_the_start_of_a_compressed_message_within_the_bound(
    data: bytes, encoding: str, limit: int
) -> None:
    start, whole = decompressed_start(encoding, COMPRESS[encoding](data), limit)
    assert start == data[:limit] and whole == (len(data) <= limit)


@given(st.binary(max_size=300), st.sampled_from(sorted(COMPRESS)),
       st.integers(min_value=1, max_value=400))
def test_bytes_that_are_not_compressed_are_refused_with_a_code(
    data: bytes, encoding: str, limit: int
) -> None:
    try:
        start, _ = decompressed_start(encoding, data, limit)
    except BadCompressedMessage:
        return
    assert len(start) <= limit


def test_a_bomb_costs_the_bound_and_unknown_encodings_are_unimplemented() -> None:
    bomb = gzip.compress(b"\0" * (64 << 20))  # 64 MiB of zeros in ~64 KiB
    start, whole = decompressed_start("gzip", bomb)
    assert len(start) == PREFIX_BYTES and not whole
    for encoding in ("snappy", "identity", None):
        with pytest.raises(UnsupportedEncoding):
            decompressed_start(encoding, bomb)
    with pytest.raises(BadCompressedMessage):
        decompressed_start("gzip", gzip.compress(b"x" * 100)[:-12])  # cut inside the stream


def test_the_model_fields_of_a_message_cut_at_the_bound() -> None:
    message = infer_request("identity", [1.0] * 40_000)  # 160 KB of raw tensor after them
    cut = whole_fields(message[:PREFIX_BYTES])
    assert read_model(cut).name == "identity" and len(cut) < PREFIX_BYTES


@pytest.mark.grpc_engine("relay", reason="the relay reads compressed first messages itself")
@pytest.mark.parametrize("compression", [grpc.Compression.Gzip, grpc.Compression.Deflate])
async def test_compressed_calls_are_routed_by_model(
    kserve_backend: Backends, grpc_router: GrpcRouterFactory, compression: grpc.Compression
) -> None:
    backend = kserve_backend()
    router = await grpc_router([grpc_backend(backend.address, "identity")])
    async with grpc.aio.insecure_channel(router.target, compression=compression) as channel:
        infer = channel.unary_unary(MODEL_INFER)
        small = await infer(infer_request("identity", [1.0, 2.0]), timeout=CALL_TIMEOUT_S)
        large = [float(i % 7) for i in range(100_000)]  # 400 KB: past the 64 KiB bound
        answer = await infer(infer_request("identity", large), timeout=CALL_TIMEOUT_S)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await infer(infer_request("nobody", [1.0]), timeout=CALL_TIMEOUT_S)
    assert output_values(small) == [1.0, 2.0] and output_values(answer) == large
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert router.app.stats.completed == 2


async def _raw_call(target: str, encoding: str, body: bytes) -> dict[str, str]:
    """One ModelInfer over a raw HTTP/2 connection, its message flagged compressed; the
    response's headers and trailers."""
    host, port = target.rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    headers = [(":method", "POST"), (":scheme", "http"), (":path", MODEL_INFER),
               (":authority", "x"), ("content-type", "application/grpc"), ("te", "trailers"),
               ("grpc-encoding", encoding)]
    message = b"\1" + len(body).to_bytes(4) + body
    writer.write(f.PREFACE + f.encode_settings([])
                 + f.encode_headers(1, encode_block(headers), False, 16_384)
                 + f.encode_data(1, message, True, 16_384))
    decoder, blocks = f.FrameDecoder(max_frame_size=1 << 20), HeaderDecoder(65_536)
    seen: dict[str, str] = {}
    try:
        async with asyncio.timeout(CALL_TIMEOUT_S):
            while "grpc-status" not in seen:
                data = await reader.read(65_536)
                assert data, f"closed before the status: {seen}"
                for kind, flags, stream_id, payload in decoder.receive(data):
                    if kind == f.HEADERS and stream_id == 1:
                        seen.update(blocks.decode(f.fragment_of(kind, flags, payload, 1)))
    finally:
        writer.close()
    return seen


@pytest.mark.grpc_engine("relay", reason="the relay reads compressed first messages itself")
async def test_an_unknown_encoding_is_unimplemented_and_bad_data_invalid(
    kserve_backend: Backends, grpc_router: GrpcRouterFactory
) -> None:
    backend = kserve_backend()
    router = await grpc_router([grpc_backend(backend.address, "identity")])
    request = infer_request("identity", [1.0])
    unknown = await _raw_call(router.target, "snappy", gzip.compress(request))
    assert (unknown["grpc-status"], unknown["x-router-error"]) == ("12", "UNSUPPORTED_ENCODING")
    bad = await _raw_call(router.target, "gzip", b"not gzip at all")
    assert (bad["grpc-status"], bad["x-router-error"]) == ("3", "BAD_COMPRESSED_MESSAGE")
    good = await _raw_call(router.target, "gzip", gzip.compress(request))
    assert good["grpc-status"] == "0"
    assert router.app.stats.completed == 1
