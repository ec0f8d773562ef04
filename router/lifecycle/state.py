"""The router's lifecycle: serving, then draining, then (if the grace period runs out) abandoned.

One object, read by everything that behaves differently during a drain: the front doors (stop
accepting, close at request boundaries, refuse new gRPC calls), readiness (not ready from the
first moment of a drain) and the gRPC handlers (a call cancelled after abandonment is answered
DROPPED). Phases only move forward.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Callable

log = logging.getLogger(__name__)


class Phase(enum.Enum):
    SERVING = "serving"
    DRAINING = "draining"  # no new connections or calls; accepted requests finish
    ABANDONED = "abandoned"  # the grace period ran out: what is left was counted dropped


class Lifecycle:
    def __init__(self) -> None:
        self.phase = Phase.SERVING
        self._listeners: list[Callable[[Phase], None]] = []

    @property
    def draining(self) -> bool:
        """True from the start of a drain on (abandoned included)."""
        return self.phase is not Phase.SERVING

    @property
    def abandoned(self) -> bool:
        return self.phase is Phase.ABANDONED

    def add_listener(self, listener: Callable[[Phase], None]) -> None:
        """``listener(phase)`` on every move to a later phase."""
        self._listeners.append(listener)

    def start_drain(self) -> None:
        self._move(Phase.DRAINING)

    def abandon(self) -> None:
        self._move(Phase.ABANDONED)

    def _move(self, phase: Phase) -> None:
        order = list(Phase)
        if order.index(phase) <= order.index(self.phase):
            return
        self.phase = phase
        for listener in list(self._listeners):
            listener(phase)

    def __repr__(self) -> str:
        return f"Lifecycle({self.phase.value})"
