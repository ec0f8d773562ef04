"""Injectable monotonic time and timers, so deadline logic is tested without sleeping.

A ``Clock`` tells the time (``now``) and runs a callback once a deadline on that same scale has
passed (``call_at``). ``MonotonicClock`` is the real one: ``time.monotonic`` and timers on the
running event loop. ``ManualClock`` moves only when a test says so, and ``advance`` runs every
timer that fell due, in deadline order, so a test drives timeouts without sleeping and without
calling a component's internals.

This module stays free of asyncio (``core`` is pure): the real clock is handed the function that
finds the running loop (``asyncio.get_running_loop``) by the composition root.
"""

from __future__ import annotations

import heapq
import itertools
import time
from collections.abc import Callable
from typing import Protocol

from mypy_extensions import mypyc_attr

Callback = Callable[[], object]


class Timer(Protocol):
    """What ``call_at`` returns: a timer that can be cancelled before it fires."""

    def cancel(self) -> None: ...


class Clock(Protocol):
    def now(self) -> float:
        """Seconds on a monotonic scale."""
        ...

    def call_at(self, when: float, callback: Callback) -> Timer:
        """Run ``callback()`` once ``now()`` has reached ``when`` (at once if it already has)."""
        ...


class EventLoop(Protocol):
    """The part of an asyncio event loop that ``MonotonicClock`` uses."""

    def call_later(self, delay: float, callback: Callback, /) -> Timer: ...


@mypyc_attr(native_class=False)  # keeps now the builtin itself (a native class would wrap it)
class MonotonicClock:
    """``time.monotonic``, with timers on the event loop that is running when they are set."""

    # The builtin itself rather than a method that calls it: the hot path reads the clock
    # several times per request.
    now = staticmethod(time.monotonic)

    def __init__(self, running_loop: Callable[[], EventLoop]) -> None:
        self._running_loop = running_loop

    def call_at(self, when: float, callback: Callback) -> Timer:
        # The loop's own time() is another scale (uvloop's is libuv's cached millisecond
        # clock), so the deadline goes over as a delay from our now.
        return self._running_loop().call_later(max(when - time.monotonic(), 0.0), callback)

    def __repr__(self) -> str:
        return "MonotonicClock()"


class _ManualTimer:
    __slots__ = ("callback", "cancelled", "when")

    def __init__(self, when: float, callback: Callback) -> None:
        self.when = when
        self.callback = callback
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class ManualClock:
    """A clock that moves only when told to; for tests.

    ``advance(seconds)`` moves time forward in steps, to each pending timer's deadline in turn
    (deadline order, ties in the order they were set), running that timer's callback with
    ``now()`` equal to its deadline; a callback may set further timers, and those that fall due
    within the advanced span run too. Time then rests at the end of the span.
    """

    # A callback that keeps re-arming itself at the current instant would never let
    # ``advance`` return; this many callbacks in one call is taken to be that bug.
    MAX_CALLBACKS_PER_ADVANCE = 100_000

    def __init__(self, start: float = 1000.0) -> None:
        self._now = start
        self._timers: list[tuple[float, int, _ManualTimer]] = []
        self._order = itertools.count()

    def now(self) -> float:
        return self._now

    def call_at(self, when: float, callback: Callback) -> Timer:
        timer = _ManualTimer(when, callback)
        heapq.heappush(self._timers, (when, next(self._order), timer))
        return timer

    def advance(self, seconds: float) -> int:
        """Move time forward by ``seconds`` (0 runs what is due now); return the callbacks run."""
        if not seconds >= 0:
            raise ValueError(f"a clock does not go backwards (advance({seconds}))")
        end = self._now + seconds
        timers = self._timers
        ran = 0
        while timers and timers[0][0] <= end:
            _, _, timer = heapq.heappop(timers)
            if timer.cancelled:
                continue
            if ran >= self.MAX_CALLBACKS_PER_ADVANCE:
                raise RuntimeError(f"over {ran} timer callbacks in one advance: a timer loop")
            self._now = max(self._now, timer.when)
            timer.cancelled = True  # fired: a later cancel() is a no-op, as with asyncio
            timer.callback()
            ran += 1
        self._now = end
        return ran

    @property
    def pending_timers(self) -> int:
        """Timers set and neither fired nor cancelled."""
        return sum(1 for _, _, timer in self._timers if not timer.cancelled)

    def next_deadline(self) -> float | None:
        """The earliest deadline among pending timers, or None."""
        live = [when for when, _, timer in self._timers if not timer.cancelled]
        return min(live) if live else None

    def __repr__(self) -> str:
        return f"ManualClock(now={self._now}, timers={self.pending_timers})"
