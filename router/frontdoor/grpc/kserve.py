"""KServe v2 (Open Inference Protocol) on the gRPC front door: ``inference.GRPCInferenceService``.

Routed to a backend that serves the model the request names (read by ``protocol.kserve``,
tensors untouched), through the dispatcher:

* ModelInfer (unary, retried before an answer), and ModelStreamInfer (Triton's streaming
  extension; the whole stream goes to a backend chosen for the model of its first message);
* Triton's ModelConfig and ModelStatistics (model ``name``/``version``), and the repository
  calls RepositoryModelLoad and RepositoryModelUnload (the model's name in KServe's or
  Triton's layout): one backend that serves the model, the policy's choice;
* Triton's TraceSetting: by its ``model_name`` when it names one, else to any gRPC backend.

Answered by the router itself, without touching a backend:

* ServerLive: true while the process runs (also while draining);
* ServerReady: ``Readiness`` for gRPC backends (not draining, some gRPC backend in rotation);
* ModelReady: ``Readiness`` for gRPC backends serving the model; false for a model no backend
  serves (as Triton answers it, rather than an error);
* ServerMetadata: the router's name and version, no extensions;
* RepositoryIndex (Triton's): every model the gRPC backends are configured with, "name" or
  "name:version" as configured, READY while ``Readiness`` says so and UNAVAILABLE otherwise
  (only the READY ones when the request sets ``ready``), whatever ``repository_name`` says:
  the registry is the router's one repository;
* ModelMetadata: fetched from a backend that serves the model on first request, then cached
  (per "name" or "name:version") for the router's life. Concurrent first requests may each
  fetch; a failed fetch is relayed and not cached.

A call naming a model no gRPC backend serves is NOT_FOUND (``UNKNOWN_MODEL``) before any
backend is touched, or UNAVAILABLE (``NO_BACKEND``) while there is no gRPC backend at all (a
router started before its fleet registers); a request that is not a well-formed message, or
names no model where one is needed (ModelStatistics for every model included: statistics are a
backend's, so the router asks for the model), is INVALID_ARGUMENT (``MALFORMED_MESSAGE``).
Other methods (Triton's LogSettings and shared-memory calls) go through the generic proxy to
any gRPC backend.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from importlib import metadata as _metadata
from typing import Any

import grpc

from router.core.errors import MalformedMessage
from router.dispatch.backends import Registry
from router.frontdoor.grpc.forward import GrpcForwarder
from router.lifecycle.readiness import Readiness
from router.protocol.kserve import (
    ModelRef,
    encode_model_ready,
    encode_repository_index,
    encode_server_live,
    encode_server_metadata,
    encode_server_ready,
    read_model,
    read_repository_index,
    read_repository_model,
    read_trace_model,
)

SERVICE = "inference.GRPCInferenceService"
MODEL_INFER = f"/{SERVICE}/ModelInfer"
MODEL_STREAM_INFER = f"/{SERVICE}/ModelStreamInfer"
MODEL_METADATA = f"/{SERVICE}/ModelMetadata"
SERVER_NAME = "inference-router"
# Unary methods routed by the model their request names: (method name, field reader).
ROUTED_BY_MODEL: dict[str, Callable[[bytes], ModelRef]] = {
    "ModelInfer": read_model,
    "ModelConfig": read_model,
    "ModelStatistics": read_model,
    "RepositoryModelLoad": read_repository_model,
    "RepositoryModelUnload": read_repository_model,
}
# Unary methods the router answers itself, whatever the backends (see ``answer``).
ANSWERED = ("ServerLive", "ServerReady", "ServerMetadata", "ModelReady", "RepositoryIndex")
Unary = Callable[[bytes, grpc.aio.ServicerContext], Awaitable[bytes]]


def _version() -> str:
    try:
        return _metadata.version("inference-router")
    except _metadata.PackageNotFoundError:
        return "0"


class KServeRouting:
    def __init__(
        self, forwarder: GrpcForwarder | None, registry: Registry, readiness: Readiness
    ) -> None:
        # None under the relay, which routes with ``model_key`` and answers with ``answer``.
        self._forwarder = forwarder
        self._registry = registry
        self._readiness = readiness
        self._metadata: dict[str, bytes] = {}
        self._server_metadata = encode_server_metadata(SERVER_NAME, _version())
        self._answers: dict[str, Callable[[bytes], bytes]] = {
            "ServerLive": self._live_reply, "ServerReady": self._ready_reply,
            "ServerMetadata": self._metadata_reply, "ModelReady": self._model_ready_reply,
            "RepositoryIndex": self._repository_index_reply,
        }

    def model_key(self, message: bytes, reader: Callable[[bytes], ModelRef] = read_model) -> str:
        """The routing key of the model a request names (read by ``reader``);
        ``MalformedMessage`` (the client's fault), ``UnknownModel`` (no gRPC backend serves
        it) or ``NoBackend`` (no gRPC backend at all)."""
        model = reader(message)
        if not model.name:
            raise MalformedMessage("the request names no model")
        return self._known(model.key)

    def _known(self, key: str) -> str:
        self._registry.check_model(key, "grpc")
        return key

    def ready(self) -> bool:
        return self._readiness.ready("grpc")

    # -- answered by the router ---------------------------------------------------------------
    # The replies are plain functions of the request bytes (``answer``), shared by both engines.

    def answer(self, name: str, payload: bytes) -> bytes:
        """The router's own reply to method ``name`` of ``ANSWERED``; ``RouterError`` for a
        request it refuses."""
        return self._answers[name](payload)

    def _live_reply(self, payload: bytes) -> bytes:
        return encode_server_live(True)

    def _ready_reply(self, payload: bytes) -> bytes:
        return encode_server_ready(self.ready())

    def _metadata_reply(self, payload: bytes) -> bytes:
        return self._server_metadata

    def _model_ready_reply(self, payload: bytes) -> bytes:
        model = read_model(payload)
        if not model.name:
            raise MalformedMessage("the request names no model")
        return encode_model_ready(self._readiness.ready("grpc", model.key))

    def _repository_index_reply(self, payload: bytes) -> bytes:
        only_ready = read_repository_index(payload)
        models: list[tuple[ModelRef, bool]] = []
        seen: set[str] = set()
        for backend in self._registry.serving("grpc"):
            for key in backend.models:
                if key in seen:
                    continue
                seen.add(key)
                ready = self._readiness.ready("grpc", key)
                if ready or not only_ready:
                    name, _, version = key.partition(":")
                    models.append((ModelRef(name, version), ready))
        return encode_repository_index(models)

    async def server_live(self, payload: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return self._live_reply(payload)

    async def server_ready(self, payload: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return self._ready_reply(payload)

    async def server_metadata(self, payload: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return self._metadata_reply(payload)

    async def model_ready(self, payload: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return self._model_ready_reply(payload)

    async def repository_index(self, payload: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return self._repository_index_reply(payload)

    async def model_metadata(self, payload: bytes, context: grpc.aio.ServicerContext) -> bytes:
        key = self.model_key(payload)
        cached = self._metadata.get(key)
        if cached is None:
            assert self._forwarder is not None
            cached = await self._forwarder.unary(MODEL_METADATA, payload, context, key)
            self._metadata[key] = cached
        return cached

    # -- routed to a backend ------------------------------------------------------------------

    def routed(self, name: str) -> Unary:
        """The handler of unary method ``name`` of ``ROUTED_BY_MODEL``: to a backend serving
        the model its request names."""
        method, reader, forwarder = f"/{SERVICE}/{name}", ROUTED_BY_MODEL[name], self._forwarder
        assert forwarder is not None

        async def handler(payload: bytes, context: grpc.aio.ServicerContext) -> bytes:
            return await forwarder.unary(method, payload, context, self.model_key(payload, reader))

        return handler

    async def trace_setting(self, payload: bytes, context: grpc.aio.ServicerContext) -> bytes:
        """By the model it names; the server-wide settings (no model) go to any gRPC backend."""
        name = read_trace_model(payload).name
        key = self._known(name) if name else None
        assert self._forwarder is not None
        return await self._forwarder.unary(f"/{SERVICE}/TraceSetting", payload, context, key)

    async def model_stream_infer(self, requests: Any, context: grpc.aio.ServicerContext) -> None:
        """Route the stream by its first message; ``requests`` stays unused (``context.read``
        reads the stream)."""
        first = await context.read()
        if first is grpc.aio.EOF:
            return  # an empty stream: nothing to route, nothing to answer
        assert isinstance(first, bytes) and self._forwarder is not None
        await self._forwarder.relay_stream(
            MODEL_STREAM_INFER, context, self.model_key(first), first
        )

    def __repr__(self) -> str:
        return f"KServeRouting(cached_metadata={len(self._metadata)})"
