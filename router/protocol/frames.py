"""Length-prefixed framing, sans-IO.

A frame is a 4-byte big-endian unsigned length followed by that many payload bytes. The
router never interprets payload bytes. A length word with bit 31 set marks an error frame
produced by the router itself; its payload is JSON ``{"code": ..., "message": ...}``. Lengths
are capped far below 2**31 (``max_frame_bytes``), so the bit is free.

``FrameDecoder`` follows the h11 shape: ``feed(data)`` buffers bytes and returns the complete
payloads found so far (at most ``limit`` of them: whole frames beyond it stay buffered until a
later ``feed``, which may be ``feed(b"")``); it raises ``FrameTooLarge`` as soon as a length
word exceeds the cap (before buffering the body), or, when whole frames came before the bad
length word in the same data, returns those and keeps the error in ``error``; ``close()``
raises ``TruncatedFrame`` when bytes of an unfinished frame are left at end of stream. No
socket, clock or event loop.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable

import orjson
from mypy_extensions import mypyc_attr

from router.core.errors import FrameTooLarge, RouterError, TruncatedFrame

HEADER_BYTES = 4
ERROR_FLAG = 0x8000_0000
LENGTH_MASK = 0x7FFF_FFFF
DEFAULT_MAX_FRAME_BYTES = 16 * 1024 * 1024
_unpack_header = struct.Struct(">I").unpack_from
# Below this size joining header and payload (one copy) is cheaper than a writev of two buffers.
_JOIN_BELOW = 64 * 1024
NO_LIMIT = LENGTH_MASK  # more frames than any one feed can hold


def encode_frame(payload: bytes) -> bytes:
    """Header and payload as one buffer, so the frame goes out in one write."""
    return len(payload).to_bytes(4, "big") + payload


def frame_parts(payload: bytes) -> list[bytes]:
    """The buffers of one frame for ``transport.writelines`` (a single writev under uvloop).

    Small payloads are joined; large ones are not copied.
    """
    header = len(payload).to_bytes(4, "big")
    if len(payload) < _JOIN_BELOW:
        return [header + payload]
    return [header, payload]


def encode_error(code: str, message: str) -> bytes:
    body = orjson.dumps({"code": code, "message": message})
    return (len(body) | ERROR_FLAG).to_bytes(4, "big") + body


def encode_router_error(error: RouterError) -> bytes:
    return encode_error(error.code, error.message)


def parse_header(header: bytes) -> tuple[int, bool]:
    """(length, is_error) of a 4-byte length word."""
    word = int.from_bytes(header, "big")
    return word & LENGTH_MASK, bool(word & ERROR_FLAG)


def decode_error(payload: bytes) -> tuple[str, str]:
    """(code, message) of an error frame's payload."""
    body = orjson.loads(payload)
    return str(body["code"]), str(body["message"])


class FrameDecoder:
    """Incremental decoder: bytes in, complete frame payloads out.

    ``accept_error_flag`` lets a client-side decoder receive router error frames (it returns
    them through ``feed`` as ``ErrorFrame``); the router's own decoders reject the flag, since
    neither a client request nor a backend response may carry it.
    """

    __slots__ = ("_accept_error_flag", "_buffer", "_max_frame_bytes", "_need", "error")

    def __init__(
        self, max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES, *, accept_error_flag: bool = False
    ) -> None:
        if not 0 < max_frame_bytes <= LENGTH_MASK:
            raise ValueError(f"max_frame_bytes must be in 1..{LENGTH_MASK}")
        self._buffer = bytearray()
        self._max_frame_bytes = max_frame_bytes
        self._accept_error_flag = accept_error_flag
        # Length of the frame body being waited for, or -1 while the header is incomplete.
        self._need = -1
        # Set when bad input follows whole frames in one ``feed``: those frames are returned
        # first (they were read whole and must be answered), the error is kept here and raised
        # by any later ``feed``.
        self.error: FrameTooLarge | None = None

    @property
    def buffered(self) -> int:
        """Bytes held: an unfinished frame, and whole frames left past a ``feed``'s ``limit``
        (0 at a frame boundary with nothing held back)."""
        return len(self._buffer)

    @property
    def frame_size(self) -> int:
        """Header and body bytes of the frame being read: known once its length word is in,
        until its body is complete (0 otherwise: at a boundary, inside a length word, or with
        whole frames held past a ``limit``, not parsed yet)."""
        need = self._need
        return HEADER_BYTES + (need & LENGTH_MASK) if need >= 0 else 0

    def discard(self) -> None:
        """Drop every byte held, and their memory: the input is over (bad input, or the read
        budget took the bytes back)."""
        self._buffer = bytearray()
        self._need = -1

    @property
    def frame_ready(self) -> bool:
        """Whether ``feed(b"")`` has something to return or raise: the buffer starts with a
        whole frame (held past a ``limit``) or with a length word it rejects."""
        buf = self._buffer
        if self.error is not None:
            return True
        if len(buf) < HEADER_BYTES:
            return False
        word: int = _unpack_header(buf)[0]
        if self._check_header(word) is not None:
            return True
        return len(buf) >= HEADER_BYTES + (word & LENGTH_MASK)

    def feed(self, data: bytes, limit: int = NO_LIMIT) -> list[bytes]:
        """Append ``data``; return the payloads completed by it, in order, at most ``limit``.

        Whole frames past ``limit`` stay in the buffer (``buffered`` counts them) and come out
        of later calls; they are not checked until then.
        """
        if self.error is not None:
            raise self.error
        buf = self._buffer
        if buf:
            buf += data
            need = self._need
            if need >= 0 and len(buf) < HEADER_BYTES + (need & LENGTH_MASK):
                return []  # still inside one frame's body: keep buffering, parse nothing
            data = bytes(buf)
            buf.clear()
        elif len(data) > HEADER_BYTES and not self._accept_error_flag and limit:
            # The common case, one whole frame in one read: no buffering, one copy. (A word
            # with the error flag set exceeds any max_frame_bytes, so it takes the slow path.)
            word = _unpack_header(data)[0]
            if len(data) == HEADER_BYTES + word and word <= self._max_frame_bytes:
                return [data[HEADER_BYTES:]]
        # Walk the frames by offset (no copy of the bytes behind each one); what is left of an
        # unfinished frame, header included, goes back to the buffer.
        frames: list[bytes] = []
        pos, size, need = 0, len(data), self._need
        while len(frames) < limit:  # also when the header was read by an earlier feed
            if need < 0:
                if size - pos < HEADER_BYTES:
                    break
                word = _unpack_header(data, pos)[0]
                problem = self._check_header(word)
                if problem is not None:
                    buf += data[pos:]
                    if not frames:
                        raise problem
                    self.error = problem
                    return frames
                need = word  # keeps the error flag, if any, for the frame's type
            end = pos + HEADER_BYTES + (need & LENGTH_MASK)
            if end > size:
                break
            payload = data[pos + HEADER_BYTES:end]
            frames.append(ErrorFrame(payload) if need & ERROR_FLAG else payload)
            pos, need = end, -1
        self._need = need
        if pos < size:
            buf += data[pos:] if pos else data
        return frames

    def _check_header(self, word: int) -> FrameTooLarge | None:
        length = word & LENGTH_MASK
        if word & ERROR_FLAG and not self._accept_error_flag:
            return FrameTooLarge(
                f"length word 0x{word:08x} exceeds max_frame_bytes={self._max_frame_bytes}"
            )
        if length > self._max_frame_bytes:
            return FrameTooLarge(
                f"frame of {length} bytes exceeds max_frame_bytes={self._max_frame_bytes}"
            )
        return None

    def close(self) -> None:
        """End of stream: raise ``TruncatedFrame`` if an unfinished frame is buffered."""
        if self._buffer:
            raise TruncatedFrame(
                f"connection closed with {len(self._buffer)} bytes of an unfinished frame"
            )

    def __repr__(self) -> str:
        return f"FrameDecoder(buffered={len(self._buffer)}, max={self._max_frame_bytes})"


@mypyc_attr(native_class=False)  # mypyc compiles no subclass of this builtin
class ErrorFrame(bytes):
    """A payload that arrived with the error flag set (client-side decoders only)."""

    __slots__ = ()

    @property
    def code_and_message(self) -> tuple[str, str]:
        return decode_error(bytes(self))  # orjson refuses bytes subclasses


def encode_frames(payloads: Iterable[bytes]) -> bytes:
    return b"".join(encode_frame(p) for p in payloads)
