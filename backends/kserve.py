"""A KServe v2 (Open Inference Protocol) gRPC backend on grpc.aio, serving small test models.

Models (``--models``, default both):

* ``identity``: every input comes back as an output of the same datatype and shape
  (``INPUTn`` -> ``OUTPUTn``), bytes for bytes;
* ``sum``: FP32 input ``INPUT0`` of any shape -> FP32 ``OUTPUT0`` of shape [1], the sum.

Inputs are read from ``raw_input_contents`` (what tritonclient sends) or, for FP32, from
``contents.fp32_contents``; outputs always go out in ``raw_output_contents``.

It answers the whole ``inference.GRPCInferenceService`` of the KServe proto plus Triton's
``ModelStreamInfer`` (one ``ModelStreamInferResponse`` per request; a failed request becomes
``error_message`` and the stream goes on), Triton's ``ModelConfig``, ``ModelStatistics``
(inference counts per model) and ``TraceSetting`` (accepted, nothing traced), and
``RepositoryModelLoad``/``Unload`` in KServe's and Triton's request layouts (an unloaded model
is NOT_FOUND for inference and not ready until loaded again). Every call that names a model
it does not serve is NOT_FOUND, so a test sees a call routed to the wrong backend. Besides:
``grpc.health.v1.Health`` (NOT_SERVING from SIGTERM on), and ``routertest.Echo``
(``backends.grpc_echo``) for transparent-proxy tests.

Misbehaviour on request, as ``backends.echo`` offers for TCP: ``--delay-ms`` answers late,
``--fail-rate`` fails that fraction of inferences with UNAVAILABLE, ``--crash-on-infer``
exits the process (status 3) as soon as an inference arrives, before answering it, and
``--record-ids FILE`` appends the ``id`` of every answered inference to FILE. ``--tls-cert``
serves TLS (``--tls-client-ca``: and requires client certificates signed by that CA).

Prints ``READY <port>`` once listening (``READY unix:<path>`` with ``--unix PATH``); SIGTERM
stops it after a short grace. With ``--register URL`` it joins the router's fleet by itself
(``backends.registering``): registered with its models before ``READY``, renewed by
heartbeat (carrying its inferences in flight and its loaded models), and on SIGTERM
deregistered first, so the router stops sending, then drained (calls in flight finish, at
most ``--drain-grace-s``).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import random
from array import array
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import uvloop
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from backends import registering
from backends.command_line import add_listen_arguments, stop_on_signals
from backends.grpc_echo import EchoService
from backends.registering import RegisterOptions
from backends.unix import remove_stale_socket
from router.protocol.announce import format_ready, format_ready_unix
from router.protocol.kserve import read_repository_model, read_trace_model
from router.protocol.proto import grpc_predict_v2_pb2 as pb
from router.protocol.proto import triton_extensions_pb2 as triton
from router.protocol.proto.model_stream_infer_pb2 import ModelStreamInferResponse

SERVICE = "inference.GRPCInferenceService"
PLATFORM = "inference-router-test"
VERSION = "1"
STOP_GRACE_S = 1.0
Context = Any  # grpc.aio.ServicerContext; grpc ships no type information


class InferError(Exception):
    """A request this backend refuses; becomes a gRPC status (or a stream's error_message)."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True, slots=True)
class KServeConfig:
    host: str = "127.0.0.1"
    port: int = 0
    unix: str | None = None  # listen on this unix socket path instead of host:port
    models: tuple[str, ...] = ("identity", "sum")
    delay_s: float = 0.0
    fail_rate: float = 0.0
    crash_on_infer: bool = False
    record_ids: str | None = None
    seed: int | None = None
    tls_cert: str | None = None  # PEM certificate chain: serve TLS
    tls_key: str | None = None  # PEM private key (default: in tls_cert)
    tls_client_ca: str | None = None  # require client certificates signed by this CA
    register: RegisterOptions | None = None  # join this router's fleet (--register)


def _input_bytes(request: pb.ModelInferRequest, index: int) -> bytes:
    if index < len(request.raw_input_contents):
        return request.raw_input_contents[index]
    tensor = request.inputs[index]
    if tensor.datatype == "FP32":
        return array("f", tensor.contents.fp32_contents).tobytes()
    raise InferError(grpc.StatusCode.INVALID_ARGUMENT, f"input {tensor.name}: send raw contents")


def identity(request: pb.ModelInferRequest) -> pb.ModelInferResponse:
    response = pb.ModelInferResponse()
    for index, tensor in enumerate(request.inputs):
        output = response.outputs.add()
        output.name = tensor.name.replace("INPUT", "OUTPUT", 1)
        output.datatype = tensor.datatype
        output.shape.extend(tensor.shape)
        response.raw_output_contents.append(_input_bytes(request, index))
    return response


def vector_sum(request: pb.ModelInferRequest) -> pb.ModelInferResponse:
    if len(request.inputs) != 1 or request.inputs[0].datatype != "FP32":
        raise InferError(grpc.StatusCode.INVALID_ARGUMENT, "sum takes one FP32 input, INPUT0")
    values = array("f")
    raw = _input_bytes(request, 0)
    if len(raw) % values.itemsize:
        raise InferError(grpc.StatusCode.INVALID_ARGUMENT, "INPUT0 is not a whole FP32 tensor")
    values.frombytes(raw)
    response = pb.ModelInferResponse()
    output = response.outputs.add()
    output.name, output.datatype = "OUTPUT0", "FP32"
    output.shape.append(1)
    response.raw_output_contents.append(array("f", [sum(values)]).tobytes())
    return response


MODELS: dict[str, Callable[[pb.ModelInferRequest], pb.ModelInferResponse]] = {
    "identity": identity,
    "sum": vector_sum,
}
TENSORS = {  # (inputs, outputs) as (name, datatype, shape) for ModelMetadata
    "identity": ([("INPUT0", "FP32", [-1])], [("OUTPUT0", "FP32", [-1])]),
    "sum": ([("INPUT0", "FP32", [-1])], [("OUTPUT0", "FP32", [1])]),
}


class KServeBackend:
    def __init__(self, config: KServeConfig, port: int) -> None:
        self._config = config
        self._rng = random.Random(config.seed)
        self._record = (
            os.open(config.record_ids, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            if config.record_ids else None
        )
        self.port = port
        self.inferences = 0
        self.inflight = 0  # inferences started and not yet answered
        self._use = registering.ModelUse()  # the same, per model (a heartbeat's model_use)
        self._unloaded: set[str] = set()  # served, but unloaded by RepositoryModelUnload
        self._counts = dict.fromkeys(config.models, 0)  # inferences answered, per model

    def close(self) -> None:
        if self._record is not None:
            os.close(self._record)

    def _model(self, name: str) -> Callable[[pb.ModelInferRequest], pb.ModelInferResponse]:
        self._served(name)
        if name in self._unloaded:
            raise InferError(grpc.StatusCode.NOT_FOUND, f"model {name!r} is unloaded")
        return MODELS[name]

    def _served(self, name: str) -> None:
        if name not in self._config.models:
            raise InferError(grpc.StatusCode.NOT_FOUND, f"unknown model {name!r}")

    def labels(self) -> dict[str, str]:
        """The labels it registers with (``--register``)."""
        return {}

    def loaded_models(self) -> list[str]:
        return [m for m in self._config.models if m not in self._unloaded]

    async def infer_one(self, request: pb.ModelInferRequest) -> pb.ModelInferResponse:
        self.inflight += 1
        name = request.model_name
        self._use.begin(name)
        try:
            return await self._infer(request)
        finally:
            self.inflight -= 1
            self._use.end(name)

    def model_use(self) -> dict[str, int]:
        """Inferences started and not yet answered, per model: what a heartbeat reports."""
        return self._use.counts()

    async def _infer(self, request: pb.ModelInferRequest) -> pb.ModelInferResponse:
        if self._config.crash_on_infer:
            os._exit(3)  # die before answering: what a retry must hide
        model = self._model(request.model_name)
        if self._config.delay_s:
            await asyncio.sleep(self._config.delay_s)
        if self._config.fail_rate and self._rng.random() < self._config.fail_rate:
            raise InferError(grpc.StatusCode.UNAVAILABLE, "injected failure")
        response = model(request)
        response.model_name, response.model_version, response.id = (
            request.model_name, VERSION, request.id
        )
        if self._record is not None and request.id:
            os.write(self._record, request.id.encode() + b"\n")  # before the answer leaves
        self.inferences += 1
        self._counts[request.model_name] += 1
        return response

    # -- inference.GRPCInferenceService -------------------------------------------------------

    async def model_infer(
        self, request: pb.ModelInferRequest, context: Context
    ) -> pb.ModelInferResponse:
        try:
            return await self.infer_one(request)
        except InferError as exc:
            await context.abort(exc.code, str(exc))
            raise  # not reached: abort raises

    async def model_stream_infer(
        self, requests: AsyncIterator[pb.ModelInferRequest], context: Context
    ) -> AsyncIterator[ModelStreamInferResponse]:
        async for request in requests:
            try:
                yield ModelStreamInferResponse(infer_response=await self.infer_one(request))
            except InferError as exc:
                yield ModelStreamInferResponse(error_message=str(exc))

    async def server_live(self, request: pb.ServerLiveRequest, context: Context) -> Any:
        return pb.ServerLiveResponse(live=True)

    async def server_ready(self, request: pb.ServerReadyRequest, context: Context) -> Any:
        return pb.ServerReadyResponse(ready=True)

    async def model_ready(self, request: pb.ModelReadyRequest, context: Context) -> Any:
        ready = request.name in self._config.models and request.name not in self._unloaded
        return pb.ModelReadyResponse(ready=ready)

    async def server_metadata(self, request: pb.ServerMetadataRequest, context: Context) -> Any:
        return pb.ServerMetadataResponse(name="kserve-test-backend", version=VERSION)

    async def model_metadata(self, request: pb.ModelMetadataRequest, context: Context) -> Any:
        if request.name not in self._config.models:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"unknown model {request.name!r}")
        response = pb.ModelMetadataResponse(
            name=request.name, versions=[VERSION], platform=PLATFORM
        )
        inputs, outputs = TENSORS[request.name]
        for target, tensors in ((response.inputs, inputs), (response.outputs, outputs)):
            for name, datatype, shape in tensors:
                target.add(name=name, datatype=datatype, shape=shape)
        return response

    # -- Triton's extensions ------------------------------------------------------------------

    async def model_config(self, request: triton.ModelConfigRequest, context: Context) -> Any:
        await self._check_served(request.name, context)
        return triton.ModelConfigResponse(config=triton.ModelConfig(
            name=request.name, platform=PLATFORM, backend="python", max_batch_size=0,
        ))

    async def model_statistics(
        self, request: triton.ModelStatisticsRequest, context: Context
    ) -> Any:
        names = [request.name] if request.name else list(self._config.models)
        for name in names:
            await self._check_served(name, context)
        return triton.ModelStatisticsResponse(model_stats=[
            triton.ModelStatistics(
                name=name, version=VERSION, inference_count=self._counts[name],
                execution_count=self._counts[name],
            )
            for name in names
        ])

    async def repository_load(self, payload: bytes, context: Context) -> bytes:
        name = read_repository_model(payload).name
        await self._check_served(name, context)
        self._unloaded.discard(name)
        return pb.RepositoryModelLoadResponse(model_name=name, isLoaded=True).SerializeToString()

    async def repository_unload(self, payload: bytes, context: Context) -> bytes:
        name = read_repository_model(payload).name
        await self._check_served(name, context)
        self._unloaded.add(name)
        return pb.RepositoryModelUnloadResponse(
            model_name=name, isUnloaded=True
        ).SerializeToString()

    async def trace_setting(self, payload: bytes, context: Context) -> bytes:
        name = read_trace_model(payload).name
        if name:
            await self._check_served(name, context)
        return b""  # a TraceSettingResponse with no settings

    async def _check_served(self, name: str, context: Context) -> None:
        try:
            self._served(name)
        except InferError as exc:
            await context.abort(exc.code, str(exc))

    def handler(self) -> Any:
        return grpc.method_handlers_generic_handler(SERVICE, self.methods())

    def methods(self) -> dict[str, Any]:
        """The method handlers of ``inference.GRPCInferenceService``, by method name (a
        subclass adds or replaces some)."""
        return {
            "ServerLive": unary(self.server_live, pb.ServerLiveRequest, pb.ServerLiveResponse),
            "ServerReady": unary(self.server_ready, pb.ServerReadyRequest, pb.ServerReadyResponse),
            "ModelReady": unary(self.model_ready, pb.ModelReadyRequest, pb.ModelReadyResponse),
            "ServerMetadata": unary(
                self.server_metadata, pb.ServerMetadataRequest, pb.ServerMetadataResponse
            ),
            "ModelMetadata": unary(
                self.model_metadata, pb.ModelMetadataRequest, pb.ModelMetadataResponse
            ),
            "ModelInfer": unary(self.model_infer, pb.ModelInferRequest, pb.ModelInferResponse),
            "ModelConfig": unary(
                self.model_config, triton.ModelConfigRequest, triton.ModelConfigResponse
            ),
            "ModelStatistics": unary(
                self.model_statistics, triton.ModelStatisticsRequest,
                triton.ModelStatisticsResponse,
            ),
            # Raw bytes: the request layout is KServe's or Triton's (read_repository_model).
            "RepositoryModelLoad": grpc.unary_unary_rpc_method_handler(self.repository_load),
            "RepositoryModelUnload": grpc.unary_unary_rpc_method_handler(self.repository_unload),
            "TraceSetting": grpc.unary_unary_rpc_method_handler(self.trace_setting),
            "ModelStreamInfer": grpc.stream_stream_rpc_method_handler(
                self.model_stream_infer,
                request_deserializer=pb.ModelInferRequest.FromString,
                response_serializer=ModelStreamInferResponse.SerializeToString,
            ),
        }


def unary(fn: Any, req: Any, resp: Any) -> Any:
    """A unary method handler with ``req``/``resp`` message classes."""
    return grpc.unary_unary_rpc_method_handler(
        fn, request_deserializer=req.FromString, response_serializer=resp.SerializeToString
    )


def _server_credentials(config: KServeConfig) -> grpc.ServerCredentials:
    assert config.tls_cert is not None
    chain = Path(config.tls_cert).read_bytes()
    key = Path(config.tls_key).read_bytes() if config.tls_key else chain
    client_ca = Path(config.tls_client_ca).read_bytes() if config.tls_client_ca else None
    return grpc.ssl_server_credentials(
        [(key, chain)], root_certificates=client_ca, require_client_auth=client_ca is not None
    )


async def serve(
    config: KServeConfig, stop: asyncio.Event,
    make_backend: Callable[[KServeConfig, int], KServeBackend] = KServeBackend,
) -> KServeBackend:
    """Listen, print ``READY <port>`` (``READY unix:<path>`` with ``unix``), serve until
    ``stop`` is set, then stop gracefully. ``make_backend(config, port)``: the servicer
    (``backends.modelsim`` passes its own); returned once stopped."""
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    address = f"{config.host}:{config.port}"
    if config.unix is not None:
        remove_stale_socket(config.unix)
        address = f"unix:{config.unix}"
    if config.tls_cert:
        port = server.add_secure_port(address, _server_credentials(config))
    else:
        port = server.add_insecure_port(address)
    if port == 0:  # a unix socket that was bound answers 1
        raise SystemExit(f"cannot listen on {address}")
    ready = format_ready(port) if config.unix is None else format_ready_unix(config.unix)
    backend = make_backend(config, port)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    name = port if config.unix is None else address
    server.add_generic_rpc_handlers([backend.handler(), EchoService(name).handler()])
    await server.start()
    grace_s = STOP_GRACE_S
    if config.register is not None:
        grace_s = config.register.drain_grace_s
        address = registering.advertised(config.register, host=config.host, port=port,
                                         unix=config.unix)
    try:
        async with registering.lease(
                config.register, address=address if config.register else "", protocol="grpc",
                models=config.models, inflight=lambda: backend.inflight,
                loaded_models=backend.loaded_models, model_use=backend.model_use,
                labels=backend.labels()):
            print(ready, flush=True)
            await stop.wait()
        # Deregistered (with --register): the router places nothing new here.
        await health_servicer.enter_graceful_shutdown()
        await server.stop(grace_s)
    finally:
        await server.stop(None)
        backend.close()
        if config.unix is not None:
            remove_stale_socket(config.unix)
    return backend


async def _main_async(config: KServeConfig) -> None:
    stop = stop_on_signals()
    await serve(config, stop)


def parse_args(argv: list[str] | None = None) -> KServeConfig:
    parser = argparse.ArgumentParser(prog="python -m backends.kserve", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_listen_arguments(parser)
    parser.add_argument("--models", default="identity,sum",
                        help=f"comma-separated, from: {', '.join(MODELS)}")
    parser.add_argument("--delay-ms", type=float, default=0.0)
    parser.add_argument("--fail-rate", type=float, default=0.0,
                        help="fraction of inferences failed with UNAVAILABLE")
    parser.add_argument("--crash-on-infer", action="store_true",
                        help="exit as soon as an inference arrives, before answering")
    parser.add_argument("--record-ids", default=None, metavar="FILE",
                        help="append the id of every answered inference to FILE")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--tls-cert", default=None, metavar="PEM",
                        help="serve TLS with this certificate chain (key in it unless --tls-key)")
    parser.add_argument("--tls-key", default=None, metavar="PEM")
    parser.add_argument("--tls-client-ca", default=None, metavar="PEM",
                        help="require client certificates signed by this CA")
    registering.add_arguments(parser)
    args = parser.parse_args(argv)
    models = tuple(m for m in args.models.split(",") if m)
    unknown = sorted(set(models) - set(MODELS))
    if unknown:
        parser.error(f"unknown models {unknown}; choose from {sorted(MODELS)}")
    if args.delay_ms < 0 or not 0.0 <= args.fail_rate <= 1.0:
        parser.error("--delay-ms must be >= 0 and --fail-rate in [0, 1]")
    if args.unix is not None and args.tls_cert:
        parser.error("--unix serves plaintext: drop --tls-cert")
    if (args.tls_key or args.tls_client_ca) and not args.tls_cert:
        parser.error("--tls-key and --tls-client-ca need --tls-cert")
    register = registering.options(args, parser)
    return KServeConfig(
        host=args.host, port=args.port or 0, unix=args.unix, models=models,
        delay_s=args.delay_ms / 1000.0, fail_rate=args.fail_rate,
        crash_on_infer=args.crash_on_infer, record_ids=args.record_ids, seed=args.seed,
        tls_cert=args.tls_cert, tls_key=args.tls_key, tls_client_ca=args.tls_client_ca,
        register=register,
    )


def main(argv: list[str] | None = None) -> None:
    config = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: "
                        "%(message)s")
    uvloop.run(_main_async(config))


if __name__ == "__main__":
    main()
