"""HTTP/2 frames (RFC 9113 section 4 and 6): a sans-IO decoder and the encoders the relay needs.

The decoder cuts a byte stream into frames ``(type, flags, stream_id, payload)``: plain tuples,
because a relayed unary call passes five or six of them each way and a tuple costs the least to
build. It holds at most one partial frame, so what it buffers is bounded by the largest frame
it accepts (``max_frame_size``, SETTINGS_MAX_FRAME_SIZE as we advertised it) plus a header; a
frame over that bound is a connection error (FRAME_SIZE_ERROR), found from its 9-byte header
before its payload is read.

The payload readers (``data_of``, ``fragment_of``, ``read_settings``, ...) check what RFC 9113
makes a frame's own error (lengths, padding, zero increments) and raise ``H2Error``; whether
it ends the connection or one stream is in the error (``stream_id`` 0: the connection). What
depends on state (windows, stream ids, CONTINUATION order) is the connection's
(``h2connection``).

Encoders return ``bytes`` ready to write; DATA and header blocks are cut at the peer's
SETTINGS_MAX_FRAME_SIZE. Pure functions and one small class: no I/O, no asyncio.
"""

from __future__ import annotations

import struct

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

# Frame types.
DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY = range(8)
WINDOW_UPDATE, CONTINUATION = 8, 9

# Flags (ACK shares END_STREAM's bit on SETTINGS and PING).
END_STREAM = ACK = 0x1
END_HEADERS = 0x4
PADDED = 0x8
PRIORITY_FLAG = 0x20

# Error codes (RFC 9113 section 7).
NO_ERROR, PROTOCOL_ERROR, INTERNAL_ERROR, FLOW_CONTROL_ERROR = 0x0, 0x1, 0x2, 0x3
SETTINGS_TIMEOUT, STREAM_CLOSED, FRAME_SIZE_ERROR, REFUSED_STREAM = 0x4, 0x5, 0x6, 0x7
CANCEL, COMPRESSION_ERROR, CONNECT_ERROR, ENHANCE_YOUR_CALM = 0x8, 0x9, 0xA, 0xB

# Settings.
HEADER_TABLE_SIZE, ENABLE_PUSH, MAX_CONCURRENT_STREAMS = 0x1, 0x2, 0x3
INITIAL_WINDOW_SIZE, MAX_FRAME_SIZE, MAX_HEADER_LIST_SIZE = 0x4, 0x5, 0x6

DEFAULT_MAX_FRAME_SIZE = 16_384
LARGEST_MAX_FRAME_SIZE = (1 << 24) - 1
MAX_WINDOW = (1 << 31) - 1
DEFAULT_WINDOW = 65_535

_HEADER = struct.Struct(">IBI")  # 24-bit length and 8-bit type in one word, flags, stream id
_U32 = struct.Struct(">I")
_U32X2 = struct.Struct(">II")
_SETTING = struct.Struct(">HI")
_STREAM_ID_MASK = 0x7FFF_FFFF

Frame = tuple[int, int, int, bytes]  # (type, flags, stream_id, payload)


class H2Error(Exception):
    """A peer broke the protocol: ``code`` is the HTTP/2 error code to answer with, on the
    stream ``stream_id`` (RST_STREAM) or, when it is 0, on the connection (GOAWAY)."""

    def __init__(self, code: int, message: str, stream_id: int = 0) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.stream_id = stream_id

    def __repr__(self) -> str:
        where = f"stream {self.stream_id}" if self.stream_id else "connection"
        return f"H2Error({where}, code={self.code:#x}, {self.message!r})"


class FrameDecoder:
    """Bytes in, whole frames out. ``expect_preface``: the server side, which first reads the
    client's connection preface (a mismatch is a PROTOCOL_ERROR)."""

    __slots__ = ("_buf", "_preface", "max_frame_size")

    def __init__(self, max_frame_size: int = DEFAULT_MAX_FRAME_SIZE, *,
                 expect_preface: bool = False) -> None:
        self.max_frame_size = max_frame_size
        self._buf = b""
        self._preface = expect_preface

    @property
    def buffered(self) -> int:
        return len(self._buf)

    def receive(self, data: bytes) -> list[Frame]:
        """The frames ``data`` completes, in order. Raises ``H2Error`` (connection)."""
        held = self._buf
        if held and not self._preface and len(held) >= 9:
            # A frame cut by the last read: completed from the head of ``data`` alone, so a
            # large DATA stream is not copied once more per read to join it to the rest.
            need = 9 + (_HEADER.unpack_from(held)[0] >> 8) - len(held)
            if need > len(data):
                self._buf = held + data
                return []
            frames = self._frames(held + data[:need], 0)  # exactly that frame: nothing left
            return frames + self._frames(data, need) if need < len(data) else frames
        return self._frames(held + data if held else data, 0)

    def _frames(self, buf: bytes, pos: int) -> list[Frame]:
        """The whole frames of ``buf`` from ``pos``; what is left is held for the next read."""
        if self._preface:
            if len(buf) < len(PREFACE):
                if not PREFACE.startswith(buf):
                    raise H2Error(PROTOCOL_ERROR, "not an HTTP/2 connection preface")
                self._buf = buf
                return []
            if not buf.startswith(PREFACE):
                raise H2Error(PROTOCOL_ERROR, "not an HTTP/2 connection preface")
            self._preface = False
            pos = len(PREFACE)
        frames: list[Frame] = []
        end = len(buf)
        limit = self.max_frame_size
        unpack = _HEADER.unpack_from
        while end - pos >= 9:
            word, flags, stream_id = unpack(buf, pos)
            length = word >> 8
            if length > limit:
                raise H2Error(FRAME_SIZE_ERROR, f"frame of {length} bytes over {limit}")
            stop = pos + 9 + length
            if stop > end:
                break
            frames.append((word & 0xFF, flags, stream_id & _STREAM_ID_MASK, buf[pos + 9:stop]))
            pos = stop
        self._buf = buf[pos:] if pos < end else b""
        return frames


# -- payload readers ---------------------------------------------------------------------------


def _unpad(flags: int, payload: bytes, stream_id: int, skip: int = 0) -> bytes:
    """``payload`` without its padding (and ``skip`` more leading bytes: HEADERS' priority)."""
    if not flags & PADDED:
        return payload[skip:] if skip else payload
    if not payload:
        raise H2Error(FRAME_SIZE_ERROR, "padded frame without a pad length")
    pad = payload[0]
    if pad + skip + 1 > len(payload):
        raise H2Error(PROTOCOL_ERROR, "padding longer than the frame")
    return payload[1 + skip:len(payload) - pad]


def data_of(flags: int, payload: bytes, stream_id: int) -> bytes:
    """The data of a DATA frame (all of ``payload`` counts against flow control)."""
    if stream_id == 0:
        raise H2Error(PROTOCOL_ERROR, "DATA on stream 0")
    return _unpad(flags, payload, stream_id)


def fragment_of(kind: int, flags: int, payload: bytes, stream_id: int) -> bytes:
    """The header block fragment of a HEADERS or CONTINUATION frame."""
    if stream_id == 0:
        raise H2Error(PROTOCOL_ERROR, "header block on stream 0")
    if kind == CONTINUATION:
        return payload
    skip = 5 if flags & PRIORITY_FLAG else 0
    if skip and len(payload) < 5 + (1 if flags & PADDED else 0):
        raise H2Error(FRAME_SIZE_ERROR, "HEADERS too short for its priority")
    return _unpad(flags, payload, stream_id, skip)


def read_settings(flags: int, payload: bytes, stream_id: int) -> list[tuple[int, int]]:
    """(identifier, value) pairs of a SETTINGS frame, values checked (section 6.5.2)."""
    if stream_id != 0:
        raise H2Error(PROTOCOL_ERROR, "SETTINGS on a stream")
    if flags & ACK:
        if payload:
            raise H2Error(FRAME_SIZE_ERROR, "SETTINGS ACK with a payload")
        return []
    if len(payload) % 6:
        raise H2Error(FRAME_SIZE_ERROR, "SETTINGS length not a multiple of 6")
    settings = [_SETTING.unpack_from(payload, at) for at in range(0, len(payload), 6)]
    for ident, value in settings:
        if ident == ENABLE_PUSH and value > 1:
            raise H2Error(PROTOCOL_ERROR, "SETTINGS_ENABLE_PUSH not 0 or 1")
        if ident == INITIAL_WINDOW_SIZE and value > MAX_WINDOW:
            raise H2Error(FLOW_CONTROL_ERROR, "SETTINGS_INITIAL_WINDOW_SIZE over 2^31-1")
        if ident == MAX_FRAME_SIZE and not (
                DEFAULT_MAX_FRAME_SIZE <= value <= LARGEST_MAX_FRAME_SIZE):
            raise H2Error(PROTOCOL_ERROR, "SETTINGS_MAX_FRAME_SIZE out of range")
    return settings


def read_window_update(payload: bytes, stream_id: int) -> int:
    if len(payload) != 4:
        raise H2Error(FRAME_SIZE_ERROR, "WINDOW_UPDATE not 4 bytes")
    increment = _U32.unpack(payload)[0] & _STREAM_ID_MASK
    if increment == 0:
        raise H2Error(PROTOCOL_ERROR, "WINDOW_UPDATE of 0", stream_id)
    return int(increment)


def read_rst_stream(payload: bytes, stream_id: int) -> int:
    if stream_id == 0:
        raise H2Error(PROTOCOL_ERROR, "RST_STREAM on stream 0")
    if len(payload) != 4:
        raise H2Error(FRAME_SIZE_ERROR, "RST_STREAM not 4 bytes")
    return int(_U32.unpack(payload)[0])


def read_goaway(payload: bytes, stream_id: int) -> tuple[int, int, bytes]:
    """(last stream id, error code, debug data)."""
    if stream_id != 0:
        raise H2Error(PROTOCOL_ERROR, "GOAWAY on a stream")
    if len(payload) < 8:
        raise H2Error(FRAME_SIZE_ERROR, "GOAWAY shorter than 8 bytes")
    last, code = _U32X2.unpack_from(payload)
    return last & _STREAM_ID_MASK, code, payload[8:]


def check_ping(payload: bytes, stream_id: int) -> None:
    if stream_id != 0:
        raise H2Error(PROTOCOL_ERROR, "PING on a stream")
    if len(payload) != 8:
        raise H2Error(FRAME_SIZE_ERROR, "PING not 8 bytes")


def check_priority(payload: bytes, stream_id: int) -> None:
    if stream_id == 0:
        raise H2Error(PROTOCOL_ERROR, "PRIORITY on stream 0")
    if len(payload) != 5:
        raise H2Error(FRAME_SIZE_ERROR, "PRIORITY not 5 bytes", stream_id)


# -- encoders ----------------------------------------------------------------------------------


def frame(kind: int, flags: int, stream_id: int, payload: bytes = b"") -> bytes:
    return _HEADER.pack(len(payload) << 8 | kind, flags, stream_id) + payload


def encode_data(stream_id: int, data: bytes, end_stream: bool, max_frame_size: int) -> bytes:
    """``data`` as DATA frames of at most ``max_frame_size``; END_STREAM on the last."""
    pack = _HEADER.pack
    if len(data) <= max_frame_size:
        return pack(len(data) << 8 | DATA, END_STREAM if end_stream else 0, stream_id) + data
    parts: list[bytes | memoryview] = []
    view = memoryview(data)
    for at in range(0, len(data), max_frame_size):
        chunk = view[at:at + max_frame_size]
        last = at + max_frame_size >= len(data)
        parts.append(pack(len(chunk) << 8 | DATA, END_STREAM if last and end_stream else 0,
                          stream_id))
        parts.append(chunk)
    return b"".join(parts)


def append_data(out: list[bytes | memoryview], stream_id: int, data: bytes, end_stream: bool,
                max_frame_size: int) -> None:
    """``encode_data`` without copying ``data``: each frame's 9-byte header and its data (the
    object itself, or a memoryview slice of it past ``max_frame_size``) appended to ``out``,
    for a vectored write. A 1 MiB message relayed in 64 frames is not copied to make them."""
    pack = _HEADER.pack
    size = len(data)
    if size <= max_frame_size:
        out.append(pack(size << 8 | DATA, END_STREAM if end_stream else 0, stream_id))
        if size:
            out.append(data)
        return
    view = memoryview(data)
    for at in range(0, size, max_frame_size):
        chunk = view[at:at + max_frame_size]
        last = at + max_frame_size >= size
        out.append(pack(len(chunk) << 8 | DATA, END_STREAM if last and end_stream else 0,
                        stream_id))
        out.append(chunk)


def encode_headers(stream_id: int, block: bytes, end_stream: bool, max_frame_size: int) -> bytes:
    """A header block as HEADERS and, past ``max_frame_size``, CONTINUATION frames."""
    flags = END_STREAM if end_stream else 0
    pack = _HEADER.pack
    if len(block) <= max_frame_size:
        return pack(len(block) << 8 | HEADERS, flags | END_HEADERS, stream_id) + block
    parts = [pack(max_frame_size << 8 | HEADERS, flags, stream_id), block[:max_frame_size]]
    for at in range(max_frame_size, len(block), max_frame_size):
        chunk = block[at:at + max_frame_size]
        last = END_HEADERS if at + max_frame_size >= len(block) else 0
        parts += [pack(len(chunk) << 8 | CONTINUATION, last, stream_id), chunk]
    return b"".join(parts)


def encode_settings(settings: list[tuple[int, int]]) -> bytes:
    return frame(SETTINGS, 0, 0, b"".join(_SETTING.pack(i, v) for i, v in settings))


SETTINGS_ACK = frame(SETTINGS, ACK, 0)


def encode_window_update(stream_id: int, increment: int) -> bytes:
    return frame(WINDOW_UPDATE, 0, stream_id, _U32.pack(increment))


def encode_rst_stream(stream_id: int, code: int) -> bytes:
    return frame(RST_STREAM, 0, stream_id, _U32.pack(code))


def encode_goaway(last_stream_id: int, code: int, debug: bytes = b"") -> bytes:
    return frame(GOAWAY, 0, 0, _U32X2.pack(last_stream_id, code) + debug)


def encode_ping(opaque: bytes, ack: bool = False) -> bytes:
    return frame(PING, ACK if ack else 0, 0, opaque)
