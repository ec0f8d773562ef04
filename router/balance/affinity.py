"""The ``affinity`` policy: send each request where its model is loaded, load it where that
costs least, and never pile a hot model onto one backend.

For a request for model M, over the candidates (healthy backends serving M, not yet tried):

1. **Hit.** The *holders* of M (``ResidencyView``: loaded, loading, or pending: placed there
   to be loaded) are ranked by rendezvous hashing on M, so every router ranks them alike. The
   first ``copies_wanted(M)`` of them are M's active copies; among those the first whose load
   is under the bound (``load_bound`` x the mean load of the active copies, the new request
   counted, rounded up) is preferred. If it can start the request now (fewer in flight than
   its concurrency, M loaded), it takes it: reason ``hit``. Otherwise any holder that can
   start it now takes it, in rank order: ``spill``.
2. **Wait or load.** Every holder is busy: the expected wait at each (its placements worked
   through first come, first served by its workers, from their measured times; what is left
   of M's load if it is loading) is weighed against loading M on a backend that does not hold
   it (that backend's own wait, plus M's measured load time, plus one more load when it
   evicts a model: that model's next request pays it). The cheaper wins: ``waited`` at the
   holder with the least wait, or ``copy``, a load beside the existing copies. While the
   holders are fewer than ``copies_wanted(M)``, a copy is added whichever is cheaper now. A
   copy never breaks the churn guard: M is served where it is meanwhile.
3. **Where to load** (also when nobody holds M: ``load``), as ModelMesh ranks pods, after
   two rules: a backend that can start now before one that cannot (then the least wait), and
   among those one whose least recently used model is not guarded (the churn guard: used
   within ``min_residency_s`` and not a spare copy, one of more holders than its
   ``copies_wanted``, which is how copies follow demand down; a load that breaks it is
   ``forced``); then a free slot, else the oldest least recently used model (its age in
   steps of ``min_residency_s`` / 8: routers stamp uses with their own clocks), the fewest
   models, the least load, the rendezvous rank. A
   backend may load only if it has a free slot or a victim: a model with no request running
   there (never evict a model in use), none waiting for it in the router and none of other
   routers' there (foreign, the backend's report). A backend
   holding M in any state is a holder, so a model is never loaded twice on one backend at a
   time. When no backend may load, the cheapest backend takes the request and goes over its
   slots (``overcommit``).

Copies follow demand: ``copies_wanted(M)`` is M's measured demand (its arrival rate, decayed
over ``demand_window_s``, times its service time: how many backends it keeps busy) x
``load_bound``, over the holders' mean concurrency, rounded up. Holders beyond the active
ones get requests only when the active ones are over their bound or cannot start them, so
when demand falls they age out of the backends' LRU slots.

Measured numbers: a placement's token (``Placement``) is told when its attempt starts (the
request reaches the backend) and when it ends. A hit that started on a backend with a free
worker gives a service-time sample of its model, a load a load-time sample (elapsed minus
service); both are exponentially smoothed. Until measured, ``service_s`` and ``load_s`` of
the settings stand in.

Other routers: where several routers share backends, each backend's reported use
(``ResidencyView.report_use``) gives the requests other routers have there (*foreign*). A
backend's load is then this router's requests there plus those: in the bounded-load check, in
whether a holder can start a request now, in its expected wait (each foreign request a mean
service time ahead), and a model with foreign requests there is not evicted to load another.

A request without a model goes to the candidate with the least wait (``no_model``). Pure:
time comes from ``now``, randomness from the RNG given (only to break exact ties), no I/O.
"""

from __future__ import annotations

import math
import random
from collections import Counter, OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from router.balance.policies import (
    Candidate,
    KeyedCandidate,
    LeastConnections,
    ModelControl,
    Placed,
)
from router.balance.rendezvous import Rendezvous
from router.balance.residency import LOADED, PENDING, ResidencyView, Resident

Outcome = Literal["hit", "load", "waited"]
REASONS = ("hit", "spill", "waited", "copy", "load", "forced", "overcommit", "no_model")
OUTCOME_OF: dict[str, Outcome] = {
    "hit": "hit", "spill": "hit", "no_model": "hit", "waited": "waited",
    "copy": "load", "load": "load", "forced": "load", "overcommit": "load",
}
MAX_BACKENDS = 4096  # backends whose last answer time is kept
# LRU ages rank in steps of min_residency_s / 8: the churn guard's 10 loads at the defaults'
# ratio make a step about one load time, far above two routers' clock skew (ms).
AGE_STEPS = 8
# router_model_load_seconds: from a 10 ms load (a time-scaled benchmark) to minutes.
LOAD_SECONDS_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
                        120.0, 300.0)


@dataclass(frozen=True, slots=True)
class AffinitySettings:
    load_bound: float = 1.25  # c: at most c x the mean load of a model's copies
    min_residency_s: float = 10.0  # the churn guard
    load_s: float = 1.0  # a model's load time until measured
    service_s: float = 0.05  # a request's service time until measured
    demand_window_s: float = 10.0  # how far back demand is remembered (decay constant)
    smoothing: float = 0.2  # weight of a new sample in the measured times
    max_models: int = 4096  # models whose numbers are kept (least recently asked dropped)

    def __post_init__(self) -> None:
        if self.load_bound < 1.0:
            raise ValueError(f"load_bound must be >= 1, got {self.load_bound}")
        if not 0.0 < self.smoothing <= 1.0:
            raise ValueError(f"smoothing must be in (0, 1], got {self.smoothing}")


@dataclass(slots=True)
class ModelNumbers:
    """What the policy measured of one model."""

    service_s: float | None = None
    load_s: float | None = None
    rate: float = 0.0  # arrivals, decayed: rate / window is arrivals per second
    rate_at: float = 0.0
    outcomes: Counter[str] = field(default_factory=Counter)
    loads: int = 0
    evictions: int = 0
    load_samples: int = 0


class Placement:
    """One request on one backend, as the policy follows it (``Placed``)."""

    __slots__ = ("backend", "clean", "control", "expected_s", "model", "outcome", "placed_at",
                 "policy", "reason", "started_at")

    def __init__(self, policy: AffinityPolicy, backend: str, model: str | None, reason: str,
                 now: float) -> None:
        self.policy = policy
        self.backend = backend
        self.model = model
        self.reason = reason
        self.outcome: Outcome = OUTCOME_OF[reason]
        self.placed_at = now
        self.started_at: float | None = None
        self.clean = False  # started with a worker free there: its time is a clean sample
        self.control: ModelControl | None = None  # explicit load (and unload) before sending
        self.expected_s = 0.0  # how long it keeps a worker busy, as estimated when placed

    def started(self, now: float) -> None:
        self.policy.started(self, now)

    def done(self, served: bool, now: float) -> None:
        self.policy.done(self, served, now)

    def __repr__(self) -> str:
        return f"Placement({self.backend}, {self.model}, {self.reason})"


@dataclass(frozen=True, slots=True)
class Scored:
    """One candidate as a decision saw it (``/v1/debug/route``)."""

    backend: str
    state: str  # loaded, loading, absent
    inflight: int
    foreign: int  # other routers' requests there (the backend's last report)
    concurrency: int
    wait_s: float
    cost_s: float  # expected time until this request is answered there
    rank: int  # rendezvous rank for the model, 0 first
    can_load: str  # absent: "free slot", "evicts NAME", "churn guard", "in use"


@dataclass(frozen=True, slots=True)
class Decision:
    index: int
    reason: str
    copies_wanted: int = 1
    candidates: tuple[Scored, ...] = ()

    @property
    def outcome(self) -> Outcome:
        return OUTCOME_OF[self.reason]


class AffinityPolicy:
    name = "affinity"

    def __init__(self, view: ResidencyView, settings: AffinitySettings,
                 now: Callable[[], float], peer: AffinityPolicy | None = None) -> None:
        """``peer``: another affinity policy placing on the same backends (a model group's,
        with other settings); both then follow one ledger of the work placed on each
        backend, so each one's wait estimates count the other's requests."""
        self.view = view
        self.settings = settings
        self._now = now
        self._rendezvous = Rendezvous()
        self._fallback = LeastConnections()
        self._numbers: OrderedDict[str, ModelNumbers] = OrderedDict()
        # backend -> its placements not done (shared with ``peer``)
        self._work: dict[str, _Work] = peer._work if peer is not None else {}
        self._service_all: float | None = None  # every model's service time, smoothed
        self.reasons: Counter[str] = Counter()
        self.loads = 0
        self.evictions = 0
        self.load_buckets = [0] * (len(LOAD_SECONDS_BUCKETS) + 1)
        self.load_seconds_sum = 0.0

    # -- the Policy interface ----------------------------------------------------------------

    def choose(self, candidates: Sequence[Candidate], rng: random.Random) -> int:
        """Without a model: least connections (the scheduler uses ``place``)."""
        return self._fallback.choose(candidates, rng)

    def place(
        self, model: str | None, key: str | None, candidates: Sequence[KeyedCandidate],
        rng: random.Random, moved: bool = False,
    ) -> tuple[int, Placed | None]:
        now = self._now()
        if model is not None and not moved:
            self._arrived(model, now)
        decision = self.decide(model, candidates, now, rng)
        backend = candidates[decision.index].id
        placement = Placement(self, backend, model, decision.reason, now)
        placement.expected_s = self.duration_s(placement)
        work = self._work.get(backend)
        if work is None:
            if len(self._work) >= MAX_BACKENDS:
                self._forget_idle_work()
            work = self._work[backend] = _Work()
        work.add(placement)
        self.reasons[decision.reason] += 1
        if model is not None:
            self._numbers_of(model).outcomes[placement.outcome] += 1
            self.view.routed(backend, model, now)
        return decision.index, placement

    def started(self, placement: Placement, now: float) -> None:
        work = self._work.get(placement.backend)
        first = placement.started_at is None
        running = work.running - (0 if first else 1) if work is not None else 0
        placement.clean = running < self.view.shape_of(placement.backend).concurrency
        placement.started_at = now
        if work is not None and first and placement in work.placements:
            work.running += 1
        model = placement.model
        if model is None or not first:
            return
        resident = self.view.get(placement.backend, model)
        loads = resident is not None and resident.state == PENDING
        evicted = self.view.started(placement.backend, model, now)
        if loads:
            self.loads += 1
            self._numbers_of(model).loads += 1
            if self.view.shape_of(placement.backend).explicit:
                placement.control = ModelControl(model, evicted[0] if evicted else None)
        for name in evicted:
            self.evictions += 1
            self._numbers_of(name).evictions += 1

    def done(self, placement: Placement, served: bool, now: float) -> None:
        started = placement.started_at is not None
        work = self._work.get(placement.backend)
        if work is not None:
            work.remove(placement, now, started)
        if placement.model is not None:
            self.view.finished(placement.backend, placement.model, now,
                               served=served and started, started=started)
        if served and started and placement.clean:
            assert placement.started_at is not None
            self._measured(placement, now - placement.started_at)

    # -- the decision ------------------------------------------------------------------------

    def decide(self, model: str | None, candidates: Sequence[KeyedCandidate], now: float,
               rng: random.Random | None = None, *, explain: bool = False) -> Decision:
        """Where a request for ``model`` goes now, and why; no state changes (``place``
        applies it). ``explain``: with every candidate as scored."""
        rows = _Rows(self, model, candidates, now)
        if model is None:
            return Decision(rows.least_wait(rng), "no_model", 1, rows.explain(explain))
        wanted = self.copies_wanted(model, now)
        index, reason = self._hit(rows, wanted)
        if index is None:
            index, reason = self._wait_or_load(rows, wanted)
        return Decision(index, reason, wanted, rows.explain(explain))

    def _hit(self, rows: _Rows, wanted: int) -> tuple[int | None, str]:
        held = rows.held
        if not held:
            return None, ""
        active = held[:wanted]
        loads = [rows.load[i] for i in active]
        cap = math.ceil(self.settings.load_bound * (sum(loads) + 1) / len(active))
        preferred = next((i for i in active if rows.load[i] < cap), active[0])
        if rows.can_start(preferred):
            return preferred, "hit"
        spill = next((i for i in held if rows.can_start(i)), None)
        return (spill, "spill") if spill is not None else (None, "")

    def _wait_or_load(self, rows: _Rows, wanted: int) -> tuple[int, str]:
        held = rows.held
        cold, forced = rows.cold_choice()
        if held:
            warm = min(held, key=lambda i: (rows.cost[i], rows.rank[i]))
            # A copy never breaks the churn guard (the model is served, if later, where it
            # is), and one that evicts a model pays for that model's next load too. Fewer
            # copies than its demand wants, all busy: add one (cheaper or not now).
            if cold is not None and not forced and (
                    len(held) < wanted or rows.copy_cost(cold) < rows.cost[warm]):
                return cold, "copy"
            return warm, "waited"
        if cold is not None:
            return cold, "forced" if forced else "load"
        return min(range(len(rows.ids)), key=lambda i: (rows.cost[i], rows.rank[i])), \
            "overcommit"

    # -- measured numbers --------------------------------------------------------------------

    def service_s(self, model: str | None) -> float:
        numbers = self._numbers.get(model) if model is not None else None
        if numbers is not None and numbers.service_s is not None:
            return numbers.service_s
        return self._service_all if self._service_all is not None else self.settings.service_s

    def load_s(self, model: str) -> float:
        numbers = self._numbers.get(model)
        if numbers is not None and numbers.load_s is not None:
            return numbers.load_s
        return self.settings.load_s

    def demand(self, model: str, now: float) -> float:
        """Backends ``model`` keeps busy: its arrivals per second x its service time."""
        numbers = self._numbers.get(model)
        if numbers is None:
            return 0.0
        window = self.settings.demand_window_s
        rate = numbers.rate * math.exp(-(now - numbers.rate_at) / window) / window
        return rate * self.service_s(model)

    def copies_wanted(self, model: str, now: float) -> int:
        holders = self.view.holders(model)
        if holders:
            concurrency = sum(self.view.shape_of(b).concurrency for b in holders) / len(holders)
        else:
            concurrency = self.view.default.concurrency
        wanted = self.demand(model, now) * self.settings.load_bound / concurrency
        return max(1, math.ceil(wanted - 1e-9))

    def duration_s(self, placement: Placement) -> float:
        """Expected time ``placement`` keeps a worker busy: its service, and its load."""
        expected = self.service_s(placement.model)
        if placement.outcome == "load" and placement.model is not None:
            expected += self.load_s(placement.model)
        return expected

    def wait_s(self, backend: str, inflight: int, now: float) -> float:
        """Expected wait before a new request starts on ``backend``, which has ``inflight``
        of this router's requests: the work placed there (each placement's expected
        duration, as estimated when it was placed), worked through first come, first served
        by its ``concurrency`` workers, less what the oldest running one has done since it
        began (when it reached the backend, or when the one before it ended, whichever is
        later); plus the other routers' requests there, a mean service time each. O(1): it
        runs for every candidate of every request."""
        return self._wait_s(backend, inflight, self.view.foreign_load(backend), now)

    def _wait_s(self, backend: str, inflight: int, foreign: int, now: float) -> float:
        """``wait_s`` with the other routers' requests there (``foreign``) already read."""
        concurrency = self.view.shape_of(backend).concurrency
        if inflight + foreign < concurrency:
            return 0.0
        ahead = foreign * self.service_s(None)
        work = self._work.get(backend)
        if work is not None and work.placements:
            head = next(iter(work.placements))
            began = max(head.started_at if head.started_at is not None else now,
                        work.last_done)
            elapsed = max(0.0, now - began)
            running = max(1, min(len(work.placements), concurrency))
            ahead += work.expected_s - running * min(elapsed, head.expected_s)
        return max(0.0, ahead / concurrency)

    def _forget_idle_work(self) -> None:
        """Past ``MAX_BACKENDS``: drop the records of backends with nothing placed there."""
        for backend in [b for b, w in self._work.items() if not w.placements]:
            del self._work[backend]

    def _arrived(self, model: str, now: float) -> None:
        numbers = self._numbers_of(model)
        window = self.settings.demand_window_s
        numbers.rate = numbers.rate * math.exp(-(now - numbers.rate_at) / window) + 1.0
        numbers.rate_at = now

    def _measured(self, placement: Placement, elapsed: float) -> None:
        alpha = self.settings.smoothing
        model = placement.model
        if placement.outcome == "hit":
            self._service_all = _smooth(self._service_all, elapsed, alpha)
            if model is not None:
                numbers = self._numbers_of(model)
                numbers.service_s = _smooth(numbers.service_s, elapsed, alpha)
        elif placement.outcome == "load" and model is not None:
            sample = max(0.0, elapsed - self.service_s(model))
            numbers = self._numbers_of(model)
            numbers.load_s = _smooth(numbers.load_s, sample, alpha)
            numbers.load_samples += 1
            self._observe_load(sample)

    def _observe_load(self, seconds: float) -> None:
        self.load_seconds_sum += seconds
        for index, bound in enumerate(LOAD_SECONDS_BUCKETS):
            if seconds <= bound:
                self.load_buckets[index] += 1
                return
        self.load_buckets[-1] += 1

    def _numbers_of(self, model: str) -> ModelNumbers:
        numbers = self._numbers.get(model)
        if numbers is None:
            if len(self._numbers) >= self.settings.max_models:
                self._numbers.popitem(last=False)
            numbers = self._numbers[model] = ModelNumbers(rate_at=self._now())
        else:
            self._numbers.move_to_end(model)
        return numbers

    # -- views -------------------------------------------------------------------------------

    def numbers(self) -> OrderedDict[str, ModelNumbers]:
        """model -> what was measured of it (least recently asked first). Shared."""
        return self._numbers

    def rendezvous_rank(self, model: str, backend_ids: list[str]) -> list[int]:
        return self._rendezvous.ranked(model, backend_ids)

    def statistics(self) -> dict[str, Any]:
        return {
            "reasons": dict(self.reasons),
            "loads": self.loads,
            "evictions": self.evictions,
            "models_measured": len(self._numbers),
            "placements_in_flight": sum(len(w.placements) for w in self._work.values()),
            "service_s": self._service_all,
            "view": self.view.statistics(),
        }

    def __repr__(self) -> str:
        return f"AffinityPolicy(loads={self.loads}, {self.view!r})"


class _Work:
    """The placements not done on one backend, in placement order, and their sums."""

    __slots__ = ("expected_s", "last_done", "placements", "running")

    def __init__(self) -> None:
        self.placements: dict[Placement, None] = {}  # ordered; O(1) removal
        self.expected_s = 0.0
        self.running = 0  # started (reached the backend), not done
        self.last_done = -math.inf

    def add(self, placement: Placement) -> None:
        self.placements[placement] = None
        self.expected_s += placement.expected_s

    def remove(self, placement: Placement, now: float, started: bool) -> None:
        if placement not in self.placements:
            return  # told twice
        del self.placements[placement]
        self.expected_s = max(0.0, self.expected_s - placement.expected_s)
        if started:
            self.running = max(0, self.running - 1)
            self.last_done = now
        if not self.placements:
            self.expected_s = 0.0  # no drift from float sums


def _age_step(age: float, guard_s: float) -> float:
    """An LRU age in steps of 1/``AGE_STEPS`` of the churn guard, for ranking where to
    load: each router stamps a model's last use with its own clock (when it routed there,
    or first saw a report), so ages a few ms apart must not decide alone; backends of the
    same step fall to the shared inputs after it (models held, rendezvous rank)."""
    if math.isinf(age) or guard_s <= 0.0:
        return age
    return float(math.floor(age * AGE_STEPS / guard_s))


def _smooth(old: float | None, sample: float, alpha: float) -> float:
    return sample if old is None else old + alpha * (sample - old)


class _Rows:
    """The candidates of one decision, scored: state, wait, cost and rank of each."""

    def __init__(self, policy: AffinityPolicy, model: str | None,
                 candidates: Sequence[KeyedCandidate], now: float) -> None:
        self.policy = policy
        self.model = model
        self.now = now
        view = policy.view
        self.ids = [c.id for c in candidates]
        self.inflight = [c.inflight for c in candidates]
        # Every router's requests there: this one's, and the others' the backend reported.
        self.foreign = [view.foreign_load(b) for b in self.ids]
        self.load = [n + f for n, f in zip(self.inflight, self.foreign, strict=True)]
        self.concurrency = [view.shape_of(b).concurrency for b in self.ids]
        self.wait = [policy._wait_s(b, n, f, now) for b, n, f in zip(
            self.ids, self.inflight, self.foreign, strict=True)]
        holders: dict[str, Resident] = view.holders(model) if model is not None else {}
        self.state = [holders[b].state if b in holders else "absent" for b in self.ids]
        order = policy.rendezvous_rank(model, self.ids) if model is not None else []
        self.rank = [0] * len(self.ids)
        for position, index in enumerate(order):
            self.rank[index] = position
        self.held = [i for i in order if self.state[i] != "absent"]  # best ranked first
        service = policy.service_s(model)
        load = policy.load_s(model) if model is not None else 0.0
        self.cost = [self._cost(i, holders, service, load) for i in range(len(self.ids))]

    def _cost(self, i: int, holders: dict[str, Resident], service: float, load: float
              ) -> float:
        state = self.state[i]
        if state == "absent":
            return self.wait[i] + load + service
        if state == LOADED:
            return self.wait[i] + service
        if state == PENDING:  # its load waits in the router: in the wait, or all of it ahead
            return max(self.wait[i], load) + service
        left = max(0.0, load - (self.now - holders[self.ids[i]].since))
        return max(self.wait[i], left) + service

    def copy_cost(self, i: int) -> float:
        """What loading the model on cold candidate ``i`` costs: this request's time there,
        plus a load of the model it evicts, which is asked for again (a free slot: none)."""
        if self.policy.view.free_slot(self.ids[i]):
            return self.cost[i]
        return self.cost[i] + self.policy.settings.load_s if self.model is None else \
            self.cost[i] + self.policy.load_s(self.model)

    def can_start(self, i: int) -> bool:
        return self.state[i] == LOADED and self.load[i] < self.concurrency[i]

    def least_wait(self, rng: random.Random | None) -> int:
        best = min((self.wait[i], self.load[i]) for i in range(len(self.ids)))
        tied = [i for i in range(len(self.ids)) if (self.wait[i], self.load[i]) == best]
        return tied[rng.randrange(len(tied))] if rng is not None and len(tied) > 1 else tied[0]

    def loadable(self, i: int, guard: bool) -> tuple[bool, float, str]:
        """(may load here, age of what it would evict, why), for a cold candidate. A victim
        that is a spare copy (its model has more holders than its demand wants) counts as
        old whenever it was last used: dropping it is how copies follow demand down, so the
        churn guard, which keeps models from being evicted and loaded again, spares it
        nothing."""
        view = self.policy.view
        backend = self.ids[i]
        if view.free_slot(backend):
            return True, math.inf, "free slot"
        victim = view.victim(backend, spare_queued=True)  # none wanted here, by any router
        if victim is None:
            return False, 0.0, "in use"
        name, resident = victim
        if len(view.holders(name)) > self.policy.copies_wanted(name, self.now):
            return True, self.policy.settings.min_residency_s, f"evicts {name} (spare copy)"
        age = self.now - resident.last_used
        if guard and age < self.policy.settings.min_residency_s:
            return False, age, "churn guard"
        return True, age, f"evicts {name}"

    def cold_choice(self) -> tuple[int | None, bool]:
        """(the backend to load the model on, whether that breaks the churn guard), or
        (None, False) when none may load it. ModelMesh's order, after two rules: a backend
        that can start the load now first, and among those one whose LRU model is not
        guarded."""
        best: tuple[Any, ...] | None = None
        choice, forced = None, False
        view = self.policy.view
        guard_s = self.policy.settings.min_residency_s
        for i, state in enumerate(self.state):
            if state != "absent":
                continue
            ok, age, _ = self.loadable(i, False)
            if not ok:
                continue
            guarded = age < guard_s
            busy = self.load[i] >= self.concurrency[i]
            key = (busy, guarded, self.wait[i] if busy else 0.0, -_age_step(age, guard_s),
                   len(view.models_of(self.ids[i])), self.load[i], self.rank[i])
            if best is None or key < best:
                best, choice, forced = key, i, guarded
        return choice, forced

    def explain(self, explain: bool) -> tuple[Scored, ...]:
        if not explain:
            return ()
        return tuple(
            Scored(self.ids[i], self.state[i], self.inflight[i], self.foreign[i],
                   self.concurrency[i],
                   self.wait[i], self.cost[i], self.rank[i],
                   self.loadable(i, True)[2] if self.state[i] == "absent" else "")
            for i in range(len(self.ids))
        )
