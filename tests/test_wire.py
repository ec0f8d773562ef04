"""The sans-IO framing decoder, checked over every way to split a byte stream."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from router.core.errors import FrameTooLarge, TruncatedFrame
from router.protocol.frames import (
    ErrorFrame,
    FrameDecoder,
    encode_error,
    encode_frame,
    encode_frames,
    frame_parts,
)

payloads_st = st.lists(st.binary(min_size=0, max_size=2000), max_size=12)


def _split(stream: bytes, cuts: list[int]) -> list[bytes]:
    """``stream`` cut at the given offsets (duplicates give empty chunks, which is allowed)."""
    bounds = [0, *sorted(cuts), len(stream)]
    return [stream[a:b] for a, b in itertools.pairwise(bounds)]


def _feed_all(decoder: FrameDecoder, chunks: list[bytes]) -> list[bytes]:
    out: list[bytes] = []
    for chunk in chunks:
        out.extend(decoder.feed(chunk))
    return out


# -- the property --------------------------------------------------------------------------


@settings(deadline=None, max_examples=200)
@given(payloads=payloads_st, data=st.data())
def test_any_split_yields_the_payloads_in_order(payloads: list[bytes], data: st.DataObject) -> None:
    stream = b"".join(encode_frame(p) for p in payloads)
    cuts = data.draw(st.lists(st.integers(0, len(stream)), max_size=40), label="cuts")
    decoder = FrameDecoder()
    out: list[bytes] = []
    fed = 0
    for chunk in _split(stream, cuts):
        out.extend(decoder.feed(chunk))
        fed += len(chunk)
        # What is held is exactly the start of the first frame not yet returned.
        assert decoder.buffered == fed - sum(4 + len(p) for p in out)
    assert out == payloads
    assert decoder.buffered == 0
    decoder.close()  # at a boundary: no TruncatedFrame


@settings(deadline=None)
@given(payloads=payloads_st)
def test_byte_at_a_time(payloads: list[bytes]) -> None:
    stream = encode_frames(payloads)
    decoder = FrameDecoder()
    assert _feed_all(decoder, [stream[i : i + 1] for i in range(len(stream))]) == payloads
    assert decoder.buffered == 0


@settings(deadline=None)
@given(
    items=st.lists(
        st.one_of(
            st.binary(max_size=300).map(lambda b: ("data", b)),
            st.tuples(st.sampled_from(["OVERLOADED", "NO_BACKEND"]), st.text(max_size=40)),
        ),
        max_size=8,
    ),
    data=st.data(),
)
def test_client_decoder_mixes_error_frames_and_payloads(
    items: list[tuple[str, object]], data: st.DataObject
) -> None:
    stream = b"".join(
        encode_frame(v) if k == "data" and isinstance(v, bytes) else encode_error(k, str(v))
        for k, v in items
    )
    cuts = data.draw(st.lists(st.integers(0, len(stream)), max_size=20), label="cuts")
    decoder = FrameDecoder(accept_error_flag=True)

    frames = _feed_all(decoder, _split(stream, cuts))

    assert len(frames) == len(items)
    for frame, (kind, value) in zip(frames, items, strict=True):
        if kind == "data":
            assert not isinstance(frame, ErrorFrame)
            assert frame == value
        else:
            assert isinstance(frame, ErrorFrame)
            assert frame.code_and_message == (kind, value)
    assert decoder.buffered == 0


# -- the cap ---------------------------------------------------------------------------------


def test_oversize_length_raises_after_only_the_header() -> None:
    decoder = FrameDecoder(max_frame_bytes=100)
    header = (101).to_bytes(4, "big")
    for byte in header[:3]:
        assert decoder.feed(bytes([byte])) == []
    with pytest.raises(FrameTooLarge):
        decoder.feed(header[3:])  # no body byte has been fed


def test_length_at_the_cap_is_accepted() -> None:
    decoder = FrameDecoder(max_frame_bytes=100)
    assert decoder.feed(encode_frame(b"x" * 100)) == [b"x" * 100]


def test_oversize_frame_after_good_ones_in_the_same_chunk() -> None:
    # The whole frame before the bad length word was read, so it is returned (and will be
    # answered); the error is kept and raised by the next feed.
    decoder = FrameDecoder(max_frame_bytes=10)
    assert decoder.feed(encode_frame(b"ok") + (11).to_bytes(4, "big")) == [b"ok"]
    assert isinstance(decoder.error, FrameTooLarge)
    with pytest.raises(FrameTooLarge):
        decoder.feed(b"more")


def test_error_flag_is_rejected_by_a_router_decoder() -> None:
    decoder = FrameDecoder()
    with pytest.raises(FrameTooLarge):
        decoder.feed(encode_error("OVERLOADED", "queue full")[:4])


def test_error_flag_is_an_error_frame_for_a_client_decoder() -> None:
    decoder = FrameDecoder(accept_error_flag=True)
    [frame] = decoder.feed(encode_error("OVERLOADED", "queue full: 4096 waiting"))
    assert isinstance(frame, ErrorFrame)
    assert frame.code_and_message == ("OVERLOADED", "queue full: 4096 waiting")
    assert decoder.buffered == 0


@given(code=st.text(min_size=1, max_size=30), message=st.text(max_size=200))
def test_encode_error_round_trips(code: str, message: str) -> None:
    [frame] = FrameDecoder(accept_error_flag=True).feed(encode_error(code, message))
    assert isinstance(frame, ErrorFrame)
    assert frame.code_and_message == (code, message)


def test_error_frame_over_the_cap_is_rejected_by_a_client_decoder() -> None:
    # The cap holds for every length word: a client must not buffer 2 GiB because the word
    # carries the error flag.
    decoder = FrameDecoder(max_frame_bytes=100, accept_error_flag=True)
    with pytest.raises(FrameTooLarge):
        decoder.feed((101 | 0x8000_0000).to_bytes(4, "big"))


def test_max_frame_bytes_must_fit_the_length_word() -> None:
    with pytest.raises(ValueError):
        FrameDecoder(max_frame_bytes=0)
    with pytest.raises(ValueError):
        FrameDecoder(max_frame_bytes=0x8000_0000)


# -- end of stream -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "leftover",
    [b"\x00", b"\x00\x00\x00", b"\x00\x00\x00\x05", b"\x00\x00\x00\x05abcd"],
    ids=["1-header-byte", "3-header-bytes", "header-only", "partial-body"],
)
def test_close_with_leftover_bytes_raises_truncated(leftover: bytes) -> None:
    decoder = FrameDecoder()
    decoder.feed(encode_frame(b"done") + leftover)
    assert decoder.buffered == len(leftover)
    with pytest.raises(TruncatedFrame):
        decoder.close()


def test_close_at_a_boundary_does_not_raise() -> None:
    decoder = FrameDecoder()
    decoder.close()
    assert decoder.feed(encode_frame(b"a") + encode_frame(b"")) == [b"a", b""]
    decoder.close()


# -- frame_parts ---------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [0, 1, 1000, 64 * 1024 - 1])
def test_frame_parts_joins_small_payloads(size: int) -> None:
    payload = bytes(range(256)) * (size // 256) + b"z" * (size % 256)
    assert frame_parts(payload) == [encode_frame(payload)]


@pytest.mark.parametrize("size", [64 * 1024, 64 * 1024 + 1, 1024 * 1024])
def test_frame_parts_leaves_large_payloads_uncopied(size: int) -> None:
    payload = b"q" * size
    parts = frame_parts(payload)
    assert len(parts) == 2
    header, body = parts
    assert header == size.to_bytes(4, "big")
    assert body is payload
    assert b"".join(parts) == encode_frame(payload)


@settings(deadline=None, max_examples=100)
@given(payloads=payloads_st, limit=st.integers(0, 4))
def test_a_limit_holds_whole_frames_back_for_later_feeds(payloads: list[bytes], limit: int) -> None:
    decoder = FrameDecoder()
    out = decoder.feed(encode_frames(payloads), limit)
    assert len(out) == min(limit, len(payloads))
    assert decoder.frame_ready == (len(payloads) > limit)
    for _ in range(len(payloads) + 1):  # bounded: each round takes at least one frame
        if not decoder.frame_ready:
            break
        more = decoder.feed(b"", max(limit, 1))
        assert 1 <= len(more) <= max(limit, 1)
        out.extend(more)
    assert out == payloads
    assert decoder.buffered == 0


def test_frame_ready_is_true_for_a_length_word_the_decoder_rejects() -> None:
    decoder = FrameDecoder(max_frame_bytes=10)
    assert decoder.feed(encode_frame(b"ok") + (11).to_bytes(4, "big"), 1) == [b"ok"]
    assert decoder.frame_ready  # feed(b"") has something to say: FrameTooLarge
    with pytest.raises(FrameTooLarge):
        decoder.feed(b"")
    half = FrameDecoder()
    half.feed(encode_frame(b"abc")[:5])
    assert not half.frame_ready
