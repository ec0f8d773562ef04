"""The length-prefixed TCP front door: the listening socket and the set of open connections.

Each accepted connection gets a ``ClientConnection`` (connection.py), the uvloop Protocol that
feeds a sans-IO ``TcpSession`` (router.protocol.session): in-order answers, coalesced writes,
pausing, closing at a request boundary and the connection's timeouts all live there. This module
owns what spans connections: accepting, the connection limits, the read budget shared by
every session, the dispatcher's backpressure fanned out to every session, and the drain.

Accepting: the front door owns its listening socket and accepts up to ``ACCEPT_BATCH``
connections per wakeup. (uvloop's server accepts one connection per loop iteration: with
10,000 clients connecting at once under load the accept queue sat full at 4096, the kernel
dropped SYNs, and the late clients waited seconds to be accepted.)
Each plaintext connection's transport is made with no task and no socket object of its own
(``_adopt_plain``, ``_AcceptedSocket``): in connection-per-request load the accept path is most
of what the router's Python does per connection.

TLS (``listener.tls``): each accepted socket is wrapped with the listener's ``ServerTls``
context in its own task, so a slow or stalled handshake never holds up the accept batch. A
handshake has ``read_timeout_s`` to finish (a client that connects and sends nothing is a
slowloris like any other), and the TLS close at a request boundary waits ``linger_s`` for the
client's close_notify. A failed handshake (untrusted or expired certificate, plaintext to a TLS
port) is counted and logged at DEBUG: it is the client's doing and may come by the thousand.
With an allow-list, a client outside it is answered CLIENT_NOT_ALLOWED and closed before
anything it sent is read (``ClientConnection.connection_made``).

Connection limits: each accepted connection is counted at once, before it is set up, so a
burst of accepts cannot overshoot ``listener.max_connections`` (and, when set,
``max_connections_per_ip``). One over a limit is still accepted and set up, but its session is
refused at once: it writes a CONNECTION_LIMIT error frame, sends its FIN and reads nothing
(the same close as after bad input, lingering for the client's FIN). Refused connections are
not counted against the limits. Each counted connection needs a file descriptor, so ``start``
raises the soft RLIMIT_NOFILE towards ``max_connections`` plus ``FD_HEADROOM``.
"""

from __future__ import annotations

import _socket
import asyncio
import collections
import functools
import logging
import random
import resource
import socket
import ssl
from collections.abc import Callable, Coroutine
from typing import Any

from mypy_extensions import mypyc_attr

from router.core.clock import Clock
from router.core.coarse_timers import CoarseTimers
from router.core.config import DrainConfig, ListenerConfig
from router.core.errors import ConnectionLimit, RouterError
from router.dispatch.scheduler import Dispatcher, Request
from router.frontdoor.tcp.connection import ClientConnection
from router.lifecycle.state import Lifecycle
from router.protocol.budget import ReadBudget
from router.protocol.keyed import read_key
from router.protocol.session import AnswerFlusher, TcpSession
from router.tls.context import ServerTls

log = logging.getLogger(__name__)

ACCEPT_BATCH = 512  # connections accepted per wakeup of the listening socket
ACCEPT_RETRY_S = 0.5  # out of file descriptors: stop accepting this long
# Descriptors beside the client connections: backend pools (64 per backend by default), the
# admin and gRPC listeners, refused connections lingering, log files.
FD_HEADROOM = 1024


class TcpFrontDoor:
    """Owns the listening server and every open client connection."""

    def __init__(
        self, dispatcher: Dispatcher, config: ListenerConfig, drain: DrainConfig, clock: Clock,
        lifecycle: Lifecycle, tls: ServerTls | None = None,
    ) -> None:
        self.dispatcher = dispatcher
        self.config = config
        self.tls = tls
        self.linger_s = drain.linger_s
        self.clock = clock
        # The sessions' timers: each holds one (its idle deadline, seconds away) for as long as
        # it is open; bucketed, they cost an entry each instead of a loop timer each.
        self.session_clock = CoarseTimers(clock)
        self._lifecycle = lifecycle
        self._listener: socket.socket | None = None
        self._loop: asyncio.AbstractEventLoop  # the loop ``start`` ran in
        self._adopting: set[asyncio.Task[Any]] = set()  # accepted sockets being wrapped
        self._sessions: set[TcpSession[Request]] = set()
        self._all_closed: asyncio.Event | None = None
        self.connections_total = 0
        self.budget = ReadBudget(config.max_buffered_bytes)
        # Answers deferred to the end of the loop iteration, by every session; writes counted.
        self.flusher = AnswerFlusher(self._call_soon)
        self._counted = 0  # connections counted against max_connections (being set up or open)
        self._by_ip: dict[str, int] = {}  # the same, per address (with max_connections_per_ip)
        self.refused = {"max_connections": 0, "max_connections_per_ip": 0}
        dispatcher.add_pressure_listener(self._on_pressure)
        # What accepting a frame means: plain frames go to the dispatcher as they are; keyed
        # ones are read for their routing key first.
        self.submit: Callable[[Request], None] = (
            self._submit_keyed if config.keyed else dispatcher.submit
        )

    def _submit_keyed(self, request: Request) -> None:
        """A keyed frame: its key names the model; a bad key or a model no backend serves is
        answered at once, the connection going on."""
        dispatcher = self.dispatcher
        try:
            model = read_key(request.payload)
            if model is not None:
                request.model = model
                registry = dispatcher.registry
                if not registry.candidates((), "tcp", model):
                    registry.check_model(model, "tcp")  # NO_BACKEND follows otherwise
        except RouterError as exc:
            dispatcher.refuse(request, exc)
            return
        dispatcher.submit(request)

    async def start(
        self, host: str, port: int, *, backlog: int = 4096, reuse_port: bool = False
    ) -> tuple[str, int]:
        raise_open_file_limit(self.config.max_connections + FD_HEADROOM)
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.create_server(
            (host, port), family=family, backlog=backlog, reuse_port=reuse_port
        )
        sock.setblocking(False)
        self._listener = sock
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(sock.fileno(), self._accept_batch)
        sockname = sock.getsockname()
        return str(sockname[0]), int(sockname[1])

    def _call_soon(self, callback: Callable[[], object]) -> None:
        self._loop.call_soon(callback)

    def _accept_batch(self) -> None:
        listener = self._listener
        if listener is None:
            return
        loop = self._loop
        # (fd, address): CPython's accept() without the socket object it makes only for
        # uvloop to take the descriptor from it.
        accept: Callable[[], tuple[int, Any]] = listener._accept  # type: ignore[attr-defined]
        for _ in range(ACCEPT_BATCH):
            try:
                fd, address = accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                # EMFILE/ENFILE/ENOBUFS: the socket stays readable, so back off instead of
                # spinning; the kernel keeps queueing connections meanwhile.
                log.warning("accept failed (%s); pausing accepts for %.1fs", exc, ACCEPT_RETRY_S)
                loop.remove_reader(listener.fileno())
                self.clock.call_at(self.clock.now() + ACCEPT_RETRY_S, self._resume_accepting)
                return
            # Neither O_NONBLOCK nor TCP_NODELAY is set here: uvloop's transport sets both
            # when it takes the descriptor (two syscalls per connection fewer).
            conn = _AcceptedSocket(listener.family, socket.SOCK_STREAM, 0, fd)
            client = ClientConnection(self, *self._admit(address[0]), address=address)
            if self.tls is None:
                self._adopt_plain(loop, conn, client)
                continue
            adopt = loop.connect_accepted_socket(
                functools.partial(_given, client), conn, ssl=self.tls.context,
                ssl_handshake_timeout=self.config.read_timeout_s,
                ssl_shutdown_timeout=self.linger_s,
            )
            task = loop.create_task(adopt)
            self._adopting.add(task)
            task.add_done_callback(functools.partial(self._adopted, conn, client))

    def _adopt_plain(
        self, loop: asyncio.AbstractEventLoop, conn: socket.socket, client: ClientConnection
    ) -> None:
        """Make a plaintext connection's transport without a task: uvloop's
        ``connect_accepted_socket`` makes the transport and schedules ``connection_made``
        before its one suspension (a wait for that call), so the coroutine is stepped here and
        resumed by that future's callback. A task per connection (its object, two steps and
        a done callback) was a sixth of the router's Python in connection-per-request runs.
        Nothing can fail between the two steps but ``connection_made`` itself."""
        coro = loop.connect_accepted_socket(functools.partial(_given, client), conn)
        try:
            waiter = coro.send(None)
        except StopIteration:
            return
        except Exception as exc:  # a descriptor uvloop refused: it never became a connection
            client.uncount()
            conn.close()
            log.warning("could not set up an accepted connection: %r", exc)
            return
        waiter.add_done_callback(functools.partial(_step_adoption, coro, client))

    def _admit(self, ip: str) -> tuple[str | None, ConnectionLimit | None]:
        """Count a new connection from ``ip``: (the key it is counted under, None) or, over a
        limit, (None, why; it is not counted)."""
        config = self.config
        if self._counted >= config.max_connections:
            self.refused["max_connections"] += 1
            return None, ConnectionLimit(
                f"{self._counted} connections open: listener.max_connections="
                f"{config.max_connections}"
            )
        per_ip = config.max_connections_per_ip
        if per_ip:
            count = self._by_ip.get(ip, 0)
            if count >= per_ip:
                self.refused["max_connections_per_ip"] += 1
                return None, ConnectionLimit(
                    f"{count} connections open from {ip}: listener.max_connections_per_ip="
                    f"{per_ip}"
                )
            self._by_ip[ip] = count + 1
        self._counted += 1
        return (ip if per_ip else ""), None

    def release(self, peer: str | None) -> None:
        """A counted connection is gone (``peer``: its key from ``_admit``; None: it was not
        counted). Called once per connection (``ClientConnection.uncount``)."""
        if peer is None:
            return
        self._counted -= 1
        if peer:
            count = self._by_ip[peer] - 1
            if count:
                self._by_ip[peer] = count
            else:
                del self._by_ip[peer]

    def _adopted(
        self, conn: socket.socket, client: ClientConnection, task: asyncio.Task[Any]
    ) -> None:
        self._adopting.discard(task)
        if task.cancelled() or task.exception() is not None:
            client.uncount()  # it may never become a connection
        if task.cancelled():
            conn.close()  # closed before it became a connection: nothing was read from it
            return
        exc = task.exception()
        if exc is None:
            return
        conn.close()
        if self.tls is not None and isinstance(exc, ssl.SSLError | OSError | TimeoutError):
            self.tls.handshake_failures += 1
            log.debug("TLS handshake failed: %r", exc)
        else:
            log.warning("could not set up an accepted connection: %r", exc)

    def _resume_accepting(self) -> None:
        if self._listener is not None:
            asyncio.get_running_loop().add_reader(self._listener.fileno(), self._accept_batch)

    def connection_opened(self, session: TcpSession[Request]) -> None:
        self._sessions.add(session)
        self.connections_total += 1
        if self._lifecycle.draining:
            # Accepted by the kernel before the listener closed: serve nothing, close at once.
            session.start_drain()

    def connection_closed(self, session: TcpSession[Request]) -> None:
        self._sessions.discard(session)
        if not self._sessions and self._all_closed is not None:
            self._all_closed.set()

    def _on_pressure(self, saturated: bool) -> None:
        sessions = list(self._sessions)
        if not saturated and sessions:
            # Resume from a random point: the loop then reads the connections in roughly this
            # order, and resuming in the same order every time starved the last ones (p99 of
            # 8 s with 10,000 clients against a 4096-request queue).
            start = random.randrange(len(sessions))
            sessions = sessions[start:] + sessions[:start]
        for session in sessions:
            session.set_queue_pressure(saturated)

    def stop_accepting(self) -> None:
        listener, self._listener = self._listener, None
        if listener is not None:
            asyncio.get_running_loop().remove_reader(listener.fileno())
            listener.close()
        for task in self._adopting:
            task.cancel()  # not yet a connection: nothing was read from it

    def start_drain(self) -> None:
        """Stop listening and shut every connection down at its next request boundary."""
        self.stop_accepting()
        for session in list(self._sessions):
            session.start_drain()

    async def wait_all_closed(self) -> None:
        if not self._sessions:
            return
        self._all_closed = asyncio.Event()
        await self._all_closed.wait()

    def abort_all(self) -> int:
        """Reset every connection; return how many requests were left unanswered."""
        unanswered = 0
        for session in list(self._sessions):
            unanswered += session.unanswered
            session.abort()
        return unanswered

    def limit_statistics(self) -> dict[str, Any]:
        """The connection limits, the read budget and the answer writes (cheap: what /metrics
        reads)."""
        return {
            "counted_connections": self._counted,
            "answer_writes": self.flusher.writes,
            "max_connections": self.config.max_connections,
            "connections_refused": dict(self.refused),
            "read_budget": self.budget.statistics(),
        }

    def statistics(self) -> dict[str, Any]:
        return {
            "open_connections": len(self._sessions),
            "by_state": dict(collections.Counter(s.state.value for s in self._sessions)),
            "connections_total": self.connections_total,
            "phase": self._lifecycle.phase.value,
            "tls": self.tls.statistics() if self.tls is not None else None,
            **self.limit_statistics(),
        }

    def __repr__(self) -> str:
        return f"TcpFrontDoor(connections={len(self._sessions)}, {self._lifecycle.phase.value})"


@mypyc_attr(native_class=False)  # its class attributes override socket.socket's properties
class _AcceptedSocket(socket.socket):
    """An accepted socket whose ``family`` and ``type`` are the plain ints of ``_socket``:
    uvloop reads both (three times) while adopting it, and ``socket.socket`` turns each into
    an enum member on every read, a measurable share of the accept path."""

    __slots__ = ()
    family = _socket.socket.family  # type: ignore[assignment]
    type = _socket.socket.type  # type: ignore[assignment]


def _step_adoption(
    coro: Coroutine[Any, Any, Any], client: ClientConnection, _waiter: asyncio.Future[Any]
) -> None:
    """The second (last) step of ``TcpFrontDoor._adopt_plain``'s coroutine."""
    try:
        coro.send(None)
    except StopIteration:
        return
    except Exception as exc:  # connection_made failed: uvloop closed the transport
        client.uncount()
        log.warning("could not set up an accepted connection: %r", exc)
        return
    coro.close()  # cannot happen: the coroutine has one suspension
    raise RuntimeError("connect_accepted_socket suspended twice")


def _given(client: ClientConnection) -> ClientConnection:
    """The protocol factory of one accepted connection: the protocol already made for it."""
    return client


def raise_open_file_limit(wanted: int) -> None:
    """Raise the soft RLIMIT_NOFILE to ``wanted`` (at most the hard limit), and warn when the
    hard limit is too low for the connection limit: past it, accepts fail (EMFILE) and
    connections wait in the kernel's queue instead of being answered."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= wanted:
        return
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if target > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    if target + FD_HEADROOM < wanted:  # less than max_connections itself
        log.warning(
            "open-file limit %d is below listener.max_connections + %d = %d: connections "
            "past it wait to be accepted instead of being refused", target, FD_HEADROOM, wanted,
        )
