"""What the access log costs per TCP request: the data plane alone, over fake transports.

One frame in through a ``TcpSession``, ``Dispatcher.submit``, an upstream that answers at once
(echo, no network), ``finish``, the answer written to a transport that discards it: the whole
per-request path of the router's own code, with no I/O, timed per request (median of rounds).
Modes: the access log off (the default: one attribute check in ``finish``), and on, writing to
/dev/null from its thread (the loop's share: the entry, a timestamp, a deque append).

    python -m bench.access_log_cost [--requests 200000] [--rounds 7]
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time
from typing import Any

from router.balance.policies import make_policy
from router.control.access_log import JsonLinesAccessLog
from router.core.clock import ManualClock
from router.core.config import DispatchConfig, ListenerConfig
from router.core.types import BackendSpec
from router.dispatch.backends import Backend, Registry
from router.dispatch.request import Request
from router.dispatch.scheduler import Dispatcher
from router.dispatch.stats import DataPlaneStats
from router.protocol.frames import encode_frame
from router.protocol.session import TcpSession
from router.upstream.base import Attempt, ReplySink, RoomListener


class EchoUpstream:
    """Always room; every attempt answered with its payload before ``start`` returns."""

    on_room: RoomListener | None = None
    closed = False
    stalled = False

    def try_acquire(self) -> Any | None:
        return self

    def grow(self, wanted: int) -> None:
        raise AssertionError("never out of room")

    def start(self, lease: Any, request: Attempt, sink: ReplySink, timeout_s: float) -> None:
        sink(request, request.payload, None)

    def start_fresh(self, request: Attempt, sink: ReplySink, timeout_s: float) -> bool:
        return False

    def release(self, lease: Any, *, reusable: bool = True) -> None:
        pass

    def close(self) -> None:
        pass

    def statistics(self) -> dict[str, Any]:
        return {}


class NullTransport:
    def write(self, data: bytes, /) -> None:
        pass

    def writelines(self, parts: list[bytes], /) -> None:
        pass

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        pass

    def close(self) -> None:
        pass

    def abort(self) -> None:
        pass


def per_request_ns(access_log: JsonLinesAccessLog | None, requests: int) -> float:
    clock = ManualClock()
    registry = Registry()
    registry.add(Backend(BackendSpec(id="echo", address="127.0.0.1:9"), EchoUpstream()))
    dispatcher = Dispatcher(
        registry, make_policy("least_connections"), DispatchConfig(), clock, DataPlaneStats(),
        access_log=access_log,
    )
    session: TcpSession[Request] = TcpSession(
        NullTransport(), ListenerConfig(), 2.0, clock, Request, dispatcher.submit,
        peer=("127.0.0.1", 50000),
    )
    frame = encode_frame(b"x" * 64)
    data_received = session.data_received
    gc.collect()
    started = time.perf_counter_ns()
    for _ in range(requests):
        data_received(frame)
    elapsed = time.perf_counter_ns() - started
    assert dispatcher.stats.completed == requests
    return elapsed / requests


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=200_000)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args(argv)
    off: list[float] = []
    on: list[float] = []
    for _ in range(args.rounds):  # interleaved, so that drift on a shared machine hits both
        off.append(per_request_ns(None, args.requests))
        log = JsonLinesAccessLog("/dev/null", args.requests)
        log.start()
        on.append(per_request_ns(log, args.requests))
        log.close()
        assert log.dropped == 0
    for name, figures in (("off", off), ("on", on)):
        print(f"access log {name:3}: {statistics.median(figures):7.0f} ns/request "
              f"(median of {args.rounds}; min {min(figures):.0f}, max {max(figures):.0f})")


if __name__ == "__main__":
    main()
