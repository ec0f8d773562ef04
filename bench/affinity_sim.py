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
import heapq
import itertools
import random
import statistics
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from router.balance.affinity import AffinityPolicy, AffinitySettings
from router.balance.policies import KeyedPolicy, Placed, Policy, make_policy
from router.balance.residency import ResidencyView


@dataclass(frozen=True, slots=True)
class SeedRun:
    """One of the seed's two runs (times in seconds, unscaled)."""

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


@dataclass(eq=False)
class SimBackend:
    id: str
    slots: int
    concurrency: int = 1
    weight: int = 1
    models: OrderedDict[str, int] = field(default_factory=OrderedDict)  # model -> users
    waiting: deque[Job] = field(default_factory=deque)
    running: int = 0
    misses: int = 0
    loads: int = 0
    evictions: int = 0

    @property
    def inflight(self) -> int:
        return self.running + len(self.waiting)


@dataclass(eq=False)
class Job:
    producer: int
    model: str
    sent_at: float
    requests: Any = None  # the producer's iterator of what it sends next
    token: Placed | None = None
    worker_s: float = 0.0


@dataclass
class Result:
    misses: int
    loads: int
    evictions: int
    mean_task_s: float
    mean_latency_s: float
    p99_latency_s: float
    reasons: dict[str, int]


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

    def _next(self, producer: int, requests: Any) -> None:
        item = next(requests, None)
        if item is None:
            return
        think, model = item
        self.at(self.now + think, lambda: self._send(Job(producer, model, self.now, requests)))

    def _send(self, job: Job) -> None:
        job.sent_at = self.now
        candidates = self.backends
        policy = self.policy
        if isinstance(policy, KeyedPolicy):
            index, job.token = policy.place(job.model, job.model, candidates, self.rng)
        else:
            index = policy.choose(candidates, self.rng)
        backend = candidates[index]
        backend.waiting.append(job)
        self._start_next(backend)

    def _start_next(self, backend: SimBackend) -> None:
        while backend.waiting and backend.running < backend.concurrency:
            job = backend.waiting.popleft()
            backend.running += 1
            if job.token is not None:
                job.token.started(self.now)
            self._work(backend, job)

    def _work(self, backend: SimBackend, job: Job) -> None:
        spec = self.run_spec
        took = spec.service_s
        if job.model not in backend.models:
            backend.misses += 1
            backend.loads += 1
            took += spec.load_s
            if len(backend.models) >= backend.slots:
                victim = next((m for m, users in backend.models.items() if not users), None)
                if victim is not None:
                    del backend.models[victim]
                    backend.evictions += 1
            backend.models[job.model] = 0
        backend.models[job.model] += 1
        backend.models.move_to_end(job.model)
        job.worker_s = took
        self.at(self.now + took, lambda: self._finish(backend, job))

    def _finish(self, backend: SimBackend, job: Job) -> None:
        backend.running -= 1
        backend.models[job.model] -= 1
        self.task_times.append(job.worker_s)
        self.latencies.append(self.now - job.sent_at)
        if job.token is not None:
            job.token.done(True, self.now)
        self._start_next(backend)
        self._next(job.producer, job.requests)

    def _result(self) -> Result:
        latencies = sorted(self.latencies)
        policy = self.policy
        return Result(
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


def seed_settings(run: SeedRun) -> AffinitySettings:
    """The affinity settings the benchmark runs with: priors at the run's own times (an
    operator knows roughly what a load costs), the churn guard at two loads."""
    return AffinitySettings(load_s=run.load_s, service_s=run.service_s,
                            min_residency_s=2 * run.load_s, demand_window_s=10 * run.wait_avg_s)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.affinity_sim", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=int, choices=(1, 2), default=1)
    parser.add_argument("--policy", default="affinity")
    parser.add_argument("--seeds", type=int, default=5)
    args = parser.parse_args(argv)
    for seed in range(args.seeds):
        r = simulate(RUNS[args.run], args.policy, seed)
        print(f"seed {seed}: misses {r.misses:5d}  task {r.mean_task_s:.4f} s  latency "
              f"{r.mean_latency_s:.4f} s  p99 {r.p99_latency_s:.4f} s  {r.reasons}")


if __name__ == "__main__":
    main()
