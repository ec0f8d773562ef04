"""A discrete-event simulation of the seed experiment, driving the router's own policies.

The fleet is simulated (backends with LRU model slots and a concurrency, requests waiting on
the backend the policy chose, as in the router's scheduler), the policy is the real one
(``router.balance``), told of every start and answer as the scheduler tells it. Time is the
simulation's, so a run of 2,400 requests takes well under a second: it calibrates the
workload (``common_queue`` against the seed's figures, FACTS.md) and checks a policy's
decisions before ``bench.affinity`` spends minutes on real processes. The real benchmark is
the measurement; this is the model.

    python -m bench.affinity_sim --run 1 --policy affinity --seeds 5
"""

from __future__ import annotations

import argparse
import functools
import heapq
import itertools
import random
import statistics
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from router.balance.affinity import AffinityPolicy, AffinitySettings
from router.balance.policies import Placed, Policy, as_keyed, make_policy
from router.balance.residency import ResidencyView


@dataclass(frozen=True, slots=True)
class SeedRun:
    """One of the seed's two runs (times in seconds, unscaled); the Zipf scenario reuses it
    for its fleet (``backends`` x ``slots``)."""

    labels: int
    wait_avg_s: float
    service_s: float
    wait_sd_s: float = 1.0
    load_s: float = 0.39
    backends: int = 2
    slots: int = 2
    producers: int = 2
    requests: int = 2400


RUNS = {1: SeedRun(labels=5, wait_avg_s=2.5, service_s=0.088),
        2: SeedRun(labels=4, wait_avg_s=0.75, service_s=0.040)}


def workload(run: SeedRun, seed: int) -> list[list[tuple[float, str]]]:
    """Per producer: (think time before it, label) of each request; the same for every
    policy. Think times are normal(avg, sd) clipped at 0, labels uniform."""
    rng = random.Random(seed)
    per = run.requests // run.producers
    return [[(max(0.0, rng.gauss(run.wait_avg_s, run.wait_sd_s)),
              f"m{rng.randrange(run.labels)}") for _ in range(per)]
            for _ in range(run.producers)]


@dataclass(eq=False, slots=True)
class Slot:
    users: int = 0  # requests that arrived for it and are not answered
    running: int = 0  # of those, the ones a worker has taken
    ready_at: float | None = None  # when its load is (was) done; None: not begun


@dataclass(eq=False)
class SimBackend:
    """A backend as ``backends.modelsim`` behaves: its slots are kept when a request
    arrives (LRU touch, a model in use never evicted), a model it lacks is loaded by the
    first of its requests that a worker takes, the others wait in arrival order."""

    id: str
    slots: int
    concurrency: int = 1
    weight: int = 1
    models: OrderedDict[str, Slot] = field(default_factory=OrderedDict)
    waiting: deque[Job] = field(default_factory=deque)  # arrived, no worker yet
    running: int = 0
    misses: int = 0
    loads: int = 0
    evictions: int = 0
    busy_s: float = 0.0
    served: dict[str, int] = field(default_factory=dict)

    @property
    def inflight(self) -> int:
        return self.running + len(self.waiting)

    def arrive(self, model: str, now: float) -> Slot:
        slot = self.models.get(model)
        if slot is None:
            # Fixed memory, as backends.modelsim: a load evicts until a slot is free, a
            # model no request uses first, else one whose requests only wait (they load it
            # again); over the slots only with a worker on every model.
            while len(self.models) >= self.slots:
                loaded = [(m, s) for m, s in self.models.items()
                          if s.ready_at is not None and s.ready_at <= now]
                victim = next((m for m, s in loaded if not s.users),
                              next((m for m, s in loaded if not s.running), None))
                if victim is None:
                    break
                del self.models[victim]
                self.evictions += 1
            slot = self.models[model] = Slot()
        else:
            self.models.move_to_end(model)
        slot.users += 1
        return slot

    def work_time(self, job: Job, now: float, load_s: float, service_s: float) -> float:
        """What a worker taking ``job`` now spends on it."""
        model = job.model
        slot = self.models.get(model)
        if slot is None or slot is not job.slot:  # evicted while the job waited: it loads
            if job.slot is not None:              # the model again
                job.slot.users -= 1
            slot = job.slot = self.arrive(model, now)
        slot.running += 1
        if slot.ready_at is None or slot.ready_at > now:
            self.misses += 1  # its worker time has (part of) a load in it
        if slot.ready_at is None:
            self.loads += 1
            slot.ready_at = now + load_s
            return load_s + service_s
        return max(0.0, slot.ready_at - now) + service_s


@dataclass(eq=False)
class Job:
    producer: int
    model: str
    sent_at: float
    requests: Any = None  # the producer's iterator of what it sends next
    token: Placed | None = None
    worker_s: float = 0.0
    slot: Slot | None = None  # its model's slot at the backend


@dataclass
class Result:
    misses: int
    loads: int
    evictions: int
    mean_task_s: float
    mean_latency_s: float
    p99_latency_s: float
    reasons: dict[str, int]
    requests: int = 0
    max_over_mean_busy: float = 0.0
    hottest_copies: int = 0  # backends that served the most requested model


def zipf_arrivals(models: int, s: float, rate: float, count: int, seed: int
                  ) -> list[tuple[float, str]]:
    """(arrival time, model) of ``count`` Poisson arrivals at ``rate`` per second, models
    ``z0``.. of Zipf(``s``) popularity (``z0`` the most popular)."""
    rng = random.Random(seed)
    weights = [1.0 / (k ** s) for k in range(1, models + 1)]
    names = [f"z{k}" for k in range(models)]
    at = 0.0
    out: list[tuple[float, str]] = []
    for label in rng.choices(names, weights, k=count):
        at += rng.expovariate(rate)
        out.append((at, label))
    return out


class Fleet:
    """The simulated backends and clock; ``run`` plays a workload through a policy."""

    def __init__(self, run: SeedRun, policy: Policy, rng: random.Random) -> None:
        self.run_spec = run
        self.policy = policy
        self.rng = rng
        self.now = 0.0
        self.backends = [SimBackend(f"b{i}", run.slots) for i in range(run.backends)]
        self._events: list[tuple[float, int, Callable[[], None]]] = []
        self._seq = itertools.count()
        self.task_times: list[float] = []
        self.latencies: list[float] = []

    def at(self, when: float, action: Callable[[], None]) -> None:
        heapq.heappush(self._events, (when, next(self._seq), action))

    def play(self, work: list[list[tuple[float, str]]]) -> Result:
        for producer, requests in enumerate(work):
            self._next(producer, iter(requests))
        for _ in range(10 * sum(len(w) for w in work) + 10):  # bounded: ~3 events per request
            if not self._events:
                break
            self.now, _, action = heapq.heappop(self._events)
            action()
        return self._result()

    def play_open(self, arrivals: list[tuple[float, str]]) -> Result:
        """Each request at its arrival time, whatever is in flight."""
        for at, model in arrivals:
            self.at(at, functools.partial(self._arrive, model))
        for _ in range(10 * len(arrivals) + 10):
            if not self._events:
                break
            self.now, _, action = heapq.heappop(self._events)
            action()
        return self._result()

    def _arrive(self, model: str) -> None:
        self._send(Job(-1, model, self.now))

    def _next(self, producer: int, requests: Any) -> None:
        if requests is None:
            return
        item = next(requests, None)
        if item is None:
            return
        think, model = item
        self.at(self.now + think, lambda: self._send(Job(producer, model, self.now, requests)))

    def _send(self, job: Job) -> None:
        """Placed and sent at once: the request waits at the backend (pipelined)."""
        job.sent_at = self.now
        candidates = self.backends
        policy = self.policy
        keyed = as_keyed(policy)
        if keyed is not None:
            index, job.token = keyed.place(job.model, job.model, candidates, self.rng)
        else:
            index = policy.choose(candidates, self.rng)
        backend = candidates[index]
        if job.token is not None:
            job.token.started(self.now)
        job.slot = backend.arrive(job.model, self.now)
        backend.waiting.append(job)
        self._start_next(backend)

    def _start_next(self, backend: SimBackend) -> None:
        while backend.waiting and backend.running < backend.concurrency:
            job = backend.waiting.popleft()
            backend.running += 1
            spec = self.run_spec
            took = backend.work_time(job, self.now, spec.load_s, spec.service_s)
            backend.busy_s += took
            backend.served[job.model] = backend.served.get(job.model, 0) + 1
            job.worker_s = took
            self.at(self.now + took, functools.partial(self._finish, backend, job))

    def _finish(self, backend: SimBackend, job: Job) -> None:
        backend.running -= 1
        assert job.slot is not None
        job.slot.users -= 1
        job.slot.running -= 1
        self.task_times.append(job.worker_s)
        self.latencies.append(self.now - job.sent_at)
        if job.token is not None:
            job.token.done(True, self.now)
        self._start_next(backend)
        self._next(job.producer, job.requests)

    def _result(self) -> Result:
        latencies = sorted(self.latencies)
        policy = self.policy
        busy = [b.busy_s for b in self.backends]
        counts: dict[str, int] = {}
        for b in self.backends:
            for model, n in b.served.items():
                counts[model] = counts.get(model, 0) + n
        hottest = max(counts, key=counts.__getitem__) if counts else ""
        return Result(
            requests=len(latencies),
            max_over_mean_busy=max(busy) / statistics.fmean(busy) if any(busy) else 0.0,
            hottest_copies=sum(1 for b in self.backends if b.served.get(hottest)),
            misses=sum(b.misses for b in self.backends),
            loads=sum(b.loads for b in self.backends),
            evictions=sum(b.evictions for b in self.backends),
            mean_task_s=statistics.fmean(self.task_times),
            mean_latency_s=statistics.fmean(latencies),
            p99_latency_s=latencies[int(len(latencies) * 0.99)],
            reasons=dict(policy.reasons) if isinstance(policy, AffinityPolicy) else {},
        )


def simulate(run: SeedRun, policy_name: str, seed: int,
             settings: AffinitySettings | None = None) -> Result:
    fleet_box: list[Fleet] = []

    def affinity() -> Policy:
        view = ResidencyView(run.slots, 1)
        return AffinityPolicy(view, settings or seed_settings(run), lambda: fleet_box[0].now)

    policy = make_policy(policy_name, affinity)
    fleet = Fleet(run, policy, random.Random(seed + 1))
    fleet_box.append(fleet)
    return fleet.play(workload(run, seed))


ZIPF = SeedRun(labels=64, wait_avg_s=0.0, service_s=0.04, load_s=0.4, backends=16, slots=4,
               requests=20_000)


def simulate_zipf(policy_name: str, seed: int, requests: int = 20_000, load: float = 0.7,
                  settings: AffinitySettings | None = None) -> Result:
    """The 16 x 4 Zipf(1.1) scenario, open loop at ``load`` of the fleet's capacity."""
    run = ZIPF
    rate = load * run.backends / run.service_s
    arrivals = zipf_arrivals(run.labels, 1.1, rate, requests, seed)
    fleet_box: list[Fleet] = []

    def affinity() -> Policy:
        return AffinityPolicy(ResidencyView(run.slots, 1), settings or AffinitySettings(
            load_s=run.load_s, service_s=run.service_s, min_residency_s=10 * run.load_s,
            demand_window_s=2.0), lambda: fleet_box[0].now)

    fleet = Fleet(run, make_policy(policy_name, affinity), random.Random(seed + 1))
    fleet_box.append(fleet)
    return fleet.play_open(arrivals)


def seed_settings(run: SeedRun) -> AffinitySettings:
    """The affinity settings the benchmark runs with: priors at the run's own times (an
    operator knows roughly what a load costs), the churn guard at two loads."""
    return AffinitySettings(load_s=run.load_s, service_s=run.service_s,
                            min_residency_s=10 * run.load_s, demand_window_s=10 * run.wait_avg_s)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.affinity_sim", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=int, choices=(1, 2), default=1)
    parser.add_argument("--policy", default="affinity")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--zipf", action="store_true", help="the 16 x 4 Zipf scenario instead")
    args = parser.parse_args(argv)
    for seed in range(args.seeds):
        r = (simulate_zipf(args.policy, seed) if args.zipf
             else simulate(RUNS[args.run], args.policy, seed))
        print(f"seed {seed}: misses {r.misses:5d}  task {r.mean_task_s:.4f} s  latency "
              f"{r.mean_latency_s:.4f} s  p99 {r.p99_latency_s:.4f} s  busy max/mean "
              f"{r.max_over_mean_busy:.2f}  hottest on {r.hottest_copies}  {r.reasons}")


if __name__ == "__main__":
    main()
