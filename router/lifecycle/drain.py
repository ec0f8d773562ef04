"""The drain coordinator: what happens between SIGTERM and exit.

Phases (shaped after uvicorn's and aiohttp's phased shutdown, with hypercorn's injectable
trigger so tests drive a drain without real signals):

1. every front door stops listening at once and shuts each client connection down at its next
   request boundary (after its last answer is flushed); readiness reports not-ready;
2. wait until every accepted request is answered and every connection has closed, or until
   ``grace_s`` has passed;
3. at the deadline, whatever is still unanswered is counted as dropped, logged, and its
   connections reset.

The caller closes the backend pools afterwards.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass
from typing import Protocol

from router.core.clock import Clock
from router.dispatch.scheduler import Dispatcher
from router.lifecycle.state import Lifecycle

log = logging.getLogger(__name__)


class DrainableFrontDoor(Protocol):
    def start_drain(self) -> None: ...

    async def wait_all_closed(self) -> None: ...

    def abort_all(self) -> int: ...


@dataclass(frozen=True, slots=True)
class DrainReport:
    duration_s: float
    dropped: int
    timed_out: bool


class DrainCoordinator:
    def __init__(
        self,
        front_doors: Sequence[DrainableFrontDoor],
        dispatcher: Dispatcher,
        lifecycle: Lifecycle,
        grace_s: float,
        clock: Clock,
    ) -> None:
        self._front_doors = front_doors
        self._dispatcher = dispatcher
        self._lifecycle = lifecycle
        self.grace_s = grace_s  # a reload may change it until the drain starts
        self._clock = clock
        self.report: DrainReport | None = None

    async def wait_and_drain(self, trigger: Awaitable[object]) -> DrainReport:
        await trigger
        return await self.drain()

    async def drain(self) -> DrainReport:
        started = self._clock.now()
        self._lifecycle.start_drain()
        log.info("drain started: grace %.1fs, %d in flight", self.grace_s,
                 self._dispatcher.stats.inflight)
        for front_door in self._front_doors:
            front_door.start_drain()
        timed_out = False
        try:
            async with asyncio.timeout(self.grace_s):
                await self._dispatcher.wait_zero()
                for front_door in self._front_doors:
                    await front_door.wait_all_closed()
        except TimeoutError:
            timed_out = True
        if timed_out:
            self._lifecycle.abandon()
        dropped = self._dispatcher.abandon()
        if dropped:
            log.error("drain deadline passed: %d accepted requests dropped", dropped)
        for front_door in self._front_doors:
            front_door.abort_all()
        self.report = DrainReport(self._clock.now() - started, dropped, timed_out)
        log.info("drain finished in %.3fs, dropped %d", self.report.duration_s, dropped)
        return self.report

    def __repr__(self) -> str:
        return f"DrainCoordinator({self._lifecycle.phase.value}, grace_s={self.grace_s})"
