"""Explicit model control: the KServe calls the router makes before an attempt, for both engines.

A backend labelled ``model_control = "explicit"`` (Triton's explicit model control) serves only
the models loaded through ``RepositoryModelLoad``. When the affinity policy starts an attempt
that loads a model there, its placement carries a ``ModelControl`` (``balance/policies.py``):
the model to load and, if a slot must be freed, the model to unload first. ``ModelController``
makes those calls, in that order, before any byte of the request goes to the backend:

* a failed unload is logged and ignored: the load may still fit (the backend goes over its
  slots, or refuses the load, which is then the failure);
* a failed load fails the attempt with ``ModelLoadFailed`` (a ``BackendUnavailable``: nothing
  was sent, so the scheduler places the request on another backend while retries last, and
  the client gets ``UNAVAILABLE`` with ``x-router-error: MODEL_LOAD_FAILED`` once they run
  out). The placement then ends unserved, which takes the model out of the residency view's
  record of that backend (``ResidencyView.finished``).

The calls are rare (one per load), so they go over the backend's ``grpc.aio`` channel
(``GrpcChannels``), whatever the engine: the grpcio engine's handler awaits ``take``; the relay,
which has no task per call, hands the attempt to ``hold``, whose task runs ``take`` and then
resumes the call. Each call is bounded by min(the client's time left, ``request_timeout_s``).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

import grpc

from router.balance.policies import ModelControl
from router.core.clock import Clock
from router.core.errors import DeadlineExceeded, Dropped, ModelLoadFailed, RouterError, quoted
from router.dispatch.backends import Backend
from router.dispatch.request import Request
from router.protocol.proto import grpc_predict_v2_pb2 as pb
from router.upstream.grpc_channels import GrpcChannels

log = logging.getLogger(__name__)

REPOSITORY_LOAD = "/inference.GRPCInferenceService/RepositoryModelLoad"
REPOSITORY_UNLOAD = "/inference.GRPCInferenceService/RepositoryModelUnload"

# What ``hold`` calls once the control calls are over: the request, and why its attempt must
# fail (None: send it now).
Resume = Callable[[Request, RouterError | None], None]


def claim(request: Request) -> ModelControl | None:
    """The control calls the attempt starting on ``request`` needs, taken once: a retry on
    another backend is decided again by the policy."""
    placement = request.placement
    if placement is None or placement.control is None:
        return None
    control, placement.control = placement.control, None
    return control


class ModelController:
    def __init__(self, channels: GrpcChannels, clock: Clock, request_timeout_s: float) -> None:
        self._channels = channels
        self._clock = clock
        self._request_timeout_s = request_timeout_s
        self._tasks: set[asyncio.Task[None]] = set()
        self.loads = 0
        self.load_failures = 0
        self.unloads = 0
        self.unload_failures = 0

    def reconfigure(self, request_timeout_s: float) -> None:
        """A new ``dispatch.request_timeout_s`` (a reload), for the calls made after."""
        self._request_timeout_s = request_timeout_s

    async def take(self, backend: Backend, control: ModelControl, deadline: float | None
                   ) -> RouterError | None:
        """Unload ``control.unload`` (if any), then load ``control.load`` on ``backend``;
        why the attempt fails, or None. ``deadline``: the client's, on the injected clock."""
        if control.unload is not None:
            timeout = self._timeout(deadline)
            if timeout is None:
                return DeadlineExceeded("the client's deadline passed before the model load")
            failure = await self._call(backend, REPOSITORY_UNLOAD, pb.RepositoryModelUnloadRequest(
                model_name=control.unload).SerializeToString(), timeout)
            if failure is None:
                self.unloads += 1
            else:
                self.unload_failures += 1
                log.info("%s: RepositoryModelUnload %s failed: %s", backend.address,
                         quoted(control.unload), failure.code().name)
        timeout = self._timeout(deadline)
        if timeout is None:
            return DeadlineExceeded("the client's deadline passed before the model load")
        failure = await self._call(backend, REPOSITORY_LOAD, pb.RepositoryModelLoadRequest(
            model_name=control.load).SerializeToString(), timeout)
        if failure is None:
            self.loads += 1
            return None
        self.load_failures += 1
        code = failure.code()
        if code == grpc.StatusCode.DEADLINE_EXCEEDED and deadline is not None \
                and deadline <= self._clock.now():
            return DeadlineExceeded("the client's deadline passed during the model load")
        log.info("%s: RepositoryModelLoad %s failed: %s %s", backend.address,
                 quoted(control.load), code.name, failure.details())
        return ModelLoadFailed(f"{backend.address}: RepositoryModelLoad {quoted(control.load)}: "
                               f"{code.name}: {failure.details() or ''}")

    def hold(self, request: Request, deadline: float | None, resume: Resume) -> bool:
        """If the attempt starting on ``request`` needs control calls: make them in a task
        of this controller's, then ``resume`` (exactly once, from that task); True. False:
        none are needed, send it now."""
        control = claim(request)
        if control is None:
            return False
        backend = request.backend
        assert backend is not None, "hold is called for an attempt that started"
        task = asyncio.get_running_loop().create_task(
            self._held(request, backend, control, deadline, resume))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return True

    async def _held(self, request: Request, backend: Backend, control: ModelControl,
                    deadline: float | None, resume: Resume) -> None:
        try:
            error = await self.take(backend, control, deadline)
        except asyncio.CancelledError:
            resume(request, Dropped("the router stopped during a model load"))
            raise
        resume(request, error)

    def _timeout(self, deadline: float | None) -> float | None:
        """min(the client's time left, ``request_timeout_s``); None once it has passed."""
        if deadline is None:
            return self._request_timeout_s
        left = deadline - self._clock.now()
        return min(left, self._request_timeout_s) if left > 0 else None

    async def _call(self, backend: Backend, method: str, payload: bytes, bound_s: float
                    ) -> grpc.aio.AioRpcError | None:
        try:
            await self._channels.unary(backend, method)(payload, timeout=bound_s)
        except grpc.aio.AioRpcError as exc:
            return exc
        return None

    async def close(self) -> None:
        """Cancel the control calls in progress (each resumes its call with ``Dropped``)."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def statistics(self) -> dict[str, Any]:
        return {"loads": self.loads, "load_failures": self.load_failures,
                "unloads": self.unloads, "unload_failures": self.unload_failures,
                "in_progress": len(self._tasks)}

    def __repr__(self) -> str:
        return (f"ModelController(loads={self.loads}, load_failures={self.load_failures}, "
                f"in_progress={len(self._tasks)})")
