"""Forwarding one gRPC call to a backend, as raw bytes, through the one scheduler.

Every call, unary or streaming, becomes a ``Request`` of kind "grpc" and goes through
``Dispatcher.submit`` like a TCP frame: the same admission, policy, queue deadline, wait for
room (a backend's ``GrpcCallLimiter``), retry budget and counters. When the scheduler starts an
attempt it calls the request's ``forward``, which only wakes the call's own handler coroutine
(gRPC already runs one per call); the handler makes the backend call and reports the outcome
with ``Dispatcher.attempt_done``. So a call costs no task of its own and, when the backend has
room, no queue hop.

Outcome of a backend call, for the scheduler:

* OK: the response bytes; initial and trailing metadata are relayed to the client.
* UNAVAILABLE with no response headers: the backend failed before answering (refused, reset,
  or said UNAVAILABLE, which gRPC defines as safe to retry): ``BackendUnavailable``, retried on
  another backend while ``max_retries`` lasts (unary calls only: a stream's messages cannot be
  replayed, so a stream gets the error).
* DEADLINE_EXCEEDED: ``DeadlineExceeded`` (client's fault) if the client's own deadline was the
  bound, ``BackendTimeout`` if ``request_timeout_s`` was.
* any other status is the backend's answer: code, details and trailing metadata are relayed
  unchanged (``RelayedStatus``), and the request counts as completed.

Deadlines: a unary attempt gets min(client's time left, ``request_timeout_s``). A relayed
call (of any kind: the wire does not say which) gets the client's time left, and once the
client has half-closed, ``request_timeout_s`` for the backend's first response message unless
the client's deadline comes first (``AnswerBound``): the whole answer of a unary call, the first
message of a server stream, nothing for a stream already answering. Metadata is forwarded
except hop-by-hop and gRPC-reserved headers, which the backend call sets itself.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from contextvars import ContextVar
from typing import Union

import grpc
from grpc._cython import cygrpc  # grpc.aio's own core binding (see _send)

from router.core.clock import Clock, Timer
from router.core.errors import (
    BackendTimeout,
    BackendUnavailable,
    Cancelled,
    DeadlineExceeded,
    RouterError,
)
from router.dispatch.access import AccessEntry
from router.dispatch.backends import Backend
from router.dispatch.request import Request
from router.dispatch.scheduler import Dispatcher
from router.frontdoor.grpc.model_control import ModelController, claim
from router.upstream.grpc_channels import GrpcChannels

log = logging.getLogger(__name__)

MetadataValue = Union[str, bytes]  # noqa: UP007 (grpc's own alias spells it this way)
Metadata = tuple[tuple[str, MetadataValue], ...]

# Headers that describe one hop, not the call: the backend call sets its own.
_HOP_BY_HOP = frozenset({
    "connection", "content-type", "host", "keep-alive", "proxy-connection", "te",
    "transfer-encoding", "upgrade", "user-agent",
})


# What the hashing policies place a call by, when it is not its model (sticky sessions).
ROUTE_KEY_HEADER = "x-route-key"


def route_key(metadata: Metadata) -> str | None:
    """The ``x-route-key`` of a call's (forwardable) metadata, if any."""
    for key, value in metadata:
        if key == ROUTE_KEY_HEADER:
            return value if isinstance(value, str) else value.decode(errors="replace")
    return None


def forwardable(metadata: Sequence[tuple[str, MetadataValue]] | None) -> Metadata:
    """The client's metadata minus hop-by-hop, pseudo (":...") and reserved ("grpc-...")."""
    if not metadata:
        return ()
    return tuple(
        (key, value) for key, value in metadata
        if key not in _HOP_BY_HOP and not key.startswith((":", "grpc-"))
    )


class RelayedStatus(Exception):
    """A backend's own non-OK status, relayed to the client unchanged (never carries the
    ``x-router-error`` trailer: the router did not choose it)."""

    def __init__(self, code: grpc.StatusCode, details: str, trailing: Metadata = ()) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details
        self.trailing = trailing

    @classmethod
    def of(cls, exc: grpc.aio.AioRpcError) -> RelayedStatus:
        return cls(exc.code(), exc.details() or "", tuple(exc.trailing_metadata() or ()))


# The access log entry of the gRPC call whose handler runs in this task, set by the front
# door's handler only while an access log is on; the forwarder fills in the model, the backend
# and a stream's bytes. A context variable: the KServe handlers between the two keep gRPC's
# (request, context) signature.
CALL_ENTRY: ContextVar[AccessEntry | None] = ContextVar("call_entry", default=None)


def _time_left(deadline: float | None, clock: Clock) -> float | None:
    return None if deadline is None else deadline - clock.now()


# The server learns the deadline from the grpc-timeout header, after the client set it, so the
# client's own deadline (which cancels the call) fires slightly before the server's.
DEADLINE_SLACK_S = 0.05


def ended_by(context: grpc.aio.ServicerContext) -> RouterError:
    """Why a handler was cancelled: its deadline passed (give or take the slack), or the
    client went away."""
    remaining = context.time_remaining()
    if remaining is not None and remaining <= DEADLINE_SLACK_S:
        return DeadlineExceeded("the client's deadline passed")
    return Cancelled("the client cancelled the call")


class Call:
    """One gRPC call in the scheduler: its ``Origin`` and its ``forward``. ``waiter`` resolves
    to the backend of the next attempt, or None once the request is answered."""

    __slots__ = (
        "_dispatcher", "abandoned", "deadline", "entry", "initial", "metadata", "relayed",
        "trailing", "waiter",
    )

    def __init__(
        self, dispatcher: Dispatcher, metadata: Metadata, deadline: float | None,
        entry: AccessEntry | None = None,
    ) -> None:
        self._dispatcher = dispatcher
        self.entry = entry  # the access log's, if on
        self.waiter: asyncio.Future[Backend | None] = asyncio.get_running_loop().create_future()
        self.metadata = metadata
        self.deadline = deadline
        self.abandoned: RouterError | None = None  # set when the handler was cancelled
        self.initial: Metadata = ()
        self.trailing: Metadata = ()
        self.relayed: RelayedStatus | None = None

    def forward(self, request: Request) -> None:
        """The scheduler started an attempt on ``request.backend``: wake the handler (or, if
        it is gone, end the attempt from the loop, outside the scheduler's own step)."""
        if self.entry is not None and request.backend is not None:
            self.entry.backend = request.backend.spec.id
        if self.abandoned is not None:
            loop = asyncio.get_running_loop()
            loop.call_soon(self._dispatcher.attempt_done, request, None, self.abandoned)
        elif not self.waiter.done():
            self.waiter.set_result(request.backend)

    def request_done(self, request: Request) -> None:
        if not self.waiter.done():
            self.waiter.set_result(None)


class GrpcForwarder:
    def __init__(
        self, dispatcher: Dispatcher, channels: GrpcChannels, clock: Clock,
        request_timeout_s: float, model_control: ModelController | None = None,
    ) -> None:
        self._dispatcher = dispatcher
        self._channels = channels
        self._clock = clock
        self._request_timeout_s = request_timeout_s
        # Explicit model control's calls before an attempt (shared with the relay engine).
        self.model_control = model_control or ModelController(channels, clock, request_timeout_s)

    def reconfigure(self, request_timeout_s: float) -> None:
        """A new ``dispatch.request_timeout_s`` (a reload), for the attempts started after."""
        self._request_timeout_s = request_timeout_s
        self.model_control.reconfigure(request_timeout_s)

    def _call(self, context: grpc.aio.ServicerContext) -> Call:
        remaining = context.time_remaining()
        deadline = None if remaining is None else self._clock.now() + remaining
        return Call(
            self._dispatcher, forwardable(context.invocation_metadata()), deadline,
            CALL_ENTRY.get(),
        )

    # -- unary --------------------------------------------------------------------------------

    async def unary(
        self, method: str, payload: bytes, context: grpc.aio.ServicerContext, model: str | None
    ) -> bytes:
        """Forward a unary call; return the response or raise ``RelayedStatus``/``RouterError``."""
        call = self._call(context)
        if call.entry is not None:
            call.entry.model = model
        request = Request(
            payload, call, self._clock.now(), kind="grpc", model=model, forward=call.forward
        )
        request.route_key = route_key(call.metadata)
        dispatcher = self._dispatcher
        dispatcher.submit(request)
        loop = asyncio.get_running_loop()
        try:
            while (backend := await call.waiter) is not None:
                call.waiter = loop.create_future()
                control = claim(request)
                error = None
                if control is not None:  # explicit model control: load it there first
                    error = await self.model_control.take(backend, control, call.deadline)
                if error is None:
                    response, error = await self._attempt(call, backend, method, payload)
                else:
                    response = None
                dispatcher.attempt_done(request, response, error)
        except asyncio.CancelledError:
            call.abandoned = ended_by(context)
            if request.backend is not None:
                dispatcher.attempt_done(request, None, call.abandoned)
            raise
        if request.error is not None:
            raise request.error
        if call.relayed is not None:
            raise call.relayed
        if call.initial:
            await context.send_initial_metadata(call.initial)
        if call.trailing:
            context.set_trailing_metadata(call.trailing)
        assert request.response is not None
        return request.response

    async def _attempt(
        self, call: Call, backend: Backend, method: str, payload: bytes
    ) -> tuple[bytes | None, RouterError | None]:
        remaining = _time_left(call.deadline, self._clock)
        client_bound = remaining is not None and remaining <= self._request_timeout_s
        timeout = remaining if client_bound else self._request_timeout_s
        assert timeout is not None
        if timeout <= 0:
            return None, DeadlineExceeded("the client's deadline passed before forwarding")
        forward = self._channels.unary(backend, method)
        rpc = forward(payload, timeout=timeout, metadata=call.metadata)
        try:
            response: bytes = await rpc
        except grpc.aio.AioRpcError as exc:
            return self._failed(exc, call, backend, client_bound)
        call.initial = tuple(await rpc.initial_metadata() or ())
        call.trailing = tuple(await rpc.trailing_metadata() or ())
        return response, None

    @staticmethod
    def _failed(
        exc: grpc.aio.AioRpcError, call: Call, backend: Backend, client_bound: bool
    ) -> tuple[bytes | None, RouterError | None]:
        code = exc.code()
        if code == grpc.StatusCode.UNAVAILABLE and not exc.initial_metadata():
            return None, BackendUnavailable(f"{backend.address}: {exc.details()}")
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            if client_bound:
                return None, DeadlineExceeded("the client's deadline passed")
            return None, BackendTimeout(f"{backend.address} did not answer in time")
        call.relayed = RelayedStatus.of(exc)
        return b"", None

    # -- streams ------------------------------------------------------------------------------

    async def relay_stream(
        self, method: str, context: grpc.aio.ServicerContext, model: str | None,
        first: bytes | None = None,
    ) -> None:
        """Proxy a call of any kind as a stream to one backend; raise ``RelayedStatus`` for a
        backend's non-OK status. ``first`` is a request message the caller already read."""
        call = self._call(context)
        if call.entry is not None:
            call.entry.model = model
        request = Request(
            b"", call, self._clock.now(), kind="grpc", model=model, forward=call.forward,
            replayable=False,
        )
        request.route_key = route_key(call.metadata)
        dispatcher = self._dispatcher
        dispatcher.submit(request)
        try:
            backend = await call.waiter
        except asyncio.CancelledError:
            call.abandoned = ended_by(context)
            raise
        if backend is None:
            assert request.error is not None
            raise request.error
        relay = AnswerBound(self._clock, self._answer_bound(context))
        outcome: RouterError | None = None
        try:
            control = claim(request)
            if control is not None:  # explicit model control; a stream is never retried
                outcome = await self.model_control.take(backend, control, call.deadline)
                if outcome is not None:
                    raise outcome
            failure = await self._relay_on(backend, method, context, first, relay, call.entry)
        except asyncio.CancelledError:
            outcome = ended_by(context)
            raise
        else:
            if relay.timed_out:
                outcome = BackendTimeout(
                    f"{backend.address} did not answer within request_timeout_s="
                    f"{self._request_timeout_s}s of the request's end"
                )
            elif failure is not None and failure.code() == grpc.StatusCode.UNAVAILABLE \
                    and not failure.answered:
                outcome = BackendUnavailable(f"{backend.address}: {failure.details()}")
        finally:
            dispatcher.attempt_done(request, None if outcome else b"", outcome)
        if outcome is not None:
            raise outcome
        if failure is not None:
            raise RelayedStatus.of(failure.exc)

    def _answer_bound(self, context: grpc.aio.ServicerContext) -> float | None:
        """``request_timeout_s``, unless the client's own deadline comes first (then gRPC's
        deadline on the backend call is the bound, and the client's fault)."""
        remaining = context.time_remaining()
        if remaining is not None and remaining <= self._request_timeout_s:
            return None
        return self._request_timeout_s

    async def _relay_on(
        self, backend: Backend, method: str, context: grpc.aio.ServicerContext,
        first: bytes | None, relay: AnswerBound, entry: AccessEntry | None,
    ) -> _StreamFailure | None:
        """Run the stream on ``backend``; its non-OK status, if any."""
        rpc = self._channels.channel(backend).stream_stream(method)(
            metadata=forwardable(context.invocation_metadata()),
            timeout=context.time_remaining(),
        )
        try:
            async with asyncio.TaskGroup() as group:
                pump = group.create_task(_pump(context, rpc, first, relay, entry))
                failure = await _relay_responses(context, rpc, relay, entry)
                pump.cancel()
        finally:
            relay.stop()
            if not rpc.done():
                rpc.cancel()
        if failure is None and not relay.timed_out:
            trailing = await rpc.trailing_metadata()
            if trailing:
                context.set_trailing_metadata(tuple(trailing))
        return failure

    def __repr__(self) -> str:
        return f"GrpcForwarder(request_timeout_s={self._request_timeout_s})"


class AnswerBound:
    """The answer bound of one relayed call: once the client has half-closed and while no
    response message has come back, the backend has ``bound_s`` to send one (or its status);
    past it the backend call is cancelled and the call ends ``BACKEND_TIMEOUT``.

    The wire does not say whether a method is unary, so this is the bound that holds for
    every kind: a unary call (request, half-close, one answer) gets ``request_timeout_s`` for
    its whole answer, as on the unary path; a server stream for its first message; a stream
    that has started answering, or whose client has not half-closed, only the client's
    deadline, so long-lived streams are never cut."""

    __slots__ = ("_clock", "_rpc", "_timer", "answered", "bound_s", "timed_out")

    def __init__(self, clock: Clock, bound_s: float | None) -> None:
        self._clock = clock
        self.bound_s = bound_s
        self._timer: Timer | None = None
        self._rpc: grpc.aio.StreamStreamCall | None = None
        self.answered = False  # a response message came back
        self.timed_out = False

    def half_closed(self, rpc: grpc.aio.StreamStreamCall) -> None:
        if self.bound_s is not None and not self.answered and not rpc.done():
            self._rpc = rpc
            self._timer = self._clock.call_at(self._clock.now() + self.bound_s, self._expire)

    def message(self) -> None:
        if not self.answered:
            self.answered = True
            self.stop()

    def _expire(self) -> None:
        self._timer = None
        if self._rpc is not None and not self._rpc.done():
            self.timed_out = True
            self._rpc.cancel()

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


async def _pump(
    context: grpc.aio.ServicerContext, rpc: grpc.aio.StreamStreamCall, first: bytes | None,
    relay: AnswerBound, entry: AccessEntry | None,
) -> None:
    """Client -> backend, until the client half-closes (then half-close the backend call), or
    until the backend ended the call (its status is what the client gets)."""
    try:
        await rpc.wait_for_connection()  # the call's headers are out: messages may follow
    except grpc.aio.AioRpcError:
        return
    if first is not None and not await _send(rpc, first, entry):
        return
    while (message := await context.read()) is not grpc.aio.EOF:
        if not await _send(rpc, message, entry):
            return
    if not rpc.done():
        try:
            await rpc.done_writing()
        except cygrpc.InternalError:
            return  # the backend ended the call while the half-close was on its way
        relay.half_closed(rpc)


async def _send(rpc: grpc.aio.StreamStreamCall, message: bytes, entry: AccessEntry | None
                ) -> bool:
    """Send one request message on the backend call; False if the backend already ended it.

    Not ``rpc.write``: when a send fails because the backend ended the call meanwhile (an
    immediate UNIMPLEMENTED arrives while the request is still on its way), grpc.aio's write
    replaces the call's status with INTERNAL "Internal error from Core"
    (``_StreamRequestMixin._write`` calls ``set_internal_error``), so the backend's own status
    would be lost: 58 of 100 1 MiB calls to an unknown method came back INTERNAL that way.
    The core call's own send raises and leaves the status as the backend sent it.
    """
    if rpc.done():
        return False
    try:
        await rpc._cython_call.send_serialized_message(message)
    except cygrpc.InternalError:
        return False
    if entry is not None:
        entry.bytes_in += len(message)
    return True


class _StreamFailure:
    """A stream's non-OK status, and whether any response headers or message came first."""

    def __init__(self, exc: grpc.aio.AioRpcError, answered: bool) -> None:
        self.exc = exc
        self.answered = answered

    def code(self) -> grpc.StatusCode:
        return self.exc.code()

    def details(self) -> str:
        return self.exc.details() or ""


async def _relay_responses(
    context: grpc.aio.ServicerContext, rpc: grpc.aio.StreamStreamCall, relay: AnswerBound,
    entry: AccessEntry | None,
) -> _StreamFailure | None:
    """Backend -> client until the backend's status; its failure if not OK. Returns None too
    when ``relay`` timed out (it cancelled the backend call)."""
    answered = False
    try:
        initial = await rpc.initial_metadata()
        if initial:
            answered = True
            await context.send_initial_metadata(tuple(initial))
        while (message := await rpc.read()) is not grpc.aio.EOF:
            answered = True
            relay.message()
            await context.write(message)
            if entry is not None:
                entry.bytes_out += len(message)
    except grpc.aio.AioRpcError as exc:
        return _StreamFailure(exc, answered)
    except asyncio.CancelledError:
        # A read of a locally cancelled call raises CancelledError without this task being
        # cancelled: that is the answer bound firing, not the client going away.
        task = asyncio.current_task()
        if not relay.timed_out or (task is not None and task.cancelling()):
            raise
    return None
