"""The sans-IO KServe field reader and the reply encoders (router/protocol/kserve.py).

Messages are built and parsed with the generated KServe classes (router/protocol/proto), so the
reader is held to what protobuf itself does: same model name and version on every message
hypothesis can build, on concatenations (protobuf's merge: the last value wins), on every
truncation (a clean error exactly where protobuf fails too), and never anything but
``MalformedMessage`` on arbitrary bytes.
"""

from __future__ import annotations

import pytest
from google.protobuf.message import DecodeError
from hypothesis import given, settings
from hypothesis import strategies as st

from router.core.errors import ClientProtocolError, MalformedMessage
from router.protocol.kserve import (
    ModelRef,
    encode_model_ready,
    encode_server_live,
    encode_server_metadata,
    encode_server_ready,
    read_model,
)
from router.protocol.proto import grpc_predict_v2_pb2 as pb

names = st.text(max_size=40)
shapes = st.lists(st.integers(min_value=-1, max_value=2**40), max_size=4)
params = st.dictionaries(
    st.text(max_size=8),
    st.one_of(
        st.builds(lambda b: pb.InferParameter(bool_param=b), st.booleans()),
        st.builds(lambda i: pb.InferParameter(int64_param=i), st.integers(-(2**63), 2**63 - 1)),
        st.builds(lambda s: pb.InferParameter(string_param=s), st.text(max_size=8)),
    ),
    max_size=3,
)


@st.composite
def infer_requests(draw: st.DrawFn) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(
        model_name=draw(names), model_version=draw(names), id=draw(names)
    )
    for key, value in draw(params).items():
        request.parameters[key].CopyFrom(value)
    for index in range(draw(st.integers(0, 3))):
        tensor = request.inputs.add(
            name=f"INPUT{index}", datatype=draw(st.sampled_from(["FP32", "INT64", "BYTES"]))
        )
        tensor.shape.extend(draw(shapes))
        if draw(st.booleans()):
            tensor.contents.fp32_contents.extend(
                draw(st.lists(st.floats(width=32, allow_nan=False), max_size=5))
            )
        request.raw_input_contents.append(draw(st.binary(max_size=300)))
    for name in draw(st.lists(names, max_size=2)):
        request.outputs.add(name=name)
    return request


def _protobuf_model(data: bytes) -> ModelRef | None:
    """What protobuf reads from ``data`` as a ModelInferRequest (None: it fails)."""
    try:
        message = pb.ModelInferRequest.FromString(data)
    except DecodeError:
        return None
    return ModelRef(message.model_name, message.model_version)


def _ours(data: bytes) -> ModelRef | None:
    try:
        return read_model(data)
    except MalformedMessage:
        return None


@settings(max_examples=300, deadline=None)
@given(infer_requests())
def test_reads_what_protobuf_reads(request: pb.ModelInferRequest) -> None:
    assert read_model(request.SerializeToString()) == (request.model_name, request.model_version)


@settings(deadline=None)
@given(infer_requests(), infer_requests())
def test_concatenated_messages_merge_like_protobuf(
    first: pb.ModelInferRequest, second: pb.ModelInferRequest
) -> None:
    data = first.SerializeToString() + second.SerializeToString()
    assert read_model(data) == _protobuf_model(data)


@settings(max_examples=100, deadline=None)
@given(infer_requests())
def test_every_truncation_fails_cleanly_exactly_where_protobuf_does(
    request: pb.ModelInferRequest,
) -> None:
    data = request.SerializeToString()
    for cut in range(len(data)):
        prefix = data[:cut]
        assert _ours(prefix) == _protobuf_model(prefix), f"cut at {cut} of {len(data)}"


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=200))
def test_arbitrary_bytes_never_crash_and_agree_when_both_parse(data: bytes) -> None:
    try:
        ours = read_model(data)
    except MalformedMessage as exc:
        assert "offset" in exc.message
        return
    theirs = _protobuf_model(data)
    if theirs is not None:  # protobuf also checks nested messages, which we skip
        assert ours == theirs


@settings(deadline=None)
@given(infer_requests(), st.binary(max_size=50))
def test_valid_message_with_garbage_appended_never_crashes(
    request: pb.ModelInferRequest, garbage: bytes
) -> None:
    _ours(request.SerializeToString() + garbage)


@given(names, names)
def test_model_ready_and_metadata_requests_share_the_layout(name: str, version: str) -> None:
    for message in (
        pb.ModelReadyRequest(name=name, version=version),
        pb.ModelMetadataRequest(name=name, version=version),
    ):
        assert read_model(message.SerializeToString()) == (name, version)


@pytest.mark.parametrize(
    ("data", "why"),
    [
        (b"\x0a", "truncated varint"),
        (b"\x0a\x05ab", "past the end"),
        (b"\x00\x00", "invalid field number 0"),
        (b"\x08\x01", "is not a string"),  # field 1 as a varint
        (b"\x0a\x02\xff\xfe", "not UTF-8"),
        (b"\x2b", "unsupported wire type 3"),  # a proto2 group
        (b"\x0a" + b"\xff" * 11, "longer than 10 bytes"),
        (b"\x39\x01\x02", "past the end"),  # field 7, fixed64, 2 of 8 bytes
    ],
)
def test_malformed_input_names_the_problem_and_is_the_clients_fault(data: bytes, why: str) -> None:
    with pytest.raises(MalformedMessage, match=why) as caught:
        read_model(data)
    assert isinstance(caught.value, ClientProtocolError)
    assert caught.value.grpc_status == "INVALID_ARGUMENT"


def test_model_key_carries_the_version_only_when_given() -> None:
    assert ModelRef("sum", "").key == "sum"
    assert ModelRef("sum", "2").key == "sum:2"


@given(st.booleans())
def test_bool_replies_parse_as_their_messages(value: bool) -> None:
    assert pb.ServerLiveResponse.FromString(encode_server_live(value)).live is value
    assert pb.ServerReadyResponse.FromString(encode_server_ready(value)).ready is value
    assert pb.ModelReadyResponse.FromString(encode_model_ready(value)).ready is value


@given(names, names, st.lists(names, max_size=4))
def test_server_metadata_parses_back(name: str, version: str, extensions: list[str]) -> None:
    reply = pb.ServerMetadataResponse.FromString(
        encode_server_metadata(name, version, tuple(extensions))
    )
    assert (reply.name, reply.version, list(reply.extensions)) == (name, version, extensions)
