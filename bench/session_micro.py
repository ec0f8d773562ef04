"""Micro-benchmark of ``TcpSession`` alone: nanoseconds per request, no sockets, no loop.

``python -m bench.session_micro [--batches 60] [--batch 20000]``

Two paths, each request answered inside ``submit`` (as a dispatcher that answers at once):

* ``whole``: one 64-byte frame per ``data_received``, the common path (the read budget is not
  involved);
* ``split``: the same frame in two reads, so it is partial once (charged to the read budget,
  then released).

Batches of the two paths are interleaved and the minimum over batches is reported, so that
noise from other processes on the machine hits both alike. Compare commits by running it at
each (or ``git stash``); differences below the spread of repeated runs are noise.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

from router.core.clock import ManualClock
from router.core.config import ListenerConfig
from router.core.errors import RouterError
from router.protocol.frames import encode_frame
from router.protocol.session import TcpSession


class _Transport:
    def write(self, data: bytes, /) -> None: ...
    def writelines(self, parts: list[bytes], /) -> None: ...
    def pause_reading(self) -> None: ...
    def resume_reading(self) -> None: ...
    def can_write_eof(self) -> bool:
        return True
    def write_eof(self) -> None: ...
    def close(self) -> None: ...
    def abort(self) -> None: ...


class _Request:
    __slots__ = ("accepted_at", "error", "origin", "payload", "response")

    def __init__(self, payload: bytes, origin: TcpSession[_Request], accepted_at: float) -> None:
        self.payload = payload
        self.origin = origin
        self.accepted_at = accepted_at
        self.response: bytes | None = None
        self.error: RouterError | None = None


def _answer_at_once(request: _Request) -> None:
    request.response = request.payload
    request.origin.request_done(request)


def _session() -> TcpSession[_Request]:
    return TcpSession(_Transport(), ListenerConfig(), 2.0, ManualClock(), _Request,
                      _answer_at_once)


def measure(batches: int, batch: int) -> dict[str, float]:
    frame = encode_frame(b"x" * 64)
    head, tail = frame[:10], frame[10:]
    whole, split = _session(), _session()

    def run_whole() -> None:
        feed = whole.data_received
        for _ in range(batch):
            feed(frame)

    def run_split() -> None:
        feed = split.data_received
        for _ in range(batch):
            feed(head)
            feed(tail)

    paths: dict[str, Callable[[], None]] = {"whole": run_whole, "split": run_split}
    best = dict.fromkeys(paths, float("inf"))
    for _ in range(batches):
        for name, run in paths.items():
            started = time.perf_counter_ns()
            run()
            best[name] = min(best[name], (time.perf_counter_ns() - started) / batch)
    return best


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.session_micro", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, default=60)
    parser.add_argument("--batch", type=int, default=20_000)
    args = parser.parse_args(argv)
    for name, ns in measure(args.batches, args.batch).items():
        print(f"{name:6} {ns:7.0f} ns per request (min of {args.batches} x {args.batch})")


if __name__ == "__main__":
    main()
