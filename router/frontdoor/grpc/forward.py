"""Forwarding one gRPC call to a backend, as raw bytes, through the shared data plane.

Unary calls become dispatcher ``Request``s, so they share the queue, admission, policy, retry
budget and counters with the TCP front door. The dispatcher decides (synchronously) which
backend an attempt goes to and calls ``UnaryCall.forward``, which only wakes the call's own
handler coroutine; that coroutine, which gRPC already runs per call, makes the backend call and
reports the outcome with ``Dispatcher.forward_done``. So a unary call costs no task of its own
and, when nothing is queued, no queue hop.

Outcome of a backend call, for the dispatcher:

* OK: the response bytes; initial and trailing metadata are relayed to the client.
* UNAVAILABLE with no response headers: the backend failed before answering (refused, reset,
  or said UNAVAILABLE, which gRPC defines as safe to retry): ``BackendUnavailable``, retried on
  another backend while ``max_retries`` lasts.
* DEADLINE_EXCEEDED: ``DeadlineExceeded`` (client's fault) if the client's own deadline was the
  bound, ``BackendTimeout`` if ``request_timeout_s`` was.
* any other status is the backend's answer: code, details and trailing metadata are relayed
  unchanged, and the request counts as completed.

Streaming calls (``relay_stream``) hold one backend for their whole life, so they do not queue:
the policy picks a backend, the call counts in the same in-flight figures (``Dispatcher.admit``
and the backend's ``inflight``), and messages are pumped both ways until the backend's status,
which is relayed. They are not retried: messages already pumped cannot be replayed.

Deadlines: a unary attempt gets min(client's time left, ``request_timeout_s``); a stream gets
the client's time left (or none). Metadata is forwarded except hop-by-hop and gRPC-reserved
headers, which the backend call sets itself.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Union

import grpc

from router.core.clock import Clock
from router.core.errors import (
    BackendTimeout,
    BackendUnavailable,
    Cancelled,
    DeadlineExceeded,
    NoBackend,
    RouterError,
    quoted,
)
from router.dispatch.backends import Backend
from router.dispatch.scheduler import Dispatcher, Request
from router.upstream.grpc_channels import GrpcChannels

MetadataValue = Union[str, bytes]  # noqa: UP007 (grpc's own alias spells it this way)
Metadata = tuple[tuple[str, MetadataValue], ...]

# Headers that describe one hop, not the call: the backend call sets its own.
_HOP_BY_HOP = frozenset({
    "connection", "content-type", "host", "keep-alive", "proxy-connection", "te",
    "transfer-encoding", "upgrade", "user-agent",
})


def forwardable(metadata: Sequence[tuple[str, MetadataValue]] | None) -> Metadata:
    """The client's metadata minus hop-by-hop, pseudo (":...") and reserved ("grpc-...")."""
    if not metadata:
        return ()
    return tuple(
        (key, value) for key, value in metadata
        if key not in _HOP_BY_HOP and not key.startswith((":", "grpc-"))
    )


class GrpcStatus(Exception):
    """A status to end a call with: a backend's, relayed, or one the router chose."""

    def __init__(self, code: grpc.StatusCode, details: str, trailing: Metadata = ()) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details
        self.trailing = trailing

    @classmethod
    def of(cls, error: RouterError) -> GrpcStatus:
        return cls(grpc.StatusCode[error.grpc_status], error.message)

    @classmethod
    def relayed(cls, exc: grpc.aio.AioRpcError) -> GrpcStatus:
        return cls(exc.code(), exc.details() or "", tuple(exc.trailing_metadata() or ()))


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


class UnaryCall:
    """One unary call in the dispatcher: its ``Origin`` and its ``forward``."""

    __slots__ = (
        "_dispatcher", "abandoned", "deadline", "initial", "metadata", "relayed", "trailing",
        "waiter",
    )

    def __init__(self, dispatcher: Dispatcher, metadata: Metadata, deadline: float | None) -> None:
        self._dispatcher = dispatcher
        # Resolves to the backend of the next attempt, or None once the request is answered.
        self.waiter: asyncio.Future[Backend | None] = asyncio.get_running_loop().create_future()
        self.metadata = metadata
        self.deadline = deadline
        self.abandoned: RouterError | None = None  # set when the handler was cancelled
        self.initial: Metadata = ()
        self.trailing: Metadata = ()
        self.relayed: GrpcStatus | None = None

    def forward(self, request: Request, backend: Backend) -> None:
        """The dispatcher chose ``backend`` for the next attempt: wake the handler."""
        if self.abandoned is not None:
            self._dispatcher.forward_done(request, None, self.abandoned)
        elif not self.waiter.done():
            self.waiter.set_result(backend)

    def request_done(self, request: Request) -> None:
        if not self.waiter.done():
            self.waiter.set_result(None)


class GrpcForwarder:
    def __init__(
        self, dispatcher: Dispatcher, channels: GrpcChannels, clock: Clock,
        request_timeout_s: float,
    ) -> None:
        self._dispatcher = dispatcher
        self._channels = channels
        self._clock = clock
        self._request_timeout_s = request_timeout_s
        # Set by the drain once its deadline passed and it counted every unanswered call as
        # dropped: from then on a cancelled call must not be counted again.
        self.dropped_all = False

    def deadline(self, context: grpc.aio.ServicerContext) -> float | None:
        remaining = context.time_remaining()
        return None if remaining is None else self._clock.now() + remaining

    # -- unary --------------------------------------------------------------------------------

    async def unary(
        self, method: str, payload: bytes, context: grpc.aio.ServicerContext, model: str | None
    ) -> bytes:
        """Forward a unary call; return the response or raise ``GrpcStatus``/``RouterError``."""
        call = UnaryCall(
            self._dispatcher, forwardable(context.invocation_metadata()), self.deadline(context)
        )
        request = Request(
            payload, call, self._clock.now(), kind="grpc", model=model, forward=call.forward
        )
        self._dispatcher.submit(request)
        loop = asyncio.get_running_loop()
        try:
            while (backend := await call.waiter) is not None:
                call.waiter = loop.create_future()
                response, error = await self._attempt(call, backend, method, payload)
                self._dispatcher.forward_done(request, response, error)
        except asyncio.CancelledError:
            call.abandoned = ended_by(context)
            if request.backend is not None and not self.dropped_all:
                self._dispatcher.forward_done(request, None, call.abandoned)
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
        self, call: UnaryCall, backend: Backend, method: str, payload: bytes
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
        exc: grpc.aio.AioRpcError, call: UnaryCall, backend: Backend, client_bound: bool
    ) -> tuple[bytes | None, RouterError | None]:
        code = exc.code()
        if code == grpc.StatusCode.UNAVAILABLE and not exc.initial_metadata():
            return None, BackendUnavailable(f"{backend.address}: {exc.details()}")
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            if client_bound:
                return None, DeadlineExceeded("the client's deadline passed")
            return None, BackendTimeout(f"{backend.address} did not answer in time")
        call.relayed = GrpcStatus.relayed(exc)
        return b"", None

    # -- streams ------------------------------------------------------------------------------

    async def relay_stream(
        self, method: str, context: grpc.aio.ServicerContext, model: str | None,
        first: bytes | None = None,
    ) -> None:
        """Proxy a call of any kind as a stream to one backend; raise ``GrpcStatus`` for a
        non-OK status. ``first`` is a request message the caller already read."""
        request = Request(b"", _NO_ORIGIN, self._clock.now(), kind="grpc", model=model)
        self._dispatcher.admit(request)
        outcome: RouterError | None = None
        try:
            backend = self._dispatcher.pick("grpc", model)
            if backend is None:
                wanted = f" for {quoted(model)}" if model else ""
                raise NoBackend(f"no healthy gRPC backend{wanted}")
            await self._relay_on(backend, method, context, first)
        except RouterError as exc:
            outcome = exc
            raise
        except asyncio.CancelledError:
            outcome = ended_by(context)
            raise
        finally:
            if not self.dropped_all:
                self._dispatcher.finish(request, None if outcome else b"", outcome)

    async def _relay_on(
        self, backend: Backend, method: str, context: grpc.aio.ServicerContext,
        first: bytes | None,
    ) -> None:
        """Run the stream on ``backend``. A non-OK status is the backend's answer, raised as
        ``GrpcStatus``, except UNAVAILABLE before any answer: ``BackendUnavailable``."""
        rpc = self._channels.channel(backend).stream_stream(method)(
            metadata=forwardable(context.invocation_metadata()),
            timeout=context.time_remaining(),
        )
        backend.inflight += 1
        try:
            async with asyncio.TaskGroup() as group:
                pump = group.create_task(_pump(context, rpc, first))
                failure, answered = await _relay_responses(context, rpc)
                pump.cancel()
        finally:
            backend.inflight -= 1
            if not rpc.done():
                rpc.cancel()
        if failure is None:
            backend.record_success()
            trailing = await rpc.trailing_metadata()
            if trailing:
                context.set_trailing_metadata(tuple(trailing))
            return
        if failure.code() == grpc.StatusCode.UNAVAILABLE and not answered:
            backend.record_failure()
            raise BackendUnavailable(f"{backend.address}: {failure.details()}")
        backend.record_success()
        raise GrpcStatus.relayed(failure)

    def __repr__(self) -> str:
        return f"GrpcForwarder(request_timeout_s={self._request_timeout_s})"


class _NoOrigin:
    """Streams answer their client themselves; the dispatcher only counts them."""

    def request_done(self, request: Request) -> None:
        return None


_NO_ORIGIN = _NoOrigin()


async def _pump(
    context: grpc.aio.ServicerContext, rpc: grpc.aio.StreamStreamCall, first: bytes | None
) -> None:
    """Client -> backend, until the client half-closes (then half-close the backend call)."""
    try:
        if first is not None:
            await rpc.write(first)
        while (message := await context.read()) is not grpc.aio.EOF:
            await rpc.write(message)
        await rpc.done_writing()
    except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
        return  # the backend ended the call first; its status is what the client gets


async def _relay_responses(
    context: grpc.aio.ServicerContext, rpc: grpc.aio.StreamStreamCall
) -> tuple[grpc.aio.AioRpcError | None, bool]:
    """Backend -> client until the backend's status; (its error if not OK, whether any
    response headers or message came back first)."""
    answered = False
    try:
        initial = await rpc.initial_metadata()
        if initial:
            answered = True
            await context.send_initial_metadata(tuple(initial))
        while (message := await rpc.read()) is not grpc.aio.EOF:
            answered = True
            await context.write(message)
    except grpc.aio.AioRpcError as exc:
        return exc, answered
    return None, answered
