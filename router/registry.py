"""Backends and the models they serve.

A ``Backend`` is the router's view of one backend process: its address and weight, its pool,
how many requests it is carrying, and whether it is healthy. Passive health lives here:
``failure_threshold`` consecutive failures (refused connects, resets, timeouts) mark it down so
the balancer stops choosing it; the health checker's active probes bring it back. (The C++
router had no such rule and sent 1,010 of 1,020 requests to a dead backend, because a backend
that fails fast always has the fewest connections in flight.)
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from router.pool import Pool


class Backend:
    __slots__ = (
        "address",
        "consecutive_failures",
        "failure_threshold",
        "failures_total",
        "healthy",
        "host",
        "inflight",
        "models",
        "pool",
        "port",
        "requests_total",
        "weight",
    )

    def __init__(
        self,
        host: str,
        port: int,
        pool: Pool,
        *,
        weight: int = 1,
        models: tuple[str, ...] = (),
        failure_threshold: int = 3,
    ) -> None:
        self.host = host
        self.port = port
        self.address = f"{host}:{port}"
        self.pool = pool
        self.weight = weight
        self.models = models
        self.failure_threshold = failure_threshold
        self.inflight = 0
        self.requests_total = 0
        self.failures_total = 0
        self.consecutive_failures = 0
        self.healthy = True

    def record_success(self) -> None:
        self.requests_total += 1
        self.consecutive_failures = 0

    def record_failure(self) -> bool:
        """Count a failure; return True if this one marked the backend down."""
        self.requests_total += 1
        self.failures_total += 1
        self.consecutive_failures += 1
        if self.healthy and self.consecutive_failures >= self.failure_threshold:
            self.healthy = False
            self.pool.expire_all()
            return True
        return False

    def mark_up(self) -> None:
        self.healthy = True
        self.consecutive_failures = 0

    def statistics(self) -> dict[str, Any]:
        return {
            "address": self.address,
            "weight": self.weight,
            "models": list(self.models),
            "healthy": self.healthy,
            "inflight": self.inflight,
            "requests_total": self.requests_total,
            "failures_total": self.failures_total,
            "consecutive_failures": self.consecutive_failures,
            "pool": self.pool.statistics(),
        }

    def __repr__(self) -> str:
        state = "up" if self.healthy else "down"
        return f"Backend({self.address}, {state}, inflight={self.inflight}, weight={self.weight})"


class Registry:
    """The set of known backends, in a stable order."""

    def __init__(self) -> None:
        self._backends: dict[str, Backend] = {}

    def add(self, backend: Backend) -> None:
        if backend.address in self._backends:
            raise ValueError(f"backend {backend.address} is already registered")
        self._backends[backend.address] = backend

    def remove(self, address: str) -> Backend:
        backend = self._backends.pop(address)
        backend.pool.close()
        return backend

    def get(self, address: str) -> Backend | None:
        return self._backends.get(address)

    def __iter__(self) -> Iterator[Backend]:
        return iter(list(self._backends.values()))

    def __len__(self) -> int:
        return len(self._backends)

    def any_healthy(self) -> bool:
        return any(b.healthy for b in self._backends.values())

    def candidates(self, exclude: tuple[Backend, ...] = ()) -> list[Backend]:
        """Healthy backends not in ``exclude`` (the ones a request already tried)."""
        return [b for b in self._backends.values() if b.healthy and b not in exclude]

    def close(self) -> None:
        for backend in self._backends.values():
            backend.pool.close()

    def statistics(self) -> list[dict[str, Any]]:
        return [b.statistics() for b in self._backends.values()]

    def __repr__(self) -> str:
        healthy = sum(1 for b in self._backends.values() if b.healthy)
        return f"Registry(backends={len(self._backends)}, healthy={healthy})"
