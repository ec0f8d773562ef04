"""Each replica's output (stdout and stderr, interleaved as written) in its own file, rotated
by size, read back by line ranges with Python slice semantics, and followed live.

``ReplicaLog`` is the file the launcher writes every output line to. It outlives the
replica's processes: a restarted replica appends to the same log (the launcher's ``close``
at the end of a process only closes the file descriptor; the next write reopens it). When a
write would take the file past ``max_bytes`` it is rotated first: ``i.log`` becomes
``i.log.1``, ``i.log.1`` becomes ``i.log.2``, and so on up to ``backups`` files; the oldest
is dropped. A line is never split across files.

Reading (``read_lines``) treats the backups, oldest first, then the current file, as one
sequence of lines and returns ``lines[start:end]`` exactly as Python slices a list
(half-open, negative indexes count from the end, out-of-range bounds clip), at most
``limit`` of them. It reads the files twice (count, then collect), holding only the answer.

Following: ``hold()`` stops writes reaching the file (they wait in memory) while a reader
takes its slice in a thread; ``follow()`` then subscribes, and ``release()`` writes what
waited, which the new follower hears. So a follower gets the slice and then every later
line, none twice and none missed. A follower that falls ``FOLLOW_BACKLOG`` lines behind is
ended, as is every follower when the log ends (its instance deleted).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

log = logging.getLogger(__name__)

FOLLOW_BACKLOG = 10_000  # lines a follower may be behind before it is ended
HOLD_LIMIT_BYTES = 4 * 1024 * 1024  # output kept in memory while a reader holds the file
MAX_LINES = 10_000  # lines one read answers at most


@dataclass(eq=False)
class Follower:
    lines: deque[str | None] = field(default_factory=deque)  # None: the follow has ended
    wakeup: asyncio.Event = field(default_factory=asyncio.Event)

    async def next_line(self) -> str | None:
        """The next line; None once the follow has ended."""
        while not self.lines:
            self.wakeup.clear()
            await self.wakeup.wait()
        return self.lines.popleft()

    def _put(self, line: str | None) -> None:
        self.lines.append(line)
        self.wakeup.set()


class ReplicaLog:
    """One replica's log file (the ``IO[bytes]`` the launcher writes lines to)."""

    def __init__(self, path: Path, max_bytes: int, backups: int) -> None:
        self.path = path
        self.name = str(path)
        self._max_bytes = max_bytes
        self._backups = backups
        self._file: IO[bytes] | None = None
        self._size = 0
        self._holds = 0
        self._held: list[bytes] = []
        self._held_bytes = 0
        self._followers: set[Follower] = set()
        self.ended = False
        self.write_errors = 0
        self.rotations = 0

    # -- the launcher's side --------------------------------------------------------------------

    def write(self, data: bytes) -> int:
        if self._holds and self._held_bytes + len(data) <= HOLD_LIMIT_BYTES:
            self._held.append(data)
            self._held_bytes += len(data)
            return len(data)
        self._write(data)
        return len(data)

    def _write(self, data: bytes) -> None:
        try:
            if self._file is None:
                self._open()
            if self._size and self._size + len(data) > self._max_bytes:
                self._rotate()
            assert self._file is not None
            self._file.write(data)
            self._file.flush()
            self._size += len(data)
        except OSError as exc:  # a full disk: the replica goes on, its output is not kept
            self.write_errors += 1
            if self.write_errors == 1:
                log.warning("cannot write %s (%s); output lost until it can", self.path, exc)
            self._close_file()
        self._tell(data)

    def flush(self) -> None:
        if self._file is not None:
            with contextlib.suppress(OSError):
                self._file.flush()

    def close(self) -> None:
        """The end of one process's output: the file is closed, the log goes on."""
        self._close_file()

    def _open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = self.path.open("ab")
        self._size = self._file.tell()

    def _rotate(self) -> None:
        self._close_file()
        if self._backups == 0:
            self.path.unlink(missing_ok=True)
        else:
            for k in range(self._backups - 1, 0, -1):
                older = self.backup(k)
                if older.exists():
                    os.replace(older, self.backup(k + 1))
            if self.path.exists():
                os.replace(self.path, self.backup(1))
        self.rotations += 1
        self._file = self.path.open("ab")
        self._size = 0

    def _close_file(self) -> None:
        if self._file is not None:
            with contextlib.suppress(OSError):
                self._file.close()
            self._file = None

    def backup(self, k: int) -> Path:
        return self.path.with_name(f"{self.path.name}.{k}")

    def paths(self) -> list[Path]:
        """The files of the log, oldest first (those that exist)."""
        candidates = [self.backup(k) for k in range(self._backups, 0, -1)] + [self.path]
        return [p for p in candidates if p.exists()]

    # -- followers -------------------------------------------------------------------------------

    def hold(self) -> None:
        self._holds += 1

    def release(self) -> None:
        self._holds -= 1
        if self._holds == 0:
            held, self._held, self._held_bytes = self._held, [], 0
            for data in held:
                self._write(data)

    def follow(self) -> Follower:
        follower = Follower()
        if self.ended:
            follower._put(None)
        else:
            self._followers.add(follower)
        return follower

    def unfollow(self, follower: Follower) -> None:
        self._followers.discard(follower)

    def _tell(self, data: bytes) -> None:
        if not self._followers:
            return
        text = data.decode(errors="replace").rstrip("\r\n")
        for follower in list(self._followers):
            if len(follower.lines) >= FOLLOW_BACKLOG:
                self._followers.discard(follower)
                follower._put(None)
            else:
                follower._put(text)

    def end(self) -> None:
        """The replica is gone for good: every follower ends, and the file is closed."""
        self.ended = True
        for follower in self._followers:
            follower._put(None)
        self._followers.clear()
        self._close_file()

    def statistics(self) -> dict[str, Any]:
        return {"path": self.name, "bytes": self._size, "rotations": self.rotations,
                "write_errors": self.write_errors, "followers": len(self._followers)}

    def __repr__(self) -> str:
        return f"ReplicaLog({self.name!r}, followers={len(self._followers)})"


# -- reading ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LineRange:
    lines: list[str]
    start: int  # the index of the first line returned, counted from the oldest line kept
    total: int  # lines in the log
    truncated: bool  # the range held more than ``limit`` lines: the first ``limit`` are here


def _lines(paths: list[Path]) -> Iterator[bytes]:
    """Every line of the files in turn; the last line of a file may lack its newline."""
    for path in paths:
        try:
            with path.open("rb") as file:
                yield from file
        except FileNotFoundError:  # rotated away between the listing and the read
            continue


def read_lines(paths: list[Path], start: int | None, end: int | None,
               limit: int = MAX_LINES) -> LineRange:
    """``lines[start:end]`` of the files (oldest first) as one list, at most ``limit``."""
    total = sum(1 for _ in _lines(paths))
    first, stop, _ = slice(start, end).indices(total)
    stop = max(first, stop)
    wanted = min(stop - first, limit)
    out: list[str] = []
    if wanted:
        for index, raw in enumerate(_lines(paths)):
            if index >= first:
                out.append(raw.decode(errors="replace").rstrip("\r\n"))
                if len(out) == wanted:
                    break
    return LineRange(out, first, total, truncated=stop - first > limit)
