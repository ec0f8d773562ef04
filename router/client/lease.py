"""When a self-registering backend talks to its router, and what it says: sans-IO.

``LeaseSchedule`` is the backend's side of a lease as a state machine with no socket, no task
and no clock of its own: the driver (``router.client.registration``) asks ``next_step()``
for the next call and when to make it, makes it, and reports the outcome with the time it
came back (``registered``, ``renewed``, ``lease_lost``, ``failed``). Each report returns the
new ``state`` when it changed, so the driver logs once per change however long a router
stays down.

States and what moves them::

    state         next call                  registered  renewed  lease_lost   failed
    registering   register now               holding     -        -            unreachable*
    holding       heartbeat, interval after  holding     holding  registering  unreachable*
                  the last renewal
    unreachable   the failed call, after     holding     holding  registering  unreachable*
    refused       the backoff                holding     holding  registering  unreachable*

    * refused when the failure is a refusal (``permanent=True``)

- A heartbeat is due one interval after the last renewal: the router's
  ``heartbeat_interval_s`` (a third of the TTL) unless the caller named one.
- ``lease_lost`` (the router answered ``LEASE_NOT_FOUND``: it restarted, or the lease expired)
  makes the next call a registration, now: that is how a backend finds a restarted router.
- ``failed`` (router down, timeout, 5xx) retries the same call after a capped exponential
  ``Backoff`` with jitter, never sooner than ``min_s``, so a dead router never sees a tight
  loop. The delay is also capped at the heartbeat interval, so a router back from a restart
  hears from every backend within one interval. Once a whole TTL has passed since the last
  renewal the lease is gone anyway, and the retried call is a registration, not a heartbeat.
- A refusal (``permanent=True``: a 4xx other than ``LEASE_NOT_FOUND``, such as a bad token or
  a conflicting backend) is retried the same way, since an operator may fix it; its state is
  ``refused`` so the driver logs it as an error.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Literal

State = Literal["registering", "holding", "unreachable", "refused"]
Action = Literal["register", "heartbeat"]

DEFAULT_LEASE_TTL_S = 10.0  # the router's default too
HEARTBEATS_PER_TTL = 3  # a heartbeat every TTL/3: two may be lost before the lease expires


@dataclass(frozen=True, slots=True)
class Backoff:
    """Capped exponential backoff with jitter: the n-th retry in a row waits a draw from
    ``[(1 - jitter) * d, d]`` where ``d = min(initial_s * multiplier**(n-1), max_s)``, and
    never less than ``min_s``. Jitter keeps a fleet that lost its router at the same instant
    from coming back in lock step."""

    initial_s: float = 0.2
    max_s: float = 5.0
    multiplier: float = 2.0
    jitter: float = 0.5
    min_s: float = 0.05

    def __post_init__(self) -> None:
        if not 0 < self.min_s <= self.initial_s <= self.max_s:
            raise ValueError("backoff needs 0 < min_s <= initial_s <= max_s, got "
                             f"{self.min_s}, {self.initial_s}, {self.max_s}")
        if self.multiplier < 1 or not 0 <= self.jitter < 1:
            raise ValueError(f"backoff needs multiplier >= 1 and 0 <= jitter < 1, got "
                             f"{self.multiplier}, {self.jitter}")

    def delay(self, failures: int, rng: random.Random, cap_s: float | None = None) -> float:
        """The wait before retry number ``failures`` (1 = the first retry), at most ``cap_s``
        when given (but never below ``min_s``)."""
        if failures < 1:
            raise ValueError(f"failures counts from 1, got {failures}")
        # The exponent stops growing once the cap is reached: no float overflow after hours.
        ceiling = self.initial_s * self.multiplier ** min(failures - 1, 64)
        ceiling = min(ceiling, self.max_s, cap_s if cap_s is not None else self.max_s)
        return max(self.min_s, ceiling * (1.0 - self.jitter * rng.random()))


@dataclass(frozen=True, slots=True)
class Lease:
    """What the router answered a registration: the backend's id and its lease."""

    backend_id: str
    lease_ttl_s: float
    heartbeat_interval_s: float


@dataclass(frozen=True, slots=True)
class Step:
    """The next call to make, at ``at`` on the schedule's clock scale."""

    action: Action
    at: float


class LeaseSchedule:
    def __init__(self, now: float, *, lease_ttl_s: float = DEFAULT_LEASE_TTL_S,
                 heartbeat_interval_s: float | None = None, backoff: Backoff | None = None,
                 rng: random.Random | None = None) -> None:
        if not lease_ttl_s > 0:
            raise ValueError(f"lease_ttl_s must be > 0, got {lease_ttl_s}")
        if heartbeat_interval_s is not None and not 0 < heartbeat_interval_s < lease_ttl_s:
            raise ValueError(f"heartbeat_interval_s must be in (0, lease_ttl_s={lease_ttl_s}),"
                             f" got {heartbeat_interval_s}")
        self._ttl_s = lease_ttl_s
        self._interval_asked = heartbeat_interval_s
        self._backoff = backoff or Backoff()
        self._rng = rng or random.Random()
        self.state: State = "registering"
        self.lease: Lease | None = None  # the last lease the router granted
        self._renewed_at: float | None = None  # when that lease was last granted or renewed
        self._step = Step("register", now)
        self.failures = 0  # calls failed in a row
        self.last_error: str | None = None
        self.counts = {"registered": 0, "renewed": 0, "lease_lost": 0, "failed": 0}

    @property
    def interval_s(self) -> float:
        """The heartbeat interval: the caller's, else the router's, else TTL/3."""
        if self._interval_asked is not None:
            return self._interval_asked
        if self.lease is not None:
            return self.lease.heartbeat_interval_s
        return self._ttl_s / HEARTBEATS_PER_TTL

    def next_step(self) -> Step:
        return self._step

    def registered(self, now: float, lease: Lease) -> State | None:
        self.counts["registered"] += 1
        self.lease = lease
        return self._granted(now)

    def renewed(self, now: float) -> State | None:
        self.counts["renewed"] += 1
        return self._granted(now)

    def lease_lost(self, now: float) -> State | None:
        """The router holds no lease for us: register again, now."""
        self.counts["lease_lost"] += 1
        self.failures = 0
        self._renewed_at = None
        self._step = Step("register", now)
        return self._enter("registering")

    def failed(self, now: float, error: str, *, permanent: bool = False) -> State | None:
        """The call of ``next_step()`` got no usable answer: retry it after the backoff."""
        self.counts["failed"] += 1
        self.failures += 1
        self.last_error = error
        delay = self._backoff.delay(self.failures, self._rng, cap_s=self.interval_s)
        action: Action = "heartbeat" if self._holds(now) else "register"
        self._step = Step(action, now + delay)
        return self._enter("refused" if permanent else "unreachable")

    def _granted(self, now: float) -> State | None:
        self.failures = 0
        self.last_error = None
        self._renewed_at = now
        self._step = Step("heartbeat", now + self.interval_s)
        return self._enter("holding")

    def _holds(self, now: float) -> bool:
        """Whether the router may still hold our lease (renewed less than a TTL ago)."""
        if self._renewed_at is None or self.lease is None:
            return False
        return now - self._renewed_at < self.lease.lease_ttl_s

    def _enter(self, state: State) -> State | None:
        if state == self.state:
            return None
        self.state = state
        return state

    def statistics(self) -> dict[str, object]:
        return {"state": self.state, "backend_id": self.lease.backend_id if self.lease else None,
                "failures_in_a_row": self.failures, "last_error": self.last_error,
                "next": self._step.action, "next_at": self._step.at, **self.counts}

    def __repr__(self) -> str:
        return (f"LeaseSchedule(state={self.state}, next={self._step.action}@{self._step.at:.3f}"
                f", failures={self.failures})")
