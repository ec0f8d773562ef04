"""The data plane's backends: their runtime state, and the set of them in rotation.

A ``Backend`` pairs a ``BackendSpec`` (who it is: address, protocol, models, weight; owned by
the control plane) with what dispatch learns while serving: its ``Upstream``, the requests
waiting on it, its load, and whether it is healthy. It counts successes and failures (refused
connects, resets, timeouts) on the hot path; what a failure streak means is passive health's
decision (``router.health.ejection``), told of every failure through ``on_failure``. Every
change in or out of rotation carries a reason (``mark_down(reason)``/``mark_up(reason)``) that
the registry's listeners hear.

Joining and leaving: ``Registry.add`` puts a backend in the candidate lists at once.
``Registry.drain`` takes it out of them at once (reason "draining"; dispatch moves the
requests waiting on it elsewhere) and keeps it, *draining*, until nothing is in flight or
waiting on it (``settle``, which dispatch calls as its attempts end): then its upstream is
closed and the leave listeners are told. A reload, a DNS refresh and any later source of
backends remove one this way, so no request accepted by the router is lost to a removal.

Kinds and models: a backend speaks one protocol (``kind``: "tcp" for length-prefixed frames,
"grpc"), and traffic of one kind only ever goes to backends of that kind. It may name the
models it serves ("name" for every version, or "name:version", or "*" for any model); a
request that names a model (``key`` "name" or "name:version") goes only to backends that
serve it.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from router.balance.policies import Snapshot
from router.core.errors import NoBackend, UnknownModel, quoted
from router.core.types import BackendSpec
from router.upstream.base import Upstream
from router.upstream.pool import Pool

if TYPE_CHECKING:
    from router.dispatch.request import Request

_MAX_CACHED_KEYS = 1024
ANY_MODEL = "*"


class Backend:
    """The data plane's runtime record of one backend: its ``spec`` (identity, owned by the
    control plane), its ``upstream``, the requests waiting on it, its load and health."""

    __slots__ = (
        "_healthy",
        "address",
        "any_model",
        "consecutive_failures",
        "drained",
        "draining",
        "failures_total",
        "inflight",
        "kind",
        "model_keys",
        "models",
        "on_change",
        "on_failure",
        "plain_models",
        "requests_total",
        "spec",
        "upstream",
        "waiting",
        "weight",
        "weight_override",
    )

    def __init__(self, spec: BackendSpec, upstream: Upstream) -> None:
        self.upstream = upstream
        self.address = spec.address
        self.kind = spec.protocol
        # An operator's weight (Registry.set_weight), over the spec's until cleared.
        self.weight_override: int | None = None
        self._take_spec(spec)
        # Told (backend, reason) when healthy flips; set by the registry.
        self.on_change: Callable[[Backend, str], None] | None = None
        # Told of every failed attempt (passive health decides on ejection); set by the registry.
        self.on_failure: Callable[[Backend], None] | None = None
        # Attempts in progress plus requests waiting here: the load the policy sees.
        self.inflight = 0
        self.waiting: deque[Request] = deque()  # owned by dispatch.queue.WaitQueue
        self.requests_total = 0
        self.failures_total = 0
        self.consecutive_failures = 0
        self._healthy = True
        # Out of the candidate lists, waiting for what is in flight on it (Registry.drain).
        self.draining = False
        # Out of the candidate lists by an operator (Registry.set_drained), still a member.
        self.drained = False

    def _take_spec(self, spec: BackendSpec) -> None:
        self.spec = spec
        # Copied from the spec: the policy and the candidate filter read them per request.
        self.weight = self.weight_override or spec.weight
        self.models = spec.models
        # "sum:2" serves key "sum:2" and key "sum" (a request for the default version);
        # plain "sum" serves "sum" and every "sum:<version>".
        self.plain_models = frozenset(m for m in spec.models if ":" not in m)
        self.model_keys = frozenset(spec.models) | {m.partition(":")[0] for m in spec.models}
        # "*": any model key (a server that loads models on demand, such as backends.modelsim).
        self.any_model = ANY_MODEL in spec.models

    def update(self, spec: BackendSpec) -> None:
        """Take a new spec for the same address and protocol (weight, models, labels): the
        requests placed from now on see it; those in flight are not touched."""
        if (spec.address, spec.protocol) != (self.address, self.kind):
            raise ValueError(f"{spec.address} ({spec.protocol}) is another backend than {self}")
        self._take_spec(spec)

    @property
    def id(self) -> str:
        """The backend's id (the keyed policies rank on it: the same in every router)."""
        return self.spec.id

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
        self._set_healthy(value, "marked up" if value else "marked down")

    def _set_healthy(self, value: bool, reason: str) -> None:
        # Every flip is announced: the registry caches who is in rotation.
        if value != self._healthy:
            self._healthy = value
            if self.on_change is not None:
                self.on_change(self, reason)

    def record_success(self) -> None:
        self.requests_total += 1
        self.consecutive_failures = 0

    def record_failure(self) -> None:
        """Count a failed attempt and tell passive health, which may eject the backend."""
        self.requests_total += 1
        self.failures_total += 1
        self.consecutive_failures += 1
        if self.on_failure is not None:
            self.on_failure(self)

    def mark_down(self, reason: str = "marked down") -> None:
        """Out of rotation until a probe succeeds (ejected, or the backend said so)."""
        self._set_healthy(False, reason)
        if (pool := self.pool) is not None:
            pool.expire_all()

    def mark_up(self, reason: str = "marked up") -> None:
        self.consecutive_failures = 0
        self._set_healthy(True, reason)

    def serves(self, model: str) -> bool:
        """Whether this backend serves model key ``model`` ("name" or "name:version")."""
        if model in self.model_keys or self.any_model:
            return True
        name, sep, _ = model.partition(":")
        return bool(sep) and name in self.plain_models

    def statistics(self) -> dict[str, Any]:
        return {
            "id": self.spec.id,
            "address": self.address,
            "kind": self.kind,
            "source": self.spec.source,
            "labels": dict(self.spec.labels),
            "weight": self.weight,
            "models": list(self.models),
            "healthy": self.healthy,
            "state": "draining" if self.draining or self.drained else (
                "up" if self.healthy else "down"),
            "drained": self.drained,
            "inflight": self.inflight,
            "waiting": len(self.waiting),
            "requests_total": self.requests_total,
            "failures_total": self.failures_total,
            "consecutive_failures": self.consecutive_failures,
            ("pool" if self.kind == "tcp" else "calls"): self.upstream.statistics(),
        }

    def __repr__(self) -> str:
        state = "draining" if self.draining else ("up" if self.healthy else "down")
        return f"Backend({self.address}, {state}, inflight={self.inflight}, weight={self.weight})"


class Registry:
    """The set of known backends, in a stable order, and those draining out of it.

    ``view(kind)`` is a live view of the backends of one kind over the same set.
    ``add_listener`` registers a callback told ``(backend, reason)`` whenever a backend goes
    in or out of rotation, draining included (the health monitor logs it, the gRPC health
    service pushes it to its watchers, dispatch moves the requests waiting on it).
    ``on_failure`` is given to every backend added: passive health, told of each failed
    attempt. Iterating, ``len``, ``get`` and the candidate lists see only the members, never a
    draining backend; ``draining()`` lists those.
    """

    def __init__(
        self, on_failure: Callable[[Backend], None] | None = None, panic_threshold: float = 0.0
    ) -> None:
        self._backends: dict[str, Backend] = {}
        # Leaving: out of every list above, kept until nothing is in flight on it. Keyed by the
        # record, not the address: a new backend may join at an address that is still draining.
        self._draining: dict[Backend, None] = {}
        # Below this fraction of healthy backends (of a kind and model), health is ignored and
        # every backend is a candidate (Envoy's panic threshold): a connect attempt to a backend
        # marked down is worth more than refusing every request until the next probe. One list
        # shared with the views, so a reload that changes it reaches them all.
        self._panic = [panic_threshold]
        self._kind: str | None = None
        self._on_failure = on_failure
        self._listeners: list[Callable[[Backend, str], None]] = []
        self._join_listeners: list[Callable[[Backend], None]] = []
        self._leave_listeners: list[Callable[[Backend], None]] = []
        # (kind, model) -> the healthy backends for it, in registry order; built on first use
        # and cleared whenever a backend joins, leaves, drains, changes spec or flips health.
        # Beside it, every backend serving the key (healthy or not: whether a model is known).
        # A list is never modified once built: policies keep derived state on it (Snapshot).
        self._in_rotation: dict[tuple[str, str | None],
                                tuple[list[Backend], Snapshot[Backend]]] = {}

    def view(self, kind: str) -> Registry:
        view = Registry(self._on_failure)
        view._backends, view._kind, view._listeners = self._backends, kind, self._listeners
        view._draining, view._panic = self._draining, self._panic
        view._join_listeners, view._leave_listeners = self._join_listeners, self._leave_listeners
        view._in_rotation = self._in_rotation
        return view

    @property
    def panic_threshold(self) -> float:
        return self._panic[0]

    @panic_threshold.setter
    def panic_threshold(self, value: float) -> None:
        self._panic[0] = value
        self._in_rotation.clear()

    def _members(self) -> list[Backend]:
        if self._kind is None:
            return list(self._backends.values())
        return [b for b in self._backends.values() if b.kind == self._kind]

    def add(self, backend: Backend) -> None:
        if backend.address in self._backends:
            raise ValueError(f"backend {backend.address} is already registered")
        self._backends[backend.address] = backend
        backend.on_change = self._changed
        backend.on_failure = self._on_failure
        self._in_rotation.clear()
        for listener in list(self._join_listeners):
            listener(backend)

    def update(self, spec: BackendSpec) -> Backend:
        """Give the member at ``spec.address`` its new spec (``Backend.update``)."""
        backend = self._backends[spec.address]
        backend.update(spec)
        self._in_rotation.clear()
        return backend

    def remove(self, address: str) -> Backend:
        """Forget a member at once and close its upstream (what is in flight on it fails
        over); ``drain`` is the way that loses nothing."""
        backend = self._backends.pop(address)
        backend.on_change = backend.on_failure = None
        self._in_rotation.clear()
        backend.upstream.close()
        return backend

    def drain(self, address: str) -> Backend:
        """Take a member out of the candidate lists now; it leaves once nothing is in flight
        or waiting on it (``settle``), at once if nothing is."""
        backend = self._backends.pop(address)
        backend.draining = True
        self._draining[backend] = None
        self._in_rotation.clear()
        for listener in list(self._listeners):
            listener(backend, "draining")
        self.settle(backend)
        return backend

    def settle(self, backend: Backend) -> None:
        """A draining backend with nothing in flight or waiting leaves: its upstream is
        closed and the leave listeners are told. Anything else is left as it is."""
        if backend.inflight or backend.waiting or backend not in self._draining:
            return
        del self._draining[backend]
        backend.on_change = backend.on_failure = None
        backend.upstream.close()
        for listener in list(self._leave_listeners):
            listener(backend)

    def set_drained(self, address: str, drained: bool) -> Backend:
        """An operator's drain (``drained``) or undrain of a member: out of (back in) the
        candidate lists at once; it stays a member, probed, and what is in flight finishes."""
        backend = self._backends[address]
        if backend.drained != drained:
            backend.drained = drained
            self._changed(backend, "drained" if drained else "undrained")
        return backend

    def set_weight(self, address: str, weight: int | None) -> Backend:
        """An operator's weight for a member (None: its spec's again), kept across spec
        updates (a reload)."""
        backend = self._backends[address]
        backend.weight_override = weight
        backend.update(backend.spec)
        self._in_rotation.clear()
        return backend

    def draining(self) -> list[Backend]:
        """The backends draining out of the registry (of this view's kind)."""
        return [b for b in self._draining if self._kind in (None, b.kind)]

    def add_listener(self, listener: Callable[[Backend, str], None]) -> None:
        """``listener(backend, reason)`` whenever a backend goes in or out of rotation."""
        self._listeners.append(listener)

    def add_join_listener(self, listener: Callable[[Backend], None]) -> None:
        """``listener(backend)`` whenever a backend is added."""
        self._join_listeners.append(listener)

    def add_leave_listener(self, listener: Callable[[Backend], None]) -> None:
        """``listener(backend)`` once a draining backend has left (its upstream closed)."""
        self._leave_listeners.append(listener)

    def _changed(self, backend: Backend, reason: str) -> None:
        self._in_rotation.clear()
        for listener in list(self._listeners):
            listener(backend, reason)

    def get(self, address: str) -> Backend | None:
        return self._backends.get(address)

    def __iter__(self) -> Iterator[Backend]:
        return iter(self._members())

    def __len__(self) -> int:
        return len(self._members())

    def any_healthy(self, kind: str | None = None) -> bool:
        return any(b.healthy and not b.drained and kind in (None, b.kind)
                   for b in self._members())

    def candidates(
        self, exclude: tuple[Backend, ...] = (), kind: str = "tcp", model: str | None = None
    ) -> list[Backend]:
        """The backends a request of ``kind`` for ``model`` (any, if None) may go to, not in
        ``exclude`` (the ones it already tried): the healthy ones serving it, or all of them
        while fewer than ``panic_threshold`` of them are healthy. The list may be shared: do not
        modify it."""
        candidates = self._rotation(kind, model)[1]
        if exclude:
            return Snapshot(b for b in candidates if b not in exclude)
        return candidates

    def _rotation(self, kind: str, model: str | None) -> tuple[list[Backend], Snapshot[Backend]]:
        """(serving, candidates) of a key, from the cache: a request must not look at every
        backend of a large fleet (1,000 registered: ``serving`` alone is a scan of each)."""
        entry = self._in_rotation.get((kind, model))
        if entry is None:
            if len(self._in_rotation) >= _MAX_CACHED_KEYS:
                self._in_rotation.clear()  # model keys come from clients: stay bounded
            serving = self.serving(kind, model)
            candidates = Snapshot(b for b in serving if b.healthy)
            if len(candidates) < self._panic[0] * len(serving):
                candidates = Snapshot(serving)
            entry = self._in_rotation[(kind, model)] = (serving, candidates)
        return entry

    def serving(self, kind: str, model: str | None = None) -> list[Backend]:
        """Every backend of ``kind`` serving ``model`` (any, if None), healthy or not, that an
        operator has not drained."""
        return [
            b for b in self._backends.values()
            if b.kind == kind and not b.drained and (model is None or b.serves(model))
        ]

    def panicking(self, kind: str = "tcp", model: str | None = None) -> bool:
        """Whether requests of ``kind`` for ``model`` go to every backend, health ignored."""
        candidates = self.candidates((), kind, model)
        return any(not b.healthy for b in candidates)

    def knows_model(self, model: str, kind: str) -> bool:
        """Whether any backend of ``kind``, healthy or not, serves ``model``: if none does, a
        request for it is refused without touching a backend."""
        entry = self._in_rotation.get((kind, model))
        if entry is not None:
            return bool(entry[0])
        # An unknown name is not cached: clients choose names, and theirs would evict ours.
        if not self.serving(kind, model):
            return False
        self._rotation(kind, model)
        return True

    def check_model(self, model: str, kind: str) -> None:
        """Refuse a request for ``model`` that no backend of ``kind`` could take, before any
        backend is touched: ``NoBackend`` while there is no backend of ``kind`` at all (a
        fleet that has not joined yet: try again later), ``UnknownModel`` when there are
        some and none serves it."""
        if self.knows_model(model, kind):
            return
        if not self.serving(kind):
            raise NoBackend(f"no {kind} backend has joined yet (model {quoted(model)})")
        raise UnknownModel(f"no backend serves model {quoted(model)}")

    def close(self) -> None:
        for backend in [*self._members(), *self.draining()]:
            backend.upstream.close()

    def statistics(self) -> list[dict[str, Any]]:
        return [b.statistics() for b in [*self._members(), *self.draining()]]

    def __repr__(self) -> str:
        members = self._members()
        healthy = sum(1 for b in members if b.healthy)
        kind = f"{self._kind}, " if self._kind else ""
        draining = len(self.draining())
        return f"Registry({kind}backends={len(members)}, healthy={healthy}, draining={draining})"
