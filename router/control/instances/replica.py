"""One replica of a managed instance: its process, started, checked and restarted by one task
that the replica owns, from ``start()`` until ``stop()``.

The life of a replica, as ``state`` shows it:

    starting --ready--> ready <--check ok / failed--> unhealthy
       ^                  |  exits, or fails max_failures_before_restart checks in a row
       |                  v
       +---- backoff / crash_loop (the wait ``RestartTracker`` gives)
    stop(): draining (deregistered, in-flight requests finish) -> stopping -> stopped

- **Start.** The port is checked free (a port from the range that something else took is
  swapped for another; a ``base_port`` one is PORT_CONFLICT and retried), the command's
  placeholders are filled in, and the process is launched in its own session with
  PR_SET_PDEATHSIG = SIGKILL, so it dies with the router however the router dies. Stdout and
  stderr go to the replica's ``ReplicaLog``. It is ready when it prints a READY line
  (``READY <port>`` or ``READY unix:<path>``) or when its probe answers (every
  ``startup_probe_interval_s``), whichever comes first, within the startup timeout; an exit
  or a timeout first is a failed start, whose error quotes the tail of its output.
- **Ready.** It is registered in the directory as backend NAME-i (source ``managed``) with a
  lease the replica renews every third of ``lease_ttl_s``: with a shared (etcd) registry,
  the records of a router that died expire instead of lingering. From ``initial_delay_s``
  on it is probed every ``interval_s``; a success resets the count of failures.
- **Failure.** An exit deregisters it at once (requests in flight on it fail before any
  answer byte and are retried elsewhere by the data plane). Failed checks deregister it with
  a drain. Either way the next start waits for the backoff.
- **Stop and restart** (delete, scale-down, rolling restart, router exit): deregistered,
  drained (bounded by ``drain_timeout_s``), then SIGTERM and, after ``stop_timeout_s``,
  SIGKILL. A restart then starts it again at once.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from router.control.directory import BackendDirectory, Registration
from router.control.instances.departures import Departures
from router.control.instances.gpus import visible_devices
from router.control.instances.logs import ReplicaLog
from router.control.instances.ports import PortAllocator
from router.control.instances.probe import Probe
from router.control.instances.restarts import RestartTracker
from router.control.launcher import LaunchedProcess, launch, started
from router.core import placeholders
from router.core.clock import Clock
from router.core.config import InstanceConfig, ManagerConfig
from router.core.errors import (
    BackendNotFound,
    LeaseNotFound,
    PortConflict,
    RouterError,
    quoted,
)
from router.protocol.announce import ready_port, ready_unix_path

log = logging.getLogger(__name__)

ReplicaState = Literal["starting", "ready", "unhealthy", "backoff", "crash_loop", "draining",
                       "stopping", "stopped"]
REPLICA_STATES: tuple[ReplicaState, ...] = (
    "starting", "ready", "unhealthy", "backoff", "crash_loop", "draining", "stopping",
    "stopped")
# Why a replica was started again, as counted in router_instance_restarts_total{reason}.
RestartReason = Literal["exited", "health", "startup", "requested"]
RESTART_REASONS: tuple[RestartReason, ...] = ("exited", "health", "startup", "requested")
ERROR_TAIL_LINES = 20  # of a replica's output, kept with its last error


@dataclass(frozen=True, eq=False)
class ReplicaContext:
    """What every replica of a manager shares."""

    settings: ManagerConfig
    directory: BackendDirectory
    clock: Clock
    ports: PortAllocator
    departures: Departures
    probe_for: Callable[[str], Probe]
    socket_dir: Path
    # Told of each restart (instance, reason) and failed health check (instance).
    on_restart: Callable[[str, RestartReason], None]
    on_health_failure: Callable[[str], None]


def join_host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class Replica:
    def __init__(self, instance: InstanceConfig, index: int, context: ReplicaContext,
                 replica_log: ReplicaLog, port: int | None) -> None:
        self.instance = instance
        self.index = index
        self.id = f"{instance.name}-{index}"
        self.log = replica_log
        self.port = port  # None: it listens on a unix socket
        self._ctx = context
        self.tracker = RestartTracker(context.settings.restart)
        self.state: ReplicaState = "stopped"
        self.pid: int | None = None
        self.last_error: str | None = None
        self.last_error_log: list[str] = []
        self.health_failures = 0  # in a row
        self.health_failures_total = 0
        self.restarts: collections.Counter[RestartReason] = collections.Counter()
        self.ready_at: float | None = None
        self.next_start_at: float | None = None
        self.first_attempt = asyncio.Event()  # the first start has succeeded or failed
        self._announced = asyncio.Event()
        self._pending: str | None = None  # "stop" or "restart", for the task to take up
        self._wake = asyncio.Event()  # set while a request is pending
        self._stop_requested = False
        self._drain_on_stop = True
        self._restart_waiters: list[asyncio.Future[bool]] = []
        self._task: asyncio.Task[None] | None = None
        self._registered = False

    # -- the manager's side -------------------------------------------------------------------

    @property
    def address(self) -> str:
        if self.port is None:
            return f"unix:{self.socket_path}"
        return join_host_port(self._ctx.settings.host, self.port)

    @property
    def socket_path(self) -> Path:
        return self._ctx.socket_dir / f"{self.id}.sock"

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"replica {self.id}")

    async def stop(self, drain: bool = True) -> None:
        """Deregister (and, with ``drain``, let its requests finish), stop the process, and
        end the replica's task."""
        self._stop_requested = True
        self._drain_on_stop = drain
        self._ask("stop")
        if self._task is not None:
            await self._task

    async def restart(self) -> bool:
        """Drain, stop and start again; True once it is ready, False if that start failed
        (it goes on retrying with backoff) or the replica was stopped meanwhile."""
        if self._stop_requested or self._task is None or self._task.done():
            return False
        waiter: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._restart_waiters.append(waiter)
        self.restarts["requested"] += 1
        self._ctx.on_restart(self.instance.name, "requested")
        self._ask("restart")
        return await waiter

    def _ask(self, what: str) -> None:
        """Ask the replica's task to "stop" or "restart"; a stop overrides a restart that
        has not been taken up."""
        if what == "stop" or self._pending is None:
            self._pending = what
        self._wake.set()

    def _taken(self) -> str | None:
        """The pending request, consumed; None if there is none."""
        pending, self._pending = self._pending, None
        if self._stop_requested:
            pending = "stop"  # however the stop was asked, it sticks
        self._wake.clear()
        return pending

    async def _wait_request(self) -> None:
        await self._wake.wait()

    # -- the replica's task -------------------------------------------------------------------

    async def _run(self) -> None:
        delay = 0.0
        try:
            while not self._stop_requested:
                if delay > 0 and await self._backoff(delay) == "stop":
                    break
                reason = await self._once()
                if reason == "stop":
                    break
                if reason == "restart":
                    delay = 0.0
                    continue
                assert reason in ("exited", "health", "startup")
                self.restarts[reason] += 1  # type: ignore[index]
                self._ctx.on_restart(self.instance.name, reason)  # type: ignore[arg-type]
                delay = self.tracker.failed(self._ctx.clock.now())
                crash_loop = self.tracker.crash_loop(self._ctx.clock.now())
                log.warning("replica %s: %s; restarting in %gs%s", self.id,
                            self.last_error or reason, delay,
                            " (crash_loop: restarted at the longest backoff only)"
                            if crash_loop else "")
        finally:
            self.state = "stopped"
            self.pid = None
            self.first_attempt.set()
            self._resolve_restarts(False)

    async def _backoff(self, delay: float) -> str | None:
        now = self._ctx.clock.now()
        self.state = "crash_loop" if self.tracker.crash_loop(now) else "backoff"
        self.next_start_at = now + delay
        try:
            await asyncio.wait_for(self._wait_request(), delay)
        except TimeoutError:
            return None
        finally:
            self.next_start_at = None
        return self._taken()  # "stop", or "restart" (start now)

    async def _once(self) -> str:
        """One process, from its start to its end: why it ended ("stop", "restart", or a
        failure: "exited", "health", "startup")."""
        self.state = "starting"
        self._announced.clear()
        try:
            process = await self._launch()
        except (RouterError, OSError) as exc:
            self._failed(f"could not start: {getattr(exc, 'message', None) or exc}")
            return "startup"
        self.pid = process.pid
        try:
            why = await self._until_ready(process)
            if why is not None:
                return why
            return await self._ready(process)
        finally:
            await self._end(process)

    async def _ready(self, process: LaunchedProcess[bool]) -> str:
        try:
            await self._register()
        except RouterError as exc:
            self._failed(f"started, but could not be registered: {exc.message}", process)
            return "startup"
        now = self._ctx.clock.now()
        self.ready_at = now
        self.tracker.up(now)
        self.health_failures = 0
        self.state = "ready"
        self.last_error = None
        self.last_error_log = []
        self.first_attempt.set()
        self._resolve_restarts(True)
        log.info("replica %s ready at %s (pid %d)", self.id, self.address, process.pid)
        why = await self._serve(process)
        drain = why != "exited" and (why != "stop" or self._drain_on_stop)
        await self._deregister(drain)
        return why

    async def _end(self, process: LaunchedProcess[bool]) -> None:
        if process.returncode is None:
            self.state = "stopping"
        await process.stop(self._ctx.settings.stop_timeout_s)
        if process.killed:
            log.warning("replica %s (pid %d) ignored SIGTERM for %gs: killed", self.id,
                        process.pid, self._ctx.settings.stop_timeout_s)
        self.pid = None
        self.ready_at = None

    # -- starting -----------------------------------------------------------------------------

    def _values(self) -> dict[str, str]:
        instance = self.instance
        values = {"host": self._ctx.settings.host, "name": instance.name,
                  "replica": str(self.index), "python": sys.executable}
        if self.port is None:
            values["unix"] = str(self.socket_path)
        else:
            values["port"] = str(self.port)
        if instance.models:
            values["model"] = instance.models[0].partition(":")[0]
        return values

    def _environment(self, values: dict[str, str]) -> dict[str, str]:
        # Unbuffered: a Python replica's READY line and log lines arrive as printed, not when
        # a pipe buffer of 8 KiB fills.
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        env.update({key: placeholders.substitute(value, values)
                    for key, value in self.instance.env.items()})
        devices = visible_devices(self.instance, self.index)
        if devices is not None:
            env["CUDA_VISIBLE_DEVICES"] = devices
        return env

    def _check_port(self) -> None:
        if self.port is None:
            self.socket_path.unlink(missing_ok=True)  # a stale socket of a killed process
            return
        ports = self._ctx.ports
        try:
            ports.check(self.port, self.id)
        except PortConflict:
            if self.instance.base_port is not None:
                raise
            old = self.port
            ports.release(old, self.id)
            self.port = ports.allocate(self.id)  # PortAllocationFailed if none is free
            log.warning("replica %s: port %d was taken by another program; now on %d",
                        self.id, old, self.port)

    async def _launch(self) -> LaunchedProcess[bool]:
        self._check_port()
        values = self._values()
        argv = [placeholders.substitute(arg, values) for arg in self.instance.command]
        return await launch(
            argv, started, env=self._environment(values), cwd=self.instance.workdir,
            stderr=subprocess.STDOUT, log_file=self.log, on_line=self._line,
            new_session=True,  # a Ctrl-C on the router's terminal is the router's to handle
            die_with_parent=signal.SIGKILL,
        )

    def _line(self, line: str) -> None:
        announced = ready_port([line]) or ready_unix_path([line])
        if announced is None or self._announced.is_set():
            return
        if announced != (self.port if self.port is not None else str(self.socket_path)):
            log.warning("replica %s announced %s but was given %s; it is reached at %s",
                        self.id, announced, self.port or self.socket_path, self.address)
        self._announced.set()

    async def _until_ready(self, process: LaunchedProcess[bool]) -> str | None:
        """None once the process is ready; else why not ("startup", "stop", "restart")."""
        timeout = self.instance.startup_timeout_s or self._ctx.settings.startup_timeout_s
        waits = {
            asyncio.ensure_future(process.wait()): "exited",
            asyncio.ensure_future(self._announced.wait()): "announced",
            asyncio.ensure_future(self._probe_until_serving()): "probed",
            asyncio.ensure_future(self._wait_request()): "request",
        }
        try:
            done, _ = await asyncio.wait(waits, timeout=timeout,
                                         return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in waits:
                task.cancel()
            await asyncio.gather(*waits, return_exceptions=True)
        kinds = {waits[task] for task in done}
        if "request" in kinds:
            return self._taken() or "restart"
        if kinds & {"announced", "probed"} and process.returncode is None:
            return None
        if "exited" in kinds or process.returncode is not None:
            await process.stop(self._ctx.settings.stop_timeout_s)  # reads its last output
            self._failed(f"exited with status {process.returncode} before it was ready",
                         process)
        else:
            self._failed(f"not ready within {timeout:g}s (no READY line, and its probe did "
                         "not answer): killed", process)
        return "startup"

    async def _probe_until_serving(self) -> None:
        settings = self._ctx.settings
        probe = self._ctx.probe_for(self.instance.protocol)
        interval = settings.startup_probe_interval_s
        # A process that prints no READY line can only be asked, at this bounded pace.
        for _attempt in itertools.count():
            if await probe(self.address, min(settings.health.timeout_s, interval)) is None:
                return
            await asyncio.sleep(interval)

    def _failed(self, why: str, process: LaunchedProcess[bool] | None = None) -> None:
        self.last_error = why
        self.last_error_log = process.output_tail()[-ERROR_TAIL_LINES:] if process else []
        self.first_attempt.set()
        self._resolve_restarts(False)
        tail = "\n    ".join(self.last_error_log)
        log.error("replica %s (%s): %s%s", self.id, quoted(" ".join(self.instance.command)),
                  why, f"; last output lines:\n    {tail}" if tail else "")

    def _resolve_restarts(self, ok: bool) -> None:
        waiters, self._restart_waiters = self._restart_waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(ok)

    # -- serving ------------------------------------------------------------------------------

    async def _serve(self, process: LaunchedProcess[bool]) -> str:
        """Checks and lease renewals until the process exits, fails its checks or is asked
        to stop or restart: which of these ("exited", "health", "stop", "restart")."""
        settings = self._ctx.settings
        clock = self._ctx.clock
        health = settings.health
        next_check = clock.now() + health.initial_delay_s
        next_renewal = clock.now() + settings.lease_ttl_s / 3
        exited = asyncio.ensure_future(process.wait())
        try:
            while True:
                timeout = max(0.0, min(next_check, next_renewal) - clock.now())
                request = asyncio.ensure_future(self._wait_request())
                done, _ = await asyncio.wait({exited, request}, timeout=timeout,
                                             return_when=asyncio.FIRST_COMPLETED)
                request.cancel()
                if request in done:
                    return self._taken() or "restart"
                if exited in done:
                    await process.stop(settings.stop_timeout_s)  # reads its last output
                    self._failed(f"exited with status {process.returncode}", process)
                    return "exited"
                if clock.now() >= next_renewal:
                    await self._renew()
                    next_renewal = clock.now() + settings.lease_ttl_s / 3
                if clock.now() >= next_check:
                    if not await self._check(process):
                        return "health"
                    next_check = clock.now() + health.interval_s
        finally:
            exited.cancel()

    async def _check(self, process: LaunchedProcess[bool]) -> bool:
        """One health check; False once the replica is to be restarted for failing them."""
        health = self._ctx.settings.health
        why = await self._ctx.probe_for(self.instance.protocol)(self.address, health.timeout_s)
        if why is None:
            if self.health_failures:
                log.info("replica %s passes its health check again", self.id)
            self.health_failures = 0
            self.state = "ready"
            return True
        self.health_failures += 1
        self.health_failures_total += 1
        self._ctx.on_health_failure(self.instance.name)
        self.state = "unhealthy"
        limit = health.max_failures_before_restart
        log.warning("replica %s failed its health check (%d in a row%s): %s", self.id,
                    self.health_failures, f" of {limit}" if limit else "", why)
        if limit and self.health_failures >= limit:
            self._failed(f"failed {self.health_failures} health checks in a row: {why}",
                         process)
            return False
        return True

    # -- the directory ------------------------------------------------------------------------

    def _registration(self) -> Registration:
        instance = self.instance
        return Registration(
            id=self.id, address=self.address, protocol=instance.protocol, models=instance.models,
            weight=instance.weight, labels={"instance": instance.name, "replica": str(self.index)},
            lease_ttl_s=self._ctx.settings.lease_ttl_s)

    async def _register(self) -> None:
        await self._ctx.directory.register(self._registration(), source="managed")
        self._registered = True

    async def _renew(self) -> None:
        try:
            await self._ctx.directory.heartbeat(self.id)
        except LeaseNotFound:
            log.warning("replica %s: its lease was lost; registering again", self.id)
            try:
                await self._register()
            except RouterError as exc:
                log.error("replica %s could not register again: %s", self.id, exc.message)
        except RouterError as exc:  # the store is away: the next renewal tries again
            log.warning("replica %s: lease renewal failed: %s", self.id, exc.message)

    async def _deregister(self, drain: bool) -> None:
        if not self._registered:
            return
        self._registered = False
        left = self._ctx.departures.expect(self.id)
        try:
            info = await self._ctx.directory.deregister(self.id)
        except BackendNotFound:
            left.cancel()
            return
        except RouterError as exc:
            left.cancel()
            log.warning("replica %s: deregistration failed (%s); its lease expires",
                        self.id, exc.message)
            return
        if not drain or info.state == "removed":
            left.cancel()
            return
        self.state = "draining"
        timeout = self._ctx.settings.drain_timeout_s
        try:
            await asyncio.wait_for(left, timeout)
        except TimeoutError:
            log.warning("replica %s: still busy %gs after it was deregistered; stopping it "
                        "anyway", self.id, timeout)

    # -- views --------------------------------------------------------------------------------

    def statistics(self) -> dict[str, Any]:
        now = self._ctx.clock.now()
        return {
            "replica": self.index, "id": self.id, "address": self.address, "state": self.state,
            "pid": self.pid, "restarts": sum(self.restarts.values()),
            "restarts_by_reason": dict(self.restarts),
            "crash_loop": self.tracker.crash_loop(now),
            "health_failures": self.health_failures,
            "health_failures_total": self.health_failures_total,
            "uptime_s": None if self.ready_at is None else round(now - self.ready_at, 3),
            "next_start_in_s": None if self.next_start_at is None
            else round(max(0.0, self.next_start_at - now), 3),
            "last_error": self.last_error, "last_error_log": list(self.last_error_log),
            "log": self.log.name,
        }

    def __repr__(self) -> str:
        return f"Replica({self.id}, {self.state}, pid={self.pid}, at={self.address})"
