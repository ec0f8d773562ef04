"""What backends say about their models, into the residency view (``router.balance``).

Three sources, beside the policy's own routing decisions:

* a backend's *shape* when it joins: its ``model_slots`` and ``concurrency`` labels (config
  ``labels``, or a registration's), else ``[affinity]``'s defaults, and ``model_control =
  "explicit"`` for a gRPC backend whose models the router loads and unloads itself (KServe
  ``RepositoryModelLoad``/``Unload``, Triton's explicit model control); a backend that
  leaves is forgotten;
* heartbeat reports (``LoadReport.loaded_models``, through the directory's report listener):
  what a registered backend holds, in every router process it heartbeats to;
* KServe for gRPC backends: every ``affinity.index_interval_s`` each one's Triton
  ``RepositoryIndex`` (READY: loaded, LOADING: loading, anything else: absent). A backend
  without the method (UNIMPLEMENTED) is asked again only after it rejoins.

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
from router.protocol.proto import triton_extensions_pb2 as triton
from router.upstream.grpc_channels import GrpcChannels

log = logging.getLogger(__name__)

REPOSITORY_INDEX = "/inference.GRPCInferenceService/RepositoryIndex"
INDEX_TIMEOUT_S = 2.0
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
        self._no_index: set[Backend] = set()  # answered UNIMPLEMENTED
        self.reports = 0
        self.index_reads = 0
        self.index_failures = 0
        registry.add_join_listener(self._joined)
        registry.add_leave_listener(self._left)
        for backend in registry:
            self._joined(backend)

    def _joined(self, backend: Backend) -> None:
        control = dict(backend.spec.labels).get(CONTROL_LABEL)
        self.view.shape(backend.id, _label(backend, SLOTS_LABEL),
                        _label(backend, CONCURRENCY_LABEL), control == "explicit")
        self._no_index.discard(backend)

    def _left(self, backend: Backend) -> None:
        self._no_index.discard(backend)
        if not any(b.id == backend.id for b in self._registry):  # not joined again meanwhile
            self.view.forget(backend.id)

    def reported(self, backend_id: str, report: LoadReport) -> None:
        """A heartbeat's report (the directory's report listener)."""
        if report.loaded_models is not None:
            self.reports += 1
            self.view.report(backend_id, report.loaded_models, self._clock.now())

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
                    if b.kind == "grpc" and b.healthy and b not in self._no_index]
        answered = await asyncio.gather(*(self._read_index(b) for b in backends))
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
                log.info("backend %s has no RepositoryIndex: its models are known from "
                         "routing alone", backend.id)
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

    def statistics(self) -> dict[str, Any]:
        return {"reports": self.reports, "index_reads": self.index_reads,
                "index_failures": self.index_failures, "view": self.view.statistics()}

    def __repr__(self) -> str:
        return f"ResidencyFeed(reports={self.reports}, index_reads={self.index_reads})"
