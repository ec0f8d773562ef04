"""Echo backend: answers every request frame with the same payload.

It is the router's stand-in for an inference server in tests, benchmarks and chaos runs, so
it can also misbehave on request: answer late (``--delay-ms``), drop a connection instead of
answering (``--fail-rate``), close after N answers (``--close-after``), send a frame on every
new connection before it is asked anything (``--greet``: a protocol violation the router must
catch), and log the payloads it answered (``--record-ids``) so a chaos test can tell which
requests reached it. With ``--tls-cert`` it speaks TLS (``--tls-client-ca``: and requires a
client certificate signed by that CA), built with the standard library alone so it checks the
router's TLS independently.

With ``--register URL`` it joins the router's fleet by itself (``backends.registering``):
registered before it prints ``READY``, renewed by heartbeat (carrying the requests it holds),
and on SIGTERM deregistered first, so the router stops sending; it then stops listening and
waits (at most ``--drain-grace-s``) for the router to close its connections, which the router
does once nothing is in flight there, before it exits. Without ``--register`` SIGTERM closes
everything at once.

One ``asyncio.Protocol`` per connection under uvloop; replies go out in request order. The
replies produced by one ``data_received`` are joined into one write (each frame is written
whole, header and payload together), which halves the syscalls under pipelined load.
Fail-rate and close-after apply to every frame, the zero-length health probe included, so a
flaky backend looks flaky to the router's health checks too.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import random
import socket
import ssl
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import cast

import uvloop

from backends import registering
from backends.command_line import add_listen_arguments, stop_on_signals
from backends.registering import RegisterOptions
from backends.unix import remove_stale_socket
from router.core.errors import FrameTooLarge, TruncatedFrame
from router.protocol.announce import format_ready, format_ready_unix
from router.protocol.frames import DEFAULT_MAX_FRAME_BYTES, FrameDecoder, encode_frame

BACKLOG = 4096


@dataclass(frozen=True, slots=True)
class EchoConfig:
    host: str = "127.0.0.1"
    port: int = 0
    unix: str | None = None  # listen on this unix socket path instead of host:port
    delay_s: float = 0.0
    fail_rate: float = 0.0
    close_after: int = 0  # 0: never
    record_ids: str | None = None
    seed: int | None = None
    tls_cert: str | None = None  # PEM: certificate (and key, unless tls_key)
    tls_key: str | None = None
    tls_client_ca: str | None = None  # require client certificates signed by this CA
    greet: bytes | None = None  # written as one frame as soon as a connection is made
    register: RegisterOptions | None = None  # join this router's fleet (--register)
    models: tuple[str, ...] = ()  # the models it registers as serving (it echoes any)

    def __post_init__(self) -> None:
        if self.unix is not None and self.tls_cert:
            raise ValueError("--unix serves plaintext: drop --tls-cert")
        if (self.tls_key or self.tls_client_ca) and not self.tls_cert:
            raise ValueError("--tls-key and --tls-client-ca need --tls-cert")
        if self.delay_s < 0:
            raise ValueError(f"delay must be >= 0, got {self.delay_s}")
        if not 0.0 <= self.fail_rate <= 1.0:
            raise ValueError(f"fail_rate must be in [0, 1], got {self.fail_rate}")
        if self.close_after < 0:
            raise ValueError(f"close_after must be >= 0, got {self.close_after}")


class IdRecorder:
    """Appends answered payloads, one per line, to a file.

    Lines are written (``os.write``, no user-space buffer) before the reply that carries them,
    so every reply a client received is on disk even if this process is SIGKILLed; that is at
    most one extra syscall per batch of replies, and only when recording is on.
    """

    def __init__(self, path: str) -> None:
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        self.lines = 0

    def write(self, payloads: list[bytes]) -> None:
        text = "".join(
            p.decode("utf-8", errors="replace").replace("\n", "\\n") + "\n" for p in payloads
        )
        os.write(self._fd, text.encode())
        self.lines += len(payloads)

    def close(self) -> None:
        os.close(self._fd)


class Connections:
    """The open client connections, and an event set while there are none (a drain waits on
    it: the router closes its connections once nothing is in flight on them)."""

    def __init__(self) -> None:
        self._open: set[EchoProtocol] = set()
        self.none_open = asyncio.Event()
        self.none_open.set()

    def add(self, connection: EchoProtocol) -> None:
        self._open.add(connection)
        self.none_open.clear()

    def discard(self, connection: EchoProtocol) -> None:
        self._open.discard(connection)
        if not self._open:
            self.none_open.set()

    def inflight(self) -> int:
        """Requests read and not yet answered (only ``--delay-ms`` holds any)."""
        return sum(connection.pending for connection in self._open)

    def __iter__(self) -> Iterator[EchoProtocol]:
        return iter(list(self._open))

    def __len__(self) -> int:
        return len(self._open)


class EchoProtocol(asyncio.Protocol):
    """One client connection: decode frames, answer each in order."""

    def __init__(
        self, config: EchoConfig, rng: random.Random, recorder: IdRecorder | None,
        connections: Connections,
    ) -> None:
        self._config = config
        self._rng = rng
        self._recorder = recorder
        self._connections = connections
        self._decoder = FrameDecoder(DEFAULT_MAX_FRAME_BYTES)
        self._transport: asyncio.Transport | None = None
        self._pending: deque[bytes] = deque()  # delayed requests, oldest first
        self._answered = 0
        self._closing = False
        self._eof = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's TCPTransport implements asyncio.Transport without subclassing it.
        self._transport = cast(asyncio.Transport, transport)
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family != socket.AF_UNIX:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._connections.add(self)
        if self._config.greet is not None:
            self._transport.write(encode_frame(self._config.greet))

    def connection_lost(self, exc: Exception | None) -> None:
        self._closing = True
        self._pending.clear()
        self._connections.discard(self)

    def data_received(self, data: bytes) -> None:
        if self._closing:
            return
        try:
            frames = self._decoder.feed(data)
        except FrameTooLarge:
            self.abort()
            return
        if self._config.delay_s > 0:
            loop = asyncio.get_running_loop()
            for payload in frames:
                self._pending.append(payload)
                # Every timer answers the oldest pending request, whichever timer fires first,
                # so replies stay in request order even if equal deadlines fire out of order.
                loop.call_later(self._config.delay_s, self._answer_oldest)
        else:
            self._answer(frames)

    def eof_received(self) -> bool:
        try:
            self._decoder.close()
        except TruncatedFrame:
            self.abort()
            return False
        # Half-closed by the client: finish the delayed replies, then close.
        self._eof = True
        return bool(self._pending)

    @property
    def pending(self) -> int:
        return len(self._pending)

    def abort(self) -> None:
        self._closing = True
        if self._transport is not None:
            self._transport.abort()

    def _answer_oldest(self) -> None:
        if self._closing:
            return
        if self._pending:
            self._answer([self._pending.popleft()])
        if self._eof and not self._pending and not self._closing:
            self._close()

    def _answer(self, frames: list[bytes]) -> None:
        """Answer ``frames`` in order with one write, honouring fail-rate and close-after."""
        replies: list[bytes] = []
        action: Callable[[], None] | None = None
        fail_rate, close_after = self._config.fail_rate, self._config.close_after
        for payload in frames:
            if fail_rate and self._rng.random() < fail_rate:
                action = self.abort
                break
            replies.append(payload)
            self._answered += 1
            if close_after and self._answered >= close_after:
                action = self._close
                break
        if replies and self._transport is not None:
            if self._recorder is not None:
                self._recorder.write([p for p in replies if p])
            self._transport.write(b"".join([encode_frame(p) for p in replies]))
        if action is not None:
            action()

    def _close(self) -> None:
        self._closing = True
        if self._transport is not None:
            self._transport.close()


def server_ssl_context(cert: str, key: str | None, client_ca: str | None) -> ssl.SSLContext:
    """A plain standard-library server context (a backend's side of TLS)."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert, key)
    if client_ca:
        ctx.load_verify_locations(client_ca)
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


async def listen_frames(
    factory: Callable[[], asyncio.Protocol], host: str, port: int, unix: str | None,
    tls: ssl.SSLContext | None = None,
) -> tuple[asyncio.Server, str]:
    """A frame server on ``host:port`` (or the unix socket ``unix``, a stale socket file
    removed first) and its announcement, ``READY <port>`` or ``READY unix:<path>``."""
    loop = asyncio.get_running_loop()
    if unix is not None:
        remove_stale_socket(unix)
        server = await loop.create_unix_server(factory, unix, backlog=BACKLOG)
        return server, format_ready_unix(unix)
    server = await loop.create_server(
        factory, host, port, backlog=BACKLOG, reuse_address=True, ssl=tls,
    )
    return server, format_ready(server.sockets[0].getsockname()[1])


async def serve(config: EchoConfig, stop: asyncio.Event) -> None:
    """Listen, print ``READY <port>`` (``READY unix:<path>`` with ``unix``), serve until
    ``stop`` is set, then close everything."""
    rng = random.Random(config.seed)
    recorder = IdRecorder(config.record_ids) if config.record_ids else None
    connections = Connections()
    tls = None
    if config.tls_cert:
        tls = server_ssl_context(config.tls_cert, config.tls_key, config.tls_client_ca)
    def factory() -> EchoProtocol:
        return EchoProtocol(config, rng, recorder, connections)

    server, ready = await listen_frames(factory, config.host, config.port, config.unix, tls)
    port = 0 if config.unix is not None else server.sockets[0].getsockname()[1]
    address = "" if config.register is None else registering.advertised(
        config.register, host=config.host, port=port, unix=config.unix)
    try:
        async with registering.lease(config.register, address=address, protocol="frames",
                                     models=config.models, inflight=connections.inflight):
            print(ready, flush=True)
            await stop.wait()
        if config.register is not None:  # deregistered: the router sends nothing new
            server.close()
            await _drained(connections, config.register.drain_grace_s)
    finally:
        if config.unix is not None:
            remove_stale_socket(config.unix)
        server.close()
        for conn in list(connections):
            conn.abort()
        await server.wait_closed()
        if recorder is not None:
            recorder.close()


async def _drained(connections: Connections, grace_s: float) -> None:
    """Until the router has closed every connection, at most ``grace_s``."""
    try:
        async with asyncio.timeout(grace_s):
            await connections.none_open.wait()
    except TimeoutError:
        logging.getLogger(__name__).warning(
            "drain: %d connections still open after %gs (%d requests unanswered); closing",
            len(connections), grace_s, connections.inflight())


async def _main_async(config: EchoConfig) -> None:
    stop = stop_on_signals()
    await serve(config, stop)


def parse_args(argv: list[str] | None = None) -> EchoConfig:
    parser = argparse.ArgumentParser(prog="python -m backends.echo", description=__doc__)
    add_listen_arguments(parser)
    parser.add_argument("--delay-ms", type=float, default=0.0)
    parser.add_argument("--fail-rate", type=float, default=0.0,
                        help="probability of aborting the connection instead of answering")
    parser.add_argument("--close-after", type=int, default=0,
                        help="close a connection after answering N requests (0: never)")
    parser.add_argument("--record-ids", default=None, metavar="FILE",
                        help="append each answered non-empty payload to FILE, one per line")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--tls-cert", default=None, metavar="PEM",
                        help="speak TLS with this certificate (and key, unless --tls-key)")
    parser.add_argument("--tls-key", default=None, metavar="PEM")
    parser.add_argument("--tls-client-ca", default=None, metavar="PEM",
                        help="require client certificates signed by this CA")
    parser.add_argument("--greet", default=None, metavar="TEXT",
                        help="write TEXT as a frame on every connection before reading")
    parser.add_argument("--models", default="", metavar="M1,M2",
                        help="with --register: the models it registers as serving")
    registering.add_arguments(parser)
    args = parser.parse_args(argv)
    register = registering.options(args, parser)
    try:
        return EchoConfig(
            host=args.host, port=args.port or 0, unix=args.unix, delay_s=args.delay_ms / 1000.0,
            fail_rate=args.fail_rate, close_after=args.close_after,
            record_ids=args.record_ids, seed=args.seed, tls_cert=args.tls_cert,
            tls_key=args.tls_key, tls_client_ca=args.tls_client_ca,
            greet=None if args.greet is None else args.greet.encode(),
            register=register, models=tuple(m for m in args.models.split(",") if m),
        )
    except ValueError as exc:
        parser.error(str(exc))


def main(argv: list[str] | None = None) -> None:
    config = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: "
                        "%(message)s")
    uvloop.run(_main_async(config))


if __name__ == "__main__":
    main()
