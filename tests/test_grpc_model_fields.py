"""Where each KServe/Triton request keeps its model name, read by router/protocol/kserve.py.

Held to what protobuf reads from the same bytes, with tritonclient's generated classes (the
layouts real clients send) and the project's KServe classes: RepositoryModelLoad/Unload in
both layouts, TraceSetting (name in field 2 after a map), ModelConfig and ModelStatistics;
and the RepositoryIndex reply the router composes parses as tritonclient's.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
from hypothesis import given
from hypothesis import strategies as st
from tritonclient.grpc import service_pb2 as triton

from router.core.errors import MalformedMessage
from router.protocol.kserve import (
    ModelRef,
    encode_repository_index,
    read_model,
    read_repository_index,
    read_repository_model,
    read_trace_model,
)
from router.protocol.proto import grpc_predict_v2_pb2 as pb

names = st.text(max_size=30)
blobs = st.binary(max_size=200)


@given(names, st.text(min_size=1, max_size=30), st.dictionaries(names, blobs, max_size=3))
def test_tritons_load_and_unload_name_the_model_in_field_2(
    repository: str, model: str, files: dict[str, bytes]
) -> None:
    for kind in (triton.RepositoryModelLoadRequest, triton.RepositoryModelUnloadRequest):
        request = kind(repository_name=repository, model_name=model)
        for path, content in files.items():
            request.parameters[path].bytes_param = content
        assert read_repository_model(request.SerializeToString()) == ModelRef(model, "")


@given(names)
def test_kserves_load_and_unload_name_the_model_in_field_1(model: str) -> None:
    for kind in (pb.RepositoryModelLoadRequest, pb.RepositoryModelUnloadRequest):
        data = kind(model_name=model).SerializeToString()
        assert read_repository_model(data) == ModelRef(model, "")


@given(st.dictionaries(names, st.lists(names, max_size=3), max_size=3), names)
def test_trace_setting_names_the_model_after_its_settings_map(
    settings: dict[str, list[str]], model: str
) -> None:
    request = triton.TraceSettingRequest(model_name=model)
    for key, values in settings.items():
        request.settings[key].value.extend(values)
    data = request.SerializeToString()
    assert read_trace_model(data) == ModelRef(model, "")
    # The map's entries are nested messages, not strings: only field 2 is read as one.
    assert read_trace_model(data + b"\x0a\x02\xff\xfe") == ModelRef(model, "")


@given(names, names)
def test_model_config_and_statistics_share_the_infer_layout(name: str, version: str) -> None:
    for kind in (triton.ModelConfigRequest, triton.ModelStatisticsRequest):
        data = kind(name=name, version=version).SerializeToString()
        assert read_model(data) == ModelRef(name, version)


@pytest.mark.parametrize("reader", [read_repository_model, read_trace_model])
@given(data=blobs)
def test_arbitrary_bytes_are_malformed_or_read(
    reader: Callable[[bytes], ModelRef], data: bytes
) -> None:
    """No exception but ``MalformedMessage`` escapes, whatever the bytes."""
    try:
        model = reader(data)
    except MalformedMessage:
        return
    assert isinstance(model, ModelRef)


@given(st.lists(st.tuples(names, names, st.booleans()), max_size=5), st.booleans())
def test_repository_index_round_trips_through_tritons_classes(
    models: list[tuple[str, str, bool]], ready: bool
) -> None:
    reply = triton.RepositoryIndexResponse.FromString(
        encode_repository_index([(ModelRef(n, v), r) for n, v, r in models])
    )
    assert [(m.name, m.version, m.state) for m in reply.models] == [
        (n, v, "READY" if r else "UNAVAILABLE") for n, v, r in models
    ]
    request = triton.RepositoryIndexRequest(repository_name="models", ready=ready)
    assert read_repository_index(request.SerializeToString()) is ready


def test_a_repository_index_request_that_is_not_one_is_malformed() -> None:
    with pytest.raises(MalformedMessage):
        read_repository_index(b"\x0a\x10truncated")
