"""Backends for tests that need the data plane's records without a network."""

from __future__ import annotations

from router.control.directory import BackendDirectory
from router.control.store import MemoryStore
from router.core.clock import ManualClock
from router.core.config import PoolConfig
from router.core.types import BackendSpec, Protocol
from router.dispatch.backends import Backend, Registry
from router.upstream.base import Upstream
from router.upstream.grpc_limiter import GrpcCallLimiter
from router.upstream.pool import Connection, Pool


async def no_dial() -> Connection:
    raise AssertionError("this test never dials")


def make_backend(
    address: str, protocol: Protocol = "tcp", models: tuple[str, ...] = (),
    upstream: Upstream | None = None, max_calls: int = 256,
) -> Backend:
    """A backend record: a frame pool that never dials (``tcp``) or a call limiter (``grpc``),
    unless ``upstream`` is given."""
    if upstream is None:
        if protocol == "grpc":
            upstream = GrpcCallLimiter(max_calls, address)
        else:
            upstream = Pool(no_dial, PoolConfig(), ManualClock(), name=address)
    spec = BackendSpec(id=address, address=address, protocol=protocol, models=models)
    return Backend(spec, upstream)


def memory_directory(registry: Registry) -> BackendDirectory:
    """A directory over ``registry`` whose records live in a MemoryStore on a ManualClock
    (leases never expire unless the clock is advanced); its backends never dial."""
    return BackendDirectory(registry, MemoryStore(ManualClock()),
                            lambda spec: make_backend(spec.address, spec.protocol, spec.models))
