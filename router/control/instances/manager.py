"""The replica manager: the managed instances of this router and the one place that creates,
scales, restarts and deletes them.

An instance is ``replicas`` copies of one command (``InstanceConfig``); each copy is a
``Replica`` that runs, checks and restarts its own process and is a backend of the
directory (source ``managed``, id NAME-i) while it is ready. Instances come from the config
file (origin ``config``: they follow the file on reload, and cannot be deleted through the
API) or from the admin API (origin ``api``: persisted in the state file with their replica
count, and started again when the router restarts; the replica counts set on config
instances are persisted too).

What is checked before anything starts, so that the API can refuse it: the definition's
placeholders and ports (``instance_problems``: INVALID_CONFIG, INVALID_PORT), the GPUs it
names against those present (INVALID_GPU_ID), its program and working directory
(INVALID_CONFIG), the total of replicas against ``max_instances``
(MAX_INSTANCES_REACHED), and a port for every replica, held from then on (PORT_CONFLICT for
a ``base_port`` one in use, PORT_ALLOCATION_FAILED when the range is used up).

Operations that start processes answer at once, with the replicas ``starting``; those that
end them (delete, and the router's own exit) wait until they have stopped. A rolling restart
runs in a task of its instance: one replica at a time is drained, stopped, started and
waited for until ready; one that does not become ready stops the rollout (state
``failed``), so a broken new start never takes the others down. A scale-down drains and
stops the highest replicas in the background; they stay listed until they have stopped.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from router.control.directory import BackendDirectory
from router.control.instances.departures import Departures
from router.control.instances.gpus import check_gpus, count_gpus
from router.control.instances.logs import Follower, LineRange, ReplicaLog, read_lines
from router.control.instances.models import (
    InstanceInfo,
    Origin,
    ReplicaInfo,
    RolloutInfo,
)
from router.control.instances.ports import PortAllocator, can_bind
from router.control.instances.probe import Probe, probe_for
from router.control.instances.replica import (
    RESTART_REASONS,
    Replica,
    ReplicaContext,
    RestartReason,
)
from router.control.state import DesiredState, DesiredStateStore
from router.core import placeholders
from router.core.clock import Clock
from router.core.config import (
    MAX_UNIX_PATH_BYTES,
    InstanceConfig,
    ManagerConfig,
    base_port_problems,
    instance_problems,
)
from router.core.errors import (
    InstanceExists,
    InstanceIsStatic,
    InstanceNotFound,
    InvalidInput,
    InvalidInstanceConfig,
    MaxInstancesReached,
    RouterError,
    quoted,
)

log = logging.getLogger(__name__)


class Instance:
    def __init__(self, definition: InstanceConfig, origin: Origin) -> None:
        self.definition = definition
        self.origin: Origin = origin
        self.replicas: dict[int, Replica] = {}
        self.leaving: set[Replica] = set()  # scaled down, stopping
        self.rollout: RolloutInfo | None = None
        self.rollout_task: asyncio.Task[None] | None = None
        self.error: str | None = None

    @property
    def name(self) -> str:
        return self.definition.name

    def all_replicas(self) -> list[Replica]:
        return sorted([*self.replicas.values(), *self.leaving], key=lambda r: r.index)

    def __repr__(self) -> str:
        return f"Instance({self.name}, {self.origin}, replicas={len(self.replicas)})"


class InstanceManager:
    def __init__(
        self, settings: ManagerConfig, directory: BackendDirectory, clock: Clock,
        log_dir: Path, state: DesiredStateStore | None = None,
        probes: Callable[[str], Probe] = probe_for,
        is_free: Callable[[str, int], bool] = can_bind,
    ) -> None:
        self.settings = settings
        self._directory = directory
        self._clock = clock
        self._state = state
        self._probes = probes
        self._default_log_dir = log_dir
        self.ports = PortAllocator(settings.host, settings.port_range, is_free)
        self.departures = Departures(directory)
        self._instances: dict[str, Instance] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._socket_dir: Path | None = None
        self._private_socket_dir = False
        self.log_dir = log_dir
        self.gpus = count_gpus(settings.gpus)
        self.created = 0
        self.deleted = 0
        self.restarts: collections.Counter[tuple[str, RestartReason]] = collections.Counter()
        self.health_failures: collections.Counter[str] = collections.Counter()
        self._configured: dict[str, InstanceConfig] = {}  # the config file's, as written

    # -- start and stop -----------------------------------------------------------------------

    async def start(self, configured: Sequence[InstanceConfig]) -> None:
        """The config's instances (with the replica counts the API set on them) and those
        the state file holds, every replica started at once; returns when each has become
        ready or failed its first start. A replica that fails does not stop the others."""
        self.log_dir = writable_log_dir(self.settings.log_dir, self._default_log_dir)
        self._socket_dir = self._make_socket_dir()
        self.departures.start()
        saved = self._state.load() if self._state is not None else DesiredState()
        self._configured = {d.name: d for d in configured}
        for definition in configured:
            replicas = saved.scaled.get(definition.name, definition.replicas)
            self._restore(definition.model_copy(update={"replicas": replicas}), "config")
        for definition in saved.instances:
            if definition.name in self._instances:
                log.error("state file: instance %s is also in the config file; the config's "
                          "is run", quoted(definition.name))
                continue
            self._restore(definition, "api")
        starting = [r for i in self._instances.values() for r in i.replicas.values()]
        await asyncio.gather(*(r.first_attempt.wait() for r in starting))
        if self._instances:
            log.info("instances: %s", ", ".join(
                f"{i.name} {self._ready(i)}/{len(i.replicas)} ready"
                for i in self._instances.values()))

    def _restore(self, definition: InstanceConfig, origin: Origin) -> None:
        """An instance at start: one that cannot run here is listed with its error."""
        try:
            self._add(definition, origin)
        except RouterError as exc:
            instance = Instance(definition, origin)
            instance.error = f"{exc.code}: {exc.message}"
            self._instances[definition.name] = instance
            log.error("instance %s (%s) cannot run: %s", quoted(definition.name), origin,
                      instance.error)

    def _make_socket_dir(self) -> Path:
        if self.settings.socket_dir is not None:
            path = Path(self.settings.socket_dir)
            path.mkdir(parents=True, exist_ok=True)
            return path
        self._private_socket_dir = True
        return Path(tempfile.mkdtemp(prefix="ir-"))  # short: sun_path holds 107 bytes

    async def close(self) -> None:
        """Stop every replica (no drain: the router has drained) and end the tasks."""
        instances = list(self._instances.values())
        self._instances.clear()
        await asyncio.gather(*(self._stop_instance(i, drain=False) for i in instances))
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.departures.close()
        if self._private_socket_dir and self._socket_dir is not None:
            shutil.rmtree(self._socket_dir, ignore_errors=True)

    # -- the API ------------------------------------------------------------------------------

    async def create(self, definition: InstanceConfig) -> InstanceInfo:
        """Add an instance through the API and start its replicas (201: they are
        ``starting``)."""
        instance = self._add(definition, "api")
        self.created += 1
        self._save()
        log.info("instance %s created: %d replicas of %s", quoted(instance.name),
                 definition.replicas, quoted(" ".join(definition.command)))
        return self.info(instance.name)

    async def delete(self, name: str) -> InstanceInfo:
        """Drain and stop every replica of an API instance; answers once they have stopped."""
        instance = self._get(name)
        if instance.origin == "config":
            raise InstanceIsStatic(f"instance {quoted(name)} is in the config file: remove "
                                   "it there and reload")
        del self._instances[name]
        self._save()
        stopped = instance.all_replicas()
        await self._stop_instance(instance, drain=True)
        self.deleted += 1
        log.info("instance %s deleted", quoted(name))
        return self._info(instance, stopped)

    def restart(self, name: str) -> InstanceInfo:
        """Start a rolling restart (one already running goes on); 202."""
        instance = self._get(name)
        if instance.rollout_task is None or instance.rollout_task.done():
            instance.rollout = RolloutInfo(state="running", done=0, of=len(instance.replicas))
            instance.rollout_task = self._own(self._roll(instance), f"rollout of {name}")
        return self._info(instance)

    def scale(self, name: str, replicas: int) -> InstanceInfo:
        """Set the replica count: new replicas start at once, surplus ones (the highest)
        drain and stop in the background; 202."""
        instance = self._get(name)
        if instance.error is not None:
            raise InvalidInstanceConfig(f"instance {quoted(name)} cannot run: {instance.error}")
        current = len(instance.replicas)
        if replicas > current:
            if instance.definition.base_port is not None:
                problems = base_port_problems(instance.definition.base_port, replicas)
                if problems:
                    raise problems[0]
            self._check_room(replicas - current)
            self._start_replicas(instance, range(current, replicas))
        for index in range(replicas, current):
            replica = instance.replicas.pop(index)
            instance.leaving.add(replica)
            self._own(self._retire(instance, replica, drain=True), f"stop {replica.id}")
        instance.definition = instance.definition.model_copy(update={"replicas": replicas})
        self._save()
        log.info("instance %s scaled from %d to %d replicas", quoted(name), current, replicas)
        return self._info(instance)

    def list_instances(self) -> list[InstanceInfo]:
        return [self._info(i) for i in self._instances.values()]

    def info(self, name: str) -> InstanceInfo:
        return self._info(self._get(name))

    def replica_log(self, name: str, index: int) -> ReplicaLog:
        instance = self._get(name)
        for replica in instance.all_replicas():
            if replica.index == index:
                return replica.log
        raise InstanceNotFound(f"instance {quoted(name)} has no replica {index} (it has "
                               f"{len(instance.replicas)})")

    async def read_log(self, name: str, index: int, start: int | None, end: int | None
                       ) -> LineRange:
        """``lines[start:end]`` of a replica's log, read in a thread while its writes wait."""
        replica_log = self.replica_log(name, index)
        replica_log.hold()
        try:
            return await asyncio.to_thread(read_lines, replica_log.paths(), start, end)
        finally:
            replica_log.release()

    async def follow_log(self, name: str, index: int, start: int | None, end: int | None
                         ) -> tuple[LineRange, Follower, ReplicaLog]:
        """The range, and a follower that hears every line written after it (none twice,
        none missed: the log's writes wait while the range is read)."""
        replica_log = self.replica_log(name, index)
        replica_log.hold()
        try:
            lines = await asyncio.to_thread(read_lines, replica_log.paths(), start, end)
            follower = replica_log.follow()
        finally:
            replica_log.release()
        return lines, follower, replica_log

    async def reconfigure(self, configured: Sequence[InstanceConfig]) -> list[str]:
        """A reload's instances, compared with the config's previous ones: those added
        start, those removed are deleted (in the background), a changed replica count
        scales, any other change replaces the instance (its replicas stop, then the new ones
        start). An entry the file did not change keeps the replica count the API set. One
        line per change."""
        changes = []
        wanted = {d.name: d for d in configured}
        for name in sorted(set(self._configured) - set(wanted)):
            instance = self._instances.get(name)
            if instance is not None and instance.origin == "config":
                del self._instances[name]
                self._own(self._stop_instance(instance, drain=True), f"remove {name}")
                changes.append(f"instance {name}: removed (drains, then stops)")
        for name, definition in wanted.items():
            current = self._instances.get(name)
            before = self._configured.get(name)
            if current is not None and current.origin == "api":
                changes.append(f"instance {name}: not added, an API instance has its name")
            elif current is None:
                self._restore(definition, "config")
                changes.append(f"instance {name}: added")
            elif before != definition:
                changes.append(self._apply_change(current, definition))
        self._configured = dict(wanted)
        self._save()
        return changes

    def _apply_change(self, current: Instance, definition: InstanceConfig) -> str:
        name = current.name
        if current.error is None and current.definition.model_copy(
                update={"replicas": definition.replicas}) == definition:
            self.scale(name, definition.replicas)
            return f"instance {name}: scaled to {definition.replicas} replicas"
        del self._instances[name]

        async def replace() -> None:
            await self._stop_instance(current, drain=True)
            if name not in self._instances:
                self._restore(definition, "config")
        self._own(replace(), f"replace {name}")
        return f"instance {name}: replaced (its replicas drain and stop, then the new ones start)"

    # -- adding -------------------------------------------------------------------------------

    def _add(self, definition: InstanceConfig, origin: Origin) -> Instance:
        if definition.name in self._instances:
            raise InstanceExists(f"instance {quoted(definition.name)} exists: DELETE it "
                                 "first to change it")
        self._check(definition)
        self._check_room(definition.replicas)
        instance = Instance(definition, origin)
        self._start_replicas(instance, range(definition.replicas))
        self._instances[definition.name] = instance
        return instance

    def _check(self, definition: InstanceConfig) -> None:
        problems = instance_problems(definition)
        if problems:
            kind = type(problems[0][1])
            raise kind([f"{key}: {exc.message}" for key, exc in problems
                        if type(exc) is kind])
        check_gpus(definition, self.gpus)
        workdir = definition.workdir
        if workdir is not None and not Path(workdir).is_dir():
            raise InvalidInstanceConfig(f"workdir: {quoted(workdir)} is not a directory")
        self._check_program(definition)
        if "unix" in placeholders.used([*definition.command, *definition.env.values()]):
            assert self._socket_dir is not None
            longest = self._socket_dir / f"{definition.name}-{definition.replicas}.sock"
            if len(str(longest).encode()) > MAX_UNIX_PATH_BYTES:
                raise InvalidInstanceConfig(f"{longest} is longer than a unix socket path may "
                                            f"be ({MAX_UNIX_PATH_BYTES} bytes): a shorter name "
                                            "or manager.socket_dir")

    @staticmethod
    def _check_program(definition: InstanceConfig) -> None:
        program = placeholders.substitute(definition.command[0], _PROGRAM_VALUES)
        path = os.environ.get("PATH", os.defpath)
        if "/" in program:
            base = Path(definition.workdir or ".")
            found = (base / program).is_file() and os.access(base / program, os.X_OK)
        else:
            found = shutil.which(program, path=path) is not None
        if not found:
            raise InvalidInstanceConfig(f"command[0]: program {quoted(program)} not found "
                                        "(or not executable)")

    def _check_room(self, more: int) -> None:
        running = sum(len(i.replicas) + len(i.leaving) for i in self._instances.values())
        limit = self.settings.max_instances
        if running + more > limit:
            raise MaxInstancesReached(f"{more} more replicas would make {running + more}, "
                                      f"more than manager.max_instances ({limit})")

    def _start_replicas(self, instance: Instance, indexes: Iterable[int]) -> None:
        """Hold a port for each new replica (all or none), then start them."""
        definition = instance.definition
        uses_unix = "unix" in placeholders.used([*definition.command, *definition.env.values()])
        held: list[tuple[int, str]] = []
        ports: dict[int, int | None] = {}
        try:
            for index in indexes:
                owner = f"{definition.name}-{index}"
                if uses_unix:
                    ports[index] = None
                    continue
                if definition.base_port is not None:
                    port = definition.base_port + 1 + index
                    self.ports.reserve(port, owner)
                else:
                    port = self.ports.allocate(owner)
                held.append((port, owner))
                ports[index] = port
        except RouterError:
            for port, owner in held:
                self.ports.release(port, owner)
            raise
        for index, given in ports.items():
            replica = Replica(definition, index, self._context(), self._log_of(definition,
                                                                               index), given)
            instance.replicas[index] = replica
            replica.start()

    def _log_of(self, definition: InstanceConfig, index: int) -> ReplicaLog:
        s = self.settings
        return ReplicaLog(self.log_dir / definition.name / f"{index}.log", s.log_max_bytes,
                          s.log_backups)

    def _context(self) -> ReplicaContext:
        assert self._socket_dir is not None, "start() first"
        return ReplicaContext(
            settings=self.settings, directory=self._directory, clock=self._clock,
            ports=self.ports, departures=self.departures, probe_for=self._probes,
            socket_dir=self._socket_dir, on_restart=self._count_restart,
            on_health_failure=self._count_health_failure)

    def _count_restart(self, instance: str, reason: RestartReason) -> None:
        self.restarts[(instance, reason)] += 1

    def _count_health_failure(self, instance: str) -> None:
        self.health_failures[instance] += 1

    # -- stopping and rolling -----------------------------------------------------------------

    async def _stop_instance(self, instance: Instance, drain: bool) -> None:
        if instance.rollout_task is not None:
            instance.rollout_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await instance.rollout_task
        replicas = list(instance.replicas.values())
        instance.leaving.update(replicas)
        instance.replicas.clear()
        await asyncio.gather(*(self._retire(instance, r, drain) for r in replicas))

    async def _retire(self, instance: Instance, replica: Replica, drain: bool) -> None:
        try:
            await replica.stop(drain)
        finally:
            if replica.port is not None:
                self.ports.release(replica.port, replica.id)
            replica.log.end()
            instance.leaving.discard(replica)

    async def _roll(self, instance: Instance) -> None:
        rollout = instance.rollout
        assert rollout is not None
        log.info("instance %s: rolling restart of %d replicas", quoted(instance.name),
                 rollout.of)
        for index in sorted(instance.replicas):
            replica = instance.replicas.get(index)
            if replica is None:  # scaled down meanwhile
                continue
            if not await replica.restart():
                rollout.state = "failed"
                rollout.error = (f"replica {index} did not become ready: "
                                 f"{replica.last_error or 'stopped'}")
                log.error("instance %s: rolling restart stopped: %s", quoted(instance.name),
                          rollout.error)
                return
            rollout.done += 1
        rollout.state = "done"
        log.info("instance %s: rolling restart done", quoted(instance.name))

    # -- views and persistence ----------------------------------------------------------------

    def _get(self, name: str) -> Instance:
        instance = self._instances.get(name)
        if instance is None:
            raise InstanceNotFound(f"no instance is named {quoted(name)}")
        return instance

    @staticmethod
    def _ready(instance: Instance) -> int:
        return sum(1 for r in instance.replicas.values() if r.state in ("ready", "unhealthy"))

    def _info(self, instance: Instance, shown: Iterable[Replica] | None = None
              ) -> InstanceInfo:
        shown = instance.all_replicas() if shown is None else shown
        return InstanceInfo(
            name=instance.name, origin=instance.origin, definition=instance.definition,
            ready=self._ready(instance), error=instance.error,
            rollout=instance.rollout.model_copy() if instance.rollout else None,
            replicas=[ReplicaInfo.model_validate(r.statistics()) for r in shown])

    def replicas(self) -> Iterable[Replica]:
        for instance in self._instances.values():
            yield from instance.all_replicas()

    def desired_state(self) -> DesiredState:
        instances = tuple(i.definition for i in self._instances.values() if i.origin == "api")
        scaled = {i.name: i.definition.replicas for i in self._instances.values()
                  if i.origin == "config" and i.name in self._configured
                  and i.definition.replicas != self._configured[i.name].replicas}
        return DesiredState(instances=instances, scaled=scaled)

    def _save(self) -> None:
        if self._state is not None:
            self._state.save_async(self.desired_state())

    def _own(self, coroutine: Any, name: str) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(_logged(coroutine, name), name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    @property
    def active(self) -> int:
        return len(self._instances)

    def statistics(self) -> dict[str, Any]:
        return {"instances": len(self._instances), "created": self.created,
                "deleted": self.deleted, "gpus": self.gpus, "log_dir": str(self.log_dir),
                "ports": self.ports.statistics(), "tasks": len(self._tasks),
                "restarts": {f"{i}/{r}": n for (i, r), n in self.restarts.items()}}

    def __repr__(self) -> str:
        return f"InstanceManager(instances={len(self._instances)}, tasks={len(self._tasks)})"


# What the program (command[0]) is checked with before any replica has a port.
_PROGRAM_VALUES = {"python": sys.executable, "port": "0", "unix": "/", "host": "",
                   "name": "", "replica": "0", "model": ""}
assert set(_PROGRAM_VALUES) == set(placeholders.PLACEHOLDERS)
assert set(RESTART_REASONS) == {"exited", "health", "startup", "requested"}


async def _logged(coroutine: Any, name: str) -> None:
    try:
        await coroutine
    except asyncio.CancelledError:
        raise
    except Exception:
        log.exception("replica manager task %s failed", name)


def writable_log_dir(configured: str | None, default: Path) -> Path:
    """The log directory, or a temporary one (with a warning) if it cannot be written."""
    path = Path(configured) if configured is not None else default
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
        return path
    except OSError as exc:
        fallback = Path(tempfile.mkdtemp(prefix="inference-router-logs-"))
        log.warning("manager.log_dir %s cannot be written (%s): replica logs go to %s",
                    path, exc.strerror or exc, fallback)
        return fallback


__all__ = ["InstanceManager", "InvalidInput"]
