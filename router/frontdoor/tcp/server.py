"""The length-prefixed TCP front door: the listening socket and the set of open connections.

Each accepted connection gets a ``ClientConnection`` (connection.py), the uvloop Protocol that
feeds a sans-IO ``TcpSession`` (router.protocol.session): in-order answers, coalesced writes,
pausing, closing at a request boundary and the connection's timeouts all live there. This module
owns what spans connections: accepting, the dispatcher's backpressure fanned out to every
session, and the drain.

Accepting: the front door owns its listening socket and accepts up to ``ACCEPT_BATCH``
connections per wakeup. (uvloop's server accepts one connection per loop iteration: with
10,000 clients connecting at once under load the accept queue sat full at 4096, the kernel
dropped SYNs, and the late clients waited seconds to be accepted.)
"""

from __future__ import annotations

import asyncio
import collections
import functools
import logging
import random
import socket
from typing import Any

from router.core.clock import Clock
from router.core.config import DrainConfig, ListenerConfig
from router.dispatch.scheduler import Dispatcher, Request
from router.frontdoor.tcp.connection import ClientConnection
from router.lifecycle.state import Lifecycle
from router.protocol.session import TcpSession

log = logging.getLogger(__name__)

ACCEPT_BATCH = 512  # connections accepted per wakeup of the listening socket
ACCEPT_RETRY_S = 0.5  # out of file descriptors: stop accepting this long


class TcpFrontDoor:
    """Owns the listening server and every open client connection."""

    def __init__(
        self, dispatcher: Dispatcher, config: ListenerConfig, drain: DrainConfig, clock: Clock,
        lifecycle: Lifecycle,
    ) -> None:
        self.dispatcher = dispatcher
        self.config = config
        self.linger_s = drain.linger_s
        self.clock = clock
        self._lifecycle = lifecycle
        self._listener: socket.socket | None = None
        self._adopting: set[asyncio.Task[Any]] = set()  # accepted sockets being wrapped
        self._sessions: set[TcpSession[Request]] = set()
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
                conn, peer = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                # EMFILE/ENFILE/ENOBUFS: the socket stays readable, so back off instead of
                # spinning; the kernel keeps queueing connections meanwhile.
                log.warning("accept failed (%s); pausing accepts for %.1fs", exc, ACCEPT_RETRY_S)
                loop.remove_reader(listener.fileno())
                self.clock.call_at(self.clock.now() + ACCEPT_RETRY_S, self._resume_accepting)
                return
            conn.setblocking(False)
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            task = loop.create_task(
                loop.connect_accepted_socket(functools.partial(ClientConnection, self, peer), conn)
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

    def statistics(self) -> dict[str, Any]:
        return {
            "open_connections": len(self._sessions),
            "by_state": dict(collections.Counter(s.state.value for s in self._sessions)),
            "connections_total": self.connections_total,
            "phase": self._lifecycle.phase.value,
        }

    def __repr__(self) -> str:
        return f"TcpFrontDoor(connections={len(self._sessions)}, {self._lifecycle.phase.value})"


