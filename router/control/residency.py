"""What backends say about their models, into the residency view (``router.balance``).

Three sources, beside the policy's own routing decisions:

* a backend's *shape* when it joins: its ``model_slots`` and ``concurrency`` labels (config
  ``labels``, or a registration's), else ``[affinity]``'s defaults, and ``model_control =
  "explicit"`` for a gRPC backend whose models the router loads and unloads itself (KServe
  ``RepositoryModelLoad``/``Unload``, Triton's explicit model control); a backend that
  leaves is forgotten;
* heartbeat reports (``LoadReport.loaded_models``, through the directory's report listener):
  what a registered backend holds (least recently used first, the order it evicts in), in
  every router process it heartbeats to, and
  (``model_use``) each model's requests there from every router: the others' share is the
  view's foreign load (``ResidencyView.report_use``);
* KServe for gRPC backends: every ``affinity.index_interval_s`` each one's Triton
  ``RepositoryIndex`` (READY: loaded, LOADING: loading, anything else: absent). A backend
  without the method (UNIMPLEMENTED; not asked for it again until it rejoins) is asked
  ``ModelReady`` instead, for the models the view holds there (the ones the router routed to
  it or it reported), at most ``MODEL_READY_MAX`` per pass, taken in turn when it holds more:
  ready is loaded, not ready or NOT_FOUND absent (``ResidencyView.confirm``). A backend
  without ModelReady either is known from routing alone.

The index is read only while the policy is ``affinity`` (``run`` is started for it), over
the backend's channel without counting as use (an idle channel still closes).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from router.balance.residency import ResidencyView
from router.control.directory import LoadReport
from router.core.clock import Clock
from router.dispatch.backends import Backend, Registry
from router.protocol.proto import grpc_predict_v2_pb2 as pb
from router.protocol.proto import triton_extensions_pb2 as triton
from router.upstream.grpc_channels import GrpcChannels

log = logging.getLogger(__name__)

REPOSITORY_INDEX = "/inference.GRPCInferenceService/RepositoryIndex"
MODEL_READY = "/inference.GRPCInferenceService/ModelReady"
INDEX_TIMEOUT_S = 2.0
# ModelReady calls per backend per pass: a backend's slots are a handful of models, and a pass
# every index_interval_s of 8 small calls per backend costs little even over 1,000 backends.
MODEL_READY_MAX = 8
SLOTS_LABEL = "model_slots"
CONCURRENCY_LABEL = "concurrency"
CONTROL_LABEL = "model_control"  # "explicit": the router loads and unloads (gRPC only)
_STATES = {"READY": "loaded", "LOADING": "loading"}


def _label(backend: Backend, name: str) -> int | None:
    value = dict(backend.spec.labels).get(name)
    if value is None:
        return None
    try:
        number = int(value)
    except ValueError:
        number = 0
    if number < 1:
        log.warning("backend %s: label %s=%r is not a positive integer; the default applies",
                    backend.id, name, value)
        return None
    return number


class ResidencyFeed:
    def __init__(self, registry: Registry, view: ResidencyView, clock: Clock,
                 channels: GrpcChannels | None = None, index_interval_s: float = 0.0,
                 active: Callable[[], bool] = lambda: True) -> None:
        """``active``: whether indexes are wanted now (the policy is ``affinity``)."""
        self._registry = registry
        self._active = active
        self.view = view
        self._clock = clock
        self._channels = channels
        self._interval_s = index_interval_s
        self._no_index: set[Backend] = set()  # answered UNIMPLEMENTED: asked ModelReady
        self._no_ready: set[Backend] = set()  # nor has ModelReady: known from routing alone
        self._ready_turn: dict[Backend, int] = {}  # where its next ModelReady pass starts
        self.reports = 0
        self.use_reports = 0
        self.index_reads = 0
        self.index_failures = 0
        self.ready_reads = 0
        self.ready_failures = 0
        registry.add_join_listener(self._joined)
        registry.add_leave_listener(self._left)
        for backend in registry:
            self._joined(backend)

    def _joined(self, backend: Backend) -> None:
        control = dict(backend.spec.labels).get(CONTROL_LABEL)
        self.view.shape(backend.id, _label(backend, SLOTS_LABEL),
                        _label(backend, CONCURRENCY_LABEL), control == "explicit")
        self._forget(backend)

    def _left(self, backend: Backend) -> None:
        self._forget(backend)
        if not any(b.id == backend.id for b in self._registry):  # not joined again meanwhile
            self.view.forget(backend.id)

    def _forget(self, backend: Backend) -> None:
        self._no_index.discard(backend)
        self._no_ready.discard(backend)
        self._ready_turn.pop(backend, None)

    def reported(self, backend_id: str, report: LoadReport) -> None:
        """A heartbeat's report (the directory's report listener): what it holds, then each
        model's requests there (after the models, so a model it reports loading counts)."""
        if report.loaded_models is not None:
            self.reports += 1
            self.view.report(backend_id, report.loaded_models, self._clock.now(),
                             lru_order=True)
        if report.model_use is not None:
            self.use_reports += 1
            self.view.report_use(backend_id, report.model_use, self._clock.now())

    # -- KServe RepositoryIndex --------------------------------------------------------------

    async def run(self) -> None:
        """Read every gRPC backend's index every interval, until cancelled."""
        if self._channels is None or self._interval_s <= 0:
            return
        while True:
            if self._active():
                await self.read_indexes()
            await asyncio.sleep(self._interval_s)

    async def read_indexes(self) -> int:
        """One pass over the healthy gRPC backends; how many answered."""
        backends = [b for b in self._registry
                    if b.kind == "grpc" and b.healthy and b not in self._no_ready]
        answered = await asyncio.gather(*(
            self._read_ready(b) if b in self._no_index else self._read_index(b)
            for b in backends))
        return sum(answered)

    async def _read_index(self, backend: Backend) -> bool:
        assert self._channels is not None
        call = self._channels.probe_channel(backend).unary_unary(REPOSITORY_INDEX)
        try:
            raw = await call(triton.RepositoryIndexRequest().SerializeToString(),
                             timeout=INDEX_TIMEOUT_S)
            reply = triton.RepositoryIndexResponse.FromString(raw)
        except grpc.aio.AioRpcError as exc:
            self.index_failures += 1
            if exc.code() == grpc.StatusCode.UNIMPLEMENTED:
                self._no_index.add(backend)
                log.info("backend %s has no RepositoryIndex: asking ModelReady instead",
                         backend.id)
                return await self._read_ready(backend)
            return False
        except DecodeError as exc:
            self.index_failures += 1
            log.warning("backend %s: unreadable RepositoryIndex reply: %r", backend.id, exc)
            return False
        self.index_reads += 1
        loaded = [m.name for m in reply.models if _STATES.get(m.state) == "loaded"]
        loading = [m.name for m in reply.models if _STATES.get(m.state) == "loading"]
        self.view.report(backend.id, loaded, self._clock.now(), loading)
        return True

    # -- KServe ModelReady, for backends without RepositoryIndex ----------------------------

    def _ready_models(self, backend: Backend) -> list[str]:
        """The models of the view on ``backend`` to ask about in this pass: all of them up to
        ``MODEL_READY_MAX``, else the next ``MODEL_READY_MAX`` in turn."""
        names = list(self.view.models_of(backend.id))
        if len(names) <= MODEL_READY_MAX:
            return names
        start = self._ready_turn.get(backend, 0) % len(names)
        self._ready_turn[backend] = start + MODEL_READY_MAX
        return (names[start:] + names[:start])[:MODEL_READY_MAX]

    async def _read_ready(self, backend: Backend) -> bool:
        """One ModelReady pass over ``backend``; whether it answered them all."""
        assert self._channels is not None
        call = self._channels.probe_channel(backend).unary_unary(MODEL_READY)
        names = self._ready_models(backend)
        answers = await asyncio.gather(*(self._ask_ready(backend, call, n) for n in names))
        now = self._clock.now()
        for name, ready in zip(names, answers, strict=True):
            if ready is not None:
                self.view.confirm(backend.id, name, ready, now)
        return all(ready is not None for ready in answers)

    async def _ask_ready(self, backend: Backend, call: grpc.aio.UnaryUnaryMultiCallable,
                         model: str) -> bool | None:
        """Whether ``backend`` says ``model`` is ready; None if it did not say."""
        try:
            raw = await call(pb.ModelReadyRequest(name=model).SerializeToString(),
                             timeout=INDEX_TIMEOUT_S)
            ready = pb.ModelReadyResponse.FromString(raw).ready
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:  # a model it does not serve
                self.ready_reads += 1
                return False
            self.ready_failures += 1
            if exc.code() == grpc.StatusCode.UNIMPLEMENTED and backend not in self._no_ready:
                self._no_ready.add(backend)
                log.info("backend %s has no ModelReady either: its models are known from "
                         "routing alone", backend.id)
            return None
        except DecodeError as exc:
            self.ready_failures += 1
            log.warning("backend %s: unreadable ModelReady reply: %r", backend.id, exc)
            return None
        self.ready_reads += 1
        return ready

    def statistics(self) -> dict[str, Any]:
        return {"reports": self.reports, "use_reports": self.use_reports,
                "index_reads": self.index_reads,
                "index_failures": self.index_failures, "ready_reads": self.ready_reads,
                "ready_failures": self.ready_failures, "view": self.view.statistics()}

    def __repr__(self) -> str:
        return f"ResidencyFeed(reports={self.reports}, index_reads={self.index_reads})"
