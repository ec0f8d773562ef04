"""bench.affinity end to end at a tiny size: real routers and modelsim processes, the two
policies that matter, the JSON and the docs block it writes."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from bench import affinity


def test_a_small_seed_run_writes_every_policy_and_the_table(tmp_path: Path) -> None:
    output = tmp_path / "affinity.json"
    affinity.main(["--runs", "2", "--requests", "60", "--scale", "0.02",
                   "--policies", "common_queue,affinity", "--output", str(output)])
    result = json.loads(output.read_text())
    [run] = result["seed_runs"]
    by_policy = {r["policy"]: r for r in run["results"]}
    assert set(by_policy) == {"common_queue", "affinity"}
    for r in by_policy.values():
        assert r["requests"] == 60 and r["errors"] == 0
        assert r["misses"] == r["loads"] >= 2  # at least the first load on each backend
    # 4 labels fit in 2 x 2 slots: affinity loads each about once, the common queue keeps on.
    assert by_policy["affinity"]["misses"] < by_policy["common_queue"]["misses"]
    assert by_policy["affinity"]["reasons"]["load"] >= 1
    block = affinity.docs_block(result)
    assert "`affinity`" in block and "seed: common_queue" in block


def test_misses_after_the_warm_up_are_counted_from_the_backends_miss_times() -> None:
    run = affinity.LoadRun(latencies=[0.1] * 10, errors=0, started_at=100.0,
                           lags=[0.0] * 9 + [0.005])
    stats = [
        {"requests": 6, "misses": 3, "loads": 3, "evictions": 0, "overcommits": 1,
         "evicted_waiting": 2, "worker_time_s": {"total": 1.0},
         "miss_times_s": [100.1, 100.5, 102.0], "models": {}},
        {"requests": 4, "misses": 1, "loads": 1, "evictions": 0,
         "worker_time_s": {"total": 0.5}, "miss_times_s": [103.0], "models": {}},
    ]
    # The warm-up: the first 4 requests, arriving within 1 s of the start (monotonic 101).
    result = affinity.summarise("affinity", 1, stats, run, 0.5, warmup=(4, 1.0))
    assert (result.steady_requests, result.steady_misses) == (6, 2)
    assert (result.misses, result.overcommits, result.evicted_waiting) == (4, 1, 2)
    assert result.generator_lag_max_ms == 5.0
    row = affinity.zipf_row(dataclasses.asdict(result))
    assert "| 33.33% | 2 | 40.00% |" in row  # after warm-up, in it, over all requests
