"""Other routers' requests at a backend (a heartbeat's ``model_use``) in the residency view and
the affinity policy: pure, on a ManualClock and a seeded RNG. Each test also shows the choice
without those requests, so that it fails if the policy ignored them."""

from __future__ import annotations

import random

from router.balance.affinity import AffinityPolicy
from router.balance.residency import LOADED, ResidencyView
from tests.test_affinity_policy import SERVICE_S, Cand, make, place, warm


def ranked(policy: AffinityPolicy, model: str, ids: list[str]) -> list[str]:
    return [ids[i] for i in policy.rendezvous_rank(model, ids)]


# -- the view -------------------------------------------------------------------------------


def test_foreign_is_the_reported_use_less_this_routers_requests_sent_there() -> None:
    view = ResidencyView(2, 1)
    view.report("b", ["m", "n"], 0.0)
    view.routed("b", "m", 0.0)
    view.started("b", "m", 0.0)  # one of ours reached it
    view.routed("b", "m", 0.0)  # one of ours waits in the router: not in the backend's count
    view.report_use("b", {"m": 3, "n": 1, "gone": 2}, 0.0)
    assert (view.foreign("b", "m"), view.foreign("b", "n"), view.foreign("b", "gone")) == (
        2, 1, 2)
    assert view.foreign_load("b") == 5
    # Only ours now: never below 0, and the rest is over.
    view.report_use("b", {"m": 1}, 0.0)
    assert (view.foreign("b", "m"), view.foreign("b", "n"), view.foreign_load("b")) == (0, 0, 0)


def test_foreign_counts_are_bounded_and_forgotten_with_their_backend() -> None:
    view = ResidencyView(2, 1, max_models=3)
    view.report_use("b", {f"m{i}": 1 for i in range(10)}, 0.0)
    assert view.foreign_load("b") == 3
    view.forget("b")
    assert view.foreign_load("b") == 0


def test_a_planned_load_never_evicts_a_model_another_routers_requests_want() -> None:
    view = ResidencyView(2, 1)
    view.report("b", ["old", "new"], 0.0)  # "old" least recently used
    assert view.victim("b", spare_queued=True) == ("old", view.get("b", "old"))
    view.report_use("b", {"old": 1}, 0.0)
    assert view.victim("b", spare_queued=True) == ("new", view.get("b", "new"))
    view.report_use("b", {"old": 1, "new": 2}, 0.0)
    assert view.victim("b", spare_queued=True) is None  # every model wanted: none may go


def test_the_backend_is_modelled_evicting_a_model_nobody_uses_first() -> None:
    view = ResidencyView(2, 1)
    view.report("b", ["old", "new"], 0.0)
    view.report_use("b", {"old": 1}, 0.0)
    view.routed("b", "m", 1.0)
    assert view.started("b", "m", 1.0) == ("new",)
    view.finished("b", "m", 1.5, served=True)
    # Only models with foreign requests left: the backend evicts one whose requests wait.
    view.report("b", ["old", "new"], 2.0)
    view.report_use("b", {"old": 1, "new": 1}, 2.0)
    view.routed("b", "k", 3.0)
    assert view.started("b", "k", 3.0) == ("old",)


# -- the policy ------------------------------------------------------------------------------


def test_a_holder_busy_with_another_routers_requests_cannot_start_one_now() -> None:
    policy, clock = make()
    a, b = Cand("a"), Cand("b")
    for cand in (a, b):
        warm(policy, clock, cand, "m")
    first, second = ranked(policy, "m", ["a", "b"])
    chosen, token = place(policy, "m", [Cand("a"), Cand("b")])
    assert (chosen.id, token.reason) == (first, "hit")  # without the report
    token.done(False, clock.now())
    policy.view.report_use(first, {"m": 1}, clock.now())
    chosen, token = place(policy, "m", [Cand("a"), Cand("b")])
    assert (chosen.id, token.reason) == (second, "spill")


def test_the_bounded_load_check_counts_the_other_routers_requests() -> None:
    policy, clock = make(concurrency=4, demand_window_s=1.0)
    for cand in (Cand("a"), Cand("b")):
        warm(policy, clock, cand, "m")
    for _ in range(100):  # 100 arrivals x 0.05 s within the window: 5 busy over 4 workers
        policy._arrived("m", clock.now())
    assert policy.copies_wanted("m", clock.now()) == 2
    first, second = ranked(policy, "m", ["a", "b"])
    decision = policy.decide("m", [Cand("a"), Cand("b")], clock.now())
    assert (decision.index, decision.reason) == (["a", "b"].index(first), "hit")
    # 3 of another router's there: over ceil(1.25 x (3 + 0 + 1) / 2) = 3 with this one, so
    # the other copy takes it, though the first could start it (3 < 4 workers).
    policy.view.report_use(first, {"m": 3}, clock.now())
    decision = policy.decide("m", [Cand("a"), Cand("b")], clock.now())
    assert (decision.index, decision.reason) == (["a", "b"].index(second), "hit")


def test_the_wait_at_a_holder_counts_the_other_routers_requests_against_a_load() -> None:
    policy, clock = make()
    holder, cold = Cand("h"), Cand("c")
    warm(policy, clock, holder, "m")
    assert policy.wait_s("h", 0, clock.now()) == 0.0
    # 10 x 0.05 s = 0.5 s ahead: less than a 1 s load.
    policy.view.report_use("h", {"m": 10}, clock.now())
    assert policy.wait_s("h", 0, clock.now()) == 10 * SERVICE_S
    chosen, token = place(policy, "m", [holder, cold])
    assert (chosen, token.reason) == (holder, "waited")
    token.done(False, clock.now())
    holder.inflight = 0
    policy.view.report_use("h", {"m": 30, "x": 1}, clock.now())  # 1.55 s ahead: copy sooner
    chosen, token = place(policy, "m", [holder, cold])
    assert (chosen, token.reason) == (cold, "copy")


def test_a_load_goes_where_it_evicts_no_model_another_routers_requests_wait_for() -> None:
    policy, clock = make(slots=1)
    older, newer = Cand("older"), Cand("newer")
    warm(policy, clock, older, "x")
    clock.advance(10.0)
    warm(policy, clock, newer, "y")
    clock.advance(10.0)
    decision = policy.decide("m", [older, newer], clock.now(), random.Random(1),
                             explain=True)
    assert (decision.index, decision.reason) == (0, "load")  # the older LRU model goes
    policy.view.report_use("older", {"x": 1}, clock.now())
    decision = policy.decide("m", [older, newer], clock.now(), random.Random(1),
                             explain=True)
    assert (decision.index, decision.reason) == (1, "load")
    scored = {s.backend: s for s in decision.candidates}
    assert (scored["older"].can_load, scored["older"].foreign) == ("in use", 1)
    assert scored["newer"].can_load == "evicts y"
    policy.view.report_use("newer", {"y": 2}, clock.now())
    decision = policy.decide("m", [older, newer], clock.now(), random.Random(1))
    assert decision.reason == "overcommit"  # nowhere to load without evicting a wanted model
    resident = policy.view.get("older", "x")
    assert resident is not None and resident.state == LOADED


def test_a_heartbeat_gives_the_backends_own_eviction_order() -> None:
    """Other routers' requests reorder a backend's models too: a report listing them least
    recently used first (``lru_order``) gives the view the order the backend evicts in."""
    view = ResidencyView(2, 1)
    view.report("b", ["x", "y"], 0.0)
    view.routed("b", "k", 1.0)  # ours, on its way: stays, after the reported ones
    assert view.victim("b") is not None and view.victim("b")[0] == "x"  # type: ignore[index]
    view.report("b", ["y", "x"], 2.0)  # without the order: the view keeps its own
    assert view.victim("b")[0] == "x"  # type: ignore[index]
    view.report("b", ["y", "x"], 3.0, lru_order=True)
    assert list(view.models_of("b")) == ["y", "x", "k"]
    assert view.victim("b")[0] == "y"  # type: ignore[index]


def test_another_routers_use_of_a_model_counts_for_the_churn_guard() -> None:
    policy, clock = make(slots=1)
    holder = Cand("h")
    warm(policy, clock, holder, "x")
    clock.advance(10.0)  # x unused here for twice the churn guard
    assert policy.decide("m", [holder], clock.now()).reason == "load"
    policy.view.report_use("h", {"x": 1}, clock.now())
    policy.view.report_use("h", {}, clock.now() + 0.001)  # over, but used just now
    assert policy.decide("m", [holder], clock.now()).reason == "forced"
