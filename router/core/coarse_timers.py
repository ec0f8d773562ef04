"""Timers far from due, grouped into ticks: one event-loop timer for all of them.

Every open client connection keeps one timer armed (its idle deadline, ``idle_timeout_s``
away), and on uvloop each loop timer costs about 0.55 KiB (a ``TimerHandle``, its libuv
handle and the callback's references): a fifth of what an idle connection holds. Those
deadlines are seconds away and a fraction of a second of lateness changes nothing, so
``CoarseTimers`` keeps them as small entries in buckets of ``resolution_s`` and arms one timer
on the underlying clock, for the earliest bucket, as a timer wheel does (HAProxy and nginx keep
one tree of timers for the same reason). A deadline under ``exact_below_s`` away goes to the
underlying clock unchanged, so short timers (a frame held back taken "now", the linger) keep
their precision.

An entry fires at the end of its bucket: at most ``resolution_s`` late, never early. A
cancelled entry stays in its bucket until the bucket is due (no search on cancel); a session
cancels only when a sooner deadline replaces the armed one, so that stays a few per
connection at most. ``CoarseTimers`` is a ``Clock``: a component takes it where it took one.
"""

from __future__ import annotations

import heapq
import logging
import math

from router.core.clock import Callback, Clock, Timer

log = logging.getLogger(__name__)


class CoarseTimer:
    """An entry of a bucket: what ``call_at`` returns."""

    __slots__ = ("callback", "cancelled")

    def __init__(self, callback: Callback) -> None:
        self.callback = callback
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class CoarseTimers:
    """A ``Clock`` whose far timers share one timer of ``clock`` per bucket of ``resolution_s``."""

    __slots__ = ("_armed", "_armed_tick", "_buckets", "_clock", "_ticks", "exact_below_s",
                 "resolution_s")

    def __init__(self, clock: Clock, resolution_s: float = 0.25, exact_below_s: float = 1.0
                 ) -> None:
        if not 0 < resolution_s <= exact_below_s:
            raise ValueError("0 < resolution_s <= exact_below_s")
        self._clock = clock
        self.resolution_s = resolution_s
        self.exact_below_s = exact_below_s
        self._buckets: dict[int, list[CoarseTimer]] = {}
        self._ticks: list[int] = []  # heap of the buckets' ticks
        self._armed: Timer | None = None
        self._armed_tick = 0

    def now(self) -> float:
        return self._clock.now()

    def call_at(self, when: float, callback: Callback) -> Timer:
        clock = self._clock
        if when - clock.now() < self.exact_below_s:
            return clock.call_at(when, callback)
        tick = math.ceil(when / self.resolution_s)
        entry = CoarseTimer(callback)
        bucket = self._buckets.get(tick)
        if bucket is None:
            self._buckets[tick] = bucket = []
            heapq.heappush(self._ticks, tick)
            if self._armed is None or tick < self._armed_tick:
                self._arm(tick)
        bucket.append(entry)
        return entry

    @property
    def pending(self) -> int:
        """Entries neither fired nor cancelled (for tests and statistics)."""
        return sum(not e.cancelled for bucket in self._buckets.values() for e in bucket)

    def _arm(self, tick: int) -> None:
        if self._armed is not None:
            self._armed.cancel()
        self._armed_tick = tick
        self._armed = self._clock.call_at(tick * self.resolution_s, self._fire)

    def _fire(self) -> None:
        self._armed = None
        now = self._clock.now()
        ticks, buckets = self._ticks, self._buckets
        while ticks and ticks[0] * self.resolution_s <= now:
            for entry in buckets.pop(heapq.heappop(ticks)):
                if entry.cancelled:
                    continue
                entry.cancelled = True  # fired: a later cancel() is a no-op, as with asyncio
                try:
                    entry.callback()
                except Exception:  # one connection's bug must not stop the others' timers
                    log.exception("timer callback %r failed", entry.callback)
        if ticks:
            self._arm(ticks[0])

    def __repr__(self) -> str:
        return f"CoarseTimers(resolution_s={self.resolution_s}, buckets={len(self._buckets)})"
