"""Readiness, defined once (``router.lifecycle.readiness``), and the admin ``/readyz`` that
answers with it."""

from __future__ import annotations

import aiohttp
from prometheus_client.registry import CollectorRegistry

from router.control.admin import AdminAuth, AdminServer
from router.core.config import AdminConfig
from router.core.config_diff import ReloadOutcome
from router.core.types import Protocol
from router.dispatch.backends import Backend, Registry
from router.lifecycle.readiness import Readiness
from router.lifecycle.state import Lifecycle
from tests.fakes import make_backend, memory_directory


def _backend(port: int, kind: Protocol, models: tuple[str, ...] = ()) -> Backend:
    return make_backend(f"127.0.0.1:{port}", kind, models)


class Setup:
    def __init__(self, *backends: Backend) -> None:
        self.registry = Registry()
        for backend in backends:
            self.registry.add(backend)
        self.lifecycle = Lifecycle()
        self.readiness = Readiness(self.registry, self.lifecycle)


def test_no_backend_is_not_ready() -> None:
    s = Setup()
    assert not s.readiness.ready()
    assert s.readiness.not_ready_because() == "no healthy backend"
    assert s.readiness.not_ready_because("grpc") == "no healthy backend of protocol grpc"


def test_ready_per_protocol_follows_who_is_in_rotation() -> None:
    tcp, grpc = _backend(1, "tcp"), _backend(2, "grpc", ("sum",))
    s = Setup(tcp, grpc)
    assert s.readiness.ready() and s.readiness.ready("tcp") and s.readiness.ready("grpc")
    grpc.mark_down("said NOT_SERVING")
    assert s.readiness.ready()  # /readyz: any protocol
    assert s.readiness.ready("tcp")
    assert not s.readiness.ready("grpc")  # the gRPC health service, ServerReady
    tcp.mark_down("ejected")
    assert not s.readiness.ready() and s.readiness.not_ready_because() == "no healthy backend"
    grpc.mark_up("answered")
    assert s.readiness.ready() and s.readiness.ready("grpc") and not s.readiness.ready("tcp")


def test_ready_for_a_model_needs_a_backend_in_rotation_serving_it() -> None:
    plain, versioned = _backend(1, "grpc", ("sum",)), _backend(2, "grpc", ("identity:2",))
    s = Setup(plain, versioned)
    assert s.readiness.ready("grpc", "sum") and s.readiness.ready("grpc", "sum:7")
    assert s.readiness.ready("grpc", "identity") and not s.readiness.ready("grpc", "identity:1")
    assert not s.readiness.ready("grpc", "unknown")
    plain.mark_down("ejected")
    assert not s.readiness.ready("grpc", "sum") and s.readiness.ready("grpc", "identity:2")
    assert s.readiness.ready(model="identity") and not s.readiness.ready(model="sum")


def test_draining_is_not_ready_whatever_the_backends() -> None:
    s = Setup(_backend(1, "tcp"), _backend(2, "grpc", ("sum",)))
    assert s.readiness.ready()
    s.lifecycle.start_drain()
    for kind, model in ((None, None), ("tcp", None), ("grpc", None), ("grpc", "sum")):
        assert not s.readiness.ready(kind, model)
        assert s.readiness.not_ready_because(kind, model) == "draining"
    s.lifecycle.abandon()
    assert s.readiness.not_ready_because() == "draining"


async def no_reload() -> ReloadOutcome:
    raise AssertionError("this test never reloads")


async def test_readyz_answers_with_the_readiness_reason() -> None:
    tcp = _backend(1, "tcp")
    s = Setup(tcp)
    admin = AdminServer(s.registry, CollectorRegistry(), s.readiness, dict, no_reload,
                        AdminAuth(AdminConfig(), None), reload_certificates=list,
                        directory=memory_directory(s.registry))
    host, port = await admin.start("127.0.0.1", 0)
    try:
        async with aiohttp.ClientSession(f"http://{host}:{port}") as session:
            async def readyz() -> tuple[int, object]:
                async with session.get("/readyz") as response:
                    return response.status, await response.json()

            assert await readyz() == (200, {"ready": True})
            tcp.mark_down("ejected")
            assert await readyz() == (503, {"ready": False, "reason": "no healthy backend"})
            tcp.mark_up("answered")
            s.lifecycle.start_drain()
            assert await readyz() == (503, {"ready": False, "reason": "draining"})
    finally:
        await admin.close()
