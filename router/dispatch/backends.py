"""The data plane's backends: their runtime state, and the set of them in rotation.

A ``Backend`` pairs a ``BackendSpec`` (who it is: address, protocol, models, weight; owned by
the control plane) with what dispatch learns while serving: its ``Upstream``, the requests
waiting on it, its load, and whether it is healthy. Passive health counts here:
``failure_threshold`` consecutive failures (refused connects, resets, timeouts) take it out of
rotation, since a backend that fails fast always has the fewest requests in flight and would
otherwise attract most of the traffic; active probes bring it back.

Kinds and models: a backend speaks one protocol (``kind``: "tcp" for length-prefixed frames,
"grpc"), and traffic of one kind only ever goes to backends of that kind. It may name the
models it serves ("name" for every version, or "name:version"); a request that names a model
(``key`` "name" or "name:version") goes only to backends that serve it.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from router.core.types import BackendSpec
from router.upstream.base import Upstream
from router.upstream.pool import Pool

if TYPE_CHECKING:
    from router.dispatch.request import Request

_MAX_CACHED_KEYS = 1024


class Backend:
    """The data plane's runtime record of one backend: its ``spec`` (identity, owned by the
    control plane), its ``upstream``, the requests waiting on it, its load and health."""

    __slots__ = (
        "_healthy",
        "address",
        "consecutive_failures",
        "failure_threshold",
        "failures_total",
        "inflight",
        "kind",
        "model_keys",
        "models",
        "on_change",
        "plain_models",
        "requests_total",
        "spec",
        "upstream",
        "waiting",
        "weight",
    )

    def __init__(
        self, spec: BackendSpec, upstream: Upstream, *, failure_threshold: int = 3
    ) -> None:
        self.spec = spec
        self.upstream = upstream
        # Copied from the spec: the policy and the candidate filter read them per request.
        self.address = spec.address
        self.weight = spec.weight
        self.models = spec.models
        self.kind = spec.protocol
        # "sum:2" serves key "sum:2" and key "sum" (a request for the default version);
        # plain "sum" serves "sum" and every "sum:<version>".
        self.plain_models = frozenset(m for m in spec.models if ":" not in m)
        self.model_keys = frozenset(spec.models) | {m.partition(":")[0] for m in spec.models}
        self.on_change: Callable[[Backend], None] | None = None  # told when healthy flips
        self.failure_threshold = failure_threshold
        # Attempts in progress plus requests waiting here: the load the policy sees.
        self.inflight = 0
        self.waiting: deque[Request] = deque()  # owned by dispatch.queue.WaitQueue
        self.requests_total = 0
        self.failures_total = 0
        self.consecutive_failures = 0
        self._healthy = True

    @property
    def pool(self) -> Pool | None:
        """The frame pool, for a length-prefixed backend (a gRPC backend has none)."""
        upstream = self.upstream
        return upstream if isinstance(upstream, Pool) else None

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
        if (pool := self.pool) is not None:
            pool.expire_all()

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
            "id": self.spec.id,
            "address": self.address,
            "kind": self.kind,
            "source": self.spec.source,
            "weight": self.weight,
            "models": list(self.models),
            "healthy": self.healthy,
            "inflight": self.inflight,
            "waiting": len(self.waiting),
            "requests_total": self.requests_total,
            "failures_total": self.failures_total,
            "consecutive_failures": self.consecutive_failures,
            ("pool" if self.kind == "tcp" else "calls"): self.upstream.statistics(),
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
        self._changed(backend)

    def remove(self, address: str) -> Backend:
        backend = self._backends.pop(address)
        backend.on_change = None
        self._in_rotation.clear()
        backend.upstream.close()
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
            backend.upstream.close()

    def statistics(self) -> list[dict[str, Any]]:
        return [b.statistics() for b in self._members()]

    def __repr__(self) -> str:
        members = self._members()
        healthy = sum(1 for b in members if b.healthy)
        kind = f"{self._kind}, " if self._kind else ""
        return f"Registry({kind}backends={len(members)}, healthy={healthy})"
