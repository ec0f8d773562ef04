"""Fixtures for the gRPC tests: ``backends.kserve`` processes and an in-process router with
its gRPC front door. tests/conftest.py registers them for every test module.

Every wait is bounded: backends are awaited on their ``READY <port>`` line, the router on the
addresses ``RouterApp.start`` returns, and shutdown on the serve task with a timeout.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any

import grpc
import pytest

from router.app import RouterApp
from router.core import config as config_mod
from router.lifecycle.drain import DrainReport
from router.protocol.proto import grpc_predict_v2_pb2 as pb
from tests.support import BASE_CONFIG, BackendProcess, backend_processes

STOP_TIMEOUT_S = 15.0
CALL_TIMEOUT_S = 10.0
MODEL_INFER = "/inference.GRPCInferenceService/ModelInfer"


KServeBackend = BackendProcess


@pytest.fixture
def kserve_backend() -> Iterator[Callable[..., KServeBackend]]:
    """Factory: ``kserve_backend(*args)`` starts ``python -m backends.kserve --port 0 ARGS``."""
    with backend_processes("backends.kserve") as start:
        yield start


@dataclass
class GrpcRouter:
    app: RouterApp
    target: str  # the gRPC front door, HOST:PORT
    admin_url: str
    _stop_event: asyncio.Event
    _serve_task: asyncio.Task[DrainReport]
    _stopped: bool = False

    def channel(self) -> grpc.aio.Channel:
        return grpc.aio.insecure_channel(self.target)

    def backend(self, address: str) -> dict[str, Any]:
        return next(b for b in self.app.registry.statistics() if b["address"] == address)

    def start_drain(self) -> None:
        self._stop_event.set()

    async def wait_report(self) -> DrainReport:
        async with asyncio.timeout(STOP_TIMEOUT_S):
            return await asyncio.shield(self._serve_task)

    async def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        self._stop_event.set()
        try:
            async with asyncio.timeout(STOP_TIMEOUT_S):
                await self._serve_task
        finally:
            if not self._serve_task.done():
                self._serve_task.cancel()
            await self.app.close()


GrpcRouterFactory = Callable[..., Awaitable[GrpcRouter]]


def grpc_backend(address: str, *models: str, **extra: Any) -> dict[str, Any]:
    return {"address": address, "protocol": "grpc", "models": list(models), **extra}


ENGINES = ("grpcio", "relay")


@pytest.fixture(params=ENGINES)
def grpc_engine(request: pytest.FixtureRequest) -> str:
    """Every test of a router's gRPC front door runs on both engines (``grpc.engine``); a
    test that holds only for one says so with ``@pytest.mark.grpc_engine("name",
    reason=...)``, and is not collected for the other (``only_marked_engines``)."""
    return str(request.param)


def only_marked_engines(items: list[pytest.Item]) -> tuple[list[pytest.Item], list[pytest.Item]]:
    """(kept, deselected): a test marked ``grpc_engine`` runs only on the engines it names."""
    kept: list[pytest.Item] = []
    dropped: list[pytest.Item] = []
    for item in items:
        marker = item.get_closest_marker("grpc_engine")
        callspec = getattr(item, "callspec", None)
        engine = callspec.params.get("grpc_engine") if callspec is not None else None
        if marker is not None and engine is not None and engine not in marker.args:
            dropped.append(item)
        else:
            kept.append(item)
    return kept, dropped


@pytest.fixture
async def grpc_router(grpc_engine: str) -> AsyncIterator[GrpcRouterFactory]:
    """Factory: ``await grpc_router([backend tables], overrides)`` -> a serving router."""
    running: list[GrpcRouter] = []

    async def start(
        backends: list[dict[str, Any]], overrides: dict[str, Any] | None = None
    ) -> GrpcRouter:
        data = config_mod.merge(
            BASE_CONFIG, {"grpc": {"listen": "127.0.0.1:0", "engine": grpc_engine}})
        data = config_mod.merge(data, overrides or {})
        data["backends"] = backends
        app = RouterApp(config_mod.from_mapping(data, "<test>"))
        async with asyncio.timeout(10):
            bound = await app.start()
        assert bound.grpc is not None
        stop_event = asyncio.Event()
        task = asyncio.create_task(app.serve(stop_event.wait()), name="router-serve")
        admin_host, admin_port = bound.admin
        router = GrpcRouter(
            app, f"{bound.grpc[0]}:{bound.grpc[1]}", f"http://{admin_host}:{admin_port}",
            stop_event, task,
        )
        running.append(router)
        return router

    yield start
    for router in running:
        await router.stop()


def infer_request(model: str, values: list[float], *, version: str = "", id: str = "") -> bytes:
    """A serialised ModelInferRequest with one FP32 input, INPUT0, in raw_input_contents."""
    from array import array

    request = pb.ModelInferRequest(model_name=model, model_version=version, id=id)
    tensor = request.inputs.add(name="INPUT0", datatype="FP32")
    tensor.shape.append(len(values))
    request.raw_input_contents.append(array("f", values).tobytes())
    return request.SerializeToString()


def output_values(response: bytes) -> list[float]:
    from array import array

    values = array("f")
    values.frombytes(pb.ModelInferResponse.FromString(response).raw_output_contents[0])
    return list(values)
