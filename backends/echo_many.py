"""Many echo backends in one process, each on its own unix socket.

``python -m backends.echo_many --dir DIR --count N`` listens on ``DIR/b0000.sock`` ...
``DIR/b{N-1}.sock`` (``socket_path``): N independent echo backends, as many as the router
sees, served by one event loop, so that a fleet of 1,000 real backends fits in a few processes
(``make bench-registry``). Each socket answers exactly as ``backends.echo`` does (its
``EchoProtocol``, shared), zero-length health probe included.

Beside them ``DIR/control.sock`` (``control_path``) answers frames about the backends:
``stats`` -> JSON ``{"now_ns": ..., "backends": [[served, first_ns, last_ns], ...]}``, one
entry per socket in index order: the non-empty frames it was sent (probes are not counted),
and ``time.monotonic_ns()`` when it saw the first and the latest of them (0: none yet).
CLOCK_MONOTONIC is one clock for every process on the machine, so a benchmark compares these
stamps with its own (registration answered -> first request served). ``reset`` zeroes every
tally and answers ``{}``; anything else is answered with an error object.

The process announces ``READY unix:DIR/control.sock`` once every socket listens. Each
listening socket and each connection costs a file descriptor: the soft RLIMIT_NOFILE is
raised to the hard limit first.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import resource
import time
from collections.abc import Callable
from pathlib import Path

import orjson
import uvloop

from backends.command_line import stop_on_signals
from backends.echo import BACKLOG, Connections, EchoConfig, EchoProtocol
from backends.unix import remove_stale_socket
from router.protocol.announce import format_ready_unix
from router.protocol.frames import encode_frame

# A unix socket path is at most 107 bytes (sun_path); DIR/b0000.sock leaves DIR 96 of them.
MAX_COUNT = 10_000


def socket_path(directory: str | Path, index: int) -> str:
    """Where backend ``index`` of a process listening in ``directory`` is."""
    return os.path.join(directory, f"b{index:04d}.sock")


def control_path(directory: str | Path) -> str:
    return os.path.join(directory, "control.sock")


class Tally:
    """What one backend has been sent: non-empty frames and when the first and the latest
    arrived (``time.monotonic_ns()``; 0 before the first)."""

    __slots__ = ("first_ns", "last_ns", "served")

    def __init__(self) -> None:
        self.served = self.first_ns = self.last_ns = 0

    def reset(self) -> None:
        self.served = self.first_ns = self.last_ns = 0

    def saw(self, frames: list[bytes]) -> None:
        requests = sum(1 for payload in frames if payload)
        if not requests:
            return  # health probes only
        now = time.monotonic_ns()
        if not self.served:
            self.first_ns = now
        self.served += requests
        self.last_ns = now

    def as_list(self) -> list[int]:
        return [self.served, self.first_ns, self.last_ns]


class CountingEcho(EchoProtocol):
    """``EchoProtocol`` that tells its backend's ``Tally`` of every batch it answers."""

    def __init__(self, config: EchoConfig, rng: random.Random, connections: Connections,
                 tally: Tally) -> None:
        super().__init__(config, rng, None, connections)
        self._tally = tally

    def _answer(self, frames: list[bytes]) -> None:
        self._tally.saw(frames)
        super()._answer(frames)


class ControlProtocol(EchoProtocol):
    """The control socket: each request frame is answered by ``answer(payload)``."""

    def __init__(self, config: EchoConfig, rng: random.Random, connections: Connections,
                 answer: Callable[[bytes], bytes]) -> None:
        super().__init__(config, rng, None, connections)
        self._answer_of = answer

    def _answer(self, frames: list[bytes]) -> None:
        if self._transport is not None:
            self._transport.write(b"".join(encode_frame(self._answer_of(p)) for p in frames))


def control_answer(tallies: list[Tally], request: bytes) -> bytes:
    if request == b"stats":
        return orjson.dumps({"now_ns": time.monotonic_ns(),
                             "backends": [t.as_list() for t in tallies]})
    if request == b"reset":
        for tally in tallies:
            tally.reset()
        return b"{}"
    return orjson.dumps({"error": f"unknown request {request[:64]!r}: stats or reset"})


def raise_nofile_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


async def serve_many(directory: str, count: int, config: EchoConfig, stop: asyncio.Event
                     ) -> None:
    """Listen on ``count`` sockets and the control socket in ``directory``, announce, serve
    until ``stop`` is set, then close everything and remove the socket files."""
    loop = asyncio.get_running_loop()
    rng = random.Random(config.seed)
    connections = Connections()
    tallies = [Tally() for _ in range(count)]
    paths = [socket_path(directory, i) for i in range(count)] + [control_path(directory)]
    servers: list[asyncio.Server] = []

    def factory(tally: Tally) -> Callable[[], EchoProtocol]:
        return lambda: CountingEcho(config, rng, connections, tally)

    try:
        for path, tally in zip(paths, tallies, strict=False):
            remove_stale_socket(path)
            servers.append(await loop.create_unix_server(factory(tally), path, backlog=BACKLOG))
        remove_stale_socket(paths[-1])
        servers.append(await loop.create_unix_server(
            lambda: ControlProtocol(config, rng, connections,
                                    lambda request: control_answer(tallies, request)),
            paths[-1]))
        print(format_ready_unix(paths[-1]), flush=True)
        await stop.wait()
    finally:
        for server in servers:
            server.close()
        for conn in list(connections):
            conn.abort()
        for server in servers:
            await server.wait_closed()
        for path in paths:
            remove_stale_socket(path)


async def _main_async(directory: str, count: int, config: EchoConfig) -> None:
    stop = stop_on_signals()
    await serve_many(directory, count, config, stop)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m backends.echo_many", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", required=True, help="an existing directory for the sockets")
    parser.add_argument("--count", type=int, required=True,
                        help=f"echo backends to run (1..{MAX_COUNT})")
    parser.add_argument("--delay-ms", type=float, default=0.0, help="answer every frame late")
    args = parser.parse_args(argv)
    if not 1 <= args.count <= MAX_COUNT:
        parser.error(f"--count must be in 1..{MAX_COUNT}, got {args.count}")
    if len(socket_path(os.path.abspath(args.dir), args.count)) > 107:
        parser.error(f"--dir {args.dir!r} is too long for a unix socket path")
    if not os.path.isdir(args.dir):
        parser.error(f"--dir {args.dir!r} is not a directory")
    try:
        config = EchoConfig(delay_s=args.delay_ms / 1000.0)
    except ValueError as exc:
        parser.error(str(exc))
    raise_nofile_limit()
    uvloop.run(_main_async(os.path.abspath(args.dir), args.count, config))


if __name__ == "__main__":
    main()
