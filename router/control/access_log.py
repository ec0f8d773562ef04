"""The access log: one JSON line per TCP request and per gRPC call, written off the event loop.

``write`` runs on the event loop, once per finished request (``router.dispatch.access``). It
stamps the wall-clock time and appends the entry to a bounded in-memory buffer, and never
blocks: when the buffer holds ``buffer_lines`` entries the new one is dropped and counted. A
writer thread owned by the log (QueueListener's shape) formats what has gathered and writes it
in one ``write`` per batch, then flushes, so a slow disk or a stdout nobody reads holds up the
thread, never the loop. The thread wakes when the buffer goes from empty to not empty (one
``Event.set`` per batch, not per line) and at least every ``FLUSH_INTERVAL_S`` otherwise: an
entry appended just as the thread finds the buffer empty waits at most that long.

``deque.append`` and ``popleft`` are atomic under the GIL, so the buffer needs no lock; the
counters are written by one thread each (``dropped_full`` by the loop, the others by the
writer).

A line: ``{"time": "2026-11-23T10:15:02.117Z", "front_door": "tcp", "client":
"127.0.0.1:50412", "method": null, "model": null, "backend": "127.0.0.1:9001", "status": "OK",
"error": null, "bytes_in": 512, "bytes_out": 512, "duration_ms": 0.412}``; docs/operations.md
describes every field.
"""

from __future__ import annotations

import collections
import datetime as dt
import errno
import logging
import sys
import threading
import time
from collections.abc import Callable
from typing import IO, Any

import orjson

from router.dispatch.access import AccessEntry, format_peer

log = logging.getLogger(__name__)

STDOUT = "-"
FLUSH_INTERVAL_S = 0.5  # longest an entry waits for the thread when the wakeup raced it
CLOSE_TIMEOUT_S = 5.0  # longest close() waits for the last lines to be written


class _Seconds:
    """The ISO 8601 spelling of the current second, kept: datetime takes ~2 us a line."""

    __slots__ = ("second", "text")

    def __init__(self) -> None:
        self.second = -1
        self.text = ""

    def stamp(self, wall_time: float) -> str:
        second = int(wall_time)
        if second != self.second:
            moment = dt.datetime.fromtimestamp(second, dt.UTC)
            self.second, self.text = second, moment.strftime("%Y-%m-%dT%H:%M:%S")
        return f"{self.text}.{int((wall_time - second) * 1000):03d}Z"


def format_line(wall_time: float, entry: AccessEntry, seconds: _Seconds | None = None) -> bytes:
    return orjson.dumps({
        "time": (seconds or _Seconds()).stamp(wall_time),
        "front_door": entry.front_door,
        "client": format_peer(entry.client),
        "method": entry.method,
        "model": entry.model,
        "backend": entry.backend,
        "status": entry.status,
        "error": entry.error,
        "bytes_in": entry.bytes_in,
        "bytes_out": entry.bytes_out,
        "duration_ms": round(entry.duration_s * 1000.0, 3),
    }) + b"\n"


class JsonLinesAccessLog:
    """``path``: a file, appended to (created if missing), or ``"-"`` for stdout."""

    def __init__(
        self, path: str, buffer_lines: int, wall_clock: Callable[[], float] = time.time
    ) -> None:
        if buffer_lines < 1:
            raise ValueError("buffer_lines must be at least 1")
        self.path = path
        self._capacity = buffer_lines
        self._wall_clock = wall_clock
        self._buffer: collections.deque[tuple[float, AccessEntry]] = collections.deque()
        self._wake = threading.Event()
        self._closing = False
        self._reopen = False
        self._file: IO[bytes] | None = None
        self._thread: threading.Thread | None = None
        self._seconds = _Seconds()  # the writer thread's
        self.written = 0
        self.dropped_full = 0  # the buffer was full
        self.dropped_unwritable = 0  # the file refused them
        self.write_errors = 0

    # -- the event loop's side -----------------------------------------------------------------

    def write(self, entry: AccessEntry) -> None:
        buffer = self._buffer
        if len(buffer) >= self._capacity or self._closing:
            self.dropped_full += 1
            return
        was_empty = not buffer
        buffer.append((self._wall_clock(), entry))
        if was_empty:
            self._wake.set()

    def start(self) -> None:
        """Open the file (``OSError`` if it cannot be) and start the writer thread."""
        self._file = self._open()
        self._thread = threading.Thread(
            target=self._run, name="access-log", daemon=True  # close() joins it
        )
        self._thread.start()

    def reopen(self) -> None:
        """Reopen the file before the next batch (after log rotation moved it away)."""
        self._reopen = True
        self._wake.set()

    def close(self) -> None:
        """Write what is buffered, stop the thread, close the file. Entries after this are
        dropped. Blocks up to ``CLOSE_TIMEOUT_S`` (the composition root runs it in a thread)."""
        self._closing = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(CLOSE_TIMEOUT_S)
            if self._thread.is_alive():
                log.warning("access log: %d lines still unwritten at exit", len(self._buffer))
                return  # the thread still holds the file; the process exit closes it
        self._close_file()

    # -- the writer thread ---------------------------------------------------------------------

    def _open(self) -> IO[bytes]:
        if self.path == STDOUT:
            return sys.stdout.buffer
        # Unbuffered: a batch is one write, and a failed one leaves nothing behind to be
        # written again later (or to fail again in close()).
        return open(self.path, "ab", buffering=0)

    def _close_file(self) -> None:
        file, self._file = self._file, None
        if file is not None and self.path != STDOUT:
            try:
                file.close()
            except OSError as exc:
                log.warning("access log: closing %s failed (%s)", self.path, exc.strerror)

    def _run(self) -> None:
        while True:
            self._wake.wait(FLUSH_INTERVAL_S)
            self._wake.clear()
            closing = self._closing  # read before draining: nothing is appended after it
            if self._reopen:
                self._reopen = False
                self._reopen_file()
            self._drain()
            if closing:
                return

    def _reopen_file(self) -> None:
        try:
            new = self._open()
        except OSError as exc:
            log.warning("access log: cannot reopen %s (%s); writing on to the old file",
                        self.path, exc.strerror)
            return
        self._close_file()
        self._file = new

    def _drain(self) -> None:
        buffer = self._buffer
        seconds = self._seconds
        lines: list[bytes] = []
        while buffer:
            wall_time, entry = buffer.popleft()
            lines.append(format_line(wall_time, entry, seconds))
        if not lines or self._file is None:
            return
        try:
            _write_all(self._file, b"".join(lines))
        except OSError as exc:
            if not self.write_errors:
                log.warning("access log: cannot write to %s (%s); lines are dropped until it "
                            "can", self.path, exc.strerror)
            self.write_errors += 1
            self.dropped_unwritable += len(lines)
            return
        self.written += len(lines)

    @property
    def dropped(self) -> int:
        return self.dropped_full + self.dropped_unwritable

    def statistics(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "written": self.written,
            "dropped": self.dropped,
            "buffered": len(self._buffer),
            "write_errors": self.write_errors,
        }

    def __repr__(self) -> str:
        return (f"JsonLinesAccessLog({self.path!r}, written={self.written}, "
                f"dropped={self.dropped})")


def _write_all(file: IO[bytes], data: bytes) -> None:
    """An unbuffered file may take part of a write; the rest follows."""
    view = memoryview(data)
    while view:
        written = file.write(view)
        if not written:
            raise OSError(errno.EIO, "the file took no bytes")
        view = view[written:]
    file.flush()
