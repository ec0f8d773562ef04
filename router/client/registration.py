"""Self-registration for any Python model server: join a router's fleet, keep the lease, leave.

::

    async with Registration("http://127.0.0.1:7072", address="127.0.0.1:9001",
                            models=["resnet:1"], token=token) as lease:
        await serve_until_stopped()

Entering registers (``POST /v1/backends``): once it returns the router routes to this
backend. A task owned by the ``Registration`` then renews the lease (``PUT
/v1/backends/{id}/lease``) every heartbeat interval (the router's answer, a third of the TTL,
unless ``heartbeat_interval_s`` is given), carrying ``inflight``, ``loaded_models`` and
``model_use`` (each model's requests here now, running or waiting: how routers sharing this
backend see each other's load; the largest 1,024 counts are sent) when the caller passes
callables for them; ``report_to`` names the other routers of a shared etcd
registry, which get the same heartbeat after each renewal (each router keeps the reports it
receives, and an affinity router places models from them). ``report_soon()`` asks for the
next heartbeat now rather than at the interval (at most one per ``min_report_gap_s``): a
backend calls it when what it holds changes, so that routers sharing it learn of a load or
an eviction within milliseconds, not an interval later. A heartbeat answered
``LEASE_NOT_FOUND`` (the router restarted, or the lease expired) registers again at once; a
router that is down or failing is retried with capped, jittered backoff, at most one
heartbeat interval apart
(``router.client.lease`` decides all of this, without I/O). Every change of state is logged
once, however long it lasts. Leaving deregisters (``DELETE /v1/backends/{id}``): when that
returns the router sends nothing new here, and the caller drains what is in flight.

A router that cannot be reached at entry is not an error: entering logs it and returns, and
the task registers as soon as the router answers (``wait_registered`` waits for that). A
refusal at entry (bad token ``UNAUTHORIZED``/``FORBIDDEN``, ``VALIDATION_ERROR``,
``BACKEND_EXISTS``, ``ADDRESS_CONFLICT``, ...) raises ``RegistrationRefused``: a
misconfiguration shows at once. Later refusals are logged as errors and retried.

The wire bodies are plain dicts: this package sits below the control plane that declares
them (``router.control.directory``: ``Registration``, ``Registered``, ``LoadReport``).
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import logging
import math
import random
import ssl as ssl_module
import urllib.parse
from collections.abc import Callable, Iterable, Mapping
from types import TracebackType
from typing import Any, Literal

import aiohttp
import orjson
from yarl import URL

from router.client.lease import (
    DEFAULT_LEASE_TTL_S,
    Action,
    Backoff,
    Lease,
    LeaseSchedule,
    State,
)
from router.core.clock import Clock, MonotonicClock, Timer
from router.core.types import MAX_REPORTED_MODELS

log = logging.getLogger(__name__)

# One call to the router: a registration waits for the router to apply it (at most 2 s for
# a shared store whose watch lags), so this leaves room for that and a slow loopback.
REQUEST_TIMEOUT_S = 5.0
# The least time between two heartbeats that report_soon() brings forward: a backend that
# loads a model every few ms reports at most 20 times a second.
MIN_REPORT_GAP_S = 0.05
LEASE_NOT_FOUND = "LEASE_NOT_FOUND"
BACKEND_NOT_FOUND = "BACKEND_NOT_FOUND"
# Answers worth retrying as they are: the router or something in front of it is busy.
_TRANSIENT_4XX = frozenset({408, 425, 429})

Protocol = Literal["frames", "grpc"]


class RegistrationRefused(Exception):
    """The router refused the registration for a reason retrying will not fix by itself."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message


class _Unreachable(Exception):
    """No usable answer: connect refused, timeout, 5xx, or a body that is not the API's."""


class Registration:
    def __init__(
        self,
        router_url: str,
        *,
        address: str,
        protocol: Protocol = "frames",
        models: Iterable[str] = (),
        weight: int = 1,
        labels: Mapping[str, str] | None = None,
        backend_id: str | None = None,
        lease_ttl_s: float = DEFAULT_LEASE_TTL_S,
        heartbeat_interval_s: float | None = None,
        token: str | None = None,
        inflight: Callable[[], int] | None = None,
        loaded_models: Callable[[], Iterable[str]] | None = None,
        model_use: Callable[[], Mapping[str, int]] | None = None,
        report_to: Iterable[str] = (),
        request_timeout_s: float = REQUEST_TIMEOUT_S,
        min_report_gap_s: float = MIN_REPORT_GAP_S,
        ssl: ssl_module.SSLContext | None = None,
        backoff: Backoff | None = None,
        clock: Clock | None = None,
        rng: random.Random | None = None,
    ) -> None:
        if not router_url.startswith(("http://", "https://")):
            raise ValueError(f"router_url is the admin API's http(s)://HOST:PORT, got "
                             f"{router_url!r}")
        self.router_url = router_url.rstrip("/")
        self.report_to = tuple(url.rstrip("/") for url in report_to)
        for url in self.report_to:
            if not url.startswith(("http://", "https://")):
                raise ValueError(f"report_to takes admin APIs' http(s)://HOST:PORT, got {url!r}")
        self._ssl = ssl
        self._body: dict[str, Any] = {
            "address": address, "protocol": protocol, "models": list(models),
            "weight": weight, "labels": dict(labels or {}), "lease_ttl_s": lease_ttl_s,
        }
        if backend_id is not None:
            self._body["id"] = backend_id
        self._asked_id = backend_id or address  # the router's default id is the address
        self._headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._inflight = inflight
        self._loaded_models = loaded_models
        self._model_use = model_use
        self._timeout = aiohttp.ClientTimeout(total=request_timeout_s)
        self._clock = clock or MonotonicClock(asyncio.get_running_loop)
        self._schedule = LeaseSchedule(self._clock.now(), lease_ttl_s=lease_ttl_s,
                                       heartbeat_interval_s=heartbeat_interval_s,
                                       backoff=backoff, rng=rng)
        self._session: aiohttp.ClientSession | None = None
        self._task: asyncio.Task[None] | None = None
        self._registered = asyncio.Event()
        self._wake = asyncio.Event()  # the next step's time has come, or report_soon()
        self._report_wanted = False
        self._min_report_gap_s = min_report_gap_s
        self._beat_at = -math.inf  # when the last heartbeat was sent
        # A registration was sent and may have been applied: leaving must deregister.
        self._may_hold = False
        self.deregistered = False

    # -- the context --------------------------------------------------------------------------

    async def __aenter__(self) -> Registration:
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(ssl=self._ssl if self._ssl is not None else True),
            timeout=self._timeout, headers=self._headers,
            json_serialize=lambda v: orjson.dumps(v).decode())
        try:
            await self._attempt("register", raise_refusal=True)
        except BaseException:
            await self._session.close()
            raise
        self._task = asyncio.create_task(self._keep(), name=f"lease-{self._asked_id}")
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.close()

    async def close(self) -> None:
        """Stop renewing, then deregister (bounded by the request timeout)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._session is None:
            return
        try:
            if self._may_hold:
                await self._deregister()
        finally:
            await self._session.close()
            self._session = None

    @property
    def backend_id(self) -> str:
        lease = self._schedule.lease
        return lease.backend_id if lease is not None else self._asked_id

    @property
    def state(self) -> State:
        return self._schedule.state

    @property
    def registered(self) -> bool:
        return self._schedule.state == "holding"

    def report_soon(self) -> None:
        """Send the next heartbeat, with its report, now (or ``min_report_gap_s`` after the
        last one) instead of at the interval; while the lease is held only."""
        self._report_wanted = True
        self._wake.set()

    async def wait_registered(self) -> None:
        """Until the router holds this backend's lease (at once when it does)."""
        while not self.registered:
            self._registered.clear()
            await self._registered.wait()

    # -- the lease ----------------------------------------------------------------------------

    async def _keep(self) -> None:
        try:
            while True:
                step = self._schedule.next_step()
                at = step.at
                if self._report_wanted and step.action == "heartbeat" and self.registered:
                    at = min(at, self._beat_at + self._min_report_gap_s)
                if not await self._until(at):
                    continue  # woken by report_soon(): the next step again
                if step.action == "heartbeat":
                    self._report_wanted = False
                    self._beat_at = self._clock.now()
                await self._attempt(step.action)
        except Exception:  # a bug: say so now, not when close() awaits the task
            log.exception("%s: the lease of %s is no longer renewed", self.router_url,
                          self.backend_id)
            raise

    async def _until(self, when: float) -> bool:
        """Wait until ``when``; False if ``report_soon()`` woke it before."""
        self._wake.clear()
        if when <= self._clock.now():
            return True
        fired = False

        def due() -> None:
            nonlocal fired
            fired = True
            self._wake.set()

        timer: Timer = self._clock.call_at(when, due)
        try:
            await self._wake.wait()
        finally:
            timer.cancel()
        return fired

    async def _attempt(self, action: Action, *, raise_refusal: bool = False) -> None:
        """Make one call and tell the schedule how it went."""
        schedule = self._schedule
        try:
            if action == "register":
                lease = await self._register()
                change = schedule.registered(self._clock.now(), lease)
            elif await self._heartbeat():
                change = schedule.renewed(self._clock.now())
            else:
                self._may_hold = False
                change = schedule.lease_lost(self._clock.now())
        except RegistrationRefused as exc:
            if raise_refusal:
                raise
            change = schedule.failed(self._clock.now(), str(exc), permanent=True)
        except _Unreachable as exc:
            change = schedule.failed(self._clock.now(), str(exc))
        if change is not None:
            self._log_change(change)
        if schedule.state == "holding":
            self._registered.set()

    async def _register(self) -> Lease:
        self._may_hold = True  # until the router says otherwise: a lost answer may be a yes
        status, body = await self._call("POST", "/v1/backends", self._body)
        if status not in (200, 201):
            self._may_hold = False
            raise _refusal(status, body)
        try:
            return Lease(str(body["id"]), float(body["lease_ttl_s"]),
                         float(body["heartbeat_interval_s"]))
        except (KeyError, TypeError, ValueError):
            raise _Unreachable(f"{status} answer without a lease: {body!r:.200}") from None

    async def _heartbeat(self) -> bool:
        """Renew; False when the router holds no lease for us (register again)."""
        report: dict[str, Any] = {}
        if self._inflight is not None:
            report["inflight"] = self._inflight()
        if self._loaded_models is not None:
            report["loaded_models"] = list(self._loaded_models())
        if self._model_use is not None:
            report["model_use"] = reported_use(self._model_use())
        status, body = await self._call("PUT", f"{self._path()}/lease", report)
        if status == 200:
            await self._report_elsewhere(report)
            return True
        if status == 404 and body.get("code") == LEASE_NOT_FOUND:
            return False
        raise _refusal(status, body)

    async def _report_elsewhere(self, report: dict[str, Any]) -> None:
        """The same heartbeat to every ``report_to`` router (routers sharing this one's etcd
        registry: each keeps the reports it receives, so each gets them all). Best effort:
        the lease is this router's business, so a refusal or no answer there is logged at
        DEBUG and changes nothing."""
        for url in self.report_to:
            try:
                status, body = await self._call("PUT", f"{self._path()}/lease", report, url)
            except _Unreachable as exc:
                log.debug("%s: report for %s not delivered (%s)", url, self.backend_id, exc)
                continue
            if status != 200:
                log.debug("%s: report for %s answered %s", url, self.backend_id,
                          _refusal(status, body))

    async def _deregister(self) -> None:
        try:
            status, body = await self._call("DELETE", self._path(), None)
        except _Unreachable as exc:
            log.warning("%s: could not deregister %s (%s): its lease expires by itself",
                        self.router_url, self.backend_id, exc)
            return
        if status in (200, 202) or (status == 404 and body.get("code") == BACKEND_NOT_FOUND):
            self.deregistered = True
            log.info("%s: deregistered %s", self.router_url, self.backend_id)
        else:
            log.warning("%s: deregistering %s answered %s", self.router_url, self.backend_id,
                        _refusal(status, body))

    def _path(self) -> str:
        return "/v1/backends/" + urllib.parse.quote(self.backend_id, safe="")

    async def _call(self, method: str, path: str, body: dict[str, Any] | None,
                    router_url: str | None = None) -> tuple[int, dict[str, Any]]:
        """One request (to ``router_url``, default the router registered with): its status
        and JSON object body; ``_Unreachable`` for no answer, a 5xx, a transient 4xx, or a
        body that is not a JSON object."""
        assert self._session is not None
        url = URL((router_url or self.router_url) + path, encoded=True)
        try:
            async with self._session.request(method, url, json=body) as response:
                raw = await response.read()
                status = response.status
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise _Unreachable(_describe(exc)) from None
        if status >= 500 or status in _TRANSIENT_4XX:
            raise _Unreachable(f"{method} {path} answered {status}: {raw[:200]!r}")
        try:
            parsed = orjson.loads(raw) if raw else {}
        except orjson.JSONDecodeError:
            parsed = None
        if not isinstance(parsed, dict):
            raise _Unreachable(f"{method} {path} answered {status} with no JSON object: "
                               f"{raw[:200]!r}")
        return status, parsed

    def _log_change(self, state: State) -> None:
        schedule, url = self._schedule, self.router_url
        if state == "holding":
            log.info("%s: registered %s, lease %gs, heartbeat every %gs", url, self.backend_id,
                     self._body["lease_ttl_s"], schedule.interval_s)
        elif state == "registering":
            log.info("%s holds no lease for %s (it restarted, or the lease expired): "
                     "registering again", url, self.backend_id)
        elif state == "unreachable":
            log.warning("%s: cannot %s %s (%s); retrying at most %gs apart", url,
                        schedule.next_step().action, self.backend_id, schedule.last_error,
                        schedule.interval_s)
        else:
            log.error("%s refused %s: %s; retrying at most %gs apart", url, self.backend_id,
                      schedule.last_error, schedule.interval_s)

    def statistics(self) -> dict[str, object]:
        return {"router": self.router_url, "deregistered": self.deregistered,
                **self._schedule.statistics()}

    def __repr__(self) -> str:
        return f"Registration({self.router_url!r}, {self.backend_id!r}, state={self.state})"


def reported_use(use: Mapping[str, int]) -> dict[str, int]:
    """``use`` as a report carries it: models with requests only, the largest counts first
    when there are more than a report may hold."""
    busy = [(name, count) for name, count in use.items() if count > 0]
    if len(busy) > MAX_REPORTED_MODELS:
        busy = heapq.nlargest(MAX_REPORTED_MODELS, busy, key=lambda item: item[1])
    return dict(busy)


def _refusal(status: int, body: Mapping[str, Any]) -> RegistrationRefused:
    return RegistrationRefused(status, str(body.get("code", "UNKNOWN")),
                               str(body.get("error", body))[:500])


def _describe(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "no answer in time"
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


__all__ = ["Backoff", "Registration", "RegistrationRefused"]
