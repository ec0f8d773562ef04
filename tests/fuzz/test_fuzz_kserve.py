"""Fuzz target: the KServe field reader (router/protocol/kserve.py ``read_model``).

Three sources of input, each held to protobuf itself (the generated classes of
router/protocol/proto):

* every request message that names a model (ModelInferRequest, ModelReadyRequest,
  ModelMetadataRequest), built with the stubs: the reader returns the name and version
  protobuf parses;
* raw field soups written by an encoder here: fields 1 and 2 any number of times, unknown
  fields of every wire type, over-long varints, in any order: the reader returns the last
  value of each (protobuf's merge rule) and agrees with protobuf whenever protobuf parses;
* those messages mutated (bytes flipped, inserted, deleted, cut, glued to others) and arbitrary
  bytes: never an exception but ``MalformedMessage``, which names a byte offset, and the same
  model as protobuf whenever both parse.
"""

from __future__ import annotations

from google.protobuf.message import DecodeError
from hypothesis import example, given
from hypothesis import strategies as st

from router.core.errors import MalformedMessage
from router.protocol.kserve import ModelRef, read_model
from router.protocol.proto import grpc_predict_v2_pb2 as pb
from tests.fuzz.budget import fuzz_target

names = st.text(max_size=20)


def _varint(value: int, extra: int = 0) -> bytes:
    """``value`` as a varint, padded with ``extra`` redundant bytes (protobuf accepts
    non-canonical varints up to 10 bytes in all)."""
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        if not value:
            out.append(byte)
            break
        out.append(byte | 0x80)
    if extra:
        out[-1] |= 0x80
        out += b"\x80" * (extra - 1) + b"\x00"
    return bytes(out)


def _tag(field: int, wire_type: int, extra: int = 0) -> bytes:
    return _varint(field << 3 | wire_type, extra)


@st.composite
def field_soups(draw: st.DrawFn) -> tuple[bytes, ModelRef | None]:
    """A top-level message as raw fields, and the model protobuf's merge rule gives it (None:
    a tag padded past 5 bytes, which protobuf refuses). Unknown fields are numbered from 16, past
    every field ModelInferRequest declares, so protobuf keeps them as opaque unknown fields."""
    name = version = ""
    valid = True
    out = bytearray()
    for _ in range(draw(st.integers(0, 8))):
        kind = draw(st.sampled_from(["name", "version", "varint", "i64", "len", "i32"]))
        pad = draw(st.sampled_from([0, 0, 0, 1, 3, 9]))
        if kind in ("name", "version"):
            value = draw(names)
            data = value.encode()
            tag = _tag(1 if kind == "name" else 2, 2, pad)
            out += tag + _varint(len(data), min(pad, 3)) + data
            if kind == "name":
                name = value
            else:
                version = value
        else:
            field = draw(st.integers(16, (1 << 29) - 1))
            wire_type = {"varint": 0, "i64": 1, "len": 2, "i32": 5}[kind]
            tag = _tag(field, wire_type, pad)
            out += tag
            if kind == "varint":
                out += _varint(draw(st.integers(0, 2**64 - 1)))
            elif kind == "i64":
                out += draw(st.binary(min_size=8, max_size=8))
            elif kind == "i32":
                out += draw(st.binary(min_size=4, max_size=4))
            else:
                body = draw(st.binary(max_size=30))
                out += _varint(len(body), min(pad, 3)) + body
        valid = valid and len(tag) <= 5
    return bytes(out), ModelRef(name, version) if valid else None


@st.composite
def stub_messages(draw: st.DrawFn) -> tuple[bytes, ModelRef]:
    name, version = draw(names), draw(names)
    kind = draw(st.sampled_from(["infer", "ready", "metadata"]))
    message: pb.ModelInferRequest | pb.ModelReadyRequest | pb.ModelMetadataRequest
    if kind == "infer":
        message = pb.ModelInferRequest(model_name=name, model_version=version, id=draw(names))
        for i in range(draw(st.integers(0, 2))):
            tensor = message.inputs.add(name=f"in{i}", datatype="FP32")
            tensor.shape.extend(draw(st.lists(st.integers(-1, 2**40), max_size=3)))
            message.raw_input_contents.append(draw(st.binary(max_size=64)))
        message.parameters["p"].int64_param = draw(st.integers(-(2**63), 2**63 - 1))
    elif kind == "ready":
        message = pb.ModelReadyRequest(name=name, version=version)
    else:
        message = pb.ModelMetadataRequest(name=name, version=version)
    return message.SerializeToString(), ModelRef(name, version)


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    data = bytearray(draw(st.one_of(stub_messages(), field_soups()))[0])
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "insert", "delete", "cut", "glue"]))
        at = draw(st.integers(0, len(data)))
        if op == "flip" and at < len(data):
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif op == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=4))
        elif op == "delete":
            del data[at:at + draw(st.integers(1, 4))]
        elif op == "cut":
            del data[at:]
        else:
            data += draw(st.one_of(stub_messages(), field_soups()))[0]
    return bytes(data)


def _protobuf(data: bytes) -> ModelRef | None:
    """The model protobuf reads from ``data`` (as a ModelInferRequest), or None: it refuses."""
    try:
        message = pb.ModelInferRequest.FromString(data)
    except DecodeError:
        return None
    return ModelRef(message.model_name, message.model_version)


def _ours(data: bytes) -> ModelRef | None:
    try:
        return read_model(data)
    except MalformedMessage as exc:
        assert "offset" in exc.message, exc.message
        return None


@fuzz_target(smoke_examples=200)
@given(stub_messages())
def test_every_request_that_names_a_model_reads_as_protobuf_builds_it(
    case: tuple[bytes, ModelRef],
) -> None:
    data, model = case
    assert read_model(data) == model


@fuzz_target(smoke_examples=300)
@given(field_soups())
# Over-long (padded) varints in the tag and the length of field 1: still field 1.
@example((_tag(1, 2, 3) + _varint(2, 2) + b"ok", ModelRef("ok", "")))
# Found by this target: a tag padded past 5 bytes, which protobuf refuses, was read.
@example((_tag(2048, 0, 3) + b"\x00", None))
def test_raw_fields_in_any_order_read_as_protobuf_reads_them(
    case: tuple[bytes, ModelRef | None],
) -> None:
    data, model = case
    assert _ours(data) == model  # the last value of each field wins
    assert _protobuf(data) == model


@fuzz_target(smoke_examples=500)
@given(st.one_of(mutated(), st.binary(max_size=120)))
@example(b"\x0a\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01")  # a 10-byte length: 2^64 - 1
@example(b"\x0a\x80\x80\x80\x80\x80\x80\x80\x80\x80\x80\x00")  # an 11-byte varint
@example(b"\x82\x80\x80\x80\x80\x00")  # field 0 behind a padded tag
def test_any_bytes_raise_only_malformed_message_and_agree_with_protobuf(data: bytes) -> None:
    ours = _ours(data)
    theirs = _protobuf(data)
    if ours is not None and theirs is not None:
        assert ours == theirs  # protobuf also checks nested messages, which the reader skips
