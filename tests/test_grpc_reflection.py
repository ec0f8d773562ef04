"""gRPC server reflection on the router (what ``grpcurl -plaintext HOST:PORT list`` and
``describe`` ask), with grpcio-reflection's own client over loopback.

grpcurl itself is not packaged for this machine's distribution (``apt-cache policy grpcurl``
finds no candidate), so the v1 protocol that grpcurl asks first is driven with raw calls.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool
from grpc_reflection.v1alpha import reflection_pb2
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

from tests.grpc_support import (
    CALL_TIMEOUT_S,
    GrpcRouterFactory,
    KServeBackend,
    grpc_backend,
)

Backends = Callable[..., KServeBackend]
LISTED = [
    "grpc.health.v1.Health",
    "grpc.reflection.v1.ServerReflection",
    "grpc.reflection.v1alpha.ServerReflection",
    "inference.GRPCInferenceService",
]


def _describe(target: str) -> dict[str, list[str]]:
    """What grpcurl's list and describe show, through grpcio-reflection's client (v1alpha):
    each listed service's methods, and the fields of two messages."""
    with grpc.insecure_channel(target) as channel:
        database = ProtoReflectionDescriptorDatabase(channel)
        pool = descriptor_pool.DescriptorPool(database)
        described = {
            name: [method.name for method in pool.FindServiceByName(name).methods]
            for name in database.get_services()
        }
        for name in ("inference.ModelInferRequest", "inference.RepositoryIndexResponse"):
            message = pool.FindMessageTypeByName(name)
            described[name] = [f"{f.name}={f.number}" for f in message.fields[:2]]
        return described


async def test_reflection_lists_and_describes_the_routers_own_services(
    kserve_backend: Backends, grpc_router: GrpcRouterFactory
) -> None:
    backend = kserve_backend()
    router = await grpc_router([grpc_backend(backend.address, "sum")])
    async with asyncio.timeout(CALL_TIMEOUT_S):
        described = await asyncio.to_thread(_describe, router.target)
    # Listed: the router's own services; routertest.Echo (proxied to backends) is not.
    assert sorted(described) == sorted(
        [*LISTED, "inference.ModelInferRequest", "inference.RepositoryIndexResponse"]
    )
    assert described["grpc.health.v1.Health"] == ["Check", "Watch"]
    assert "ModelInfer" in described["inference.GRPCInferenceService"]
    assert described["grpc.reflection.v1.ServerReflection"] == ["ServerReflectionInfo"]
    assert described["inference.ModelInferRequest"] == ["model_name=1", "model_version=2"]
    assert described["inference.RepositoryIndexResponse"] == ["models=1"]
    assert router.backend(backend.address)["requests_total"] == 0  # answered by the router


async def test_reflection_v1_as_grpcurl_asks_it(
    kserve_backend: Backends, grpc_router: GrpcRouterFactory
) -> None:
    """grpcurl asks grpc.reflection.v1 first: the router answers it (not the generic proxy,
    which would hand it to a backend), with the same messages as v1alpha."""
    backend = kserve_backend()
    router = await grpc_router([grpc_backend(backend.address)])
    request = reflection_pb2.ServerReflectionRequest
    async with router.channel() as channel:
        call = channel.stream_stream(
            "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
            request_serializer=request.SerializeToString,
            response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
        )(timeout=CALL_TIMEOUT_S)
        await call.write(request(list_services=""))
        listed = await call.read()
        await call.write(request(file_containing_symbol="grpc.reflection.v1.ServerReflection"))
        file = await call.read()
        await call.write(request(file_containing_symbol="routertest.Echo"))
        unknown = await call.read()
        await call.done_writing()
        assert await call.read() == grpc.aio.EOF
        assert await call.code() == grpc.StatusCode.OK
    assert sorted(s.name for s in listed.list_services_response.service) == LISTED
    files = [
        descriptor_pb2.FileDescriptorProto.FromString(raw)
        for raw in file.file_descriptor_response.file_descriptor_proto
    ]
    v1 = next(f for f in files if f.package == "grpc.reflection.v1")
    assert v1.name == "grpc/reflection/v1/reflection.proto"
    assert v1.service[0].method[0].input_type == ".grpc.reflection.v1.ServerReflectionRequest"
    assert unknown.error_response.error_code == grpc.StatusCode.NOT_FOUND.value[0]
    assert router.backend(backend.address)["requests_total"] == 0
