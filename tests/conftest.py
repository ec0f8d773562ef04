"""Shared fixtures: echo backend processes and an in-process router.

Every wait is bounded: backends are awaited on their ``READY <port>`` line, the router on the
addresses ``RouterApp.start`` returns, and shutdown on the serve task with a timeout.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import uvloop

from router.app import RouterApp
from router.client.frames import FrameClient
from router.core import config as config_mod
from tests.grpc_support import grpc_engine, grpc_router, kserve_backend, only_marked_engines
from tests.support import BASE_CONFIG, BackendProcess, backend_processes

# The gRPC fixtures, for every test module.
__all__ = ["grpc_engine", "grpc_router", "kserve_backend"]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    kept, dropped = only_marked_engines(items)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = kept

STOP_TIMEOUT_S = 15.0
UVLOOP_MODULES = frozenset({
    "test_router_integration.py", "test_tls_tcp.py", "test_tls_admin.py", "test_grpc_relay.py",
})


def pytest_asyncio_loop_factories(
    config: pytest.Config, item: pytest.Item
) -> dict[str, Callable[[], asyncio.AbstractEventLoop]]:
    """Run the integration and TLS tests on uvloop, as the router runs in production (its
    TLS is uvloop's); leave every other test module on the stdlib loop."""
    if item.path.name in UVLOOP_MODULES:
        return {"uvloop": uvloop.new_event_loop}
    return {"asyncio": asyncio.new_event_loop}


# -- echo backends -------------------------------------------------------------------------------


EchoBackend = BackendProcess


@pytest.fixture
def echo_backend() -> Iterator[Callable[..., EchoBackend]]:
    """Factory: ``echo_backend(*args)`` starts ``python -m backends.echo --port 0 ARGS``."""
    with backend_processes("backends.echo") as start:
        yield start


# -- the router, in process ----------------------------------------------------------------------


@dataclass
class RunningRouter:
    app: RouterApp
    host: str
    port: int
    admin_host: str
    admin_port: int
    _stop_event: asyncio.Event
    _serve_task: asyncio.Task[Any]
    _clients: list[FrameClient] = field(default_factory=list)
    _stopped: bool = False

    async def client(self) -> FrameClient:
        async with asyncio.timeout(10):
            client = await FrameClient.connect(self.host, self.port)
        self._clients.append(client)
        return client

    async def open_raw(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        async with asyncio.timeout(10):
            return await asyncio.open_connection(self.host, self.port)

    @property
    def admin_url(self) -> str:
        return f"http://{self.admin_host}:{self.admin_port}"

    def backend_stats(self) -> dict[str, dict[str, Any]]:
        return {b["address"]: b for b in self.app.registry.statistics()}

    async def stop(self) -> None:
        """Close our clients, trigger the drain, await the serve task, close the app."""
        if self._stopped:
            return
        self._stopped = True
        for client in self._clients:
            try:
                async with asyncio.timeout(5):
                    await client.close()
            except TimeoutError:
                pass
        self._stop_event.set()
        try:
            async with asyncio.timeout(STOP_TIMEOUT_S):
                await self._serve_task
        finally:
            if not self._serve_task.done():
                self._serve_task.cancel()
            await self.app.close()


RouterFactory = Callable[..., Awaitable[RunningRouter]]



@pytest.fixture
async def router_factory() -> AsyncIterator[RouterFactory]:
    """Factory: ``await router_factory([addresses or backend tables], overrides)`` -> a
    started, serving router."""
    running: list[RunningRouter] = []

    async def start(
        addresses: list[str | dict[str, Any]], overrides: dict[str, Any] | None = None
    ) -> RunningRouter:
        """``addresses``: each an address, or a whole ``[[backends]]`` table."""
        data = config_mod.merge(BASE_CONFIG, overrides or {})
        data["backends"] = [a if isinstance(a, dict) else {"address": a} for a in addresses]
        app = RouterApp(config_mod.from_mapping(data, "<test>"))
        async with asyncio.timeout(10):
            bound = await app.start()
        stop_event = asyncio.Event()
        task = asyncio.create_task(app.serve(stop_event.wait()), name="router-serve")
        router = RunningRouter(app, *bound.listen, *bound.admin, stop_event, task)
        running.append(router)
        return router

    yield start
    for router in running:
        await router.stop()


@pytest.fixture
def dead_port() -> int:
    """A port nothing listens on (bound a moment ago, then closed)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
