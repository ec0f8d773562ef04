"""Injectable monotonic time and timers, so deadline logic is tested without sleeping.

``Clock.call_at(when, callback)`` runs ``callback`` once the clock reads ``when`` or later and
returns a handle with ``cancel()``. ``MonotonicClock`` schedules on the event loop it is given
(this package stays free of asyncio: the loop is passed in by the composition root);
``ManualClock`` keeps its timers in a heap and runs the due ones, in deadline order, inside
``advance``, so a unit test moves time and sees every consequence without real waiting.
"""

from __future__ import annotations

import heapq
import itertools
import time
from collections.abc import Callable
from typing import Protocol


class TimerHandle(Protocol):
    def cancel(self) -> None: ...


class Clock(Protocol):
    def now(self) -> float:
        """Seconds on a monotonic scale."""
        ...

    def call_at(self, when: float, callback: Callable[[], None]) -> TimerHandle:
        """Run ``callback`` once ``now() >= when``."""
        ...


class Loop(Protocol):
    """The part of an event loop a clock schedules on."""

    def call_later(self, delay: float, callback: Callable[[], None]) -> TimerHandle: ...


class MonotonicClock:
    # The builtin itself rather than a method that calls it: the hot path reads the clock
    # several times per request.
    now = staticmethod(time.monotonic)

    def __init__(self, loop: Loop) -> None:
        self._loop = loop

    def call_at(self, when: float, callback: Callable[[], None]) -> TimerHandle:
        return self._loop.call_later(max(when - time.monotonic(), 0.0), callback)

    def __repr__(self) -> str:
        return "MonotonicClock()"


class _ManualTimer:
    __slots__ = ("callback", "cancelled", "when")

    def __init__(self, when: float, callback: Callable[[], None]) -> None:
        self.when = when
        self.callback = callback
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class ManualClock:
    """A clock that moves only when told to; for tests."""

    def __init__(self, start: float = 1000.0) -> None:
        self._now = start
        self._timers: list[tuple[float, int, _ManualTimer]] = []
        self._order = itertools.count()

    def now(self) -> float:
        return self._now

    def call_at(self, when: float, callback: Callable[[], None]) -> TimerHandle:
        timer = _ManualTimer(when, callback)
        heapq.heappush(self._timers, (when, next(self._order), timer))
        return timer

    def advance(self, seconds: float) -> None:
        """Move time forward, running every timer that falls due on the way, in deadline
        order, with ``now()`` reading each timer's own deadline while it runs (a timer armed
        by a callback for a moment inside the span runs too)."""
        if seconds < 0:
            raise ValueError("a clock does not go backwards")
        target = self._now + seconds
        while self._timers and self._timers[0][0] <= target:
            when, _, timer = heapq.heappop(self._timers)
            if timer.cancelled:
                continue
            self._now = max(self._now, when)
            timer.callback()
        self._now = target

    @property
    def pending_timers(self) -> int:
        return sum(1 for _, _, timer in self._timers if not timer.cancelled)

    def __repr__(self) -> str:
        return f"ManualClock(now={self._now}, timers={self.pending_timers})"
