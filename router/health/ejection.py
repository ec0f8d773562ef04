"""Passive outlier ejection: ``failure_threshold`` consecutive failed attempts on a backend
(refused connects, resets, timeouts) take it out of rotation; any success resets the streak.

Without this rule a dead backend keeps its share of traffic: a backend that fails fast always
has the fewest requests in flight, so least-connections prefers it. The counting happens on the
hot path in ``Backend.record_success``/``record_failure``; the backend tells this object of each
failure (``Registry(on_failure=...)``), which decides. Active probes bring the backend back.
"""

from __future__ import annotations

from router.dispatch.backends import Backend


class PassiveEjection:
    def __init__(self, failure_threshold: int) -> None:
        if failure_threshold < 1:
            raise ValueError("failure_threshold must be at least 1")
        self.failure_threshold = failure_threshold
        self.ejected = 0

    def __call__(self, backend: Backend) -> None:
        """A failed attempt on ``backend``; its streak is ``consecutive_failures``."""
        streak = backend.consecutive_failures
        if backend.healthy and streak >= self.failure_threshold:
            self.ejected += 1
            backend.mark_down(f"ejected after {streak} consecutive failures")

    def statistics(self) -> dict[str, int]:
        return {"failure_threshold": self.failure_threshold, "ejected": self.ejected}

    def __repr__(self) -> str:
        return f"PassiveEjection(after {self.failure_threshold} failures, ejected={self.ejected})"
