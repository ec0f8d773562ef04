"""The length-prefixed TCP front door: a uvloop server with one Protocol per client connection.

Per connection: a sans-IO ``FrameDecoder``, and the requests accepted on it in arrival order.
Requests are dispatched concurrently, but answers are written strictly in request order, so a
fast backend's answer waits behind a slow one's; all answers ready together go out in one
``writelines`` (one writev).

Reading pauses for any of three reasons and resumes when all are gone: too many answers
pending on this connection (``max_pipelined``), the transport's write buffer is full (the
client is not reading), or the dispatcher's queue is saturated (global backpressure).

Accepting: the front door owns its listening socket and accepts up to ``ACCEPT_BATCH``
connections per wakeup. (uvloop's server accepts one connection per loop iteration: with
10,000 clients connecting at once under load the accept queue sat full at 4096, the kernel
dropped SYNs, and the late clients waited seconds to be accepted.)

Closing follows the retry contract (README): a connection is never closed while a request
accepted on it is unanswered. Bad input (oversize length, truncated frame, a partial frame held
past ``read_timeout_s``) stops reading, lets the accepted requests finish, writes an error frame
and shuts down. A shutdown is a half-close (FIN) that then discards input until the client
closes or ``linger_s`` passes: closing with unread input would send a reset that can destroy
answers the client has not read yet.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import random
import socket
from dataclasses import dataclass
from typing import Any, cast

from router.core.clock import Clock
from router.core.errors import ClientProtocolError, ReadTimeout
from router.dispatch.scheduler import Dispatcher, Request
from router.protocol.frames import FrameDecoder, encode_frame, encode_router_error, frame_parts

log = logging.getLogger(__name__)

ACCEPT_BATCH = 512  # connections accepted per wakeup of the listening socket
ACCEPT_RETRY_S = 0.5  # out of file descriptors: stop accepting this long

# Reasons reading is paused, as bits.
_PIPELINE_FULL = 1
_WRITE_BLOCKED = 2
_QUEUE_SATURATED = 4


@dataclass(frozen=True, slots=True)
class ListenerSettings:
    max_frame_bytes: int = 16 * 1024 * 1024
    read_timeout_s: float = 10.0
    idle_timeout_s: float = 300.0
    max_pipelined: int = 128
    linger_s: float = 2.0


class ClientConnection(asyncio.Protocol):
    def __init__(self, front_door: TcpFrontDoor) -> None:
        self._front_door = front_door
        self._dispatcher = front_door.dispatcher
        self._clock = front_door.clock
        self._settings = front_door.settings
        self._decoder = FrameDecoder(self._settings.max_frame_bytes)
        # Requests accepted here, oldest first. A list, not a deque: it rarely holds more than
        # one (an empty deque costs 760 bytes per connection, a list 56).
        self._pending: list[Request] = []
        self._transport: asyncio.Transport | None = None
        self._paused = 0
        self._last_activity = self._clock.now()
        self._partial_since: float | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._input_done = False  # EOF, bad input or drain: accept nothing more
        self._final_error: ClientProtocolError | None = None  # written after pending answers
        self._shutting_down = False
        self._peer_eof = False
        self._lost = False

    # -- asyncio.Protocol ---------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop transports implement asyncio.Transport without subclassing it
        self._transport = cast(asyncio.Transport, transport)  # TCP_NODELAY set at accept
        self._front_door.connection_opened(self)
        if self._dispatcher.saturated:
            self._pause(_QUEUE_SATURATED)
        self._arm_timer(self._settings.idle_timeout_s)

    def data_received(self, data: bytes) -> None:
        if self._input_done:
            return  # shutting down or failed: input is discarded
        now = self._clock.now()
        self._last_activity = now
        try:
            payloads = self._decoder.feed(data)
        except ClientProtocolError as exc:
            self._fail(exc)
            return
        pending = self._pending
        dispatcher = self._dispatcher
        for payload in payloads:
            request = Request(payload, self, now)
            pending.append(request)
            dispatcher.submit(request)
        if self._decoder.error is not None:
            self._fail(self._decoder.error)  # after the whole frames before it were accepted
            return
        if self._decoder.buffered:
            if self._partial_since is None or payloads:
                self._partial_since = now
                self._arm_timer(self._settings.read_timeout_s)
        else:
            self._partial_since = None
        if len(pending) >= self._settings.max_pipelined:
            self._pause(_PIPELINE_FULL)
        if self._front_door.draining:
            self._close_at_boundary()

    def eof_received(self) -> bool:
        self._peer_eof = True
        if self._shutting_down:
            return False  # both sides have sent FIN: close now, the linger is over
        if self._input_done:
            return True
        self._input_done = True
        if self._decoder.buffered:
            self._fail_truncated()
        else:
            self._close_at_boundary()
        return True  # keep our side open until every accepted request is answered

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = True
        self._input_done = True
        self._cancel_timer()
        self._front_door.connection_closed(self)

    def pause_writing(self) -> None:
        self._pause(_WRITE_BLOCKED)

    def resume_writing(self) -> None:
        self._resume(_WRITE_BLOCKED)

    # -- answers ------------------------------------------------------------------------------

    def request_done(self, request: Request) -> None:
        pending = self._pending
        if not pending or pending[0] is not request:
            return  # an earlier request is still unanswered; this one is written after it
        response = request.response
        if len(pending) == 1 and response is not None and len(response) < 65536 and not self._lost:
            # The common case (no pipelining): one frame, one write, no list.
            pending.pop()
            assert self._transport is not None
            self._transport.write(encode_frame(response))
            self._after_flush()
            return
        out: list[bytes] = []
        ready = 0
        for done in pending:
            if not done.done:
                break
            ready += 1
            if done.response is not None:
                out.extend(frame_parts(done.response))
            elif done.error is not None:
                out.append(encode_router_error(done.error))
        del pending[:ready]
        if not self._lost and self._transport is not None:
            self._transport.writelines(out)
        self._after_flush()

    def _after_flush(self) -> None:
        pending = self._pending
        if self._paused & _PIPELINE_FULL and len(pending) <= self._settings.max_pipelined // 2:
            self._resume(_PIPELINE_FULL)
        if not pending:
            self._last_activity = self._clock.now()
            if self._input_done or self._front_door.draining:
                self._close_at_boundary()

    # -- closing ------------------------------------------------------------------------------

    def start_drain(self) -> None:
        self._close_at_boundary()

    def _close_at_boundary(self) -> None:
        """Shut down once nothing accepted here is unanswered and no frame is half-read."""
        if self._pending or self._shutting_down or self._lost:
            return
        if self._decoder.buffered and not self._input_done:
            return  # mid-frame: wait for the request boundary (or the read timeout)
        if self._final_error is not None and self._transport is not None:
            self._transport.write(encode_router_error(self._final_error))
        self._shutdown()

    def _fail(self, error: ClientProtocolError) -> None:
        self._input_done = True
        self._final_error = error
        self._close_at_boundary()

    def _fail_truncated(self) -> None:
        try:
            self._decoder.close()
        except ClientProtocolError as exc:
            self._fail(exc)

    def _shutdown(self) -> None:
        """FIN now; discard input until the client closes or ``linger_s`` passes."""
        transport = self._transport
        if transport is None or self._lost:
            return
        self._shutting_down = True
        self._input_done = True
        if self._peer_eof:
            transport.close()  # the client already sent its FIN: nothing left to linger for
            return
        self._paused = 0
        transport.resume_reading()
        if transport.can_write_eof():
            transport.write_eof()
        self._arm_timer(self._settings.linger_s)

    # -- flow control -------------------------------------------------------------------------

    def set_queue_pressure(self, saturated: bool) -> None:
        if saturated:
            self._pause(_QUEUE_SATURATED)
        else:
            self._resume(_QUEUE_SATURATED)

    def _pause(self, reason: int) -> None:
        if not self._paused and self._transport is not None and not self._shutting_down:
            self._transport.pause_reading()
        if not self._shutting_down:
            self._paused |= reason

    def _resume(self, reason: int) -> None:
        was_paused = self._paused
        self._paused &= ~reason
        if was_paused and not self._paused and self._transport is not None and not self._lost:
            self._transport.resume_reading()

    # -- timers: one per connection, for read timeout, idle timeout and linger -----------------

    def _arm_timer(self, delay_s: float) -> None:
        self._cancel_timer()
        loop = asyncio.get_running_loop()
        self._timer = loop.call_later(delay_s, self._on_timer)

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _on_timer(self) -> None:
        self._timer = None
        if self._lost or self._transport is None:
            return
        if self._shutting_down:
            self._transport.close()  # linger over: the client never closed its side
            return
        now = self._clock.now()
        if self._partial_since is not None:
            waited = now - self._partial_since
            if waited >= self._settings.read_timeout_s:
                limit = self._settings.read_timeout_s
                self._fail(ReadTimeout(f"partial frame held for over {limit}s"))
                return
            self._arm_timer(self._settings.read_timeout_s - waited)
            return
        if self._pending:
            # Busy, not idle: look again one idle period from now (an answer restamps activity).
            self._arm_timer(self._settings.idle_timeout_s)
            return
        idle = now - self._last_activity
        if idle >= self._settings.idle_timeout_s:
            self._input_done = True
            self._close_at_boundary()
            return
        self._arm_timer(self._settings.idle_timeout_s - idle)

    def abort(self) -> None:
        if self._transport is not None and not self._lost:
            self._transport.abort()

    @property
    def unanswered(self) -> int:
        return len(self._pending)

    def __repr__(self) -> str:
        peer = self._transport.get_extra_info("peername") if self._transport else None
        return f"ClientConnection({peer}, pending={len(self._pending)}, paused={self._paused})"


class TcpFrontDoor:
    """Owns the listening server and every open client connection."""

    def __init__(self, dispatcher: Dispatcher, settings: ListenerSettings, clock: Clock) -> None:
        self.dispatcher = dispatcher
        self.settings = settings
        self.clock = clock
        self.draining = False
        self._listener: socket.socket | None = None
        self._adopting: set[asyncio.Task[Any]] = set()  # accepted sockets being wrapped
        self._connections: set[ClientConnection] = set()
        self._all_closed: asyncio.Event | None = None
        self.connections_total = 0
        dispatcher.add_pressure_listener(self._on_pressure)

    async def start(
        self, host: str, port: int, *, backlog: int = 4096, reuse_port: bool = False
    ) -> tuple[str, int]:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.create_server(
            (host, port), family=family, backlog=backlog, reuse_port=reuse_port
        )
        sock.setblocking(False)
        self._listener = sock
        asyncio.get_running_loop().add_reader(sock.fileno(), self._accept_batch)
        sockname = sock.getsockname()
        return str(sockname[0]), int(sockname[1])

    def _accept_batch(self) -> None:
        listener = self._listener
        if listener is None:
            return
        loop = asyncio.get_running_loop()
        for _ in range(ACCEPT_BATCH):
            try:
                conn, _ = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                # EMFILE/ENFILE/ENOBUFS: the socket stays readable, so back off instead of
                # spinning; the kernel keeps queueing connections meanwhile.
                log.warning("accept failed (%s); pausing accepts for %.1fs", exc, ACCEPT_RETRY_S)
                loop.remove_reader(listener.fileno())
                loop.call_later(ACCEPT_RETRY_S, self._resume_accepting)
                return
            conn.setblocking(False)
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            task = loop.create_task(
                loop.connect_accepted_socket(lambda: ClientConnection(self), conn)
            )
            self._adopting.add(task)
            task.add_done_callback(functools.partial(self._adopted, conn))

    def _adopted(self, conn: socket.socket, task: asyncio.Task[Any]) -> None:
        self._adopting.discard(task)
        if task.cancelled():
            conn.close()  # closed before it became a connection: nothing was read from it
        elif task.exception() is not None:
            conn.close()
            log.warning("could not set up an accepted connection: %r", task.exception())

    def _resume_accepting(self) -> None:
        if self._listener is not None:
            asyncio.get_running_loop().add_reader(self._listener.fileno(), self._accept_batch)

    def connection_opened(self, connection: ClientConnection) -> None:
        self._connections.add(connection)
        self.connections_total += 1
        if self.draining:
            # Accepted by the kernel before the listener closed: serve nothing, close at once.
            connection.start_drain()

    def connection_closed(self, connection: ClientConnection) -> None:
        self._connections.discard(connection)
        if not self._connections and self._all_closed is not None:
            self._all_closed.set()

    def _on_pressure(self, saturated: bool) -> None:
        connections = list(self._connections)
        if not saturated and connections:
            # Resume from a random point: the loop then reads the connections in roughly this
            # order, and resuming in the same order every time starved the last ones (p99 of
            # 8 s with 10,000 clients against a 4096-request queue).
            start = random.randrange(len(connections))
            connections = connections[start:] + connections[:start]
        for connection in connections:
            connection.set_queue_pressure(saturated)

    def stop_accepting(self) -> None:
        listener, self._listener = self._listener, None
        if listener is not None:
            asyncio.get_running_loop().remove_reader(listener.fileno())
            listener.close()
        for task in self._adopting:
            task.cancel()  # not yet a connection: nothing was read from it

    def start_drain(self) -> None:
        """Stop listening and shut every connection down at its next request boundary."""
        self.draining = True
        self.stop_accepting()
        for connection in list(self._connections):
            connection.start_drain()

    async def wait_all_closed(self) -> None:
        if not self._connections:
            return
        self._all_closed = asyncio.Event()
        await self._all_closed.wait()

    def abort_all(self) -> int:
        """Reset every connection; return how many requests were left unanswered."""
        unanswered = 0
        for connection in list(self._connections):
            unanswered += connection.unanswered
            connection.abort()
        return unanswered

    def statistics(self) -> dict[str, Any]:
        return {
            "open_connections": len(self._connections),
            "connections_total": self.connections_total,
            "draining": self.draining,
        }

    def __repr__(self) -> str:
        return f"TcpFrontDoor(connections={len(self._connections)}, draining={self.draining})"


