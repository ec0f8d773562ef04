from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Registration(_message.Message):
    __slots__ = ("id", "address", "protocol", "models", "weight", "labels", "lease_ttl_s", "leaseless")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    ID_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    PROTOCOL_FIELD_NUMBER: _ClassVar[int]
    MODELS_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    LEASE_TTL_S_FIELD_NUMBER: _ClassVar[int]
    LEASELESS_FIELD_NUMBER: _ClassVar[int]
    id: str
    address: str
    protocol: str
    models: _containers.RepeatedScalarFieldContainer[str]
    weight: int
    labels: _containers.ScalarMap[str, str]
    lease_ttl_s: float
    leaseless: bool
    def __init__(self, id: _Optional[str] = ..., address: _Optional[str] = ..., protocol: _Optional[str] = ..., models: _Optional[_Iterable[str]] = ..., weight: _Optional[int] = ..., labels: _Optional[_Mapping[str, str]] = ..., lease_ttl_s: _Optional[float] = ..., leaseless: _Optional[bool] = ...) -> None: ...

class Registered(_message.Message):
    __slots__ = ("id", "lease_ttl_s", "heartbeat_interval_s")
    ID_FIELD_NUMBER: _ClassVar[int]
    LEASE_TTL_S_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_INTERVAL_S_FIELD_NUMBER: _ClassVar[int]
    id: str
    lease_ttl_s: float
    heartbeat_interval_s: float
    def __init__(self, id: _Optional[str] = ..., lease_ttl_s: _Optional[float] = ..., heartbeat_interval_s: _Optional[float] = ...) -> None: ...

class ModelList(_message.Message):
    __slots__ = ("models",)
    MODELS_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, models: _Optional[_Iterable[str]] = ...) -> None: ...

class ModelUse(_message.Message):
    __slots__ = ("use",)
    class UseEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    USE_FIELD_NUMBER: _ClassVar[int]
    use: _containers.ScalarMap[str, int]
    def __init__(self, use: _Optional[_Mapping[str, int]] = ...) -> None: ...

class LoadReport(_message.Message):
    __slots__ = ("inflight", "loaded_models", "model_use")
    INFLIGHT_FIELD_NUMBER: _ClassVar[int]
    LOADED_MODELS_FIELD_NUMBER: _ClassVar[int]
    MODEL_USE_FIELD_NUMBER: _ClassVar[int]
    inflight: int
    loaded_models: ModelList
    model_use: ModelUse
    def __init__(self, inflight: _Optional[int] = ..., loaded_models: _Optional[_Union[ModelList, _Mapping]] = ..., model_use: _Optional[_Union[ModelUse, _Mapping]] = ...) -> None: ...

class HeartbeatRequest(_message.Message):
    __slots__ = ("id", "report")
    ID_FIELD_NUMBER: _ClassVar[int]
    REPORT_FIELD_NUMBER: _ClassVar[int]
    id: str
    report: LoadReport
    def __init__(self, id: _Optional[str] = ..., report: _Optional[_Union[LoadReport, _Mapping]] = ...) -> None: ...

class DeregisterRequest(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    def __init__(self, id: _Optional[str] = ...) -> None: ...

class ListRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListResponse(_message.Message):
    __slots__ = ("backends",)
    BACKENDS_FIELD_NUMBER: _ClassVar[int]
    backends: _containers.RepeatedCompositeFieldContainer[BackendInfo]
    def __init__(self, backends: _Optional[_Iterable[_Union[BackendInfo, _Mapping]]] = ...) -> None: ...

class WatchRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class WatchEvent(_message.Message):
    __slots__ = ("kind", "backend")
    KIND_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    kind: str
    backend: BackendInfo
    def __init__(self, kind: _Optional[str] = ..., backend: _Optional[_Union[BackendInfo, _Mapping]] = ...) -> None: ...

class BackendInfo(_message.Message):
    __slots__ = ("id", "address", "protocol", "models", "weight", "labels", "source", "state", "drained", "lease_ttl_s", "inflight", "reported")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    ID_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    PROTOCOL_FIELD_NUMBER: _ClassVar[int]
    MODELS_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    DRAINED_FIELD_NUMBER: _ClassVar[int]
    LEASE_TTL_S_FIELD_NUMBER: _ClassVar[int]
    INFLIGHT_FIELD_NUMBER: _ClassVar[int]
    REPORTED_FIELD_NUMBER: _ClassVar[int]
    id: str
    address: str
    protocol: str
    models: _containers.RepeatedScalarFieldContainer[str]
    weight: int
    labels: _containers.ScalarMap[str, str]
    source: str
    state: str
    drained: bool
    lease_ttl_s: float
    inflight: int
    reported: LoadReport
    def __init__(self, id: _Optional[str] = ..., address: _Optional[str] = ..., protocol: _Optional[str] = ..., models: _Optional[_Iterable[str]] = ..., weight: _Optional[int] = ..., labels: _Optional[_Mapping[str, str]] = ..., source: _Optional[str] = ..., state: _Optional[str] = ..., drained: _Optional[bool] = ..., lease_ttl_s: _Optional[float] = ..., inflight: _Optional[int] = ..., reported: _Optional[_Union[LoadReport, _Mapping]] = ...) -> None: ...
