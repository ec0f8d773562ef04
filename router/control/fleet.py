"""The backends the config names, kept in the registry as the config and DNS change.

Each ``[[backends]]`` entry is a *source* of backends:

* an IP address or a unix socket path (``unix:/path``, never resolved): one backend;
* with ``command``: one backend on the process the router starts (with port 0, on the port
  the process announces); once that backend has left the registry the process is stopped;
* a host name: one backend per address it resolves to (Envoy's STRICT_DNS, HAProxy's
  ``server-template``), resolved again every ``dns_refresh_s``.

The fleet keeps the registry's static backends equal to the union of its sources. After a
reload (``prepare``, then ``commit``) and after each resolution whose answer differs,
``plan_sync`` says which backends join, which change and which drain (``Registry.drain``: no
new requests, those in flight finish, then it leaves). When two sources give the same
address, the first keeps it and the other is logged.

Resolution: a name that does not resolve at start is a warning, and its entry has no backend
until it does; a later failure keeps the addresses it had. Every change of a name's state
(failing, resolving again, a different set of addresses) is logged once, never each refresh.
Refreshes are timers on the injected clock; each resolution runs in a task the fleet owns.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from router.control.spawner import SpawnedProcess, Spawner
from router.core.clock import Clock, Timer
from router.core.config import BackendConfig, parse_host_port, substitute
from router.core.config_diff import ConfigDiff, plan_sync
from router.core.types import BackendSpec
from router.dispatch.backends import Backend, Registry

log = logging.getLogger(__name__)

# (host, port) -> the IP addresses it resolves to, in the resolver's order; OSError if none.
Resolver = Callable[[str, int], Awaitable[list[str]]]
# A resolver that hangs (an unreachable name server) must not hold a refresh forever; the
# system resolver gives up after 5 s per server and attempt by default.
RESOLVE_TIMEOUT_S = 15.0


async def system_resolver(host: str, port: int) -> list[str]:
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


def is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def join_host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@dataclass(eq=False)
class _Source:
    config: BackendConfig
    label: str  # "backends[i]", for log lines
    specs: dict[str, BackendSpec] = field(default_factory=dict)  # by address
    spawned: SpawnedProcess | None = None
    failing: bool = False  # its name did not resolve at the last attempt
    timer: Timer | None = None
    retired: bool = False

    @property
    def name(self) -> tuple[str, int] | None:
        """(host, port) when the address is a host name to resolve (a unix socket path never
        is)."""
        if self.config.is_unix:
            return None
        host, port = parse_host_port(self.config.address)
        return None if self.config.command or is_ip(host) else (host, port)

    def spec(self, address: str) -> BackendSpec:
        c = self.config
        labels = {**c.labels, "dns": c.address} if self.name is not None else c.labels
        return BackendSpec(id=address, address=address, protocol=c.protocol, models=c.models,
                           weight=c.weight, labels=tuple(sorted(labels.items())),
                           source="static")


class Fleet:
    def __init__(
        self,
        registry: Registry,
        # (spec, the config entry that names it, the entry's key path) -> its runtime record
        make_backend: Callable[[BackendSpec, BackendConfig, str], Backend],
        spawner: Spawner,
        clock: Clock,
        resolver: Resolver = system_resolver,
        release: Callable[[Backend], Awaitable[None]] | None = None,
    ) -> None:
        self._registry = registry
        self._make_backend = make_backend
        self._spawner = spawner
        self._clock = clock
        self._resolver = resolver
        self._release = release  # what else to free once a backend has left (a gRPC channel)
        self._sources: list[_Source] = []
        self._stop_on_leave: dict[str, SpawnedProcess] = {}  # address -> its process
        self._tasks: set[asyncio.Task[None]] = set()
        self._started = False  # joins before start() returns are in the banner, not the log
        self.resolutions = 0
        self.resolution_failures = 0
        registry.add_leave_listener(self._left)

    # -- the config's entries -------------------------------------------------------------------

    async def start(self, entries: Sequence[BackendConfig]) -> None:
        self._sources = await self._prepare(entries, range(len(entries)))
        self._sync()
        self._started = True
        for source in self._sources:
            self._arm(source)

    async def prepare(self, entries: Sequence[BackendConfig], diff: ConfigDiff
                      ) -> list[_Source]:
        """The first half of a reload to ``entries`` (``diff`` from the running ones): start
        the new processes and resolve the new names. A ``SpawnError`` propagates, with the
        processes this call started stopped again: nothing has changed."""
        return await self._prepare([entries[j] for j in diff.added], diff.added)

    def commit(self, entries: Sequence[BackendConfig], diff: ConfigDiff,
               fresh: list[_Source]) -> None:
        """The second half, synchronous: ``entries`` become the sources, and the registry
        follows (joins, changes, drains)."""
        sources: list[_Source | None] = [None] * len(entries)
        for j, source in zip(diff.added, fresh, strict=True):
            sources[j] = source
        for i, j in diff.kept:
            source = self._sources[i]
            refresh_changed = source.config.dns_refresh_s != entries[j].dns_refresh_s
            source.config, source.label = entries[j], f"backends[{j}]"
            source.specs = {address: source.spec(address) for address in source.specs}
            if refresh_changed:
                self._arm(source)
            sources[j] = source
        for i in diff.removed:
            self._retire(self._sources[i])
        self._sources = [s for s in sources if s is not None]
        self._sync()
        for source in fresh:
            self._arm(source)

    async def _prepare(self, entries: Sequence[BackendConfig], indexes: Sequence[int]
                       ) -> list[_Source]:
        sources = [_Source(entry, f"backends[{i}]") for entry, i in zip(entries, indexes,
                                                                        strict=True)]
        try:
            for source in sources:
                if source.config.command:
                    await self._spawn(source)
        except BaseException:
            for source in sources:
                if source.spawned is not None:
                    await self._spawner.stop(source.spawned)
            raise
        await asyncio.gather(*(self._resolve(s) for s in sources if s.name is not None))
        for source in sources:
            if source.name is None and not source.specs:
                address = source.config.address
                if not source.config.is_unix:
                    address = join_host_port(*parse_host_port(address))
                source.specs = {address: source.spec(address)}
        return sources

    async def _spawn(self, source: _Source) -> None:
        host, port = parse_host_port(source.config.address)
        source.spawned = await self._spawner.spawn(substitute(source.config.command, port))
        address = join_host_port(host, source.spawned.port)
        source.specs = {address: source.spec(address)}

    def _retire(self, source: _Source) -> None:
        source.retired = True
        if source.timer is not None:
            source.timer.cancel()
        if source.spawned is not None:
            for address in source.specs:
                self._stop_on_leave[address] = source.spawned

    # -- the registry ---------------------------------------------------------------------------

    def _sync(self) -> None:
        """Make the registry's static backends those of the sources."""
        desired: dict[str, BackendSpec] = {}
        owner: dict[str, _Source] = {}
        for source in self._sources:
            for address, spec in source.specs.items():
                if address in desired:
                    log.warning("%s: backend %s is already given by %s; ignored",
                                source.label, address, owner[address].label)
                    continue
                desired[address], owner[address] = spec, source
        current = {b.address: b.spec for b in self._registry if b.spec.source == "static"}
        plan = plan_sync(current, desired)
        for address in plan.drain:
            backend = self._registry.drain(address)
            if backend in self._registry.draining():  # else it has left already
                log.info("backend %s draining: no new requests, %d in flight to finish",
                         address, backend.inflight)
        for spec in plan.update:
            self._registry.update(spec)
            log.info("backend %s updated: weight %d, models %s", spec.address, spec.weight,
                     list(spec.models))
        for spec in plan.join:
            source = owner[spec.address]
            self._registry.add(self._make_backend(spec, source.config, source.label))
            log.log(logging.INFO if self._started else logging.DEBUG, "backend %s joined (%s)",
                    spec.address, source.label)
        for address in [a for a in self._stop_on_leave if a in desired]:
            del self._stop_on_leave[address]  # its port was given again: not ours to stop

    def _left(self, backend: Backend) -> None:
        if backend.spec.source == "static":  # the directory logs the others
            log.info("backend %s left: drained", backend.address)
        if self._release is not None:
            self._own(self._release(backend))
        spawned = self._stop_on_leave.pop(backend.address, None)
        if spawned is not None:
            self._own(self._spawner.stop(spawned))

    # -- DNS ------------------------------------------------------------------------------------

    def _arm(self, source: _Source) -> None:
        if source.name is None or source.retired:
            return
        if source.timer is not None:
            source.timer.cancel()
        when = self._clock.now() + source.config.dns_refresh_s
        source.timer = self._clock.call_at(when, lambda: self._own(self._refresh(source)))

    async def _refresh(self, source: _Source) -> None:
        source.timer = None
        before = set(source.specs)
        await self._resolve(source)
        if source.retired:
            return
        if set(source.specs) != before:
            self._sync()
        self._arm(source)

    async def _resolve(self, source: _Source) -> None:
        """Resolve the source's name into its specs; on failure keep those it had."""
        assert source.name is not None
        host, port = source.name
        self.resolutions += 1
        try:
            async with asyncio.timeout(RESOLVE_TIMEOUT_S):
                found = await self._resolver(host, port)
            if not found:
                raise OSError("no address")
        except (OSError, TimeoutError) as exc:
            self.resolution_failures += 1
            if not source.failing:
                source.failing = True
                cause = str(exc) or type(exc).__name__
                kept = (f"keeping its {len(source.specs)} addresses" if source.specs
                        else "it has no backend until it resolves")
                log.warning("%s: cannot resolve %r: %s; %s (retried every %ss)",
                            source.label, host, cause, kept, source.config.dns_refresh_s)
            return
        addresses = [join_host_port(ip, port) for ip in found]
        if source.failing or set(addresses) != set(source.specs):
            log.info("%s: %r resolves to %s", source.label, host, ", ".join(addresses))
        source.failing = False
        source.specs = {address: source.spec(address) for address in addresses}

    # -- tasks ----------------------------------------------------------------------------------

    def _own(self, coroutine: Awaitable[Any]) -> None:
        task = asyncio.get_running_loop().create_task(_run(coroutine))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def close(self) -> None:
        for source in self._sources:
            self._retire(source)
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def statistics(self) -> dict[str, Any]:
        return {
            "sources": len(self._sources),
            "names": sum(1 for s in self._sources if s.name is not None),
            "names_failing": sum(1 for s in self._sources if s.failing),
            "resolutions": self.resolutions,
            "resolution_failures": self.resolution_failures,
        }

    def __repr__(self) -> str:
        return f"Fleet(sources={len(self._sources)}, tasks={len(self._tasks)})"


async def _run(coroutine: Awaitable[Any]) -> None:
    """A fleet task: an error is logged (nothing awaits these tasks' results)."""
    try:
        await coroutine
    except asyncio.CancelledError:
        raise
    except Exception:
        log.exception("backend fleet task failed")
