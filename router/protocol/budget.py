"""The read budget: one bound on the bytes of partly read frames across all client connections.

A client connection holds a partly read frame in its ``FrameDecoder`` until the rest arrives,
so without a bound a few thousand connections that each start a large frame and trickle the
rest hold gigabytes (``listener.max_frame_bytes`` each). ``ReadBudget`` is shared by every
``TcpSession`` of a front door and keeps what they hold within ``limit`` bytes
(``listener.max_buffered_bytes``). Sans-IO: sessions report what their decoder holds, the
budget answers, and tells other sessions through two callbacks when their turn comes.

What a session is charged (``charge(member, size, held)``):

* a frame whose length word is in and whose body is not: its whole ``size``, reserved when it
  fits, so that once a frame is admitted it can always be read to its end (``GRANTED``). A
  frame that does not fit *waits* (``WAITING``): its connection stops being read, and it is
  charged only the ``held`` bytes already read (one read, at most 256 KB under uvloop). Room
  that frees up goes to the waiting frames that need the least more of it first (``size -
  held``; ties: longest waiting), so a small frame split across two reads is not stuck behind
  large ones, and while the first in line does not fit no other does. Each is told
  ``budget_granted`` and reading resumes.
* a frame larger than ``limit`` can never fit: ``TOO_LARGE`` (FRAME_TOO_LARGE to the client).
* bytes that are no frame being read (whole frames held back past ``max_pipelined``: the
  connection is paused already): ``size`` 0, charged as they are, never refused.

Waiting and held-back bytes are already in memory, so they may push ``used`` past ``limit``.
Then the budget takes bytes back from the connections that hold the most of them (never from
an admitted frame): each is told ``budget_shed``, drops what it holds unread and answers
OVERLOADED (the frame was not accepted, so the client may send it again). Hence at any moment
``used <= limit`` plus the one read that is being charged.

A member's own outcome is returned, never called back, even when the room it frees or takes
changes it during the same call.

Bookkeeping: admitted frames in one dict (member -> size: the common case costs two dict
operations); waiting frames and held-back bytes in another, with two heaps (waiting frames by
the room they need, least first; what may be shed by charge, largest first) whose stale
entries are skipped by sequence number and rebuilt when they outnumber the live records.
"""

from __future__ import annotations

import enum
import heapq
import itertools
from typing import Any, Protocol


class Outcome(enum.Enum):
    GRANTED = "granted"  # charged; go on reading
    WAITING = "waiting"  # the frame does not fit yet: stop reading until ``budget_granted``
    TOO_LARGE = "too large"  # the frame can never fit: refuse it
    SHED = "shed"  # the budget took back what the member holds: drop it, refuse the frame


# Module constants: an Enum member read through its class costs ~150 ns in CPython 3.11.
GRANTED, WAITING, TOO_LARGE, SHED = Outcome


class Member(Protocol):
    """A connection the budget can call back (a ``TcpSession``)."""

    def budget_granted(self) -> None:
        """Its waiting frame is admitted now: resume reading."""

    def budget_shed(self) -> None:
        """What it holds is taken back: drop it unread and refuse the frame."""


class _Held:
    """What a member holds that is no admitted frame: a waiting frame, or held-back bytes."""

    __slots__ = ("charge", "seq", "size")

    def __init__(self, charge: int, size: int, seq: int) -> None:
        self.charge = charge  # bytes counted in ``used``: those already read
        self.size = size  # the waiting frame's whole size (0: held-back bytes, no frame)
        self.seq = seq  # identifies the heap entries that still describe this record


class ReadBudget:
    __slots__ = (
        "_admitted", "_held", "_seq", "_sheddable", "_waiting", "limit", "peak", "shed_total",
        "too_large_total", "used", "waits_total",
    )

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError(f"limit must be >= 1, got {limit}")
        self.limit = limit
        self.used = 0
        self.peak = 0
        self.waits_total = 0
        self.shed_total = 0
        self.too_large_total = 0
        self._admitted: dict[Member, int] = {}  # member -> the size of its admitted frame
        self._held: dict[Member, _Held] = {}
        # (room it still needs, seq, member): the least first
        self._waiting: list[tuple[int, int, Member]] = []
        self._sheddable: list[tuple[int, int, Member]] = []  # (-charge, seq, member)
        self._seq = itertools.count()

    def charge(self, member: Member, size: int, held: int) -> Outcome:
        """``member`` now holds ``held`` bytes: part of a frame of ``size`` bytes in all, or,
        with ``size`` 0, bytes that are no frame being read. Replaces its earlier charge."""
        dropped = self._drop(member)
        if size > self.limit:
            self.too_large_total += 1
            if dropped and self._waiting:
                self._grant(member)
            return TOO_LARGE
        used = self.used
        if size and used + size <= self.limit:
            # The common case (a large frame, room to spare): no heap, no callback.
            self._admitted[member] = size
            self.used = used = used + size
            if used > self.peak:
                self.peak = used
            if dropped and self._waiting:
                self._grant(member)  # its earlier frame may have been larger
            return GRANTED
        seq = next(self._seq)
        self._held[member] = _Held(held, size, seq)
        if size:
            self.waits_total += 1
            heapq.heappush(self._waiting, (size - held, seq, member))
        heapq.heappush(self._sheddable, (-held, seq, member))
        self.used = used = used + held
        if used > self.peak:
            self.peak = used
        if used > self.limit:
            self._shed(member)
        self._grant(member)
        record = self._held.get(member)
        if record is not None:
            return WAITING if record.size else GRANTED
        return GRANTED if member in self._admitted else SHED

    def release(self, member: Member) -> None:
        """``member`` holds nothing any more (its frame is whole, or its input is over)."""
        if self._drop(member) and self._waiting:
            self._grant(None)

    def _drop(self, member: Member) -> bool:
        size = self._admitted.pop(member, None)
        if size is not None:
            self.used -= size
            return True
        record = self._held.pop(member, None)
        if record is None:
            return False
        self.used -= record.charge
        return True

    def _grant(self, caller: Member | None) -> None:
        """Admit waiting frames, those needing the least room first, while they fit; ``caller``
        learns its own outcome from its return value instead of a callback."""
        waiting, held = self._waiting, self._held
        while waiting:
            needed, seq, member = waiting[0]
            record = held.get(member)
            if record is None or record.seq != seq:
                heapq.heappop(waiting)  # stale: released, shed or charged again since
                continue
            if self.used + needed > self.limit:
                break
            heapq.heappop(waiting)
            del held[member]
            self._admitted[member] = record.size
            self.used += needed
            self.peak = max(self.peak, self.used)
            if member is not caller:
                member.budget_granted()
        self._compact()

    def _shed(self, caller: Member) -> None:
        """Take back bytes that are no admitted frame, largest holder first, until ``used`` is
        within ``limit``; ``caller``, if shed, learns it from its return value."""
        sheddable, held = self._sheddable, self._held
        while self.used > self.limit and sheddable:
            _, seq, member = heapq.heappop(sheddable)
            record = held.get(member)
            if record is None or record.seq != seq:
                continue  # stale: released, admitted or charged again since
            del held[member]
            self.used -= record.charge
            self.shed_total += 1
            if member is not caller:
                member.budget_shed()

    def _compact(self) -> None:
        """Rebuild the heaps once stale entries outnumber the live records (memory stays
        proportional to the connections holding bytes)."""
        held = self._held
        if len(self._waiting) + len(self._sheddable) <= 2 * len(held) + 64:
            return
        self._waiting = [(r.size - r.charge, r.seq, m) for m, r in held.items() if r.size]
        self._sheddable = [(-r.charge, r.seq, m) for m, r in held.items()]
        heapq.heapify(self._waiting)
        heapq.heapify(self._sheddable)

    def statistics(self) -> dict[str, Any]:
        return {
            "limit_bytes": self.limit,
            "used_bytes": self.used,
            "peak_bytes": self.peak,
            "frames_admitted": len(self._admitted),
            "frames_waiting": sum(1 for r in self._held.values() if r.size),
            "waits_total": self.waits_total,
            "shed_total": self.shed_total,
            "too_large_total": self.too_large_total,
        }

    def __repr__(self) -> str:
        members = len(self._admitted) + len(self._held)
        return f"ReadBudget(used={self.used}, limit={self.limit}, members={members})"
