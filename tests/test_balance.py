"""router.balance.policies: pure policies over a snapshot of candidates and an injected RNG."""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass

import pytest

from router.balance.policies import (
    SCAN_MAX,
    LeastConnections,
    Policy,
    PowerOfTwoChoices,
    RoundRobin,
    Snapshot,
    WeightedRandom,
    as_keyed,
    make_policy,
)


@dataclass(frozen=True)
class Cand:
    inflight: int = 0
    weight: int = 1


def _shares(policy: Policy, candidates: list[Cand], picks: int, seed: int = 7) -> list[float]:
    rng = random.Random(seed)
    counts = Counter(policy.choose(candidates, rng) for _ in range(picks))
    return [counts[i] / picks for i in range(len(candidates))]


# -- least connections ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("candidates", "expected"),
    [
        ([Cand(3), Cand(1), Cand(2)], 1),
        ([Cand(0), Cand(5)], 0),
        # loads are (inflight + 1) / weight
        ([Cand(4, weight=4), Cand(1, weight=1), Cand(0, weight=1)], 2),  # 1.25, 2.0, 1.0
        ([Cand(2, weight=4), Cand(0, weight=1)], 0),  # 0.75 < 1.0
        ([Cand(0, weight=1), Cand(0, weight=3)], 1),  # 1.0 vs 0.33: the heavier wins
        ([Cand(1, weight=1), Cand(1, weight=3)], 1),  # 2.0 vs 0.67
    ],
)
def test_least_connections_picks_lowest_load(candidates: list[Cand], expected: int) -> None:
    policy = LeastConnections()
    for seed in range(20):
        assert policy.choose(candidates, random.Random(seed)) == expected


def test_least_connections_breaks_ties_at_random() -> None:
    # Concurrency 1: every backend at zero in flight. "First wins" would send all to index 0.
    shares = _shares(LeastConnections(), [Cand(), Cand(), Cand()], 1000)
    for share in shares:
        assert 0.25 <= share <= 0.42, shares


def test_least_connections_ties_only_among_the_least_loaded() -> None:
    shares = _shares(LeastConnections(), [Cand(2), Cand(0), Cand(0)], 600)
    assert shares[0] == 0
    assert 0.4 <= shares[1] <= 0.6, shares


# -- round robin ------------------------------------------------------------------------------


def test_round_robin_weighted_counts_and_cycle() -> None:
    policy = RoundRobin()
    candidates = [Cand(weight=1), Cand(weight=2)]
    rng = random.Random(0)
    picks = [policy.choose(candidates, rng) for _ in range(30)]
    assert Counter(picks) == {0: 10, 1: 20}
    cycle = picks[:3]
    assert sorted(cycle) == [0, 1, 1]
    assert picks == cycle * 10


def test_round_robin_equal_weights_spreads_evenly() -> None:
    policy = RoundRobin()
    candidates = [Cand(), Cand(), Cand(), Cand()]
    rng = random.Random(0)
    picks = [policy.choose(candidates, rng) for _ in range(40)]
    assert Counter(picks) == {0: 10, 1: 10, 2: 10, 3: 10}
    assert picks[:4] == [0, 1, 2, 3]


def test_round_robin_ignores_load() -> None:
    policy = RoundRobin()
    candidates = [Cand(inflight=100), Cand(inflight=0)]
    rng = random.Random(0)
    assert [policy.choose(candidates, rng) for _ in range(4)] == [0, 1, 0, 1]


# -- weighted random --------------------------------------------------------------------------


def test_weighted_random_follows_weights() -> None:
    weights = [1, 2, 5]
    shares = _shares(WeightedRandom(), [Cand(weight=w) for w in weights], 3000)
    for share, weight in zip(shares, weights, strict=True):
        assert abs(share - weight / sum(weights)) <= 0.05, shares


def test_weighted_random_is_reproducible_with_a_seeded_rng() -> None:
    candidates = [Cand(), Cand(), Cand()]

    def run() -> list[int]:
        policy, rng = WeightedRandom(), random.Random(42)
        return [policy.choose(candidates, rng) for _ in range(50)]

    assert run() == run()


# -- power of two choices -----------------------------------------------------------------------


def test_power_of_two_avoids_the_more_loaded_of_two() -> None:
    # The loaded one wins only when both samples land on it: about 1/4 of picks.
    shares = _shares(PowerOfTwoChoices(), [Cand(inflight=5), Cand(inflight=0)], 200)
    assert shares[0] < 0.40, shares
    assert shares[1] > 0.60, shares


def test_power_of_two_shares_over_three_distinct_loads() -> None:
    # The most loaded wins only when both samples are it; the least loaded whenever sampled.
    candidates = [Cand(inflight=0), Cand(inflight=1), Cand(inflight=9)]
    shares = _shares(PowerOfTwoChoices(), candidates, 3000)
    assert abs(shares[2] - 1 / 9) <= 0.05, shares  # (1/3)**2
    assert abs(shares[0] - 5 / 9) <= 0.05, shares  # 1 - (2/3)**2


# -- large candidate lists ------------------------------------------------------------------------


class Counted:
    """A candidate that counts how often a policy reads it."""

    reads = 0

    def __init__(self, inflight: int = 0, weight: int = 1) -> None:
        self._inflight, self._weight = inflight, weight

    @property
    def inflight(self) -> int:
        Counted.reads += 1
        return self._inflight

    @property
    def weight(self) -> int:
        Counted.reads += 1
        return self._weight


@pytest.mark.parametrize("policy", [LeastConnections(), RoundRobin(), WeightedRandom(),
                                    PowerOfTwoChoices()], ids=lambda p: p.name)
def test_a_pick_over_a_thousand_candidates_reads_a_few_of_them(policy: Policy) -> None:
    # 1,000 backends: a pick per request must not look at each (765 us per request did).
    candidates = Snapshot(Counted(inflight=i % 3) for i in range(1000))
    rng = random.Random(3)
    policy.choose(candidates, rng)  # the first pick builds the cumulative weights, once
    Counted.reads = 0
    for _ in range(100):
        assert 0 <= policy.choose(candidates, rng) < 1000
    assert Counted.reads <= 100 * 4  # at most two candidates, load and weight


def test_weighted_picks_over_many_candidates_follow_the_weights() -> None:
    weights = [1, 2, 5, 1] * 10  # 40 > SCAN_MAX: bisected
    assert len(weights) > SCAN_MAX
    candidates = Snapshot(Cand(weight=w) for w in weights)
    shares = _shares(WeightedRandom(), candidates, 20_000)
    for kind in (1, 2, 5):
        share = sum(s for s, w in zip(shares, weights, strict=True) if w == kind)
        expected = kind * weights.count(kind) / sum(weights)
        assert abs(share - expected) <= 0.02, (kind, share, expected)


def test_round_robin_over_many_candidates_gives_each_its_weight_in_turn() -> None:
    weights = [(i % 4) + 1 for i in range(40)]
    policy, rng = RoundRobin(), random.Random(0)
    snapshot = Snapshot(Cand(weight=w) for w in weights)
    for candidates in (snapshot, list(snapshot)):
        picks = [policy.choose(candidates, rng) for _ in range(sum(weights))]
        expected = [i for i, w in enumerate(weights) for _ in range(w)]
        assert picks == expected


def test_least_connections_over_many_candidates_avoids_the_loaded_half() -> None:
    # The power of two choices: a loaded one wins only when both picks are loaded (1/4).
    candidates = Snapshot([Cand(inflight=9)] * 20 + [Cand(inflight=0)] * 20)
    shares = _shares(LeastConnections(), candidates, 4000)
    assert abs(sum(shares[:20]) - 0.25) <= 0.04, sum(shares[:20])


def test_least_connections_scans_exactly_up_to_scan_max() -> None:
    # At SCAN_MAX candidates the least loaded always wins, wherever it is.
    for where in range(SCAN_MAX):
        candidates = [Cand(inflight=3)] * SCAN_MAX
        candidates[where] = Cand(inflight=0)
        assert LeastConnections().choose(candidates, random.Random(where)) == where


# -- make_policy ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "cls"),
    [
        ("least_connections", LeastConnections),
        ("round_robin", RoundRobin),
        ("random", WeightedRandom),
        ("power_of_two_choices", PowerOfTwoChoices),
    ],
)
def test_make_policy_known_names(name: str, cls: type) -> None:
    policy = make_policy(name)
    assert isinstance(policy, cls)
    assert policy.name == name


def test_make_policy_returns_a_fresh_round_robin_each_time() -> None:
    a, b = make_policy("round_robin"), make_policy("round_robin")
    rng = random.Random(0)
    candidates = [Cand(), Cand()]
    assert a.choose(candidates, rng) == 0
    assert b.choose(candidates, rng) == 0


@pytest.mark.parametrize("name", ["least_connections", "round_robin", "random",
                                  "power_of_two_choices", "common_queue"])
def test_as_keyed_leaves_out_policies_without_place(name: str) -> None:
    assert as_keyed(make_policy(name)) is None


def test_as_keyed_takes_a_policy_with_a_name_and_place() -> None:
    hashing = make_policy("consistent_hash_bounded")
    assert as_keyed(hashing) is hashing

    class Nameless:
        def place(self) -> None: ...

    assert as_keyed(Nameless()) is None


def test_make_policy_unknown_name() -> None:
    with pytest.raises(ValueError, match="bogus"):
        make_policy("bogus")
