"""The regression gate's comparison (pure; the smoke bench itself runs in `make bench-smoke`)."""

from __future__ import annotations

from bench.regress import compare, router_direct_ratios


def test_ratio_within_drift_passes_and_below_fails() -> None:
    baseline = {50: 0.40}
    assert compare({50: 0.30}, baseline, 0.30) == []  # 0.30 >= 0.28
    [problem] = compare({50: 0.27}, baseline, 0.30)
    assert "50 clients" in problem


def test_missing_client_count_is_a_problem() -> None:
    assert compare({}, {50: 0.4}, 0.3) == ["50 clients: missing from the smoke run"]


def test_ratios_are_read_from_a_bench_result() -> None:
    result = {"ratios": [
        {"clients": 50, "ratio": "router/direct", "requests_per_s": 0.33},
        {"clients": 50, "ratio": "router/haproxy", "requests_per_s": 0.46},
    ]}
    assert router_direct_ratios(result) == {50: 0.33}
