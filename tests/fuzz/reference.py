"""A reference parser of the length-prefixed protocol, written from its definition (4-byte
big-endian length, bit 31 the error flag, lengths capped by ``max_frame_bytes``) rather than
for speed: what the fuzz targets hold the decoder and the session to."""

from __future__ import annotations

from typing import NamedTuple

from router.protocol.frames import ERROR_FLAG, HEADER_BYTES, LENGTH_MASK


class Parsed(NamedTuple):
    frames: list[tuple[bytes, bool]]  # (payload, carried the error flag)
    too_large: bool  # stopped at a length word the decoder must refuse
    consumed: int  # bytes of whole frames, up to the first unfinished or refused one


def reference(stream: bytes, max_frame_bytes: int, accept_error_flag: bool) -> Parsed:
    frames: list[tuple[bytes, bool]] = []
    pos = 0
    while len(stream) - pos >= HEADER_BYTES:
        word = int.from_bytes(stream[pos:pos + HEADER_BYTES], "big")
        flagged, length = bool(word & ERROR_FLAG), word & LENGTH_MASK
        if (flagged and not accept_error_flag) or length > max_frame_bytes:
            return Parsed(frames, True, pos)
        end = pos + HEADER_BYTES + length
        if end > len(stream):
            break
        frames.append((stream[pos + HEADER_BYTES:end], flagged))
        pos = end
    return Parsed(frames, False, pos)
