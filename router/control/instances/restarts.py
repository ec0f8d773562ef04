"""When a replica that failed may start again, and whether it is crash-looping. Pure: the
caller passes the time.

A failure is anything that ends a replica it did not ask to end: an exit, a start that
failed or timed out, a restart forced by failed health checks. After one, the replica waits
``backoff_initial_s``, doubling with each further failure up to ``backoff_max_s`` (1 s to
60 s by default: a replica that exits at once is started 5 times in its first 30 s). The
doubling starts over once a replica has stayed up (ready) for ``backoff_max_s``.

``crash_loop_exits`` failures within ``crash_loop_window_s`` make it ``crash_loop``: from then
on every wait is ``backoff_max_s``, so a broken command never becomes a restart storm,
whatever the doubling would say. A replica leaves crash_loop once it has stayed up for a
whole window. Both conditions are read lazily, at the next failure or when asked, so no
timer is needed.
"""

from __future__ import annotations

from collections import deque
from typing import Any

from router.core.config import ManagerRestartConfig


class RestartTracker:
    def __init__(self, config: ManagerRestartConfig) -> None:
        self._config = config
        self._failures: deque[float] = deque()  # within the window, oldest first
        self._consecutive = 0  # failures since the replica last stayed up
        self._crash_loop = False
        self._up_since: float | None = None  # when it last became ready, while it is up
        self.failures_total = 0

    def up(self, now: float) -> None:
        """The replica is ready (started, or back after a failure)."""
        self._up_since = now

    def failed(self, now: float) -> float:
        """A failure at ``now``: the seconds to wait before the next start."""
        self._settle(now)
        self._up_since = None
        self.failures_total += 1
        c = self._config
        self._failures.append(now)
        while self._failures and self._failures[0] <= now - c.crash_loop_window_s:
            self._failures.popleft()
        if len(self._failures) >= c.crash_loop_exits:
            self._crash_loop = True
        delay = (c.backoff_max_s if self._crash_loop
                 else min(c.backoff_initial_s * 2 ** self._consecutive, c.backoff_max_s))
        self._consecutive += 1
        return delay

    def crash_loop(self, now: float) -> bool:
        self._settle(now)
        return self._crash_loop

    def _settle(self, now: float) -> None:
        """Forget what the time the replica has been up has made old."""
        if self._up_since is None:
            return
        uptime = now - self._up_since
        if uptime >= self._config.backoff_max_s:
            self._consecutive = 0
        if uptime >= self._config.crash_loop_window_s:
            self._crash_loop = False
            self._failures.clear()

    def statistics(self, now: float) -> dict[str, Any]:
        return {"failures_total": self.failures_total, "consecutive": self._consecutive,
                "crash_loop": self.crash_loop(now), "recent_failures": len(self._failures)}

    def __repr__(self) -> str:
        return (f"RestartTracker(consecutive={self._consecutive}, crash_loop={self._crash_loop}, "
                f"recent={len(self._failures)})")
