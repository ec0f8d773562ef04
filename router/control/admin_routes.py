"""The admin API's routes and the pydantic models of what they answer: the one declaration
that one router process and the federation over several serve, and from which /openapi.json
and docs/api.md's endpoint table are generated."""

from __future__ import annotations

from importlib import metadata
from typing import Any, Literal

import pydantic

from router.control.api import ErrorBody, Route, endpoint_table, openapi
from router.control.directory import (
    BackendInfo,
    DirectoryList,
    LeaseBatch,
    LeaseBatchResult,
    LoadReport,
    Registered,
    Registration,
    WeightChange,
)
from router.control.instances.models import (
    InstanceInfo,
    InstanceList,
    LogLines,
    LogQuery,
    ScaleRequest,
)
from router.control.models_api import ModelList, RouteDecision
from router.core.config import InstanceConfig

TITLE = "inference-router admin API"
PROMETHEUS_TEXT = "text/plain"


class ProcessHealth(pydantic.BaseModel):
    index: int
    pid: int | None
    alive: bool
    restarts: int


class Healthz(pydantic.BaseModel):
    status: Literal["ok"]
    processes: list[ProcessHealth] | None = pydantic.Field(
        default=None, description="each router process (multi-process routers only)")


class Ready(pydantic.BaseModel):
    ready: Literal[True]
    processes: int | None = pydantic.Field(
        default=None, description="router processes answering ready (multi-process only)")


class NotReady(pydantic.BaseModel):
    ready: Literal[False]
    reason: str


class BackendStats(pydantic.BaseModel):
    """One backend: who it is and its runtime state (``Backend.statistics()``); its pool or
    gRPC call limiter counters are under ``pool`` or ``calls``."""

    model_config = pydantic.ConfigDict(extra="allow")
    id: str
    address: str
    kind: Literal["tcp", "grpc"]
    source: str
    labels: dict[str, str]
    weight: int
    models: list[str]
    healthy: bool
    state: Literal["up", "down", "draining"]
    drained: bool = pydantic.Field(
        False, description="out of rotation by an operator (POST /v1/backends/{id}/drain)")
    inflight: int
    waiting: int
    requests_total: int
    failures_total: int
    consecutive_failures: int
    process: int | None = pydantic.Field(
        default=None, description="the router process reporting it (multi-process only)")


class BackendList(pydantic.RootModel[list[BackendStats]]):
    pass


class Stats(pydantic.RootModel[dict[str, Any]]):
    """The data plane's counters (one process), or each process's under its index."""


class ReloadDone(pydantic.BaseModel):
    reloaded: Literal[True]
    changes: list[str]


class ReloadRefused(pydantic.BaseModel):
    """The running config stays; ``problems`` are check-config's."""

    reloaded: Literal[False]
    error: str
    code: str
    problems: list[str]
    timestamp: str


class CertificatesReloaded(pydantic.BaseModel):
    """``reloaded`` is false (status 422) with the problems; the running files are kept."""

    reloaded: bool
    problems: list[str]


class OpenApiDocument(pydantic.RootModel[dict[str, Any]]):
    """This document."""


ROUTES: tuple[Route, ...] = (
    Route("metrics", "GET", "/metrics", "Prometheus metrics", {200: PROMETHEUS_TEXT}),
    Route("healthz", "GET", "/healthz", "The process is alive", {200: Healthz}),
    Route("readyz", "GET", "/readyz", "Ready for traffic: not draining, some backend in "
          "rotation", {200: Ready, 503: NotReady}),
    Route("backends", "GET", "/backends", "Every backend and its state", {200: BackendList}),
    Route("backend", "GET", "/backends/{id}", "One backend by id",
          {200: BackendStats, 404: ErrorBody}),
    Route("stats", "GET", "/stats", "The data plane's counters", {200: Stats}),
    Route("openapi", "GET", "/openapi.json", "This API as OpenAPI 3.1", {200: OpenApiDocument}),
    Route("reload", "POST", "/admin/reload", "Read the config again and apply it (as SIGHUP)",
          {200: ReloadDone, 400: ReloadRefused, 409: ReloadRefused, 500: ReloadRefused},
          mutates=True),
    Route("reload_certificates", "POST", "/admin/reload-certificates", "Read certificates, "
          "keys, CAs and the token again", {200: CertificatesReloaded,
                                            422: CertificatesReloaded}, mutates=True),
)

# The directory (control.directory): backends that register themselves, and operators' changes.
_NOT_FOUND = {404: ErrorBody}
V1_ROUTES: tuple[Route, ...] = (
    Route("v1_register", "POST", "/v1/backends", "Register a backend (leased), or add one "
          "(lease_ttl_s null)", {201: Registered, 409: ErrorBody, 422: ErrorBody},
          request=Registration, mutates=True),
    Route("v1_list", "GET", "/v1/backends", "Every backend, every source, with its state",
          {200: DirectoryList}),
    Route("v1_get", "GET", "/v1/backends/{id}", "One backend", {200: BackendInfo, **_NOT_FOUND}),
    Route("v1_heartbeat", "PUT", "/v1/backends/{id}/lease", "Renew a backend's lease "
          "(heartbeat), with its load report", {200: Registered, **_NOT_FOUND},
          request=LoadReport, mutates=True),
    Route("v1_heartbeat_many", "PUT", "/v1/leases", "Renew many leases at once (a process "
          "running many backends)", {200: LeaseBatchResult}, request=LeaseBatch, mutates=True),
    Route("v1_deregister", "DELETE", "/v1/backends/{id}", "Deregister: the backend drains, "
          "then leaves", {202: BackendInfo, 409: ErrorBody, **_NOT_FOUND}, mutates=True),
    Route("v1_drain", "POST", "/v1/backends/{id}/drain", "Take a backend out of rotation "
          "(kept, probed; in-flight requests finish)", {200: BackendInfo, **_NOT_FOUND},
          mutates=True),
    Route("v1_undrain", "POST", "/v1/backends/{id}/undrain", "Put a drained backend back "
          "in rotation", {200: BackendInfo, **_NOT_FOUND}, mutates=True),
    Route("v1_weight", "PUT", "/v1/backends/{id}/weight", "Set a backend's weight",
          {200: BackendInfo, **_NOT_FOUND}, request=WeightChange, mutates=True),
    # Model routing (control.models_api): what the router knows of its models.
    Route("v1_models", "GET", "/v1/models", "Every model: its holders, those loading it, "
          "the copies its demand wants, its measured times and requests by outcome",
          {200: ModelList}),
    Route("v1_debug_route", "GET", "/v1/debug/route", "A dry run of one placement: "
          "?model=NAME (&kind=tcp|grpc, &key=ROUTING_KEY); the policy and what chose it (model "
          "group, listener, dispatch), the candidates, their scores, the choice and its reason",
          {200: RouteDecision, 400: ErrorBody}),
)
# The replica manager (control.instances): managed instances and their replicas' logs.
_INVALID = {400: ErrorBody}
INSTANCE_ROUTES: tuple[Route, ...] = (
    Route("instances_list", "GET", "/v1/instances", "Every managed instance and its replicas",
          {200: InstanceList}),
    Route("instances_create", "POST", "/v1/instances", "Add an instance and start its "
          "replicas (they answer starting)", {201: InstanceInfo, **_INVALID, 409: ErrorBody,
                                              422: ErrorBody},
          request=InstanceConfig, mutates=True),
    Route("instance_get", "GET", "/v1/instances/{name}", "One instance and its replicas",
          {200: InstanceInfo, **_NOT_FOUND}),
    Route("instance_delete", "DELETE", "/v1/instances/{name}", "Drain and stop every replica, "
          "then forget the instance (answers once they have stopped)",
          {200: InstanceInfo, 409: ErrorBody, **_NOT_FOUND}, mutates=True),
    Route("instance_restart", "POST", "/v1/instances/{name}/restart", "Rolling restart: one "
          "replica at a time drained, stopped, started and ready",
          {202: InstanceInfo, **_NOT_FOUND}, mutates=True),
    Route("instance_scale", "PUT", "/v1/instances/{name}/replicas", "Scale up (new replicas "
          "start) or down (the highest drain, then stop)",
          {202: InstanceInfo, **_INVALID, 409: ErrorBody, 422: ErrorBody, **_NOT_FOUND},
          request=ScaleRequest, mutates=True),
    Route("instance_logs", "GET", "/v1/instances/{name}/logs", "Lines of a replica's log "
          "(Python slice semantics); follow=true streams new lines as text/plain",
          {200: LogLines, **_INVALID, **_NOT_FOUND}, query=LogQuery),
)
ALL_ROUTES = ROUTES + V1_ROUTES + INSTANCE_ROUTES


def _version() -> str:
    try:
        return metadata.version("inference-router")
    except metadata.PackageNotFoundError:  # run from a checkout that was never installed
        return "0"


def document() -> dict[str, Any]:
    return openapi(ALL_ROUTES, TITLE, _version())


def table() -> str:
    return endpoint_table(ALL_ROUTES)
