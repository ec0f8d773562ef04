"""Backends and the models they serve.

A ``Backend`` is the router's view of one backend process: its address and weight, its pool,
how many requests it is carrying, and whether it is healthy. Passive health lives here:
``failure_threshold`` consecutive failures (refused connects, resets, timeouts) mark it down so
the balancer stops choosing it; the health checker's active probes bring it back. (The C++
router had no such rule and sent 1,010 of 1,020 requests to a dead backend, because a backend
that fails fast always has the fewest connections in flight.)

Kinds and models: a backend speaks one protocol (``kind``: "tcp" for length-prefixed frames,
"grpc"), and traffic of one kind only ever goes to backends of that kind. It may name the
models it serves ("name" for every version, or "name:version"); a request that names a model
(``key`` "name" or "name:version") goes only to backends that serve it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from router.upstream.pool import Pool

_MAX_CACHED_KEYS = 1024


class Backend:
    __slots__ = (
        "_healthy",
        "address",
        "call_limit",
        "consecutive_failures",
        "failure_threshold",
        "failures_total",
        "host",
        "inflight",
        "kind",
        "model_keys",
        "models",
        "on_change",
        "plain_models",
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
        kind: str = "tcp",
        call_limit: int = 0,
    ) -> None:
        self.host = host
        self.port = port
        self.address = f"{host}:{port}"
        self.pool = pool
        self.weight = weight
        self.models = models
        self.kind = kind
        # In-flight calls this backend may carry (0: no limit; the TCP pool bounds its own).
        self.call_limit = call_limit
        # "sum:2" serves key "sum:2" and key "sum" (a request for the default version);
        # plain "sum" serves "sum" and every "sum:<version>".
        self.plain_models = frozenset(m for m in models if ":" not in m)
        self.model_keys = frozenset(models) | {m.partition(":")[0] for m in models}
        self.on_change: Callable[[Backend], None] | None = None  # told when healthy flips
        self.failure_threshold = failure_threshold
        self.inflight = 0
        self.requests_total = 0
        self.failures_total = 0
        self.consecutive_failures = 0
        self._healthy = True

    @property
    def healthy(self) -> bool:
        return self._healthy

    @healthy.setter
    def healthy(self, value: bool) -> None:
        # Every flip is announced: the registry caches who is in rotation.
        if value != self._healthy:
            self._healthy = value
            if self.on_change is not None:
                self.on_change(self)

    def record_success(self) -> None:
        self.requests_total += 1
        self.consecutive_failures = 0

    def record_failure(self) -> bool:
        """Count a failure; return True if this one marked the backend down."""
        self.requests_total += 1
        self.failures_total += 1
        self.consecutive_failures += 1
        if self.healthy and self.consecutive_failures >= self.failure_threshold:
            self.mark_down()
            return True
        return False

    def mark_down(self) -> None:
        """Out of rotation until a probe succeeds (failures, or the backend said so)."""
        self.healthy = False
        self.pool.expire_all()

    def mark_up(self) -> None:
        self.consecutive_failures = 0
        self.healthy = True

    def serves(self, model: str) -> bool:
        """Whether this backend serves model key ``model`` ("name" or "name:version")."""
        if model in self.model_keys:
            return True
        name, sep, _ = model.partition(":")
        return bool(sep) and name in self.plain_models

    def statistics(self) -> dict[str, Any]:
        return {
            "address": self.address,
            "kind": self.kind,
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
    """The set of known backends, in a stable order.

    ``view(kind)`` is a live view of the backends of one kind over the same set (the TCP
    health checker gets ``view("tcp")``: it probes with frames, which a gRPC backend would
    not answer). ``add_listener`` registers a callback told whenever a backend goes in or
    out of rotation (the gRPC health service pushes that to its watchers).
    """

    def __init__(self) -> None:
        self._backends: dict[str, Backend] = {}
        self._kind: str | None = None
        self._listeners: list[Callable[[Backend], None]] = []
        # (kind, model) -> the healthy backends for it, in registry order; built on first use
        # and cleared whenever a backend joins, leaves or flips health (add, remove, _changed).
        self._in_rotation: dict[tuple[str, str | None], list[Backend]] = {}

    def view(self, kind: str) -> Registry:
        view = Registry()
        view._backends, view._kind, view._listeners = self._backends, kind, self._listeners
        view._in_rotation = self._in_rotation
        return view

    def _members(self) -> list[Backend]:
        if self._kind is None:
            return list(self._backends.values())
        return [b for b in self._backends.values() if b.kind == self._kind]

    def add(self, backend: Backend) -> None:
        if backend.address in self._backends:
            raise ValueError(f"backend {backend.address} is already registered")
        self._backends[backend.address] = backend
        backend.on_change = self._changed
        self._in_rotation.clear()

    def remove(self, address: str) -> Backend:
        backend = self._backends.pop(address)
        backend.on_change = None
        self._in_rotation.clear()
        backend.pool.close()
        return backend

    def add_listener(self, listener: Callable[[Backend], None]) -> None:
        self._listeners.append(listener)

    def _changed(self, backend: Backend) -> None:
        self._in_rotation.clear()
        for listener in list(self._listeners):
            listener(backend)

    def get(self, address: str) -> Backend | None:
        return self._backends.get(address)

    def __iter__(self) -> Iterator[Backend]:
        return iter(self._members())

    def __len__(self) -> int:
        return len(self._members())

    def any_healthy(self, kind: str | None = None) -> bool:
        return any(b.healthy and kind in (None, b.kind) for b in self._members())

    def candidates(
        self, exclude: tuple[Backend, ...] = (), kind: str = "tcp", model: str | None = None
    ) -> list[Backend]:
        """Healthy backends of ``kind`` serving ``model`` (any, if None), not in ``exclude``
        (the ones a request already tried). The list may be shared: do not modify it."""
        healthy = self._in_rotation.get((kind, model))
        if healthy is None:
            if len(self._in_rotation) >= _MAX_CACHED_KEYS:
                self._in_rotation.clear()  # model keys come from clients: stay bounded
            healthy = self._in_rotation[(kind, model)] = [
                b for b in self._backends.values()
                if b.healthy and b.kind == kind and (model is None or b.serves(model))
            ]
        if exclude:
            return [b for b in healthy if b not in exclude]
        return healthy

    def knows_model(self, model: str, kind: str) -> bool:
        """Whether any backend of ``kind``, healthy or not, serves ``model``: if none does, a
        request for it is refused without touching a backend."""
        return any(b.kind == kind and b.serves(model) for b in self._backends.values())

    def close(self) -> None:
        for backend in self._members():
            backend.pool.close()

    def statistics(self) -> list[dict[str, Any]]:
        return [b.statistics() for b in self._members()]

    def __repr__(self) -> str:
        members = self._members()
        healthy = sum(1 for b in members if b.healthy)
        kind = f"{self._kind}, " if self._kind else ""
        return f"Registry({kind}backends={len(members)}, healthy={healthy})"
