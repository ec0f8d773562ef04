"""A model worker that behaves as AnyServe's do (github.com/simpx/anyserve, its
``anyserve.worker``), to show that such a worker joins the router unchanged.

On the wire it does what AnyServe's worker does: for each of its models, one
``anyserve.WorkerManagement/RegisterModel`` call on the ingress (``--ingress HOST:PORT``, a
plaintext channel, no metadata, a 5 s deadline) with ``worker_address = "unix://" + PATH``
and its ``--worker-id``; then, on its unix socket, per connection one request (a 4-byte
big-endian length and a serialized KServe ``ModelInferRequest``) and one answer (the same
framing around a ``ModelInferResponse``), after which it closes the connection. It binds its
socket before registering (AnyServe's binds after), so that no request finds it absent.

Each model answers with its input: ``OUTPUT0`` carries the request's first input, and the
parameter ``worker_id`` names the worker. A model it does not serve (the empty frame of a
router's frame probe too) gets a response with an ``error`` parameter, as AnyServe's worker
answers one. Prints ``READY unix:PATH`` once registered; SIGTERM stops it.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import struct
import sys

import grpc

from backends.unix import remove_stale_socket
from router.protocol.announce import format_ready_unix
from router.protocol.proto import anyserve_worker_management_pb2 as mgmt
from router.protocol.proto import anyserve_worker_management_pb2_grpc as mgmt_grpc
from router.protocol.proto import grpc_predict_v2_pb2 as kserve

REGISTER_TIMEOUT_S = 5.0  # AnyServe's worker's deadline for each RegisterModel
LENGTH = struct.Struct("!I")


def register(ingress: str, worker_id: str, path: str, models: list[tuple[str, str]]) -> None:
    """One RegisterModel per model, as AnyServe's ``Worker.register_to_ingress`` makes them;
    exits on a refusal (which AnyServe's worker would only print)."""
    with grpc.insecure_channel(ingress) as channel:
        stub = mgmt_grpc.WorkerManagementStub(channel)  # type: ignore[no-untyped-call]
        for name, version in models:
            request = mgmt.RegisterModelRequest(model_name=name, model_version=version,
                                                worker_address=f"unix://{path}",
                                                worker_id=worker_id)
            response = stub.RegisterModel(request, timeout=REGISTER_TIMEOUT_S)
            if not response.success:
                sys.exit(f"RegisterModel {name}: {response.message}")


def answer(request: kserve.ModelInferRequest, worker_id: str,
           models: list[tuple[str, str]]) -> kserve.ModelInferResponse:
    response = kserve.ModelInferResponse(model_name=request.model_name,
                                         model_version=request.model_version, id=request.id)
    response.parameters["worker_id"].string_param = worker_id
    served = (request.model_name, request.model_version) in models or (
        (request.model_name, "") in models)
    if not served:
        response.parameters["error"].string_param = (
            f"Model '{request.model_name}' not found in this worker")
        return response
    if request.inputs:
        source = request.inputs[0]
        response.outputs.add(name="OUTPUT0", datatype=source.datatype, shape=source.shape)
        response.raw_output_contents.extend(request.raw_input_contents[:1])
    return response


async def serve(path: str, worker_id: str, models: list[tuple[str, str]], ingress: str) -> None:
    async def one_request(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            (length,) = LENGTH.unpack(await reader.readexactly(LENGTH.size))
            request = kserve.ModelInferRequest.FromString(await reader.readexactly(length))
            body = answer(request, worker_id, models).SerializeToString()
            writer.write(LENGTH.pack(len(body)) + body)
            await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass  # a client that went away (a connect probe): nothing to answer
        finally:
            writer.close()  # one request per connection, as AnyServe's worker serves

    remove_stale_socket(path)
    server = await asyncio.start_unix_server(one_request, path)
    await asyncio.to_thread(register, ingress, worker_id, path, models)
    print(format_ready_unix(path), flush=True)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    async with server:
        await stop.wait()
    remove_stale_socket(path)


def parse_models(text: str) -> list[tuple[str, str]]:
    """``add,echo:1`` -> [("add", ""), ("echo", "1")]."""
    return [(name, version) for name, _, version in
            (item.partition(":") for item in text.split(",") if item)]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m backends.anyserve_worker",
                                     description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ingress", required=True, help="HOST:PORT of WorkerManagement")
    parser.add_argument("--worker-id", required=True)
    parser.add_argument("--unix", required=True, metavar="PATH", help="the worker's socket")
    parser.add_argument("--models", default="echo", help='"name" or "name:version", comma '
                        "separated")
    args = parser.parse_args(argv)
    asyncio.run(serve(args.unix, args.worker_id, parse_models(args.models), args.ingress))


if __name__ == "__main__":
    main()
