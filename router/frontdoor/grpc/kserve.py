"""KServe v2 (Open Inference Protocol) on the gRPC front door: ``inference.GRPCInferenceService``.

Routed to a backend, by the model named in the request (read by ``kserve.read_model``, tensors
untouched): ModelInfer (unary, through the dispatcher) and ModelStreamInfer (Triton's streaming
extension; the whole stream goes to a backend chosen for the model of its first message).

Answered by the router itself, without touching a backend:

* ServerLive: true while the process runs (also while draining);
* ServerReady: ``Readiness`` for gRPC backends (not draining, some gRPC backend in rotation);
* ModelReady: ``Readiness`` for gRPC backends serving the model; false for a model no backend
  serves (as Triton answers it, rather than an error);
* ServerMetadata: the router's name and version, no extensions;
* ModelMetadata: fetched from a backend that serves the model on first request, then cached
  (per "name" or "name:version") for the router's life. Concurrent first requests may each
  fetch; a failed fetch is relayed and not cached.

A model no gRPC backend serves is NOT_FOUND for ModelInfer, ModelStreamInfer and ModelMetadata,
before any backend is touched; a request that is not a well-formed message, or names no model,
is INVALID_ARGUMENT. Other methods of the service (RepositoryModelLoad, Triton's extras) go
through the generic proxy.
"""

from __future__ import annotations

from importlib import metadata as _metadata
from typing import Any

import grpc

from router.core.errors import MalformedMessage, UnknownModel, quoted
from router.dispatch.backends import Registry
from router.frontdoor.grpc.forward import GrpcForwarder
from router.lifecycle.readiness import Readiness
from router.protocol.kserve import (
    encode_model_ready,
    encode_server_live,
    encode_server_metadata,
    encode_server_ready,
    read_model,
)

SERVICE = "inference.GRPCInferenceService"
MODEL_INFER = f"/{SERVICE}/ModelInfer"
MODEL_STREAM_INFER = f"/{SERVICE}/ModelStreamInfer"
MODEL_METADATA = f"/{SERVICE}/ModelMetadata"
SERVER_NAME = "inference-router"


def _version() -> str:
    try:
        return _metadata.version("inference-router")
    except _metadata.PackageNotFoundError:
        return "0"


class KServeRouting:
    def __init__(
        self, forwarder: GrpcForwarder, registry: Registry, readiness: Readiness
    ) -> None:
        self._forwarder = forwarder
        self._registry = registry
        self._readiness = readiness
        self._metadata: dict[str, bytes] = {}
        self._server_metadata = encode_server_metadata(SERVER_NAME, _version())

    def model_key(self, message: bytes) -> str:
        """The routing key of the model a request names; ``MalformedMessage`` (the client's
        fault) or ``UnknownModel`` (no gRPC backend serves it)."""
        model = read_model(message)
        if not model.name:
            raise MalformedMessage("the request names no model")
        key = model.key
        if not self._registry.knows_model(key, "grpc"):
            raise UnknownModel(f"no backend serves model {quoted(key)}")
        return key

    def ready(self) -> bool:
        return self._readiness.ready("grpc")

    # -- answered by the router ---------------------------------------------------------------

    async def server_live(self, payload: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return encode_server_live(True)

    async def server_ready(self, payload: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return encode_server_ready(self.ready())

    async def server_metadata(self, payload: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return self._server_metadata

    async def model_ready(self, payload: bytes, context: grpc.aio.ServicerContext) -> bytes:
        model = read_model(payload)
        if not model.name:
            raise MalformedMessage("the request names no model")
        return encode_model_ready(self._readiness.ready("grpc", model.key))

    async def model_metadata(self, payload: bytes, context: grpc.aio.ServicerContext) -> bytes:
        key = self.model_key(payload)
        cached = self._metadata.get(key)
        if cached is None:
            cached = await self._forwarder.unary(MODEL_METADATA, payload, context, key)
            self._metadata[key] = cached
        return cached

    # -- routed to a backend ------------------------------------------------------------------

    async def model_infer(self, payload: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return await self._forwarder.unary(MODEL_INFER, payload, context, self.model_key(payload))

    async def model_stream_infer(self, requests: Any, context: grpc.aio.ServicerContext) -> None:
        """Route the stream by its first message; ``requests`` stays unused (``context.read``
        reads the stream)."""
        first = await context.read()
        if first is grpc.aio.EOF:
            return  # an empty stream: nothing to route, nothing to answer
        assert isinstance(first, bytes)
        await self._forwarder.relay_stream(
            MODEL_STREAM_INFER, context, self.model_key(first), first
        )

    def __repr__(self) -> str:
        return f"KServeRouting(cached_metadata={len(self._metadata)})"
