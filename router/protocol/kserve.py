"""KServe v2 messages: the model a request names, read without protobuf; the router's replies.

Reading (on the hot path): the router routes every ``inference.GRPCInferenceService`` call that
names a model by that name, and answers ModelReady itself. Where the name sits:

* ``read_model``: ``name``/``model_name`` (field 1) and ``version``/``model_version`` (field 2)
  of ModelInfer (and each ModelStreamInfer message), ModelReady, ModelMetadata and Triton's
  ModelConfig and ModelStatistics;
* ``read_repository_model``: RepositoryModelLoad/Unload, whose model name is field 1 in KServe's
  layout and field 2 in Triton's (field 1 there is ``repository_name``): field 2 when the
  message has it, else field 1; no version (the call is about the model);
* ``read_trace_model``: Triton's TraceSetting, ``model_name`` in field 2 (field 1 is a map).

Each reader walks the top-level fields of the raw message once, keeps the last value of the
fields it wants (protobuf's rule for a repeated singular field) and skips every other field by
its length, so tensors (``raw_input_contents``, often megabytes) are never copied or decoded.
Nested messages are not entered: the router passes them through untouched and the backend
parses them.

Anything that is not a well-formed top-level message (a truncated varint or length, a length
past the end, a tag over 5 bytes, field number 0, wire types 3/4/6/7, a wanted field that is
not a UTF-8 string) raises ``MalformedMessage`` naming the byte offset; no other exception
escapes, whatever the input (a hypothesis property test holds it to that). Group wire types
(3/4) are legal protobuf but belong to proto2 groups, which no KServe message has, so they are
refused rather than skipped.

Writing (off the hot path): the replies the router composes itself (ServerLive, ServerReady,
ModelReady, ServerMetadata, RepositoryIndex) are built with the generated classes of
``router.protocol.proto``.

Pure functions: no I/O, no asyncio.
"""

from __future__ import annotations

from typing import NamedTuple

from google.protobuf.message import DecodeError

from router.core.errors import MalformedMessage
from router.protocol.proto import grpc_predict_v2_pb2 as pb
from router.protocol.proto import triton_extensions_pb2 as triton

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


def _strings(message: bytes, first: int, second: int) -> tuple[str, str]:
    """The last values of string fields ``first`` and ``second`` (``""`` where absent); every
    other field skipped. Raises ``MalformedMessage``."""
    values = ["", ""]
    pos, end = 0, len(message)
    while pos < end:
        tag_at = pos
        tag = message[pos]
        if tag < 0x80:  # fields 1-15: a one-byte tag, read here rather than by _varint
            pos += 1
        else:
            tag, pos = _varint(message, pos, end)
            if pos - tag_at > _MAX_TAG_BYTES:
                raise MalformedMessage(
                    f"tag longer than {_MAX_TAG_BYTES} bytes at offset {tag_at}")
        field, wire_type = tag >> 3, tag & 7
        if field == 0 or field > _MAX_FIELD_NUMBER:
            raise MalformedMessage(f"invalid field number {field} at offset {tag_at}")
        if wire_type == _LEN and pos < end and message[pos] < 0x80:
            length, start = message[pos], pos + 1  # a length under 128: one byte
            if field != first and field != second:
                pos = start + length
                if pos > end:
                    raise MalformedMessage(
                        f"field at offset {tag_at} runs past the end of the message")
                continue
        elif field in (first, second):
            if wire_type != _LEN:
                raise MalformedMessage(f"field {field} at offset {tag_at} is not a string")
            length, start = _varint(message, pos, end)
        else:
            pos = _skip(message, pos, end, wire_type, tag_at)
            continue
        pos = start + length
        if pos > end:
            raise MalformedMessage(f"field at offset {tag_at} runs past the end of the message")
        values[field != first] = _string(message, start, pos, tag_at)
    return values[0], values[1]


def whole_fields(start: bytes) -> bytes:
    """The top-level fields of ``start`` (the first bytes of a longer message) that it holds
    whole: cut before the first one it holds only part of."""
    pos, end = 0, len(start)
    while pos < end:
        try:
            tag, after = _varint(start, pos, end)
            after = _skip(start, after, end, tag & 7, pos)
        except MalformedMessage:
            break
        pos = after
    return start[:pos]


def read_model(message: bytes) -> ModelRef:
    """Fields 1 and 2 (strings) of a ModelInferRequest / ModelReadyRequest /
    ModelMetadataRequest / ModelConfigRequest / ModelStatisticsRequest; ``""`` where absent.
    Raises ``MalformedMessage``."""
    return ModelRef(*_strings(message, 1, 2))


def read_repository_model(message: bytes) -> ModelRef:
    """The model of a RepositoryModelLoadRequest / RepositoryModelUnloadRequest: Triton's
    ``model_name`` (field 2) when present, else KServe's (field 1). Raises
    ``MalformedMessage``."""
    first, second = _strings(message, 1, 2)
    return ModelRef(second or first, "")


def read_trace_model(message: bytes) -> ModelRef:
    """``model_name`` (field 2) of Triton's TraceSettingRequest; ``""`` for the server-wide
    settings. Raises ``MalformedMessage``."""
    return ModelRef(_strings(message, 2, 0)[0], "")


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


def read_repository_index(message: bytes) -> bool:
    """The ``ready`` flag of a RepositoryIndexRequest (only models ready for inference).
    Off the hot path: parsed with the generated class. Raises ``MalformedMessage``."""
    try:
        return bool(triton.RepositoryIndexRequest.FromString(message).ready)
    except DecodeError:
        raise MalformedMessage("not a RepositoryIndexRequest") from None


def encode_repository_index(models: list[tuple[ModelRef, bool]]) -> bytes:
    """A RepositoryIndexResponse: each model with state READY or UNAVAILABLE."""
    reply = triton.RepositoryIndexResponse()
    for model, ready in models:
        reply.models.add(
            name=model.name, version=model.version, state="READY" if ready else "UNAVAILABLE"
        )
    return reply.SerializeToString()
