"""gRPC server reflection on the router, so ``grpcurl -plaintext HOST:PORT list`` works.

Listed and described: the services the router answers itself, ``grpc.health.v1.Health`` and
``inference.GRPCInferenceService`` (KServe's definition in router/protocol/proto, with the
message types of Triton's extensions beside it), and the reflection service, as
``grpc.reflection.v1`` (which grpcurl asks first) and ``grpc.reflection.v1alpha``. Methods the
generic proxy relays to backends are not listed: the router knows them only by name, when a
call arrives; a backend's own reflection describes them.

grpcio-reflection 1.81 ships only v1alpha. v1 is the same protocol renamed (every message and
field number alike), so one servicer with the v1alpha classes answers both, and the v1 file
descriptor is the v1alpha one with its package renamed, so that ``describe`` finds it too.

Descriptors come from a pool of their own, built from the generated modules' files: the KServe
modules register in a private pool (``router.protocol.proto``), the health and reflection ones
in protobuf's default pool, and reflection reads one pool.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from types import ModuleType

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection, reflection_pb2

from router.protocol.proto import (
    grpc_predict_v2_pb2,
    model_stream_infer_pb2,
    triton_extensions_pb2,
)

V1 = "grpc.reflection.v1.ServerReflection"
V1ALPHA = "grpc.reflection.v1alpha.ServerReflection"
_V1ALPHA_PACKAGE = ".grpc.reflection.v1alpha."
_V1_PACKAGE = ".grpc.reflection.v1."
# In dependency order: a file is added after the files it imports.
_MODULES: tuple[ModuleType, ...] = (
    grpc_predict_v2_pb2, model_stream_infer_pb2, triton_extensions_pb2, health_pb2,
    reflection_pb2,
)


def _file(module: ModuleType) -> descriptor_pb2.FileDescriptorProto:
    return descriptor_pb2.FileDescriptorProto.FromString(module.DESCRIPTOR.serialized_pb)


def _renamed_v1(v1alpha: descriptor_pb2.FileDescriptorProto) -> descriptor_pb2.FileDescriptorProto:
    """The v1alpha reflection file as v1: same messages and fields, package grpc.reflection.v1."""
    v1 = descriptor_pb2.FileDescriptorProto()
    v1.CopyFrom(v1alpha)
    v1.name = "grpc/reflection/v1/reflection.proto"
    v1.package = "grpc.reflection.v1"
    v1.ClearField("options")  # v1alpha's Java and Objective-C names
    for message in v1.message_type:
        for field in message.field:
            if field.type_name.startswith(_V1ALPHA_PACKAGE):  # message-typed fields only
                field.type_name = _V1_PACKAGE + field.type_name[len(_V1ALPHA_PACKAGE):]
    for service in v1.service:
        for method in service.method:
            method.input_type = method.input_type.replace(_V1ALPHA_PACKAGE, _V1_PACKAGE)
            method.output_type = method.output_type.replace(_V1ALPHA_PACKAGE, _V1_PACKAGE)
    return v1


def reflection_pool() -> descriptor_pool.DescriptorPool:
    """Every file the router can describe, in a pool of its own."""
    pool = descriptor_pool.DescriptorPool()
    files = [_file(module) for module in _MODULES]
    files.append(_renamed_v1(_file(reflection_pb2)))
    for proto in files:
        pool.AddSerializedFile(proto.SerializeToString())  # type: ignore[no-untyped-call]
    return pool


def enable_reflection(server: grpc.aio.Server, services: Iterable[str]) -> tuple[str, ...]:
    """Serve reflection on ``server`` for ``services`` and itself; the names it lists.
    Registered methods take precedence over the generic proxy."""
    names = (*services, V1, V1ALPHA)
    servicer = reflection.aio.ReflectionServicer(names, pool=reflection_pool())
    handlers = {
        "ServerReflectionInfo": grpc.stream_stream_rpc_method_handler(
            servicer.ServerReflectionInfo,
            request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
            response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString,
        ),
    }
    for service in (V1, V1ALPHA):
        server.add_registered_method_handlers(service, handlers)
    return tuple(sorted(names))


def reflection_answer(services: Iterable[str]) -> Callable[[bytes], bytes]:
    """For a server that is not grpc.aio's (the relay): the reply to one
    ServerReflectionRequest message, from the same servicer and pool."""
    names = (*services, V1, V1ALPHA)
    servicer = reflection.ReflectionServicer(names, pool=reflection_pool())

    def answer(message: bytes) -> bytes:
        request = reflection_pb2.ServerReflectionRequest.FromString(message)
        reply = next(iter(servicer.ServerReflectionInfo(iter((request,)), None)))
        return bytes(reply.SerializeToString())

    return answer
