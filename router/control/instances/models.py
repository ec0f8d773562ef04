"""The replica manager's side of the admin API: the pydantic models of what it answers and
takes (declared in ``admin_routes``, so /openapi.json and docs/api.md carry them)."""

from __future__ import annotations

from typing import Literal

import pydantic

from router.control.instances.replica import ReplicaState
from router.core.config import MAX_REPLICAS, InstanceConfig

Origin = Literal["config", "api"]
RolloutState = Literal["running", "done", "failed"]


class ReplicaInfo(pydantic.BaseModel):
    replica: int
    id: str = pydantic.Field(description="its backend id in /v1/backends: NAME-i")
    address: str
    state: ReplicaState
    pid: int | None
    restarts: int
    restarts_by_reason: dict[str, int] = pydantic.Field(
        description="exited, health (failed checks), startup (did not become ready), "
        "requested (rolling restart)")
    crash_loop: bool = pydantic.Field(
        description="restarted at the longest backoff only, until it stays up")
    health_failures: int = pydantic.Field(description="failed health checks in a row")
    health_failures_total: int
    uptime_s: float | None = pydantic.Field(description="seconds since it became ready")
    next_start_in_s: float | None = pydantic.Field(
        description="while waiting to be started again")
    last_error: str | None
    last_error_log: list[str] = pydantic.Field(
        description="the last lines of its output when that error happened")
    log: str = pydantic.Field(description="its log file")


class RolloutInfo(pydantic.BaseModel):
    """A rolling restart: one replica at a time drained, stopped, started and ready."""

    state: RolloutState
    done: int
    of: int
    error: str | None = None


class InstanceInfo(pydantic.BaseModel):
    name: str
    origin: Origin = pydantic.Field(
        description="config: from [[instances]] (not deleted through the API); api: added "
        "through POST /v1/instances (persisted in the state file)")
    definition: InstanceConfig
    ready: int = pydantic.Field(description="replicas ready")
    error: str | None = pydantic.Field(
        None, description="why its replicas cannot run on this machine (none are started)")
    rollout: RolloutInfo | None = None
    replicas: list[ReplicaInfo]


class InstanceList(pydantic.RootModel[list[InstanceInfo]]):
    pass


class ScaleRequest(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid", frozen=True)

    replicas: int = pydantic.Field(ge=0, le=MAX_REPLICAS, strict=True)


class LogQuery(pydantic.BaseModel):
    """``lines[start:end]`` of one replica's log, Python slice semantics."""

    model_config = pydantic.ConfigDict(extra="forbid", frozen=True)

    replica: int = pydantic.Field(0, ge=0, le=MAX_REPLICAS, description="replica index")
    start: int | None = pydantic.Field(
        -100, ge=-(1 << 40), le=1 << 40,
        description="first line (negative: from the end); empty: the first")
    end: int | None = pydantic.Field(
        None, ge=-(1 << 40), le=1 << 40, description="end of the range, not included "
        "(negative: from the end); empty: after the last line")
    follow: bool = pydantic.Field(
        False, description="after the lines, stream each new one as it is written "
        "(text/plain, one line each) until the replica is removed")


class LogLines(pydantic.BaseModel):
    instance: str
    replica: int
    start: int = pydantic.Field(description="index of the first line returned")
    total: int = pydantic.Field(description="lines the log holds (rotated files included)")
    truncated: bool = pydantic.Field(
        description="the range held more lines than one answer gives (10,000): ask again "
        "from start + len(lines)")
    lines: list[str]
