"""The gRPC front door as an HTTP/2 frame relay (``grpc.engine = "relay"``).

Clients connect to a uvloop server whose Protocol (``ClientConnection``) feeds an
``H2Connection`` (server side); each request stream becomes a ``RelayCall`` that the one
scheduler places on a backend's ``H2Upstream`` (multiplexed, pooled HTTP/2 connections,
stream ids of their own). Frames are relayed as they come: no protobuf is decoded except the
KServe field reader on the first message of a call routed by model, and no task is created
per call.

What a call's path (``:path``) decides, in this order:

1. answered by the router: ``grpc.health.v1.Health/Check`` (SERVING while ``Readiness``
   holds for gRPC backends, for "" and the KServe service; NOT_FOUND for other names) and
   ``/Watch`` (a message now and at each change), and the KServe calls the router answers
   (``kserve.ANSWERED``: ServerLive, ServerReady, ServerMetadata, ModelReady,
   RepositoryIndex), from the same replies as the grpcio engine's;
2. routed by model: the KServe and Triton calls whose request names one (``ROUTED_BY_MODEL``,
   ModelMetadata, ModelStreamInfer by its first message, TraceSetting when it names one):
   UNKNOWN_MODEL (NOT_FOUND) at the door for a model no gRPC backend serves;
3. any other method: to the ``x-route-model`` group when the header is there, else to any
   gRPC backend.

Admission, for calls that reach a backend: UNAVAILABLE (DRAINING) while draining and
RESOURCE_EXHAUSTED (OVERLOADED) while the dispatch queue is full; streams past
``grpc.max_concurrent_streams`` on a connection are refused (REFUSED_STREAM) and connections
past ``grpc.max_connections`` closed at once.

Drain, GOAWAY first (as grpc-go's and Envoy's servers do): ``start_drain`` sends every
client connection a GOAWAY notice (last-stream-id 2^31-1) and a PING, then turns health and
ServerReady to not serving. A client stops opening streams on the connection once it reads the
notice, but calls it sent before that are still on their way: they are taken. On the PING's
ack (every frame the client sent before it has arrived) or after
``grpc.drain_goaway_timeout_s``, the final GOAWAY names the highest stream taken; a stream
above it is refused (REFUSED_STREAM: never processed, so the client retries it elsewhere), and
every stream at or below it is answered within the grace period. So no call is refused or lost
for racing the drain. A connection opened during the drain (the listener stays open until
every call has finished) gets its calls refused UNAVAILABLE (DRAINING, so a client knows to go
elsewhere). ``wait_all_closed`` waits for the final GOAWAYs and for every call, stops
listening, sends the connections that had none their final GOAWAY, and closes each after its
last bytes (within ``linger_s``); ``abort_all`` answers what is left UNAVAILABLE (DROPPED) at
the deadline.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any, cast

from google.protobuf.message import DecodeError
from grpc_health.v1 import health_pb2

from router.core.clock import Clock, Timer
from router.core.config import GrpcConfig
from router.core.errors import (
    BadCompressedMessage,
    Draining,
    Dropped,
    MalformedMessage,
    Overloaded,
    RouterError,
    UnknownService,
    quoted,
)
from router.dispatch.access import AccessLog
from router.dispatch.backends import Backend, Registry
from router.dispatch.scheduler import Dispatcher
from router.dispatch.stats import GrpcStats
from router.frontdoor.grpc.kserve import ANSWERED, ROUTED_BY_MODEL, KServeRouting
from router.frontdoor.grpc.kserve import SERVICE as KSERVE_SERVICE
from router.frontdoor.grpc.model_control import ModelController
from router.frontdoor.grpc.reflection import V1, V1ALPHA, reflection_answer
from router.frontdoor.grpc.relay_call import (
    RelayCall,
    first_message,
    first_message_start,
    message_end,
    split_messages,
)
from router.lifecycle.readiness import Readiness
from router.lifecycle.state import Lifecycle
from router.protocol import h2frames as f
from router.protocol.grpc_compression import PREFIX_BYTES
from router.protocol.h2connection import (
    DataReceived,
    H2Connection,
    HeadersReceived,
    PingAcked,
    Sent,
    StreamReset,
    Terminated,
)
from router.protocol.kserve import ModelRef, read_model, read_trace_model, whole_fields
from router.tls.context import ServerTls
from router.tls.identity import PeerIdentity

log = logging.getLogger(__name__)

HEALTH_SERVICE = "grpc.health.v1.Health"
ROUTE_MODEL_HEADER = "x-route-model"
HEALTH_SERVICES = frozenset({"", KSERVE_SERVICE})
_HEALTH_CHECK = f"/{HEALTH_SERVICE}/Check"
_HEALTH_WATCH = f"/{HEALTH_SERVICE}/Watch"
_MODEL_METADATA = f"/{KSERVE_SERVICE}/ModelMetadata"
_REFLECTION = frozenset(f"/{name}/ServerReflectionInfo" for name in (V1, V1ALPHA))
# Request bytes a call keeps for a retry before any answer: a unary call of up to this much
# may go to another backend when its first fails before answering.
MAX_REPLAY_BYTES = 4 << 20
# The opaque data of the PING that follows the GOAWAY notice: its ack sends the final GOAWAY.
DRAIN_PING = b"rdrain\0\0"


def _by_model() -> dict[str, tuple[Callable[[bytes], ModelRef], bool]]:
    """:path -> (its model reader, whether the request must name a model)."""
    routed = {f"/{KSERVE_SERVICE}/{name}": (reader, True)
              for name, reader in ROUTED_BY_MODEL.items()}
    routed[f"/{KSERVE_SERVICE}/ModelMetadata"] = (read_model, True)
    routed[f"/{KSERVE_SERVICE}/ModelStreamInfer"] = (read_model, True)
    routed[f"/{KSERVE_SERVICE}/TraceSetting"] = (read_trace_model, False)
    return routed


class ClientConnection(asyncio.Protocol):
    """One client's HTTP/2 connection; its streams' peers are ``RelayCall``s."""

    def __init__(self, door: RelayFrontDoor) -> None:
        self.door = door
        config = door.config
        self.conn = H2Connection(client=False,
                                 max_concurrent_streams=config.max_concurrent_streams)
        self.transport: asyncio.Transport | None = None
        self.peer: Any = None  # the client's address, for the access log
        self.refusal: RouterError | None = None  # a client certificate off the allow-list
        self._flush_scheduled = False
        self._closing = False
        # Opened during the drain: its calls are refused DRAINING (it had no GOAWAY notice).
        self.late = door.draining
        self._final_timer: Timer | None = None
        # Once per connection: get_running_loop() costs a getpid() system call each time.
        self._loop = asyncio.get_running_loop()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses: a cast, not a check.
        self.transport = transport = cast(asyncio.Transport, transport)
        self.peer = transport.get_extra_info("peername")
        tls = self.door.tls
        if tls is not None and tls.allow_list.active:
            identity = PeerIdentity.from_peercert(transport.get_extra_info("peercert"))
            self.refusal = tls.refusal(identity)  # every call on it gets PERMISSION_DENIED
            if self.refusal is not None:
                log.info("refused %s: %s", self.peer, self.refusal.message)
        door = self.door
        if len(door.connections) >= door.config.max_connections:
            door.refused_connections += 1
            transport.abort()
            return
        door.connections.add(self)
        door.connections_total += 1
        door.no_connections.clear()
        transport.write(self.conn.data_to_send())
        if door.closing:
            self.final_goaway()  # the listener closed as it was accepted: not one call more

    def data_received(self, data: bytes) -> None:
        # The flush at the end writes what the events put on this connection: a mark() on the
        # way schedules no flush of its own.
        self._flush_scheduled = True
        try:
            for event in self.conn.receive_data(data):
                cls = type(event)
                if cls is DataReceived:
                    assert isinstance(event, DataReceived)
                    peer = event.stream.peer
                    if peer is not None:
                        peer.client_data(event.data, event.end_stream, event.flow)
                    else:
                        self.conn.consumed(event.stream_id, event.flow)
                elif cls is HeadersReceived:
                    assert isinstance(event, HeadersReceived)
                    if event.trailers:  # a client's trailers end its request
                        if event.stream.peer is not None:
                            event.stream.peer.client_data(b"", True, 0)
                    else:
                        self.door.new_call(self, event)
                elif cls is Sent:
                    assert isinstance(event, Sent)
                    if event.stream.peer is not None:
                        event.stream.peer.client_sent(event.count)
                elif cls is StreamReset:
                    assert isinstance(event, StreamReset)
                    if event.stream.peer is not None:
                        event.stream.peer.client_reset()
                elif cls is PingAcked:
                    assert isinstance(event, PingAcked)
                    if event.opaque == DRAIN_PING:
                        self.final_goaway()
                elif cls is Terminated:
                    assert isinstance(event, Terminated)
                    log.info("gRPC client broke HTTP/2: %s", event.error.message)
                    self._end_calls()
                    self._closing = True
        finally:
            self.flush()

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        door = self.door
        door.connections.discard(self)
        door.goaway_done(self)
        if not door.connections:
            door.no_connections.set()
        self._end_calls()

    def _end_calls(self) -> None:
        for stream in list(self.conn.streams.values()):
            if stream.peer is not None:
                stream.peer.client_reset()

    def mark(self) -> None:
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self.flush)

    def flush(self) -> None:
        self._flush_scheduled = False
        transport = self.transport
        if transport is None:
            return
        out = self.conn.output()
        if out:
            transport.writelines(out)  # one vectored write; DATA payloads not copied
        if self._closing and (self.conn.terminated or not self.conn.streams):
            transport.close()  # after a protocol error, at once: its streams are gone

    @property
    def closing(self) -> bool:
        """Its final GOAWAY (or a protocol error's) has gone: no notice is due."""
        return self._closing

    def drain_notice(self, timeout_s: float) -> None:
        """The GOAWAY notice and its PING; the final GOAWAY on the ack or in ``timeout_s``."""
        self.conn.goaway(last_stream_id=f.MAX_WINDOW)
        self.conn.ping(DRAIN_PING)
        self.flush()
        clock = self.door.clock
        self._final_timer = clock.call_at(clock.now() + timeout_s, self.final_goaway)

    def final_goaway(self) -> None:
        """The final GOAWAY (once); close once the streams left have ended."""
        if self._final_timer is not None:
            self._final_timer.cancel()
            self._final_timer = None
        self.conn.goaway()
        self._closing = True
        self.flush()
        self.door.goaway_done(self)

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    def __repr__(self) -> str:
        return f"ClientConnection({self.conn!r})"


class RelayFrontDoor:
    def __init__(
        self, dispatcher: Dispatcher, registry: Registry, clock: Clock, config: GrpcConfig,
        request_timeout_s: float, linger_s: float, stats: GrpcStats, readiness: Readiness,
        lifecycle: Lifecycle, tls: ServerTls | None = None,
        access_log: AccessLog | None = None, model_control: ModelController | None = None,
    ) -> None:
        self.access_log = access_log  # None: no access log, one check per call
        # Explicit model control's calls before an attempt (None: no backend needs them).
        self.model_control = model_control
        self.dispatcher = dispatcher
        self.registry = registry
        self.clock = clock
        self.config = config
        self.request_timeout_s = request_timeout_s
        self.linger_s = linger_s
        self.stats = stats
        self.readiness = readiness
        self.lifecycle = lifecycle
        self.tls = tls
        self.max_replay_bytes = MAX_REPLAY_BYTES
        self.kserve = KServeRouting(None, registry, readiness)
        self._answers = {f"/{KSERVE_SERVICE}/{name}": name for name in ANSWERED}
        self._by_model = _by_model()
        self._metadata: dict[str, bytes] = {}  # ModelMetadata answers by model key
        self._reflection = reflection_answer((HEALTH_SERVICE, KSERVE_SERVICE))
        self.connections: set[ClientConnection] = set()
        self.calls: set[RelayCall] = set()
        self._watchers: dict[RelayCall, tuple[str, int]] = {}  # Watch: (service, last sent)
        self._idle = asyncio.Event()
        self._idle.set()
        self.no_connections = asyncio.Event()
        self.no_connections.set()
        self._server: asyncio.Server | None = None
        self.draining = False
        self.closing = False  # the last phase of the drain: every connection's final GOAWAY
        # Connections sent the GOAWAY notice whose final GOAWAY has not gone yet.
        self._noticed: set[ClientConnection] = set()
        self._finals = asyncio.Event()
        self._finals.set()
        self.calls_total = 0
        self.connections_total = 0
        self.refused_connections = 0
        registry.add_listener(self.health_changed)

    def reconfigure(self, request_timeout_s: float) -> None:
        self.request_timeout_s = request_timeout_s
        if self.model_control is not None:
            self.model_control.reconfigure(request_timeout_s)

    # -- lifecycle ----------------------------------------------------------------------------

    async def start(self, host: str, port: int, *, reuse_port: bool = False) -> tuple[str, int]:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: ClientConnection(self), host, port, reuse_port=reuse_port or None,
            ssl=self.tls.context if self.tls is not None else None, backlog=1024,
        )
        # Any: uvloop's sockets is a list, typeshed's a tuple (compiled code checks the type).
        bound = cast(Any, self._server).sockets[0].getsockname()
        return host, int(bound[1])

    def start_drain(self) -> None:
        """The GOAWAY notice on every connection (before the watchers' NOT_SERVING, so a
        client that reads that has read the notice too), then readiness's change."""
        self.draining = True
        connections = [c for c in self.connections if not c.closing]
        self._noticed.update(connections)
        if self._noticed:
            self._finals.clear()
        for connection in connections:
            connection.drain_notice(self.config.drain_goaway_timeout_s)
        self.health_changed()

    def goaway_done(self, connection: ClientConnection) -> None:
        """``connection`` had its final GOAWAY (or went away)."""
        self._noticed.discard(connection)
        if not self._noticed:
            self._finals.set()

    async def wait_all_closed(self) -> None:
        """Once every final GOAWAY is out and no call is left: no listener, a final GOAWAY
        on the connections opened during the drain, and every connection closed after its
        last bytes (within ``linger_s``)."""
        for watcher in list(self._watchers):
            watcher.fail(Draining("the router is draining"))
        await self._finals.wait()
        await self._idle.wait()
        self.closing = True
        if self._server is not None:
            self._server.close()
        for connection in list(self.connections):
            connection.final_goaway()
        try:
            async with asyncio.timeout(self.linger_s):
                await self.no_connections.wait()
        except TimeoutError:
            for connection in list(self.connections):
                connection.abort()

    def abort_all(self) -> int:
        calls = [c for c in self.calls if not c.done]
        for call in calls:
            call.fail(Dropped("the router stopped before answering"))
        return len(calls)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for call in list(self.calls):
            call.fail(Dropped("the router stopped before answering"))
        if self.model_control is not None:
            await self.model_control.close()
        for connection in list(self.connections):
            connection.abort()

    # -- calls --------------------------------------------------------------------------------

    def new_call(self, client: ClientConnection, event: HeadersReceived) -> None:
        call = RelayCall(self, client, event.stream, event.headers, event.end_stream)
        event.stream.peer = call
        if len(self.calls) >= self.config.max_concurrent_calls:
            self.calls.add(call)
            call.fail(Overloaded(
                f"grpc.max_concurrent_calls={self.config.max_concurrent_calls} calls in progress"))
            return
        self.calls.add(call)
        self._idle.clear()
        self.calls_total += 1
        try:
            if client.refusal is not None:
                raise client.refusal
            self._begin(call)
        except RouterError as error:
            call.fail(error)

    def _begin(self, call: RelayCall) -> None:
        method = call.method
        if method in _REFLECTION:
            self._reflect(call)
            return
        if method in self._answers or method in (_HEALTH_CHECK, _HEALTH_WATCH):
            if call.client_ended:
                self._answer(call)
            return
        if method in self._by_model:
            if call.client_ended:
                self.waiting_call_data(call)
            return  # routed once its first message is in
        model = call.header(ROUTE_MODEL_HEADER)
        if model is not None:
            self.registry.check_model(model, "grpc")
        self._admit(call, model)

    def waiting_call_data(self, call: RelayCall) -> None:
        """More request data of a call not yet submitted."""
        try:
            method = call.method
            if method in _REFLECTION:
                self._reflect(call)
                return
            routed = self._by_model.get(method)
            if routed is None:
                if call.client_ended:
                    self._answer(call)
                return
            # Joined only once whole: a 1 MiB message comes in 64 DATA frames.
            whole = call.unsent_size >= message_end(call.unsent, self.config.max_message_bytes)
            start = first_message_start(call.unsent, self.config.max_message_bytes,
                                        call.header("grpc-encoding")) if whole else None
            if start is None:
                if call.client_ended:
                    raise MalformedMessage("the call ended before its first message")
                return
            message, complete = start
            if not complete:  # a compressed message over PREFIX_BYTES: the fields it holds
                message = whole_fields(message)
            reader, needs_model = routed
            if not complete and needs_model and not reader(message).name:
                raise BadCompressedMessage(
                    f"no model named in the first {PREFIX_BYTES} bytes of the decompressed "
                    "message")
            named = needs_model or bool(reader(message).name)
            key = self.kserve.model_key(message, reader) if named else None
            if method == _MODEL_METADATA and key is not None:
                cached = self._metadata.get(key)
                if cached is not None:
                    self._reply(call, cached, end=True)
                    return
                call.capture = (key, [])
            self._admit(call, key)
        except RouterError as error:
            call.fail(error)

    def _admit(self, call: RelayCall, model: str | None) -> None:
        if call.client.late or self.lifecycle.abandoned:
            raise Draining("the router is draining; retry on another router")
        if self.dispatcher.saturated:
            raise Overloaded("the dispatch queue is full")
        call.submit(model)

    def captured(self, key: str, response: bytes) -> None:
        """A ModelMetadata answer (one whole message): cached for the router's life, as on
        the grpcio engine."""
        try:
            message = first_message([response], self.config.max_message_bytes)
        except MalformedMessage:
            return  # compressed: relayed as it came, not cached
        if message is not None:
            self._metadata[key] = message

    def call_finished(self, call: RelayCall) -> None:
        duration = self.clock.now() - call.started
        self.stats.count(call.method, call.status, duration)
        entry = call.entry
        if entry is not None and self.access_log is not None and call.meters is not None:
            entry.status, entry.duration_s = call.status, duration
            entry.bytes_in, entry.bytes_out = call.meters[0].total, call.meters[1].total
            self.access_log.write(entry)
        self.calls.discard(call)
        self._watchers.pop(call, None)
        if not self.calls:
            self._idle.set()

    # -- answered by the router ---------------------------------------------------------------

    def _answer(self, call: RelayCall) -> None:
        data = b"".join(call.unsent)
        payload = data[5:] if len(data) >= 5 else b""
        try:
            if call.method == _HEALTH_CHECK:
                reply = self._health_check(payload)
            elif call.method == _HEALTH_WATCH:
                self._watch(call, payload)
                return
            else:
                reply = self.kserve.answer(self._answers[call.method], payload)
        except RouterError as error:
            call.fail(error)
            return
        self._reply(call, reply, end=True)

    def _reply(self, call: RelayCall, reply: bytes, *, end: bool) -> None:
        conn = call.client.conn
        sid = call.stream.id
        if not call.answered:
            call.answered = True
            conn.send_headers(sid, [(":status", "200"), ("content-type", "application/grpc")])
        message = b"\0" + len(reply).to_bytes(4) + reply
        conn.send_data(sid, message)
        if call.meters is not None:
            call.meters[1].feed(message)
        if end:
            self._reply_end(call)
        call.client.mark()

    def _reply_end(self, call: RelayCall) -> None:
        if not call.answered:
            call.answered = True
            call.client.conn.send_headers(
                call.stream.id, [(":status", "200"), ("content-type", "application/grpc")])
        call.client.conn.send_headers(call.stream.id, [("grpc-status", "0")], end_stream=True)
        call.client.mark()
        call.done = True
        call.status = "OK"
        self.call_finished(call)

    def _reflect(self, call: RelayCall) -> None:
        """Server reflection, a stream the router answers: a reply per request message."""
        messages, rest = split_messages(call.unsent)
        call.unsent = [rest] if rest else []
        call.unsent_size = len(rest)
        for message in messages:
            try:
                reply = self._reflection(message)
            except DecodeError:
                call.fail(MalformedMessage("not a ServerReflectionRequest"))
                return
            self._reply(call, reply, end=False)
        if call.client_ended and not call.done:
            if rest:
                call.fail(MalformedMessage("the stream ended inside a message"))
                return
            self._reply_end(call)

    def _health_status(self, service: str) -> int:
        if service not in HEALTH_SERVICES:
            return int(health_pb2.HealthCheckResponse.SERVICE_UNKNOWN)
        serving = self.readiness.ready("grpc")
        return int(health_pb2.HealthCheckResponse.SERVING if serving
                   else health_pb2.HealthCheckResponse.NOT_SERVING)

    def _health_check(self, payload: bytes) -> bytes:
        service = _health_service(payload)
        if service not in HEALTH_SERVICES:
            raise UnknownService(f"unknown service {quoted(service)}")
        return _health_reply(self._health_status(service))

    def _watch(self, call: RelayCall, payload: bytes) -> None:
        service = _health_service(payload)
        status = self._health_status(service)
        self._watchers[call] = (service, status)
        self._reply(call, _health_reply(status), end=False)

    def health_changed(self, backend: Backend | None = None, reason: str = "") -> None:
        """Readiness may have changed: every watcher whose status did gets a message."""
        for call, (service, last) in list(self._watchers.items()):
            status = self._health_status(service)
            if status != last and not call.done:
                self._watchers[call] = (service, status)
                self._reply(call, _health_reply(status), end=False)

    def statistics(self) -> dict[str, Any]:
        return {
            "engine": "relay",
            "tls": self.tls.statistics() if self.tls is not None else None,
            "connections": len(self.connections),
            "connections_total": self.connections_total,
            # Response bytes waiting for a client's window (bounded by the credit the
            # backends were given: a slow reader holds its backend back).
            "pending_bytes": sum(c.conn.statistics()["pending_bytes"] for c in self.connections),
            "refused_connections": self.refused_connections,
            "calls_in_flight": len(self.calls),
            "calls_total": self.calls_total,
            "health_watchers": len(self._watchers),
            # Draining: connections sent the GOAWAY notice and waiting for their final one.
            "goaway_pending": len(self._noticed),
            "phase": self.lifecycle.phase.value,
            "calls": self.stats.statistics(),
        }

    def __repr__(self) -> str:
        return (f"RelayFrontDoor(connections={len(self.connections)}, calls={len(self.calls)}, "
                f"{self.lifecycle.phase.value})")


def _health_service(payload: bytes) -> str:
    try:
        return str(health_pb2.HealthCheckRequest.FromString(payload).service)
    except DecodeError as exc:
        raise MalformedMessage(f"not a HealthCheckRequest: {exc}") from None


def _health_reply(status: int) -> bytes:
    return bytes(health_pb2.HealthCheckResponse(status=status).SerializeToString())

