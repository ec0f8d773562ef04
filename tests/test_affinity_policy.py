"""router.balance.affinity, residency and the hashing policies: pure, on a ManualClock and a
seeded RNG. Every branch of the affinity policy's decision has a test here."""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bench.affinity_sim import RUNS, simulate
from router.balance.affinity import AffinityPolicy, AffinitySettings, Placement
from router.balance.policies import CommonQueue, ConsistentHashBounded, make_policy
from router.balance.residency import LOADED, LOADING, PENDING, ResidencyView
from router.core.clock import ManualClock

SERVICE_S, LOAD_S = 0.05, 1.0


@dataclass
class Cand:
    id: str
    inflight: int = 0
    weight: int = 1


def make(slots: int = 2, concurrency: int = 1, **settings: float) -> tuple[
        AffinityPolicy, ManualClock]:
    clock = ManualClock()
    options: dict[str, Any] = {"load_s": LOAD_S, "service_s": SERVICE_S,
                               "min_residency_s": 5.0, **settings}
    policy = AffinityPolicy(ResidencyView(slots, concurrency), AffinitySettings(**options),
                            clock.now)
    return policy, clock


def place(policy: AffinityPolicy, model: str | None, cands: list[Cand],
          rng: random.Random | None = None) -> tuple[Cand, Placement]:
    """Place and count it in flight on the chosen candidate, as the scheduler does."""
    index, token = policy.place(model, model, cands, rng or random.Random(1))
    assert isinstance(token, Placement)
    cands[index].inflight += 1
    return cands[index], token


def serve(policy: AffinityPolicy, clock: ManualClock, cand: Cand, token: Placement,
          seconds: float) -> None:
    """Start it now, answer it ``seconds`` later."""
    token.started(clock.now())
    clock.advance(seconds)
    token.done(True, clock.now())
    cand.inflight -= 1


def warm(policy: AffinityPolicy, clock: ManualClock, cand: Cand, model: str) -> None:
    """``model`` loaded on ``cand`` (the backend's report), last used now."""
    view = policy.view
    view.report(cand.id, [*[m for m in view.models_of(cand.id) if m != model], model],
                clock.now())


# -- hit ----------------------------------------------------------------------------------------


def test_hit_goes_to_the_holder_that_can_start_now() -> None:
    policy, clock = make()
    a, b, c = Cand("a"), Cand("b"), Cand("c")
    warm(policy, clock, b, "m")
    chosen, token = place(policy, "m", [a, b, c])
    assert chosen is b and token.reason == "hit" and token.outcome == "hit"


def test_hit_prefers_the_same_holder_in_any_candidate_order_in_any_router() -> None:
    """Two routers (two policies) with the candidates listed differently pick alike."""
    picks = set()
    for order in (["a", "b", "c", "d"], ["d", "c", "b", "a"], ["b", "d", "a", "c"]):
        policy, clock = make()
        cands = [Cand(i) for i in order]
        for cand in cands:
            warm(policy, clock, cand, "m")
        picks.add(place(policy, "m", cands)[0].id)
    assert len(picks) == 1


def test_bounded_load_spreads_a_hot_model_over_its_active_copies() -> None:
    # Demand for 4 backends' worth of work: every holder is an active copy.
    policy, clock = make(concurrency=8, demand_window_s=1.0)
    cands = [Cand(i) for i in "abcd"]
    for cand in cands:
        warm(policy, clock, cand, "m")
    for _ in range(400):  # 400 arrivals within the window, each 0.05 s of work: 20 busy
        policy._arrived("m", clock.now())
    assert policy.copies_wanted("m", clock.now()) >= 4
    for placed in range(1, 33):  # as many as the four copies start at once
        _, token = place(policy, "m", cands)
        assert token.outcome == "hit"  # the preferred copy, or another that can start
        # c = 1.25: no copy ever above ceil(1.25 x the mean), the new request counted.
        assert max(c.inflight for c in cands) <= -(-5 * placed // 16)
    assert [c.inflight for c in cands] == [8, 8, 8, 8]  # and every copy took its share


def test_spill_to_another_holder_when_the_preferred_one_is_busy() -> None:
    policy, clock = make()
    cands = [Cand("a"), Cand("b")]
    for cand in cands:
        warm(policy, clock, cand, "m")
    first, _ = place(policy, "m", cands)  # the preferred copy, now busy
    second, token = place(policy, "m", cands)
    assert second is not first and token.reason == "spill" and token.outcome == "hit"


# -- wait or load ---------------------------------------------------------------------------


def test_waits_for_a_busy_holder_when_that_is_sooner_than_a_load() -> None:
    policy, clock = make()
    holder, cold = Cand("h"), Cand("c")
    warm(policy, clock, holder, "m")
    _, running = place(policy, "m", [holder, cold])
    running.started(clock.now())
    chosen, token = place(policy, "m", [holder, cold])  # 0.05 s left there vs a 1 s load
    assert chosen is holder and token.reason == "waited" and token.outcome == "waited"


def test_loads_a_copy_when_the_holder_queue_is_longer_than_a_load() -> None:
    policy, clock = make()
    holder, cold = Cand("h"), Cand("c")
    warm(policy, clock, holder, "m")
    for _ in range(30):  # 30 x 0.05 s = 1.5 s of work queued there, more than the 1 s load
        holder.inflight += 1
        policy.place("m", "m", [holder], random.Random(1))
    chosen, token = place(policy, "m", [holder, cold])
    assert chosen is cold and token.reason == "copy" and token.outcome == "load"
    copy = policy.view.get("c", "m")
    assert copy is not None and copy.state == PENDING  # placed there; loads once it is sent
    token.started(clock.now())
    assert copy.state == LOADING and policy.loads == 1


def test_a_loading_holder_is_joined_not_loaded_twice() -> None:
    policy, clock = make(concurrency=4)
    a, b = Cand("a"), Cand("b")
    first, token = place(policy, "m", [a, b])
    assert token.reason == "load"
    token.started(clock.now())
    clock.advance(0.9)  # 0.1 s of the load left: joining beats another load
    second, joined = place(policy, "m", [a, b])
    assert second is first and joined.reason == "waited"
    assert len(policy.view.holders("m")) == 1 and policy.loads == 1


# -- where to load --------------------------------------------------------------------------


def test_load_prefers_a_free_slot_then_the_oldest_lru_model() -> None:
    policy, clock = make(slots=2, min_residency_s=1.0)
    full_old, full_new, free = Cand("old"), Cand("new"), Cand("free")
    for cand in (full_old, full_new):
        warm(policy, clock, cand, "x")
        warm(policy, clock, cand, "y")
    warm(policy, clock, free, "x")
    clock.advance(10)
    warm(policy, clock, full_new, "x")  # used again now: its LRU model is "y", 10 s old
    assert place(policy, "m", [full_old, full_new, free])[0] is free
    # Without the free slot: the backend whose least recently used model is oldest.
    policy2, clock2 = make(slots=2, min_residency_s=1.0)
    a, b = Cand("a"), Cand("b")
    for cand in (a, b):
        warm(policy2, clock2, cand, "x")
        warm(policy2, clock2, cand, "y")
    clock2.advance(10)
    warm(policy2, clock2, b, "x")
    warm(policy2, clock2, b, "y")  # b's models were both used just now
    clock2.advance(2)
    chosen, token = place(policy2, "m", [a, b])
    assert chosen is a and token.reason == "load"
    token.started(clock2.now())  # it reaches a: a makes room, as an LRU cache does
    assert "m" in policy2.view.models_of("a") and "x" not in policy2.view.models_of("a")
    assert policy2.evictions == 1


def test_load_prefers_a_backend_that_can_start_then_fewer_models_then_less_load() -> None:
    policy, clock = make(slots=4)
    busy, many, few = Cand("busy", inflight=1), Cand("many"), Cand("few")
    warm(policy, clock, many, "x")
    warm(policy, clock, many, "y")
    warm(policy, clock, few, "x")
    assert place(policy, "m", [busy, many, few])[0] is few
    # Both can start and hold nothing: the less loaded.
    policy2, _ = make(slots=4, concurrency=4)
    heavy, light = Cand("heavy", inflight=2), Cand("light", inflight=1)
    assert place(policy2, "m", [heavy, light])[0] is light


def test_a_model_with_requests_in_flight_is_never_evicted() -> None:
    policy, clock = make(slots=1, concurrency=2, min_residency_s=0.0)
    a, b = Cand("a"), Cand("b")
    warm(policy, clock, a, "x")
    user, token = place(policy, "x", [a])
    assert user is a
    token.started(clock.now())
    clock.advance(1)
    warm(policy, clock, b, "y")  # y is newer than x, and a has a worker free
    # Still a's only model is in use: m goes to b, which evicts y (nothing in flight there).
    chosen, _ = place(policy, "m", [a, b])
    assert chosen is b and "x" in policy.view.models_of("a")


def test_when_every_slot_is_in_use_the_request_overcommits_the_cheapest_backend() -> None:
    policy, clock = make(slots=1, min_residency_s=0.0)
    a = Cand("a")
    warm(policy, clock, a, "x")
    place(policy, "x", [a])[1].started(clock.now())
    chosen, token = place(policy, "m", [a])
    assert chosen is a and token.reason == "overcommit"
    assert set(policy.view.models_of("a")) == {"x", "m"}  # over its one slot, x kept


def test_churn_guard_spares_recent_models_and_gives_way_only_when_nothing_else_can_load() -> None:
    policy, clock = make(slots=1, min_residency_s=5.0)
    recent, stale = Cand("recent"), Cand("stale")
    warm(policy, clock, stale, "x")
    clock.advance(6)
    warm(policy, clock, recent, "y")
    chosen, token = place(policy, "m", [recent, stale])
    assert chosen is stale and token.reason == "load"  # y was used 0 s ago: guarded
    # Only guarded backends left: the guard gives way.
    policy2, clock2 = make(slots=1, min_residency_s=5.0)
    only = Cand("only")
    warm(policy2, clock2, only, "y")
    decision = policy2.decide("m", [only], clock2.now(), explain=True)
    assert decision.reason == "forced" and decision.candidates[0].can_load == "churn guard"
    chosen2, token2 = place(policy2, "m", [only])
    assert chosen2 is only and token2.reason == "forced"


def test_the_churn_guard_gives_way_rather_than_queue_a_load_behind_busy_backends() -> None:
    policy, clock = make(slots=1, min_residency_s=5.0)
    recent, busy_stale = Cand("recent"), Cand("stale", inflight=1)
    warm(policy, clock, busy_stale, "x")
    clock.advance(6)
    warm(policy, clock, recent, "y")
    # The only unguarded backend is busy: the idle one loads now, its guard broken.
    chosen, token = place(policy, "m", [recent, busy_stale])
    assert chosen is recent and token.reason == "forced"


def queue_on(policy: AffinityPolicy, holder: Cand, model: str, count: int) -> None:
    """``count`` requests for ``model`` placed on ``holder`` and waiting there."""
    for _ in range(count):
        holder.inflight += 1
        policy.place(model, model, [holder], random.Random(1))


def test_a_copy_never_breaks_the_churn_guard() -> None:
    policy, clock = make(slots=1, min_residency_s=5.0)
    holder, cold = Cand("h"), Cand("c")
    warm(policy, clock, holder, "m")
    warm(policy, clock, cold, "y")  # c's only model, used just now: guarded
    queue_on(policy, holder, "m", 60)  # 3 s of work queued at the holder, more than a load
    chosen, token = place(policy, "m", [holder, cold])
    assert chosen is holder and token.reason == "waited"  # m is served where it is
    assert "y" in policy.view.models_of("c")


def test_a_copy_that_evicts_pays_for_the_evicted_models_next_load() -> None:
    policy, clock = make(slots=1, min_residency_s=1.0)
    holder, cold = Cand("h"), Cand("c")
    warm(policy, clock, holder, "m")
    warm(policy, clock, cold, "y")
    clock.advance(2)  # y unguarded now
    queue_on(policy, holder, "m", 30)  # 1.5 s queued: a 1 s load alone would be sooner...
    chosen, token = place(policy, "m", [holder, cold])
    assert chosen is holder and token.reason == "waited"  # ...but y's next load is owed too
    queue_on(policy, holder, "m", 30)  # 3 s queued: more than both loads
    chosen, token = place(policy, "m", [holder, cold])
    assert chosen is cold and token.reason == "copy"


def test_a_spare_copy_is_evicted_before_a_models_only_copy_whatever_their_ages() -> None:
    policy, clock = make(slots=1, min_residency_s=5.0)
    only, spare_a, spare_b = Cand("only"), Cand("a"), Cand("b")
    warm(policy, clock, only, "x")
    clock.advance(1)
    warm(policy, clock, spare_a, "y")  # y on two backends, its demand (none) wants one
    warm(policy, clock, spare_b, "y")
    decision = policy.decide("m", [only, spare_a, spare_b], clock.now(), explain=True)
    assert [c.can_load for c in decision.candidates] == [
        "churn guard", "evicts y (spare copy)", "evicts y (spare copy)"]
    chosen, token = place(policy, "m", [only, spare_a, spare_b])
    assert chosen in (spare_a, spare_b) and token.reason == "load"  # not forced
    token.started(clock.now())
    assert len(policy.view.holders("y")) == 1 and "x" in policy.view.models_of("only")
    # y's last copy is not spare: guarded like any model used within min_residency_s.
    decision = policy.decide("n", [only, spare_a, spare_b], clock.now(), explain=True)
    assert decision.reason == "forced"


def test_routers_that_heard_the_same_reports_ms_apart_load_a_model_on_the_same_backend() -> None:
    """LRU ages count in whole churn-guard periods: each router stamps what it hears with its
    own clock, and the order in which reports reach it must not decide where a load goes."""
    choices = set()
    for heard in ((("a", 0.000), ("b", 0.002), ("c", 0.004)),
                  (("c", 0.010), ("b", 0.012), ("a", 0.014))):
        policy, clock = make(slots=1, min_residency_s=5.0)
        cands = [Cand(i) for i in "abc"]
        start = clock.now()
        for backend, at in heard:
            clock.advance(start + at - clock.now())
            policy.view.report(backend, [f"old-{backend}"], clock.now())
        clock.advance(start + 20.0 - clock.now())  # every model unguarded, ages ~ms apart
        chosen, token = place(policy, "m", cands)
        assert token.reason == "load"
        choices.add(chosen.id)
    assert len(choices) == 1


def test_a_copy_is_added_while_the_copies_are_fewer_than_demand_wants() -> None:
    policy, clock = make(demand_window_s=1.0)
    holder, cold = Cand("h"), Cand("c")
    warm(policy, clock, holder, "m")
    _, running = place(policy, "m", [holder, cold])
    running.started(clock.now())
    for _ in range(100):  # 100 arrivals in the window, 0.05 s each: 5 backends busy
        policy._arrived("m", clock.now())
    assert policy.copies_wanted("m", clock.now()) > 1
    chosen, token = place(policy, "m", [holder, cold])  # waiting (0.05 s) beats a 1 s load...
    assert chosen is cold and token.reason == "copy"  # ...but one copy is too few


def test_no_model_goes_to_the_least_waited_backend() -> None:
    policy, _ = make()
    a, b = Cand("a", inflight=3), Cand("b", inflight=0)
    chosen, token = place(policy, None, [a, b])
    assert chosen is b and token.reason == "no_model"


# -- copies follow demand -------------------------------------------------------------------


def test_copies_wanted_rise_with_demand_and_fall_when_it_decays() -> None:
    policy, clock = make(concurrency=1, demand_window_s=2.0)
    for _ in range(200):  # 200 arrivals over 2 s of 0.05 s each: 5 backends busy
        policy._arrived("m", clock.now())
        clock.advance(0.01)
    busy = policy.demand("m", clock.now())
    assert 3.0 < busy < 6.0
    assert policy.copies_wanted("m", clock.now()) == pytest.approx(busy * 1.25, abs=1.0)
    clock.advance(20)  # ten windows without a request
    assert policy.copies_wanted("m", clock.now()) == 1


def test_copies_beyond_demand_get_only_spilled_requests_and_age_out() -> None:
    policy, clock = make(slots=2, min_residency_s=1.0)
    cands = [Cand(i) for i in "abc"]
    for cand in cands:
        warm(policy, clock, cand, "m")
    served: Counter[str] = Counter()
    for _ in range(50):  # one at a time: the preferred copy is always free
        cand, token = place(policy, "m", cands)
        served[cand.id] += 1
        serve(policy, clock, cand, token, SERVICE_S)
    assert len(served) == 1  # the other two copies were never used: their LRU age grows
    idle = [c for c in cands if c.id not in served]
    clock.advance(2)
    assert all(policy.view.models_of(c.id)["m"].last_used < clock.now() - 2 for c in idle)


# -- measured numbers -----------------------------------------------------------------------


def test_service_and_load_times_are_measured_from_clean_starts() -> None:
    policy, clock = make(smoothing=1.0)
    a = Cand("a")
    cand, token = place(policy, "m", [a])
    assert token.reason == "load"
    serve(policy, clock, cand, token, 0.55)  # 0.05 service (the prior) + 0.5 load
    assert policy.load_s("m") == pytest.approx(0.5)
    cand, token = place(policy, "m", [a])
    serve(policy, clock, cand, token, 0.02)
    assert policy.service_s("m") == pytest.approx(0.02)
    assert policy.view.get("a", "m").state == LOADED  # type: ignore[union-attr]
    # A request started behind another on a backend of concurrency 1 waited there: no sample.
    _, t1 = place(policy, "m", [a])
    _, t2 = place(policy, "m", [a])
    t1.started(clock.now())
    t2.started(clock.now())
    clock.advance(0.3)
    t1.done(True, clock.now())
    t2.done(True, clock.now())
    assert policy.service_s("m") == pytest.approx(0.3)  # t1 was clean, t2 not
    assert sum(policy.load_buckets) == 1 and policy.load_seconds_sum == pytest.approx(0.5)


def test_a_request_taken_back_before_it_ran_forgets_the_load_it_began() -> None:
    policy, _ = make()
    a = Cand("a")
    _, token = place(policy, "m", [a])
    token.done(False, 0.0)  # moved elsewhere, or expired waiting
    assert policy.view.holders("m") == {}
    assert policy.statistics()["placements_in_flight"] == 0


# -- the residency view ---------------------------------------------------------------------


def test_a_report_replaces_the_view_but_keeps_models_with_requests_in_flight() -> None:
    view = ResidencyView(default_slots=3)
    view.routed("b", "inflight", 1.0)
    view.report("b", ["x", "y"], 2.0)
    assert set(view.models_of("b")) == {"x", "y", "inflight"}
    assert view.get("b", "inflight").state == PENDING  # type: ignore[union-attr]
    view.started("b", "inflight", 2.5)
    assert view.get("b", "inflight").state == LOADING  # type: ignore[union-attr]
    view.report("b", ["inflight"], 3.0)
    assert set(view.models_of("b")) == {"inflight"} and view.get("b", "inflight").state == LOADED  # type: ignore[union-attr]
    view.forget("b")
    assert view.holders("inflight") == {} and list(view) == []


def test_model_ready_confirms_one_model_and_spares_one_with_requests_in_flight() -> None:
    view = ResidencyView(default_slots=3)
    view.routed("b", "queued", 1.0)
    view.routed("b", "running", 1.0)
    view.started("b", "running", 1.5)
    view.report("b", ["idle", "queued", "running"], 2.0)
    view.confirm("b", "idle", False, 3.0)  # ModelReady: not ready, nothing in flight: gone
    view.confirm("b", "queued", False, 3.0)
    view.confirm("b", "running", False, 3.0)
    states = {name: r.state for name, r in view.models_of("b").items()}
    assert states == {"queued": PENDING, "running": LOADING}
    assert view.occupied("b") == 1  # the pending one takes no slot yet
    view.confirm("b", "queued", True, 4.0)
    view.confirm("b", "new", True, 4.0)  # ready though the view did not hold it: it does now
    assert view.get("b", "queued").state == LOADED  # type: ignore[union-attr]
    assert view.get("b", "new").state == LOADED  # type: ignore[union-attr]
    assert view.occupied("b") == 3


def test_the_view_is_bounded_in_backends_and_models() -> None:
    view = ResidencyView(default_slots=2, max_backends=3, max_models=4)
    for i in range(10):
        view.report(f"b{i}", [f"m{j}" for j in range(100)], float(i))
    assert list(view) == ["b7", "b8", "b9"] and view.forgotten == 7
    assert all(len(view.models_of(b)) == 4 for b in view)
    assert sum(len(h) for h in view.models().values()) == 12


def test_routed_predicts_the_backend_lru_eviction() -> None:
    view = ResidencyView(default_slots=2)
    for model, now in (("x", 1.0), ("y", 2.0), ("x", 3.0)):  # x used again: y is the LRU
        view.routed("b", model, now)
        view.started("b", model, now)
        view.finished("b", model, now, served=True)
    view.routed("b", "z", 4.0)
    assert set(view.models_of("b")) == {"x", "y", "z"}  # z pending: not at the backend yet
    view.routed("b", "y", 4.5)  # y waits in the router: the backend does not know it
    assert view.started("b", "z", 5.0) == ("y",)  # z reaches it: y goes, its waiter will miss
    assert set(view.models_of("b")) == {"x", "z"}
    assert view.victim("b") == ("x", view.get("b", "x"))  # next time: x, z is running
    view.routed("b", "x", 5.5)
    assert view.victim("b", spare_queued=True) is None  # x has a waiter now, z runs


def test_a_load_brings_a_backend_back_under_its_slots_after_a_spell_over_them() -> None:
    view = ResidencyView(default_slots=2)
    for model in ("x", "y", "z"):  # all three running at once: over its two slots
        view.routed("b", model, 1.0)
        assert view.started("b", model, 1.0) == ()
    assert view.occupied("b") == 3
    for model in ("x", "y", "z"):
        view.finished("b", model, 2.0, served=True)
    view.routed("b", "w", 3.0)
    assert view.started("b", "w", 3.0) == ("x", "y")  # the two least recently used go
    assert set(view.models_of("b")) == {"z", "w"} and view.occupied("b") == 2


# -- the hashing policies -------------------------------------------------------------------


def test_consistent_hash_bounded_sticks_to_a_key_until_its_backend_is_over_the_bound() -> None:
    policy = ConsistentHashBounded(load_bound=1.25)
    cands = [Cand(i) for i in "abcd"]
    rng = random.Random(3)
    first = policy.place(None, "session-7", cands, rng)[0]
    assert all(policy.place(None, "session-7", cands, rng)[0] == first for _ in range(20))
    cands[first].inflight = 2  # ceil(1.25 x 3 / 4) = 1: over the bound
    spilled = policy.place(None, "session-7", cands, rng)[0]
    assert spilled != first and policy.spilled == 1
    # The same key ranks the same way whatever the order of the candidates.
    reordered = list(reversed(cands))
    assert reordered[policy.place(None, "session-7", reordered, rng)[0]] is cands[spilled]


def test_consistent_hash_bounded_spreads_keys_by_weight_and_needs_a_key() -> None:
    policy = ConsistentHashBounded()
    cands = [Cand("a", weight=1), Cand("b", weight=3)]
    rng = random.Random(5)
    shares = Counter(policy.place(None, f"k{i}", cands, rng)[0] for i in range(4000))
    assert 0.70 < shares[1] / 4000 < 0.80
    busy = [Cand("a", inflight=5), Cand("b", inflight=0)]
    assert policy.place(None, None, busy, rng)[0] == 1  # no key: least connections


def test_common_queue_takes_the_least_busy_backend_whatever_its_weight() -> None:
    policy = CommonQueue()
    rng = random.Random(9)
    assert policy.choose([Cand("a", 2, 10), Cand("b", 1, 1)], rng) == 1
    ties = Counter(policy.choose([Cand("a"), Cand("b")], rng) for _ in range(1000))
    assert 400 < ties[0] < 600


def test_make_policy_knows_every_name_and_needs_a_factory_for_affinity() -> None:
    for name in ("common_queue", "consistent_hash_bounded", "least_connections"):
        assert make_policy(name).name == name
    with pytest.raises(ValueError, match="affinity"):
        make_policy("affinity")
    policy, _ = make()
    assert make_policy("affinity", lambda: policy) is policy


# -- the seed experiment, simulated ---------------------------------------------------------


@pytest.mark.parametrize(("run", "max_misses", "max_task_s"), [(1, 530, 0.175), (2, 40, 0.050)])
def test_the_policy_meets_the_seed_targets_in_a_simulated_fleet(
    run: int, max_misses: int, max_task_s: float
) -> None:
    """bench.affinity_sim: 2 backends x 2 slots, the seed's workload, the real policy."""
    result = simulate(RUNS[run], "affinity", seed=0)
    baseline = simulate(RUNS[run], "common_queue", seed=0)
    assert result.misses <= max_misses and result.mean_task_s <= max_task_s
    assert result.mean_latency_s < baseline.mean_latency_s
    assert baseline.misses > 2 * result.misses


ops = st.lists(st.tuples(
    st.sampled_from(["routed", "started", "served", "failed", "taken_back", "report", "forget",
                     "ready", "not_ready"]),
    st.sampled_from(["b0", "b1", "b2"]), st.sampled_from(["m0", "m1", "m2", "m3", "m4"]),
), max_size=60)


@settings(max_examples=150, deadline=None)
@given(ops=ops)
def test_the_view_stays_consistent_whatever_happens(ops: list[tuple[str, str, str]]) -> None:
    """Its holders index, slot counts and in-flight counts agree with its backends' models,
    and it stays within its bound."""
    view = ResidencyView(default_slots=2, max_models=3)
    for step, (op, backend, model) in enumerate(ops):
        now = float(step)
        resident = view.get(backend, model)
        if op == "routed":
            view.routed(backend, model, now)
        elif op == "started" and resident is not None and resident.queued:
            view.started(backend, model, now)
        elif op in ("served", "failed") and resident is not None and resident.running:
            view.finished(backend, model, now, served=op == "served")
        elif op == "taken_back" and resident is not None and resident.queued:
            view.finished(backend, model, now, served=False, started=False)
        elif op == "report":
            view.report(backend, [model], now)
        elif op == "forget":
            view.forget(backend)
        elif op in ("ready", "not_ready"):
            view.confirm(backend, model, op == "ready", now)
        for b in view:
            models = view.models_of(b)
            assert view.occupied(b) == sum(1 for r in models.values() if r.in_slot)
            assert len(models) <= max(2, 3)
            for name, r in models.items():
                assert view.holders(name)[b] is r and r.queued >= 0 and r.running >= 0
        for name, holders in view.models().items():
            assert holders and all(view.models_of(b).get(name) is r for b, r in holders.items())
