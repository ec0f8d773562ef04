"""``GET /v1/models`` and ``GET /v1/debug/route``: what the router knows of its models, and a
dry run of one placement. Both read the residency view and the dispatcher's routes (the
policy of each listener and model group); neither changes anything (the debug route runs the
policy's decision without applying it)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import pydantic
from aiohttp import web

from router.balance.affinity import OUTCOME_OF, AffinityPolicy
from router.balance.policies import ConsistentHashBounded
from router.balance.rendezvous import Rendezvous
from router.balance.residency import LOADED, LOADING, ResidencyView
from router.control.api import Handler, json_response
from router.core.errors import InvalidInput
from router.dispatch.backends import Backend
from router.dispatch.scheduler import Dispatcher

Kind = Literal["tcp", "grpc"]


class ModelRequests(pydantic.BaseModel):
    hit: int = 0
    load: int = 0
    waited: int = 0


class ModelInfo(pydantic.BaseModel):
    """One model as this router process sees it."""

    model: str
    group: str | None = pydantic.Field(None, description="the model group it belongs to")
    holders: list[str] = pydantic.Field(description="backends with it loaded")
    loading: list[str] = pydantic.Field(description="backends loading it now")
    copies_wanted: int | None = pydantic.Field(
        None, description="copies its demand needs (affinity only)")
    demand: float | None = pydantic.Field(
        None, description="backends its requests keep busy (affinity only)")
    service_s: float | None = pydantic.Field(None, description="measured service time")
    load_s: float | None = pydantic.Field(None, description="measured load time")
    requests: ModelRequests = pydantic.Field(default_factory=ModelRequests)
    loads: int = 0
    evictions: int = 0


class ModelList(pydantic.RootModel[list[ModelInfo]]):
    pass


class RouteCandidate(pydantic.BaseModel):
    backend: str
    state: str = pydantic.Field(description="loaded, loading or absent")
    inflight: int = pydantic.Field(description="this router's requests there")
    foreign: int = pydantic.Field(0, description="other routers' requests there, from the "
                                  "backend's last reported model_use (affinity only)")
    concurrency: int | None = None
    wait_s: float | None = pydantic.Field(None, description="expected wait before it starts")
    cost_s: float | None = pydantic.Field(None, description="expected time to the answer")
    rank: int = pydantic.Field(description="rendezvous rank for the key, 0 first")
    can_load: str = pydantic.Field("", description="absent: free slot, evicts NAME, churn "
                                   "guard, in use")


class RouteDecision(pydantic.BaseModel):
    """A dry run: where a request for ``model`` would go now, and why."""

    model: str
    kind: Kind
    policy: str = pydantic.Field(description="the policy that places it")
    decided_by: Literal["model_group", "listener", "dispatch"] = pydantic.Field(
        description="what chose the policy: its model group, the listener's policy, or "
        "dispatch.policy")
    group: str | None = pydantic.Field(None, description="the model group, if one decided")
    choice: str | None = pydantic.Field(description="the backend id; null if none, or if "
                                        "the policy does not decide by model")
    reason: str
    copies_wanted: int | None = None
    candidates: list[RouteCandidate]


class ModelRouting:
    """The data of the two routes (one router process)."""

    def __init__(self, dispatcher: Dispatcher, view: ResidencyView,
                 now: Callable[[], float]) -> None:
        self._dispatcher = dispatcher
        self._view = view
        self._now = now
        self._rendezvous = Rendezvous()

    def models(self) -> list[ModelInfo]:
        routes = self._dispatcher.routes
        affinities = [p for p in routes.policies() if isinstance(p, AffinityPolicy)]
        held = self._view.models()
        names = set(held).union(*(a.numbers() for a in affinities))
        return [self._model(name, held.get(name, {}), self._affinity_of(name, affinities))
                for name in sorted(names)]

    def _affinity_of(self, model: str, affinities: list[AffinityPolicy]
                     ) -> AffinityPolicy | None:
        """The affinity policy that measured ``model``, else the one that would place it."""
        measured = next((a for a in affinities if model in a.numbers()), None)
        if measured is not None:
            return measured
        routes = self._dispatcher.routes
        for kind in ("tcp", "grpc"):
            policy = routes.route(kind, model).policy
            if isinstance(policy, AffinityPolicy):
                return policy
        return None

    def _model(self, name: str, holders: dict[str, Any], affinity: AffinityPolicy | None
               ) -> ModelInfo:
        info = ModelInfo(
            model=name, group=self._dispatcher.routes.group_of(name),
            holders=sorted(b for b, r in holders.items() if r.state == LOADED),
            loading=sorted(b for b, r in holders.items() if r.state == LOADING),
        )
        if affinity is None:
            return info
        now = self._now()
        numbers = affinity.numbers().get(name)
        info.copies_wanted = affinity.copies_wanted(name, now)
        info.demand = affinity.demand(name, now)
        if numbers is not None:
            info.service_s, info.load_s = numbers.service_s, numbers.load_s
            info.requests = ModelRequests(**{k: numbers.outcomes.get(k, 0)
                                             for k in ("hit", "load", "waited")})
            info.loads, info.evictions = numbers.loads, numbers.evictions
        return info

    def route(self, model: str, kind: Kind, key: str | None) -> RouteDecision:
        candidates = self._dispatcher.registry.candidates((), kind, model)
        chosen = self._dispatcher.routes.route(kind, model)
        policy = chosen.policy
        base = {"model": model, "kind": kind, "policy": policy.name,
                "decided_by": chosen.source, "group": chosen.group}
        if not candidates:
            return RouteDecision(**base, choice=None, reason="no_backend", candidates=[])
        if isinstance(policy, AffinityPolicy):
            decision = policy.decide(model, candidates, self._now(), explain=True)
            return RouteDecision(
                **base, choice=candidates[decision.index].id, reason=decision.reason,
                copies_wanted=decision.copies_wanted,
                candidates=[RouteCandidate(
                    backend=s.backend, state=s.state, inflight=s.inflight, foreign=s.foreign,
                    concurrency=s.concurrency, wait_s=s.wait_s, cost_s=s.cost_s, rank=s.rank,
                    can_load=s.can_load) for s in decision.candidates],
            )
        rows = self._plain_rows(key or model, candidates)
        if isinstance(policy, ConsistentHashBounded):
            index, first = policy.pick(key or model, candidates)
            return RouteDecision(**base, choice=candidates[index].id,
                                 reason="hash_first" if first else "hash_spill", candidates=rows)
        return RouteDecision(**base, choice=None, reason="not_keyed", candidates=rows)

    def _plain_rows(self, key: str, candidates: list[Backend]) -> list[RouteCandidate]:
        order = self._rendezvous.ranked(key, [c.id for c in candidates],
                                        [c.weight for c in candidates])
        rank = {index: position for position, index in enumerate(order)}
        return [RouteCandidate(
            backend=c.id, inflight=c.inflight, rank=rank[i],
            state=_state(self._view, c.id, key)) for i, c in enumerate(candidates)]


def _state(view: ResidencyView, backend: str, model: str) -> str:
    resident = view.get(backend, model)
    return "absent" if resident is None else resident.state


def model_handlers(routing: ModelRouting) -> dict[str, Handler]:
    async def list_models(request: web.Request) -> web.Response:
        return json_response([m.model_dump(mode="json") for m in routing.models()])

    async def debug_route(request: web.Request) -> web.Response:
        query = request.query
        model = query.get("model", "")
        kind = query.get("kind", "tcp")
        if not model:
            raise InvalidInput("model: a query parameter ?model=NAME is required")
        if kind not in ("tcp", "grpc"):
            raise InvalidInput(f"kind: expected tcp or grpc, got {kind[:32]!r}")
        decision = routing.route(model, "grpc" if kind == "grpc" else "tcp", query.get("key"))
        return json_response(decision.model_dump(mode="json"))

    return {"v1_models": list_models, "v1_debug_route": debug_route}


__all__ = ["OUTCOME_OF", "ModelInfo", "ModelList", "ModelRouting", "RouteDecision",
           "model_handlers"]
