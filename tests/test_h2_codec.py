"""The HTTP/2 frame codec and the relay's HPACK, with no sockets: every split of a byte stream,
each frame's own errors, header blocks cached only where that is sound."""

from __future__ import annotations

import itertools

import pytest
from hpack import Encoder
from hypothesis import given, settings
from hypothesis import strategies as st

from router.protocol import h2frames as f
from router.protocol.h2frames import FrameDecoder, H2Error
from router.protocol.h2headers import HeaderDecoder, encode_block

frames_st = st.lists(
    st.tuples(st.integers(0, 12), st.integers(0, 255), st.integers(0, (1 << 31) - 1),
              st.binary(max_size=300)),
    max_size=10,
)


def _split(stream: bytes, cuts: list[int]) -> list[bytes]:
    bounds = [0, *sorted(cuts), len(stream)]
    return [stream[a:b] for a, b in itertools.pairwise(bounds)]


@settings(deadline=None, max_examples=200)
@given(frames_st, st.lists(st.integers(0, 4000), max_size=8), st.booleans())
def test_every_split_gives_the_same_frames(frames, cuts, preface):
    stream = (f.PREFACE if preface else b"") + b"".join(f.frame(*fr) for fr in frames)
    decoder = FrameDecoder(expect_preface=preface)
    out = []
    for chunk in _split(stream, [c % (len(stream) + 1) for c in cuts]):
        out += decoder.receive(chunk)
    assert out == frames
    assert decoder.buffered == 0


def test_a_frame_over_the_limit_is_refused_from_its_header():
    decoder = FrameDecoder(max_frame_size=16_384)
    with pytest.raises(H2Error) as caught:
        decoder.receive(f.frame(f.DATA, 0, 1, b"x" * 16_385)[:9])
    assert caught.value.code == f.FRAME_SIZE_ERROR and caught.value.stream_id == 0


def test_a_wrong_preface_is_a_protocol_error_as_soon_as_it_differs():
    with pytest.raises(H2Error) as caught:
        FrameDecoder(expect_preface=True).receive(b"GET / HTTP/1.1\r\n")
    assert caught.value.code == f.PROTOCOL_ERROR
    assert FrameDecoder(expect_preface=True).receive(f.PREFACE[:10]) == []


def test_padding_and_priority_are_stripped():
    padded = bytes([3]) + b"abc" + b"\0\0\0"
    assert f.data_of(f.PADDED, padded, 1) == b"abc"
    with_priority = bytes([2]) + b"\0\0\0\0\x10" + b"blk" + b"\0\0"
    assert f.fragment_of(f.HEADERS, f.PADDED | f.PRIORITY_FLAG, with_priority, 1) == b"blk"
    with pytest.raises(H2Error) as caught:
        f.data_of(f.PADDED, bytes([9]) + b"ab", 1)
    assert caught.value.code == f.PROTOCOL_ERROR


@pytest.mark.parametrize(("reader", "payload", "stream_id", "code", "on_stream"), [
    (lambda p, s: f.read_window_update(p, s), b"\0\0\0\0", 3, f.PROTOCOL_ERROR, True),
    (lambda p, s: f.read_window_update(p, s), b"\0\0\0\0", 0, f.PROTOCOL_ERROR, False),
    (lambda p, s: f.read_window_update(p, s), b"\0\0\1", 0, f.FRAME_SIZE_ERROR, False),
    (lambda p, s: f.read_rst_stream(p, s), b"\0\0\0\1", 0, f.PROTOCOL_ERROR, False),
    (lambda p, s: f.read_goaway(p, s), b"\0" * 7, 0, f.FRAME_SIZE_ERROR, False),
    (lambda p, s: f.check_ping(p, s), b"\0" * 7, 0, f.FRAME_SIZE_ERROR, False),
    (lambda p, s: f.check_priority(p, s), b"\0" * 4, 5, f.FRAME_SIZE_ERROR, True),
    (lambda p, s: f.read_settings(0, p, s), b"\0\5\0\0\0\1", 0, f.PROTOCOL_ERROR, False),
    (lambda p, s: f.read_settings(0, p, s), b"\0\4\x80\0\0\0", 0, f.FLOW_CONTROL_ERROR, False),
    (lambda p, s: f.read_settings(0, p, s), b"\0\2\0\0\0\2", 0, f.PROTOCOL_ERROR, False),
    (lambda p, s: f.read_settings(f.ACK, p, s), b"\0\2\0\0\0\0", 0, f.FRAME_SIZE_ERROR, False),
])
def test_each_frames_own_errors(reader, payload, stream_id, code, on_stream):
    with pytest.raises(H2Error) as caught:
        reader(payload, stream_id)
    assert caught.value.code == code
    assert caught.value.stream_id == (stream_id if on_stream else 0)


@settings(deadline=None, max_examples=100)
@given(st.binary(max_size=70_000), st.sampled_from([16_384, 20_000, 1 << 20]), st.booleans())
def test_data_is_cut_at_the_peers_frame_size(data, size, end):
    frames = FrameDecoder(max_frame_size=size).receive(f.encode_data(7, data, end, size))
    assert b"".join(p for _, _, _, p in frames) == data
    assert all(len(p) <= size and k == f.DATA and s == 7 for k, _, s, p in frames)
    ends = [bool(fl & f.END_STREAM) for _, fl, _, _ in frames]
    assert ends == [False] * (len(frames) - 1) + [end]


@settings(deadline=None, max_examples=100)
@given(st.binary(max_size=70_000), st.sampled_from([16_384, 20_000]), st.booleans())
def test_data_frames_for_a_vectored_write_are_the_same_bytes_without_copying_the_data(
        data, size, end):
    parts: list[bytes | memoryview] = []
    f.append_data(parts, 7, data, end, size)
    assert b"".join(parts) == f.encode_data(7, data, end, size)
    payloads = parts[1::2]  # header, payload, header, payload, ...
    assert all(p is data or (isinstance(p, memoryview) and p.obj is data) for p in payloads)


@settings(deadline=None, max_examples=100)
@given(st.binary(max_size=50_000), st.booleans())
def test_a_header_block_past_the_frame_size_continues(block, end):
    frames = FrameDecoder().receive(f.encode_headers(9, block, end, 16_384))
    assert frames[0][0] == f.HEADERS and all(k == f.CONTINUATION for k, *_ in frames[1:])
    assert b"".join(p for *_, p in frames) == block
    assert [bool(fl & f.END_HEADERS) for _, fl, _, _ in frames][-1]
    assert bool(frames[0][1] & f.END_STREAM) == end


header_st = st.lists(st.tuples(
    st.sampled_from([":status", "content-type", "grpc-status", "x-a", "te", "x-route-model"]),
    st.sampled_from(["200", "0", "application/grpc", "trailers", "", "model-ä", "x" * 80]),
), max_size=12)


@settings(deadline=None, max_examples=200)
@given(header_st)
def test_encoded_blocks_decode_to_the_same_headers_in_any_context(headers):
    assert HeaderDecoder(65_536).decode(encode_block(headers)) == headers
    shrunk = HeaderDecoder(65_536)
    assert shrunk.decode(b"\x20" + encode_block(headers)) == headers  # the peer shrinks to 0
    assert shrunk.decode(encode_block(headers)) == headers


def test_blocks_are_cached_only_once_the_table_is_gone():
    peer = Encoder()
    decoder = HeaderDecoder(65_536)
    headers = [("grpc-status", "0"), ("x-trace", "abc")]
    first = peer.encode(headers)  # indexes x-trace in the peer's (4 KiB) table
    assert decoder.decode(first) == headers
    second = peer.encode(headers)  # now a reference into the dynamic table
    assert decoder.decode(second) == headers and decoder.hits == 0
    peer.header_table_size = 0  # what the peer does on our SETTINGS: its next block shrinks
    shrinking = peer.encode(headers)
    assert decoder.decode(shrinking) == headers
    steady = peer.encode(headers)
    assert decoder.decode(steady) == headers
    assert decoder.decode(steady) == headers
    assert decoder.hits == 1


def test_a_peer_that_keeps_its_table_after_the_ack_is_decoded_with_it():
    """gRPC's C core can send a block encoded before our SETTINGS took effect: the table it
    references is still the peer's, bounded by the default 4,096 bytes; the later shrink to 0
    brings the cached path back."""
    peer = Encoder()
    decoder = HeaderDecoder(65_536)
    headers = [("x-a", "b"), ("x-trace", "t" * 100)]
    assert decoder.decode(peer.encode(headers)) == headers
    assert decoder.decode(peer.encode(headers)) == headers  # dynamic references
    peer.header_table_size = 0
    assert decoder.decode(peer.encode(headers)) == headers
    steady = peer.encode(headers)
    assert decoder.decode(steady) == decoder.decode(steady) == headers
    assert decoder.hits == 1


def test_a_table_over_the_default_size_is_a_compression_error():
    peer = Encoder()
    peer.header_table_size = 8192  # never allowed: we advertise 0, the default bound is 4,096
    with pytest.raises(H2Error) as caught:
        HeaderDecoder(65_536).decode(peer.encode([("x-a", "b")]))
    assert caught.value.code == f.COMPRESSION_ERROR


def test_header_lists_over_the_limit_are_refused():
    decoder = HeaderDecoder(1000)
    with pytest.raises(H2Error) as caught:
        decoder.decode(encode_block([("x-big", "v" * 2000)]))
    assert caught.value.code == f.ENHANCE_YOUR_CALM
    # Small on the wire, large decoded: the library's own bound.
    with pytest.raises(H2Error) as caught:
        decoder.decode(encode_block([(":status", "200")] * 30))
    assert caught.value.code == f.COMPRESSION_ERROR


@settings(deadline=None, max_examples=500)
@given(st.binary(max_size=200))
def test_hostile_header_blocks_end_in_an_h2_error_only(block):
    try:
        HeaderDecoder(4096).decode(block)
    except H2Error as error:
        assert error.code in (f.COMPRESSION_ERROR, f.ENHANCE_YOUR_CALM)


@settings(deadline=None, max_examples=300)
@given(st.lists(st.tuples(
    st.sampled_from([":path", "grpc-timeout", "content-type", "x-id", "user-agent", "te"]),
    st.text(max_size=40)), max_size=12), st.booleans())
def test_blocks_for_a_table_of_zero_decode_field_by_field_as_hpack_does(headers, huffman):
    peer = Encoder()
    peer.header_table_size = 0  # our SETTINGS acknowledged: no dynamic table
    shrink = peer.encode([])
    block = peer.encode(headers, huffman=huffman)
    reference = HeaderDecoder(65_536)  # the library's, with the default table
    fast = HeaderDecoder(65_536)
    assert fast.decode(shrink) == [] and shrink == b"\x20"  # from here: field by field
    assert fast.decode(block) == reference.decode(block) == [(n, v) for n, v in headers]
    assert fast.decode(block) == reference.decode(block)  # again: from the caches


@settings(deadline=None, max_examples=500)
@given(st.binary(max_size=200))
def test_hostile_blocks_for_a_table_of_zero_end_in_an_h2_error_only(block):
    decoder = HeaderDecoder(4096)
    decoder.decode(b"\x20")
    try:
        decoder.decode(block)
    except H2Error as error:
        assert error.code in (f.COMPRESSION_ERROR, f.ENHANCE_YOUR_CALM)
