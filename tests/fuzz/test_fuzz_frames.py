"""Fuzz target: the frame decoder (router/protocol/frames.py) on arbitrary bytes.

The stream mixes whole frames, error-flagged and oversize length words and raw garbage, is cut
anywhere, and is fed with any ``limit`` per call, then drained with ``feed(b"")``. It is held to
a reference parser written here from the protocol's definition (4-byte big-endian length, bit
31 the error flag, lengths capped by ``max_frame_bytes``): the same payloads in the same order,
of the same type, then exactly the error the reference finds; ``FrameTooLarge`` and
``TruncatedFrame`` are the only exceptions, ``buffered`` accounts for every byte fed, and
``frame_ready`` says truly whether ``feed(b"")`` has something to give.
"""

from __future__ import annotations

import contextlib
import itertools

from hypothesis import example, given
from hypothesis import strategies as st

from router.core.errors import FrameTooLarge, TruncatedFrame
from router.protocol.frames import (
    ERROR_FLAG,
    HEADER_BYTES,
    LENGTH_MASK,
    NO_LIMIT,
    ErrorFrame,
    FrameDecoder,
    encode_error,
    encode_frame,
)
from tests.fuzz.budget import fuzz_target
from tests.fuzz.reference import reference

MAX_FRAME = 48  # small, so that oversize words and whole frames both come up often

segments = st.one_of(
    st.binary(max_size=MAX_FRAME).map(encode_frame),
    st.binary(max_size=MAX_FRAME).map(lambda p: (len(p) | ERROR_FLAG).to_bytes(4, "big") + p),
    st.builds(lambda code, msg: encode_error(code, msg), st.text(max_size=8), st.text(max_size=8)),
    st.integers(0, 0xFFFF_FFFF).map(lambda word: word.to_bytes(4, "big")),
    st.binary(max_size=12),
)
streams = st.lists(segments, max_size=12).map(b"".join)
limits = st.one_of(st.integers(0, 3), st.just(NO_LIMIT))


def _chunks(stream: bytes, cuts: list[int]) -> list[bytes]:
    bounds = [0, *sorted(cuts), len(stream)]
    return [stream[a:b] for a, b in itertools.pairwise(bounds)]


@fuzz_target(smoke_examples=300)
@given(
    stream=streams,
    max_frame_bytes=st.sampled_from([1, 5, MAX_FRAME, LENGTH_MASK]),
    accept_error_flag=st.booleans(),
    cuts=st.lists(st.integers(0, 400), max_size=16),  # past the end: cut at the end
    feed_limits=st.lists(limits, min_size=1, max_size=8),
)
# The fast path (one whole frame in one read) with a word that has the error flag set.
@example(stream=(4 | ERROR_FLAG).to_bytes(4, "big") + b"oops", max_frame_bytes=LENGTH_MASK,
         accept_error_flag=False, cuts=[], feed_limits=[NO_LIMIT])
# Found by this target: a frame whose header came in an earlier feed was returned by a feed
# with limit=0.
@example(stream=b"\x00\x00\x00\x01\x00", max_frame_bytes=1, accept_error_flag=False, cuts=[4],
         feed_limits=[NO_LIMIT, 0])
def test_decoder_agrees_with_the_reference_on_any_bytes_any_split_any_limit(
    stream: bytes, max_frame_bytes: int, accept_error_flag: bool, cuts: list[int],
    feed_limits: list[int],
) -> None:
    expected = reference(stream, max_frame_bytes, accept_error_flag)
    cuts = [min(cut, len(stream)) for cut in cuts]
    decoder = FrameDecoder(max_frame_bytes, accept_error_flag=accept_error_flag)
    got: list[bytes] = []
    fed = 0
    raised: FrameTooLarge | None = None
    calls = itertools.cycle(feed_limits)
    pending = _chunks(stream, cuts)
    # Every chunk, then feed(b"") while a frame is ready: each call returns at least one frame
    # or raises, so the drain ends within one call per frame.
    for _ in range(len(pending) + len(expected.frames) + 2 * len(feed_limits) + 2):
        if not pending and not decoder.frame_ready:
            break
        chunk = pending.pop(0) if pending else b""
        limit = next(calls) if chunk else max(next(calls), 1)
        ready_before = decoder.frame_ready
        try:
            out = decoder.feed(chunk, limit)
        except FrameTooLarge as exc:
            raised = exc
            break
        fed += len(chunk)
        assert len(out) <= limit
        if not chunk and limit:
            assert bool(out) or decoder.error is not None or not ready_before
        got.extend(out)
        if decoder.error is None:
            # Held is exactly what follows the frames returned so far.
            assert decoder.buffered == fed - sum(HEADER_BYTES + len(p) for p in got)
    assert [(bytes(p), isinstance(p, ErrorFrame)) for p in got] == expected.frames
    if expected.too_large:
        assert raised is not None or decoder.error is not None
        return
    assert raised is None and decoder.error is None
    assert not decoder.frame_ready
    assert decoder.buffered == len(stream) - expected.consumed
    try:
        decoder.close()
    except TruncatedFrame:
        assert expected.consumed < len(stream)
    else:
        assert expected.consumed == len(stream)


@fuzz_target(smoke_examples=200)
@given(stream=streams, max_frame_bytes=st.sampled_from([1, MAX_FRAME]))
def test_after_a_refused_length_word_every_feed_raises_the_same_error(
    stream: bytes, max_frame_bytes: int,
) -> None:
    decoder = FrameDecoder(max_frame_bytes)
    with contextlib.suppress(FrameTooLarge):
        decoder.feed(stream)
    if decoder.error is None and not reference(stream, max_frame_bytes, False).too_large:
        return
    first = decoder.error
    for extra in (b"", b"\x00\x00\x00\x00", b"more"):
        try:
            decoder.feed(extra)
        except FrameTooLarge as exc:
            assert first is None or exc is first
        else:
            raise AssertionError("a decoder past a refused length word accepted more input")
