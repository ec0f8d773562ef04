"""bench.affinity end to end at a tiny size: real routers and modelsim processes, the two
policies that matter, the JSON and the docs block it writes."""

from __future__ import annotations

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
