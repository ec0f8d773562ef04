"""Locust load for the length-prefixed protocol: one persistent connection per simulated user.

    locust -f bench/locustfile.py --host tcp://127.0.0.1:7070 --headless -u 50 -r 50 -t 30s
    make locust          # the same against a router it starts (python -m bench.locust_run)

The target comes from Locust's ``--host`` (or its ``LOCUST_HOST`` variable), as
``tcp://HOST:PORT`` or ``HOST:PORT``; without one, ``127.0.0.1:7070``. Each user keeps one
connection open and sends one 64-byte request at a time (``FRAME_PAYLOAD_BYTES`` changes the
size), with no wait between requests, and checks that the echo comes back byte for byte.

The client is a plain blocking socket: Locust monkeypatches the standard library with gevent
before it imports this file, so a blocking ``recv`` yields to the other users' greenlets.
(``router.client.frames.FrameClient`` is asyncio and cannot run under gevent; the framing
itself, ``router.protocol.frames``, is sans-IO and is reused here.) Every request fires one
Locust request event (``request_type="frame"``, ``name="echo"``) with its time in ms, the
answer's length and, on failure, one of the exceptions below; the connect counts in the time of
the first request on a connection, as Locust's HTTP clients count theirs. After a transport
failure the connection is dropped and the next request reconnects.

Run it only through Locust (``bench.locust_run``, or the ``locust`` command): importing it
anywhere else imports Locust, which monkeypatches that process.
"""

from __future__ import annotations

import itertools
import os
import socket
import time
from urllib.parse import urlsplit

from locust import User, constant, task

from router.core.errors import RouterError
from router.protocol.frames import ErrorFrame, FrameDecoder, encode_frame

DEFAULT_TARGET = ("127.0.0.1", 7070)
PAYLOAD_BYTES = int(os.environ.get("FRAME_PAYLOAD_BYTES", "64"))
# A loaded router on this 2-core machine answers in milliseconds; 10 s means something is stuck.
TIMEOUT_S = 10.0
RECV_BYTES = 65536

_user_ids = itertools.count(1)


class FrameFailure(Exception):
    """Base of the failures a request can end in (what Locust shows as the error)."""


class RouterErrorReply(FrameFailure):
    """The router answered with an error frame (OVERLOADED, NO_BACKEND, ...)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code


class ConnectionClosed(FrameFailure):
    """The router closed the connection before answering."""


class EchoMismatch(FrameFailure):
    """The answer was not the request's payload."""


def error_reply(frame: ErrorFrame) -> RouterErrorReply:
    try:
        return RouterErrorReply(*frame.code_and_message)
    except (ValueError, KeyError, TypeError):  # not the JSON the router writes
        return RouterErrorReply("bad_error_frame", repr(bytes(frame[:64])))


def parse_target(host: str | None) -> tuple[str, int]:
    """``tcp://H:P``, ``H:P`` or nothing (the default) -> (host, port)."""
    if not host:
        return DEFAULT_TARGET
    parts = urlsplit(host if "://" in host else f"tcp://{host}")
    if parts.scheme != "tcp" or not parts.hostname or parts.port is None:
        raise ValueError(f"--host must be tcp://HOST:PORT or HOST:PORT, got {host!r}")
    return parts.hostname, parts.port


class FrameConnection:
    """One blocking connection: send a frame, read frames until the answer is whole."""

    def __init__(self, host: str, port: int, timeout_s: float) -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout_s)
        # One small write per request: without NODELAY, Nagle and delayed ACKs add ~40 ms.
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.decoder = FrameDecoder(accept_error_flag=True)

    def request(self, payload: bytes) -> bytes | ErrorFrame:
        self.sock.sendall(encode_frame(payload))
        # Bounded: each recv returns at least one byte, ends at EOF, or times out (TIMEOUT_S).
        while True:
            data = self.sock.recv(RECV_BYTES)
            if not data:
                raise ConnectionClosed("connection closed before the answer")
            frames = self.decoder.feed(data)
            if frames:
                # One request in flight: a second frame would be an answer to nothing.
                if len(frames) > 1 or self.decoder.buffered:
                    raise EchoMismatch(f"{len(frames)} frames for one request")
                return frames[0]

    def close(self) -> None:
        self.sock.close()


class FrameClient:
    """Sends requests on a persistent connection and reports each to Locust."""

    def __init__(self, user: User, host: str, port: int) -> None:
        self.user = user
        self.host = host
        self.port = port
        self.conn: FrameConnection | None = None

    def request(self, payload: bytes, name: str = "echo") -> None:
        start = time.perf_counter()
        length = 0
        failure: Exception | None = None
        try:
            if self.conn is None:
                self.conn = FrameConnection(self.host, self.port, TIMEOUT_S)
            answer = self.conn.request(payload)
            length = len(answer)
            if isinstance(answer, ErrorFrame):
                raise error_reply(answer)
            if answer != payload:
                raise EchoMismatch(f"sent {payload[:32]!r}..., got {answer[:32]!r}...")
        except RouterErrorReply as exc:
            failure = exc  # an answer: the connection is still in step
        except (OSError, FrameFailure, RouterError) as exc:
            # Transport failure, undecodable or out-of-step stream: start over on a new one.
            failure = exc
            self.close()
        self.user.environment.events.request.fire(
            request_type="frame", name=name,
            response_time=(time.perf_counter() - start) * 1000.0,
            response_length=length, exception=failure, context={},
        )

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None


class FrameUser(User):
    """A client of the length-prefixed protocol: one connection, one request at a time."""

    wait_time = constant(0)  # closed loop: the next request as soon as the answer is in

    def on_start(self) -> None:
        host, port = parse_target(self.host)
        self.client = FrameClient(self, host, port)
        self.label = f"u{next(_user_ids)}"
        self.seq = 0

    @task
    def echo(self) -> None:
        self.seq += 1
        self.client.request(f"{self.label}-{self.seq}".encode().ljust(PAYLOAD_BYTES, b" "))

    def on_stop(self) -> None:
        self.client.close()
