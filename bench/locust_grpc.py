"""Locust load for the gRPC front door: KServe v2 ModelInfer, one channel per simulated user.

    locust -f bench/locust_grpc.py --host grpc://127.0.0.1:7071 --headless -u 20 -r 20 -t 30s

The target comes from Locust's ``--host`` (or ``LOCUST_HOST``), as ``grpc://HOST:PORT`` or
``HOST:PORT``; without one, ``127.0.0.1:7071``. Each user keeps one channel and sends one
ModelInfer at a time, with no wait between calls, to model ``GRPC_MODEL`` (default
``identity``) with one FP32 tensor of ``GRPC_ELEMENTS`` values (default 16) in
``raw_input_contents``, and checks that the answer names the model and carries an output.
Every call fires one Locust request event (``request_type="grpc"``, ``name`` the model) with
its time in ms, the answer's length and, on failure, ``GrpcFailure("<STATUS>: details")``, so
Locust's failure table groups failures by gRPC status.

gRPC's synchronous client runs under gevent only after ``grpc.experimental.gevent.init_gevent``,
which this module calls at import, before any channel exists; Locust has already monkeypatched
the process by then. Run it only through Locust.
"""

from __future__ import annotations

import os
import time
from array import array
from urllib.parse import urlsplit

import grpc
from grpc.experimental import gevent as grpc_gevent
from locust import User, constant, task

from router.protocol.proto import grpc_predict_v2_pb2 as pb

grpc_gevent.init_gevent()

DEFAULT_TARGET = "127.0.0.1:7071"
MODEL = os.environ.get("GRPC_MODEL", "identity")
ELEMENTS = int(os.environ.get("GRPC_ELEMENTS", "16"))
# A loaded router on this 2-core machine answers in milliseconds; 10 s means something is stuck.
TIMEOUT_S = 10.0
MODEL_INFER = "/inference.GRPCInferenceService/ModelInfer"


class GrpcFailure(Exception):
    """A call that did not end in a good answer: a status, or an answer that does not fit."""


def parse_target(host: str | None) -> str:
    """``grpc://H:P``, ``H:P`` or nothing (the default) -> ``H:P``."""
    if not host:
        return DEFAULT_TARGET
    parts = urlsplit(host if "://" in host else f"grpc://{host}")
    if parts.scheme != "grpc" or not parts.hostname or parts.port is None:
        raise ValueError(f"--host must be grpc://HOST:PORT or HOST:PORT, got {host!r}")
    return f"{parts.hostname}:{parts.port}"


def infer_request(model: str, elements: int) -> bytes:
    request = pb.ModelInferRequest(model_name=model, id="locust")
    tensor = request.inputs.add(name="INPUT0", datatype="FP32")
    tensor.shape.append(elements)
    request.raw_input_contents.append(array("f", range(elements)).tobytes())
    return request.SerializeToString()


class GrpcUser(User):
    """A KServe v2 client: one channel, one ModelInfer at a time."""

    wait_time = constant(0)  # closed loop: the next call as soon as the answer is in

    def on_start(self) -> None:
        self.channel = grpc.insecure_channel(parse_target(self.host))
        self.infer = self.channel.unary_unary(MODEL_INFER)
        self.payload = infer_request(MODEL, ELEMENTS)

    @task
    def model_infer(self) -> None:
        start = time.perf_counter()
        length = 0
        failure: Exception | None = None
        try:
            answer: bytes = self.infer(self.payload, timeout=TIMEOUT_S)
            length = len(answer)
            response = pb.ModelInferResponse.FromString(answer)
            if response.model_name != MODEL or not response.raw_output_contents:
                raise GrpcFailure(f"unexpected answer for {MODEL}: {response.model_name!r}")
        except grpc.RpcError as exc:
            failure = GrpcFailure(f"{exc.code().name}: {exc.details()}")
        except GrpcFailure as exc:
            failure = exc
        self.environment.events.request.fire(
            request_type="grpc", name=MODEL,
            response_time=(time.perf_counter() - start) * 1000.0,
            response_length=length, exception=failure, context={},
        )

    def on_stop(self) -> None:
        self.channel.close()
