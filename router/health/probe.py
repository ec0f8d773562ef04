"""What a prober is: the monitor's one interface to every way of asking a backend if it serves.

A pass of the monitor hands each prober the backends of its protocol. ``plan`` does the
prober's upkeep for the pass (expire pooled connections, close idle channels: probes do not
count as use, so this is what ages out a connection that only ever carries probes) and returns
the backends worth probing now; ``probe`` asks one of them and says what came back. A prober
never changes a backend's state: the monitor applies the result.

The three answers and what the monitor does with each:

* SERVING: a backend out of rotation comes back;
* NOT_SERVING: the backend itself says it does not serve (grpc.health): out at once;
* NO_ANSWER: refused, reset, timed out or garbled. Nothing changes: a backend in rotation is
  taken out by the requests that fail on it (passive ejection), not by one lost probe.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from router.dispatch.backends import Backend


class ProbeStatus(enum.Enum):
    SERVING = "serving"
    NOT_SERVING = "not_serving"
    NO_ANSWER = "no_answer"


@dataclass(frozen=True, slots=True)
class ProbeResult:
    status: ProbeStatus
    reason: str  # said in the log line of the state change it causes, if any

    @classmethod
    def serving(cls, reason: str) -> ProbeResult:
        return cls(ProbeStatus.SERVING, reason)

    @classmethod
    def not_serving(cls, reason: str) -> ProbeResult:
        return cls(ProbeStatus.NOT_SERVING, reason)

    @classmethod
    def no_answer(cls, reason: str) -> ProbeResult:
        return cls(ProbeStatus.NO_ANSWER, reason)


class Prober(Protocol):
    async def plan(self, backends: Sequence[Backend]) -> Sequence[Backend]:
        """This pass's upkeep over ``backends``; return the ones to probe now."""
        ...

    async def probe(self, backend: Backend) -> ProbeResult:
        """Ask ``backend`` whether it serves."""
        ...
