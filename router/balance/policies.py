"""Balancing policies: pure functions over a snapshot of candidates.

A policy gets the candidates (already filtered to healthy backends the request has not tried),
their in-flight counts and weights, and an injected RNG; it returns an index. No I/O, no clock.
Ties are broken at random: with deterministic "first wins" tie-breaking, traffic at concurrency 1
(every backend at zero in flight) would all go to the first backend.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Protocol


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


def _load(candidate: Candidate) -> float:
    # +1 so that weight matters even at zero in flight: the next request's share is what counts.
    return (candidate.inflight + 1) / candidate.weight


def _total_weight(candidates: Sequence[Candidate]) -> int:
    return sum(c.weight for c in candidates)


def _index_at(candidates: Sequence[Candidate], point: int) -> int:
    """The candidate whose share of [0, total weight) contains ``point``."""
    for index, candidate in enumerate(candidates):
        if point < candidate.weight:
            return index
        point -= candidate.weight
    raise ValueError(f"point {point} is beyond the total weight")


class LeastConnections:
    """Weighted least-connections: lowest (in-flight + 1) / weight, random among ties."""

    name = "least_connections"

    def choose(self, candidates: Sequence[Candidate], rng: random.Random) -> int:
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
