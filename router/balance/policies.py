"""Balancing policies: pure functions over a snapshot of candidates.

A policy gets the candidates (already filtered to healthy backends the request has not tried),
their in-flight counts and weights, and an injected RNG; it returns an index. No I/O, no clock.
Ties are broken at random: with deterministic "first wins" tie-breaking, traffic at concurrency 1
(every backend at zero in flight) would all go to the first backend.

Large candidate lists. A policy runs once per request, so its cost must not grow with the
fleet: up to ``SCAN_MAX`` candidates each policy looks at every one (exact, and cheapest at
that size); beyond it, a weighted pick is a bisection of the cumulative weights, and least
connections becomes the power of two choices (the less loaded of two weighted random picks,
as Envoy's least_request does with equal weights), so a pick costs O(log n), not O(n): the
exact scan with its random tie-break measured 765 us per request over 1,000 backends, against
24 us over 2. The cumulative weights are computed once per ``Snapshot``, the registry's
candidate list, which is rebuilt rather than modified whenever a backend joins, leaves, or
changes weight or health; any other sequence gets them computed on each pick.
"""

from __future__ import annotations

import bisect
import itertools
import random
from collections.abc import Iterable, Sequence
from typing import Protocol, TypeVar


class Candidate(Protocol):
    @property
    def inflight(self) -> int: ...

    @property
    def weight(self) -> int: ...


class Policy(Protocol):
    name: str

    def choose(self, candidates: Sequence[Candidate], rng: random.Random) -> int:
        """Index of the chosen candidate; ``candidates`` is never empty."""
        ...


# Up to this many candidates a policy scans them all; beyond it, picks bisect (module
# docstring). 16: a scan of 16 costs about what two bisections and their random draws do.
SCAN_MAX = 16

C = TypeVar("C", bound=Candidate)


class Snapshot(list[C]):
    """Candidates that are not modified while in use (the registry's candidate lists), with
    their cumulative weights computed on first use and kept."""

    __slots__ = ("_cumulative",)

    def __init__(self, candidates: Iterable[C] = ()) -> None:
        super().__init__(candidates)
        self._cumulative: list[int] | None = None

    @property
    def cumulative_weights(self) -> list[int]:
        if self._cumulative is None:
            self._cumulative = list(itertools.accumulate(c.weight for c in self))
        return self._cumulative


def _cumulative_weights(candidates: Sequence[Candidate]) -> list[int]:
    if isinstance(candidates, Snapshot):
        return candidates.cumulative_weights
    return list(itertools.accumulate(c.weight for c in candidates))


def _load(candidate: Candidate) -> float:
    # +1 so that weight matters even at zero in flight: the next request's share is what counts.
    return (candidate.inflight + 1) / candidate.weight


def _total_weight(candidates: Sequence[Candidate]) -> int:
    if len(candidates) > SCAN_MAX:
        return _cumulative_weights(candidates)[-1]
    return sum(c.weight for c in candidates)


def _index_at(candidates: Sequence[Candidate], point: int) -> int:
    """The candidate whose share of [0, total weight) contains ``point``."""
    if len(candidates) > SCAN_MAX:
        cumulative = _cumulative_weights(candidates)
        if 0 <= point < cumulative[-1]:
            return bisect.bisect_right(cumulative, point)
        raise ValueError(f"point {point} is beyond the total weight")
    for index, candidate in enumerate(candidates):
        if point < candidate.weight:
            return index
        point -= candidate.weight
    raise ValueError(f"point {point} is beyond the total weight")


class LeastConnections:
    """Weighted least-connections: lowest (in-flight + 1) / weight, random among ties; over
    more than ``SCAN_MAX`` candidates, the power of two choices (module docstring)."""

    name = "least_connections"

    def __init__(self) -> None:
        self._sampled = PowerOfTwoChoices()

    def choose(self, candidates: Sequence[Candidate], rng: random.Random) -> int:
        if len(candidates) > SCAN_MAX:
            return self._sampled.choose(candidates, rng)
        best = 0
        first = candidates[0]
        best_load = (first.inflight + 1) / first.weight  # _load, inlined: runs per request
        ties = 1
        for index in range(1, len(candidates)):
            candidate = candidates[index]
            load = (candidate.inflight + 1) / candidate.weight
            if load < best_load:
                best, best_load, ties = index, load, 1
            elif load == best_load:
                # Reservoir sampling: each tied candidate ends up chosen with probability 1/ties.
                ties += 1
                if rng.randrange(ties) == 0:
                    best = index
        return best


class RoundRobin:
    """Weighted round robin: each candidate gets ``weight`` consecutive turns per cycle.

    The cursor is the policy's only state; it advances by one per choice.
    """

    name = "round_robin"

    def __init__(self) -> None:
        self._cursor = 0

    def choose(self, candidates: Sequence[Candidate], rng: random.Random) -> int:
        slot = self._cursor % _total_weight(candidates)
        self._cursor += 1
        return _index_at(candidates, slot)


class WeightedRandom:
    name = "random"

    def choose(self, candidates: Sequence[Candidate], rng: random.Random) -> int:
        return _index_at(candidates, rng.randrange(_total_weight(candidates)))


class PowerOfTwoChoices:
    """Two candidates at random (weighted), the less loaded of them wins."""

    name = "power_of_two_choices"

    def __init__(self) -> None:
        self._random = WeightedRandom()

    def choose(self, candidates: Sequence[Candidate], rng: random.Random) -> int:
        first = self._random.choose(candidates, rng)
        second = self._random.choose(candidates, rng)
        return first if _load(candidates[first]) <= _load(candidates[second]) else second


def make_policy(name: str) -> Policy:
    policies: dict[str, type[Policy]] = {
        "least_connections": LeastConnections,
        "round_robin": RoundRobin,
        "random": WeightedRandom,
        "power_of_two_choices": PowerOfTwoChoices,
    }
    try:
        return policies[name]()
    except KeyError:
        raise ValueError(f"unknown policy {name!r}; choose one of {sorted(policies)}") from None
