"""Policies per listener and per model group: the config's validation, the resolution of a
request's policy (precedence, globs, the memo and its bound, reload), the affinity policies of
several groups sharing one work ledger, and the scheduler placing each request by its own
route. Pure, or fake backends on a manual clock; no sleeps."""

from __future__ import annotations

import asyncio
import random
from typing import Any

import pytest

from router.balance.affinity import AffinityPolicy, AffinitySettings
from router.balance.groups import PolicySpec, PolicyTable, Route, build_table
from router.balance.policies import (
    ConsistentHashBounded,
    LeastConnections,
    Policy,
    RoundRobin,
    make_policy,
)
from router.balance.residency import ResidencyView
from router.control.metrics import ModelCollector
from router.core.clock import ManualClock
from router.core.config import DispatchConfig, PoolConfig, RouterConfig, from_mapping
from router.core.config_diff import diff
from router.core.errors import ConfigError
from router.core.types import BackendSpec
from router.dispatch.backends import Backend, Registry
from router.dispatch.request import Request
from router.dispatch.scheduler import Dispatcher
from router.dispatch.stats import DataPlaneStats
from router.upstream.pool import Pool
from tests.test_affinity_dispatch import Answers
from tests.test_dispatch_unit import FakeService


def config(**sections: Any) -> RouterConfig:
    return from_mapping(sections, "cfg.toml")


def problems(**sections: Any) -> list[str]:
    with pytest.raises(ConfigError) as info:
        from_mapping(sections, "cfg.toml")
    return list(info.value.problems)


class Maker:
    """``make`` for build_table: the real policies, each spec's object recorded."""

    def __init__(self) -> None:
        self.made: list[PolicySpec] = []
        self.view = ResidencyView(default_slots=2, default_concurrency=1)
        self.clock = ManualClock()

    def __call__(self, spec: PolicySpec) -> Policy:
        self.made.append(spec)

        def affinity() -> Policy:
            assert spec.load_bound is not None and spec.min_residency_s is not None
            settings = AffinitySettings(load_bound=spec.load_bound,
                                        min_residency_s=spec.min_residency_s)
            return AffinityPolicy(self.view, settings, self.clock.now)

        return make_policy(spec.name, affinity, spec.load_bound or 1.25)


GROUPS = [
    {"name": "llama", "models": ["llama-*", "mistral-7b"], "policy": "affinity",
     "load_bound": 2.0, "min_residency_s": 30.0},
    {"name": "bert", "models": ["bert-?", "[xy]-model", "llama-70b"],
     "policy": "consistent_hash_bounded", "load_bound": 3.0},
    {"name": "versions", "models": ["resnet:2"], "policy": "round_robin"},
]


# -- config validation ---------------------------------------------------------------------------


def test_a_group_with_an_unknown_policy_names_its_key_and_the_choices() -> None:
    [problem] = problems(model_groups=[{"name": "g", "models": ["m"], "policy": "fastest"}])
    assert problem.startswith("cfg.toml: model_groups[0].policy: "), problem
    assert "'affinity'" in problem and "'least_connections'" in problem


def test_a_listener_with_an_unknown_policy_names_its_key() -> None:
    [problem] = problems(grpc={"policy": "fastest"})
    assert problem.startswith("cfg.toml: grpc.policy: "), problem
    [problem] = problems(listener={"policy": 3})
    assert problem.startswith("cfg.toml: listener.policy: "), problem


def test_a_group_needs_a_model() -> None:
    [problem] = problems(model_groups=[{"name": "g", "models": [], "policy": "random"}])
    assert problem == ("cfg.toml: model_groups[0].models: Value error, a model group needs "
                       "at least one model name or glob")
    [problem] = problems(model_groups=[{"name": "g", "policy": "random"}])
    assert problem == "cfg.toml: model_groups[0].models: Field required"


@pytest.mark.parametrize("pattern", ["", " llama-*", "llama\x00", "bert "])
def test_a_model_pattern_is_not_empty_or_padded(pattern: str) -> None:
    [problem] = problems(model_groups=[{"name": "g", "models": ["ok", pattern],
                                        "policy": "random"}])
    assert problem.startswith("cfg.toml: model_groups[0].models[1]: "), problem
    assert "a model name or a glob" in problem


def test_group_names_are_unique() -> None:
    found = problems(model_groups=[
        {"name": "a", "models": ["x"], "policy": "random"},
        {"name": "b", "models": ["y"], "policy": "random"},
        {"name": "a", "models": ["z"], "policy": "affinity"},
    ])
    assert found == ["cfg.toml: model_groups[2].name: 'a' is already used by "
                     "model_groups[0].name"]


@pytest.mark.parametrize(("key", "value", "policy", "message"), [
    ("load_bound", 2.0, "round_robin",
     "load_bound applies to policy affinity or consistent_hash_bounded, not round_robin"),
    ("min_residency_s", 5.0, "consistent_hash_bounded",
     "min_residency_s applies to policy affinity, not consistent_hash_bounded"),
])
def test_an_override_the_policy_does_not_take_is_an_error(
    key: str, value: float, policy: str, message: str
) -> None:
    [problem] = problems(model_groups=[{"name": "g", "models": ["m"], "policy": policy,
                                        key: value}])
    assert problem == f"cfg.toml: model_groups[0]: {message}"


@pytest.mark.parametrize(("key", "value"), [("load_bound", 0.5), ("load_bound", True),
                                            ("min_residency_s", -1.0), ("name", "a b"),
                                            ("colour", "red")])
def test_a_group_key_out_of_range_is_reported_at_its_path(key: str, value: object) -> None:
    [problem] = problems(model_groups=[{"name": "g", "models": ["m"], "policy": "affinity",
                                        key: value}])
    assert problem.startswith(f"cfg.toml: model_groups[0].{key}: "), problem


def test_a_glob_matching_nothing_is_fine() -> None:
    cfg = config(model_groups=[{"name": "g", "models": ["nothing-like-this-*"],
                                "policy": "affinity"}])
    table = build_table(cfg, Maker())
    assert table.route("tcp", "llama-7b").source == "dispatch"


# -- resolution ----------------------------------------------------------------------------------


def test_precedence_model_group_then_listener_then_dispatch() -> None:
    cfg = config(dispatch={"policy": "random"}, listener={"policy": "least_connections"},
                 model_groups=GROUPS)
    table = build_table(cfg, Maker())
    group = table.route("tcp", "llama-7b")
    assert (group.policy.name, group.source, group.group) == ("affinity", "model_group", "llama")
    assert table.route("grpc", "llama-7b") is group  # whichever listener it came in on
    tcp = table.route("tcp", "other")
    assert (tcp.policy.name, tcp.source, tcp.group) == ("least_connections", "listener", None)
    grpc = table.route("grpc", "other")  # no grpc.policy: the default
    assert (grpc.policy.name, grpc.source) == ("random", "dispatch")
    assert table.route("tcp", None) is tcp  # no model, no group: the listener's
    assert table.route("grpc", None) is table.default


def test_exact_names_and_globs_first_group_in_file_order_wins() -> None:
    table = build_table(config(model_groups=GROUPS), Maker())
    expected = {
        "llama-7b": "llama", "mistral-7b": "llama", "llama-": "llama",
        "llama-70b": "llama",  # bert names it exactly, but llama's glob comes first
        "bert-a": "bert", "x-model": "bert", "y-model": "bert",
        "resnet:2": "versions",
        "mistral-7b:1": None, "bert-ab": None, "z-model": None, "LLAMA-7b": None,
        "resnet": None, "resnet:1": None, "Llama-7b": None,
    }
    assert {m: table.group_of(m) for m in expected} == expected
    assert {m: table.route("tcp", m).group for m in expected} == expected


def test_each_group_gets_its_own_settings() -> None:
    cfg = config(affinity={"load_bound": 1.5, "min_residency_s": 4.0}, model_groups=[
        *GROUPS, {"name": "plain", "models": ["p-*"], "policy": "affinity"},
        {"name": "hash", "models": ["h-*"], "policy": "consistent_hash_bounded"},
    ])
    table = build_table(cfg, Maker())
    llama = table.route("tcp", "llama-7b").policy
    assert isinstance(llama, AffinityPolicy)
    assert (llama.settings.load_bound, llama.settings.min_residency_s) == (2.0, 30.0)
    plain = table.route("tcp", "p-1").policy
    assert isinstance(plain, AffinityPolicy)
    assert (plain.settings.load_bound, plain.settings.min_residency_s) == (1.5, 4.0)
    bert, hashed = table.route("tcp", "bert-a").policy, table.route("tcp", "h-1").policy
    assert isinstance(bert, ConsistentHashBounded) and isinstance(hashed, ConsistentHashBounded)
    assert (bert.load_bound, hashed.load_bound) == (3.0, 1.5)
    assert table.route("tcp", "resnet:2").keyed is None  # round robin is not keyed
    assert table.route("tcp", "llama-7b").keyed is llama


def test_one_policy_object_per_spec() -> None:
    maker = Maker()
    cfg = config(dispatch={"policy": "affinity"}, listener={"policy": "affinity"},
                 model_groups=[{"name": "a", "models": ["a-*"], "policy": "affinity"},
                               {"name": "b", "models": ["b-*"], "policy": "round_robin"},
                               {"name": "c", "models": ["c-*"], "policy": "round_robin"}])
    table = build_table(cfg, maker)
    assert len(maker.made) == 2  # affinity at [affinity]'s settings, round robin
    assert table.route("tcp", "a-1").policy is table.default.policy
    assert table.route("tcp", "b-1").policy is table.route("tcp", "c-1").policy
    assert len(table.policies()) == 2 and table.policies()[0] is table.default.policy


def test_the_glob_match_runs_once_per_model_name() -> None:
    table = build_table(config(model_groups=GROUPS), Maker())
    for _ in range(100):
        for model in ("llama-7b", "bert-a", "unknown"):
            table.route("tcp", model)
    assert table.lookups == 3
    assert table.statistics()["memoised"] == 3


def test_the_memo_is_bounded_and_forgets_the_oldest_name() -> None:
    table = build_table(config(model_groups=GROUPS), Maker(), memo_max=3)
    for i in range(10):
        assert table.route("tcp", f"llama-{i}").group == "llama"
        assert table.statistics()["memoised"] == min(i + 1, 3)
    assert table.lookups == 10
    table.route("tcp", "llama-9")  # still memoised
    assert table.lookups == 10
    assert table.route("tcp", "llama-0").group == "llama"  # forgotten: looked up again
    assert table.lookups == 11
    with pytest.raises(ValueError, match="memo_max"):
        PolicyTable(table.default, memo_max=0)


def test_a_single_policy_table_resolves_nothing() -> None:
    policy = LeastConnections()
    table = PolicyTable.single(policy)
    assert table.simple and table.route("grpc", "m") == Route.of(policy, "dispatch")
    assert not build_table(config(listener={"policy": "random"}), Maker()).simple
    assert build_table(config(), Maker()).simple


# -- reload --------------------------------------------------------------------------------------


def test_reload_keeps_unchanged_policies_and_applies_changed_groups() -> None:
    maker = Maker()
    old_cfg = config(dispatch={"policy": "affinity"}, model_groups=GROUPS)
    old = build_table(old_cfg, maker)
    default = old.default.policy
    llama = old.route("tcp", "llama-7b").policy
    new_cfg = config(dispatch={"policy": "affinity"}, model_groups=[
        {**GROUPS[0], "load_bound": 4.0},  # changed: a new object with the new bound
        GROUPS[1],
        {"name": "resnets", "models": ["resnet*"], "policy": "round_robin"},
    ])
    d = diff(old_cfg, new_cfg)
    assert not d.restart and [key for key, _, _ in d.settings] == ["model_groups"]
    made_before = len(maker.made)
    new = build_table(new_cfg, maker, old)
    assert new.default.policy is default  # its measured numbers kept
    assert new.route("tcp", "bert-a").policy is old.route("tcp", "bert-a").policy
    fresh = new.route("tcp", "llama-7b").policy
    assert fresh is not llama and isinstance(fresh, AffinityPolicy)
    assert fresh.settings.load_bound == 4.0
    assert new.route("tcp", "resnet:1").group == "resnets"  # memo of the old table not used
    assert old.route("tcp", "resnet:1").group is None
    assert len(maker.made) == made_before + 1  # only the changed llama spec was made


def test_listener_policies_and_groups_reload_live_and_say_what_changed() -> None:
    old = config(listener={"policy": "random"}, model_groups=GROUPS[2:])
    new = config(listener={"policy": "round_robin"}, grpc={"policy": "affinity"},
                 model_groups=GROUPS[:2])
    d = diff(old, new)
    assert not d.restart
    assert d.describe(old, new) == [
        "listener.policy: 'random' -> 'round_robin'",
        "grpc.policy: None -> 'affinity'",
        "model_groups: [versions (round_robin: resnet:2)] -> [llama (affinity: llama-*, "
        "mistral-7b), bert (consistent_hash_bounded: bert-?, [xy]-model, llama-70b)]",
    ]


# -- affinity policies of several groups share one ledger -----------------------------------------


class Candidate:
    def __init__(self, id: str, inflight: int = 0) -> None:
        self.id = id
        self.inflight = inflight
        self.weight = 1


def test_affinity_policies_with_a_peer_count_each_others_work() -> None:
    clock = ManualClock()
    view = ResidencyView(default_slots=2, default_concurrency=1)
    first = AffinityPolicy(view, AffinitySettings(), clock.now)
    other = AffinityPolicy(view, AffinitySettings(load_bound=3.0), clock.now, first)
    alone = AffinityPolicy(view, AffinitySettings(load_bound=3.0), clock.now)
    busy = Candidate("b0", inflight=1)
    index, placed = first.place("m", "m", [busy], random.Random(1))
    assert index == 0 and placed is not None
    placed.started(clock.now())
    assert other.wait_s("b0", 1, clock.now()) > 0  # sees the first policy's request
    assert alone.wait_s("b0", 1, clock.now()) == 0.0  # without a peer, it cannot
    clock.advance(0.05)
    placed.done(True, clock.now())
    assert other.statistics()["placements_in_flight"] == 0


# -- the scheduler places each request by its route ----------------------------------------------


async def test_the_scheduler_uses_each_requests_route() -> None:
    clock = ManualClock()
    registry = Registry()
    services = [FakeService(), FakeService()]
    for index, service in enumerate(services):
        address = f"10.0.0.{index + 1}:9000"
        pool = Pool(service.dial, PoolConfig(max_connections=1, pipeline_depth=1), clock,
                    address)
        registry.add(Backend(BackendSpec(id=f"b{index}", address=address, models=("*",)),
                             pool))
    cfg = config(dispatch={"policy": "round_robin"}, model_groups=[
        {"name": "sticky", "models": ["s-*"], "policy": "consistent_hash_bounded"}])
    table = build_table(cfg, Maker())
    assert not table.simple
    dispatcher = Dispatcher(registry, table, DispatchConfig(), clock, DataPlaneStats(),
                            rng=random.Random(3))
    origin = Answers()

    async def served_by(model: str, count: int = 8) -> list[int]:
        before = [s.requests for s in services]
        for _ in range(count):
            request = Request(b"x", origin, clock.now(), model=model)
            dispatcher.submit(request)
            await origin.wait_for(request)
            assert request.response == b"x"
        return [s.requests - b for s, b in zip(services, before, strict=True)]

    assert sorted(await served_by("s-1")) == [0, 8]  # the group's hashing: one backend
    assert await served_by("other") == [4, 4]  # the default's round robin: alternating
    assert dispatcher.policy is table.default.policy
    assert dispatcher.statistics()["routes"]["groups"] == {"sticky": "consistent_hash_bounded"}
    assert isinstance(table.default.policy, RoundRobin)
    dispatcher.reconfigure(DispatchConfig(), build_table(
        config(dispatch={"policy": "round_robin"}), Maker(), table))
    assert dispatcher.routes.simple and dispatcher.routes.default.policy is table.default.policy
    assert await served_by("s-1") == [4, 4]  # the group is gone: round robin again
    async with asyncio.timeout(2.0):
        await dispatcher.wait_zero()


def test_metrics_count_every_groups_decisions_under_its_policys_name() -> None:
    maker = Maker()
    cfg = config(dispatch={"policy": "affinity"}, model_groups=[
        {"name": "g", "models": ["g-*"], "policy": "affinity", "load_bound": 2.0},
        {"name": "h", "models": ["h-*"], "policy": "consistent_hash_bounded"},
    ])
    table = build_table(cfg, maker)
    dispatcher = Dispatcher(Registry(), table, DispatchConfig(), maker.clock, DataPlaneStats())
    rng = random.Random(2)
    candidates = [Candidate("b0"), Candidate("b1")]
    for model in ("d-1", "g-1", "g-2", "h-1"):
        keyed = table.route("tcp", model).keyed
        assert keyed is not None
        keyed.place(model, model, candidates, rng)
    assert len({id(table.route("tcp", m).policy) for m in ("d-1", "g-1", "h-1")}) == 3
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in ModelCollector(dispatcher).collect() for s in family.samples}
    decisions = "router_route_decisions_total"
    assert samples[decisions, (("policy", "affinity"), ("reason", "load"))] == 3  # both
    assert samples[decisions, (("policy", "consistent_hash_bounded"), ("reason", "first"))] == 1
    requests = "router_model_requests_total"
    assert {m for (name, labels), _ in samples.items() if name == requests
            for key, m in labels if key == "model"} == {"d-1", "g-1", "g-2"}
    assert samples[requests, (("model", "g-2"), ("outcome", "load"))] == 1
