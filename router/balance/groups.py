"""Which policy places a request: its model's group, else its listener's, else the router's.

A route-level override of a global default, as Envoy's per-route cluster and HAProxy's
per-backend ``balance`` are: ``[[model_groups]]`` name models (exact names and shell-style
globs) and a policy; each listener (``listener.policy`` for TCP frames, ``grpc.policy`` for
gRPC calls) may name a policy; ``dispatch.policy`` is the default. Precedence, per request:

1. the first model group, in file order, with a name or glob matching the request's model;
2. the policy of the listener it came in on (its ``kind``: ``tcp`` or ``grpc``);
3. ``dispatch.policy``.

A ``PolicyTable`` holds the routes of one config. ``route(kind, model)`` runs per request, so
glob matching is not: a model's group (or none) is found once and memoised, per model name,
in a dict of at most ``MEMO_MAX`` names (past it the oldest name is forgotten: a flood of
distinct names costs one lookup each, never memory). A reload builds a new table; policies
whose spec (name and settings) did not change are carried over with their state (affinity's
measured times, round robin's cursor), so the same policy object serves every route with
that spec. Pure: no I/O, no clock.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from router.balance.policies import KeyedPolicy, Policy, as_keyed
from router.core.config import BOUNDED_POLICIES, RouterConfig

Source = Literal["model_group", "listener", "dispatch"]
# Distinct model names whose group is memoised. 4096: far above the models a fleet serves
# (the registry scale test runs 1,000), ~0.5 MiB at most.
MEMO_MAX = 4096
_NO_GROUP = -1
_GLOB_CHARS = frozenset("*?[")


@dataclass(frozen=True, slots=True)
class PolicySpec:
    """What makes two routes share one policy object: its name and the settings it takes
    (None where the policy takes none)."""

    name: str
    load_bound: float | None = None
    min_residency_s: float | None = None


@dataclass(frozen=True, slots=True)
class Route:
    """The policy that places a request, and what decided it (``/v1/debug/route``)."""

    policy: Policy
    keyed: KeyedPolicy | None  # the same object when it is keyed (checked once, not per request)
    source: Source
    group: str | None = None

    @classmethod
    def of(cls, policy: Policy, source: Source, group: str | None = None) -> Route:
        return cls(policy, as_keyed(policy), source, group)


@dataclass(frozen=True, slots=True)
class GroupRule:
    """One model group: exact names, then globs, matched against a request's model."""

    name: str
    exact: frozenset[str]
    globs: tuple[re.Pattern[str], ...]
    route: Route

    @classmethod
    def of(cls, name: str, models: Iterable[str], route: Route) -> GroupRule:
        patterns = list(models)
        exact = frozenset(p for p in patterns if not _GLOB_CHARS & set(p))
        globs = tuple(re.compile(fnmatch.translate(p)) for p in patterns if p not in exact)
        return cls(name, exact, globs, route)

    def matches(self, model: str) -> bool:
        return model in self.exact or any(glob.match(model) for glob in self.globs)


class PolicyTable:
    """The routes of one config: ``route(kind, model)`` per request (module docstring)."""

    def __init__(self, default: Route, listeners: Mapping[str, Route] | None = None,
                 groups: Iterable[GroupRule] = (), memo_max: int = MEMO_MAX,
                 instances: Mapping[PolicySpec, Policy] | None = None) -> None:
        if memo_max < 1:
            raise ValueError(f"memo_max must be >= 1, got {memo_max}")
        self.default = default
        self._listeners = dict(listeners or {})
        self._groups = tuple(groups)
        self._memo: dict[str, int] = {}  # model -> index into _groups, or _NO_GROUP
        self._memo_max = memo_max
        self.instances: dict[PolicySpec, Policy] = dict(instances or {})
        self.lookups = 0  # glob matches run: once per model name memoised

    @classmethod
    def single(cls, policy: Policy) -> PolicyTable:
        """One policy for every request (no listener policy, no groups)."""
        return cls(Route.of(policy, "dispatch"))

    @property
    def simple(self) -> bool:
        """Whether every request gets ``default`` (nothing to resolve per request)."""
        return not self._listeners and not self._groups

    def route(self, kind: str, model: str | None) -> Route:
        """The route of a request of ``kind`` (its listener: tcp or grpc) for ``model``."""
        if model is not None and self._groups:
            index = self._memo.get(model)
            if index is None:
                index = self._lookup(model)
            if index != _NO_GROUP:
                return self._groups[index].route
        return self._listeners.get(kind, self.default)

    def group_of(self, model: str) -> str | None:
        """The name of the group ``model`` belongs to, if any (memoised as ``route``)."""
        index = self._memo.get(model)
        if index is None:
            index = self._lookup(model)
        return None if index == _NO_GROUP else self._groups[index].name

    def _lookup(self, model: str) -> int:
        self.lookups += 1
        index = next((i for i, group in enumerate(self._groups) if group.matches(model)),
                     _NO_GROUP)
        memo = self._memo
        if len(memo) >= self._memo_max:
            del memo[next(iter(memo))]  # the oldest name: dicts keep insertion order
        memo[model] = index
        return index

    def routes(self) -> list[Route]:
        """Every route: the default, the listeners', the groups' (in file order)."""
        return [self.default, *self._listeners.values(), *(g.route for g in self._groups)]

    def policies(self) -> list[Policy]:
        """Each policy object once, the default's first."""
        seen: dict[int, Policy] = {}
        for route in self.routes():
            seen.setdefault(id(route.policy), route.policy)
        return list(seen.values())

    def statistics(self) -> dict[str, Any]:
        return {
            "default": self.default.policy.name,
            "listeners": {kind: r.policy.name for kind, r in self._listeners.items()},
            "groups": {g.name: g.route.policy.name for g in self._groups},
            "memoised": len(self._memo),
            "lookups": self.lookups,
        }

    def __repr__(self) -> str:
        return (f"PolicyTable(default={self.default.policy.name}, "
                f"listeners={len(self._listeners)}, groups={len(self._groups)})")


def spec_of(config: RouterConfig, name: str, load_bound: float | None = None,
            min_residency_s: float | None = None) -> PolicySpec:
    """The spec of policy ``name`` with a group's overrides (None: ``[affinity]``'s)."""
    a = config.affinity
    return PolicySpec(
        name,
        (a.load_bound if load_bound is None else load_bound) if name in BOUNDED_POLICIES
        else None,
        (a.min_residency_s if min_residency_s is None else min_residency_s)
        if name == "affinity" else None,
    )


def build_table(config: RouterConfig, make: Callable[[PolicySpec], Policy],
                previous: PolicyTable | None = None, memo_max: int = MEMO_MAX) -> PolicyTable:
    """The table of ``config``. ``make`` builds the policy of a spec; a spec ``previous``
    already has keeps its object (and state); one object per spec."""
    carried = previous.instances if previous is not None else {}
    made: dict[PolicySpec, Policy] = {}

    def route(spec: PolicySpec, source: Source, group: str | None = None) -> Route:
        policy = made.get(spec)
        if policy is None:
            policy = carried.get(spec)
            made[spec] = policy = policy if policy is not None else make(spec)
        return Route.of(policy, source, group)

    default = route(spec_of(config, config.dispatch.policy), "dispatch")
    listeners = {kind: route(spec_of(config, name), "listener") for kind, name in (
        ("tcp", config.listener.policy), ("grpc", config.grpc.policy)) if name is not None}
    groups = [GroupRule.of(g.name, g.models, route(
        spec_of(config, g.policy, g.load_bound, g.min_residency_s), "model_group", g.name))
        for g in config.model_groups]
    return PolicyTable(default, listeners, groups, memo_max, made)
