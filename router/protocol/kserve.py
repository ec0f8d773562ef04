"""KServe v2 messages: the model a request names, read without protobuf; the router's replies.

Reading (on the hot path): the router routes ModelInfer/ModelStreamInfer by ``model_name``
(field 1) and ``model_version`` (field 2), and answers ModelReady/ModelMetadata whose requests
carry ``name`` (1) and ``version`` (2) too. ``read_model`` walks the top-level fields of the
raw message once, keeps the last value of fields 1 and 2 (protobuf's rule for a repeated
singular field) and skips every other field by its length, so tensors
(``raw_input_contents``, often megabytes) are never copied or decoded. Nested messages are
not entered: the router passes them through untouched and the backend parses them.

Anything that is not a well-formed top-level message (a truncated varint or length, a length
past the end, a tag over 5 bytes, field number 0, wire types 3/4/6/7, a string that is not
UTF-8) raises
``MalformedMessage`` naming the byte offset; no other exception escapes, whatever the input
(a hypothesis property test holds it to that). Group wire types (3/4) are legal protobuf but
belong to proto2 groups, which no KServe message has, so they are refused rather than skipped.

Writing (off the hot path): the replies the router composes itself (ServerLive, ServerReady,
ModelReady, ServerMetadata) are built with the generated classes of ``router.protocol.proto``.

Pure functions: no I/O, no asyncio.
"""

from __future__ import annotations

from typing import NamedTuple

from router.core.errors import MalformedMessage
from router.protocol.proto import grpc_predict_v2_pb2 as pb

# Wire types (protobuf encoding spec).
_VARINT, _I64, _LEN, _I32 = 0, 1, 2, 5
_MAX_FIELD_NUMBER = (1 << 29) - 1
_MAX_VARINT_BYTES = 10
# A tag is a 32-bit varint: protobuf refuses one padded past 5 bytes, even if its value is small.
_MAX_TAG_BYTES = 5


class ModelRef(NamedTuple):
    """A model name and optional version; ``key`` is what the registry routes on."""

    name: str
    version: str

    @property
    def key(self) -> str:
        return f"{self.name}:{self.version}" if self.version else self.name


def _varint(buf: bytes, pos: int, end: int) -> tuple[int, int]:
    """Decode a varint at ``pos``; return (value, position after it)."""
    value = 0
    shift = 0
    start = pos
    while pos < end:
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7
        if pos - start >= _MAX_VARINT_BYTES:
            raise MalformedMessage(f"varint longer than 10 bytes at offset {start}")
    raise MalformedMessage(f"truncated varint at offset {start}")


def _skip(buf: bytes, pos: int, end: int, wire_type: int, tag_at: int) -> int:
    """Position after the value of a field whose tag ended at ``pos``."""
    if wire_type == _VARINT:
        return _varint(buf, pos, end)[1]
    if wire_type == _LEN:
        length, pos = _varint(buf, pos, end)
        after = pos + length
    elif wire_type == _I64:
        after = pos + 8
    elif wire_type == _I32:
        after = pos + 4
    else:
        raise MalformedMessage(f"unsupported wire type {wire_type} at offset {tag_at}")
    if after > end:
        raise MalformedMessage(f"field at offset {tag_at} runs past the end of the message")
    return after


def _string(buf: bytes, start: int, stop: int, tag_at: int) -> str:
    try:
        return buf[start:stop].decode()
    except UnicodeDecodeError:
        raise MalformedMessage(f"string field at offset {tag_at} is not UTF-8") from None


def read_model(message: bytes) -> ModelRef:
    """Fields 1 and 2 (strings) of a ModelInferRequest / ModelReadyRequest /
    ModelMetadataRequest; ``""`` where absent. Raises ``MalformedMessage``."""
    name = version = ""
    pos, end = 0, len(message)
    while pos < end:
        tag_at = pos
        tag, pos = _varint(message, pos, end)
        if pos - tag_at > _MAX_TAG_BYTES:
            raise MalformedMessage(f"tag longer than {_MAX_TAG_BYTES} bytes at offset {tag_at}")
        field, wire_type = tag >> 3, tag & 7
        if field == 0 or field > _MAX_FIELD_NUMBER:
            raise MalformedMessage(f"invalid field number {field} at offset {tag_at}")
        if field <= 2:
            if wire_type != _LEN:
                raise MalformedMessage(f"field {field} at offset {tag_at} is not a string")
            length, start = _varint(message, pos, end)
            pos = start + length
            if pos > end:
                raise MalformedMessage(f"field at offset {tag_at} runs past the end of the message")
            if field == 1:
                name = _string(message, start, pos, tag_at)
            else:
                version = _string(message, start, pos, tag_at)
        else:
            pos = _skip(message, pos, end, wire_type, tag_at)
    return ModelRef(name, version)


# -- writing ----------------------------------------------------------------------------------


def encode_server_live(live: bool) -> bytes:
    return pb.ServerLiveResponse(live=live).SerializeToString()


def encode_server_ready(ready: bool) -> bytes:
    return pb.ServerReadyResponse(ready=ready).SerializeToString()


def encode_model_ready(ready: bool) -> bytes:
    return pb.ModelReadyResponse(ready=ready).SerializeToString()


def encode_server_metadata(name: str, version: str, extensions: tuple[str, ...] = ()) -> bytes:
    reply = pb.ServerMetadataResponse(name=name, version=version, extensions=extensions)
    return reply.SerializeToString()
