"""Several router processes on one port (``listener.processes = N``), started and drained as one.

Why: a router process is one Python thread on one core. At 10,000 client connections a single
process was the bottleneck (94 % of a core while the load generator idled); several processes
share the load the way HAProxy's threads do.

How:

- **One port, many listeners.** The supervisor binds each listen address once with SO_REUSEPORT
  and never listens on that socket: it only reserves the port (so ``:0`` works). Every child
  binds the same port with SO_REUSEPORT and the kernel spreads new connections across the
  children by 4-tuple hash. (One shared accept socket would let whichever child wakes first
  take a whole burst of connections, and persistent connections would stay lopsided.)
- **Backends the config spawns** (``command``) are started once, here; the children are given
  their addresses.
- **Children** are ordinary routers (``serve --supervised``): same config, admin on a loopback
  port they announce with ``READY <admin port>``. The supervisor serves the configured admin
  address and federates theirs (``router.control.federation``).
- **Drain.** SIGTERM/SIGINT: ``/readyz`` turns 503, every child gets SIGTERM and drains exactly
  as a single router does (close its listener, finish what it accepted, FIN at request
  boundaries). The supervisor waits for all of them, then stops the backends it spawned. It
  exits 0 only if every child did (a child exits 1 if it dropped a request). A second signal is
  forwarded: the children exit at once.
- **A child that exits while not draining** is restarted, after 1 s doubling to 30 s.
- **Reload** (SIGHUP, ``POST /admin/reload`` on the supervisor's admin API): the supervisor
  reads and validates the config as a single router does, and refuses what needs a restart;
  it then rewrites the children's config file (same reserved ports, the same spawned backends)
  and sends every child SIGHUP, so each reloads it. Adding or removing a backend the config
  spawns (``command``) needs a restart here: its process is shared by every child.
- **TLS.** Each child terminates TLS on the shared listen ports itself, from the same files.
  The configured admin address (its TLS, token and allow-list) is the supervisor's; the
  children's admin APIs are plain HTTP on loopback, reached only by the supervisor.
  ``reload_certificates`` (SIGHUP) re-reads the admin files here and sends SIGHUP on to every
  child.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import signal
import socket
import sys
import tempfile
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomli_w

from router.control.admin import AdminAuth
from router.control.federation import FederatedAdmin, ProcessInfo
from router.control.spawner import SpawnedProcess, Spawner
from router.core import config_diff
from router.core.config import RouterConfig, parse_host_port, substitute
from router.core.config_diff import ReloadOutcome
from router.core.errors import (
    ConfigError,
    InvalidInput,
    ListenFailed,
    RestartRequired,
    RouterError,
)
from router.lifecycle.state import Lifecycle
from router.tls.context import Reloadable, ServerTls, reload_each

log = logging.getLogger(__name__)

RESTART_BACKOFF_S = (1.0, 30.0)  # first delay, cap
STOP_MARGIN_S = 10.0  # beyond shutdown_grace_s + linger_s before a child is killed


@dataclass(frozen=True, slots=True)
class SupervisedAddresses:
    listen: tuple[str, int]
    admin: tuple[str, int]
    grpc: tuple[str, int] | None


@dataclass(eq=False)
class _Child:
    index: int
    spawned: SpawnedProcess | None = None
    restarts: int = 0
    exit_codes: list[int] = field(default_factory=list)

    def info(self) -> ProcessInfo:
        spawned = self.spawned
        alive = spawned is not None and spawned.process.returncode is None
        return ProcessInfo(
            index=self.index,
            pid=spawned.process.pid if spawned is not None else None,
            alive=alive,
            restarts=self.restarts,
            admin_url=f"http://127.0.0.1:{spawned.port}" if spawned is not None else None,
        )


def reserve_port(address: str) -> tuple[socket.socket, str, int]:
    """Bind (never listen) with SO_REUSEPORT: the port is ours, the children can share it."""
    host, port = parse_host_port(address)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    return sock, host, int(sock.getsockname()[1])


def _reserve(key: str, address: str) -> tuple[socket.socket, str, int]:
    try:
        return reserve_port(address)
    except OSError as exc:
        raise ListenFailed.of(key, address, exc) from None


class Supervisor:
    def __init__(self, config: RouterConfig, log_dir: Path,
                 source: Callable[[], RouterConfig] | None = None) -> None:
        self.config = config
        self._source = source or (lambda: self.config)
        self._resolved: list[dict[str, Any]] = []  # config.backends, spawned ones by address
        self._addresses: dict[str, str] = {}  # "listener", "grpc": the ports reserved
        self._log_dir = log_dir
        self._backends = Spawner(log_dir=log_dir)
        self._routers = Spawner(log_dir=log_dir, ready_timeout_s=60.0)
        self._children = [_Child(i) for i in range(config.listener.processes)]
        self._reserved: list[socket.socket] = []
        self._child_config: Path | None = None
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        self.lifecycle = Lifecycle()
        admin = config.admin
        self.admin_tls = ServerTls(admin.tls, "admin.tls") if admin.tls is not None else None
        # The children's admin APIs take changes only with this token, which only we hold:
        # a request the supervisor has authorized is forwarded with it.
        self._child_token = secrets.token_urlsafe(32)
        self.admin = FederatedAdmin(
            self.processes, self.lifecycle, self.reload, AdminAuth(admin, self.admin_tls),
            self.reload_certificates, self.admin_tls, child_token=self._child_token,
        )
        self.reloads = 0

    def processes(self) -> list[ProcessInfo]:
        return [child.info() for child in self._children]

    async def start(self) -> SupervisedAddresses:
        self._resolved = [await self._resolve_backend(b.model_dump(mode="json", exclude_none=True))
                          for b in self.config.backends]
        listen_sock, host, port = _reserve("listener.listen", self.config.listener.listen)
        self._reserved.append(listen_sock)
        self._addresses["listener"] = f"{host}:{port}"
        grpc: tuple[str, int] | None = None
        if self.config.grpc.listen is not None:  # gRPC sets SO_REUSEPORT too
            grpc_sock, ghost, gport = _reserve("grpc.listen", self.config.grpc.listen)
            self._reserved.append(grpc_sock)
            self._addresses["grpc"] = f"{ghost}:{gport}"
            grpc = (ghost, gport)
        self._tmp = tempfile.TemporaryDirectory(prefix="inference-router-")
        self._child_config = Path(self._tmp.name) / "process.toml"
        (Path(self._tmp.name) / "admin.token").write_text(self._child_token)  # dir is 0700
        self._write_child_config(self.config)
        await asyncio.gather(*(self._start_child(child) for child in self._children))
        admin_host, admin_port = parse_host_port(self.config.admin.listen)
        try:
            admin = await self.admin.start(admin_host, admin_port)
        except OSError as exc:
            raise ListenFailed.of("admin.listen", self.config.admin.listen, exc) from None
        return SupervisedAddresses((host, port), admin, grpc)

    def _write_child_config(self, config: RouterConfig) -> None:
        """The children's config: ``config`` on the reserved ports, its spawned backends by
        address, the admin API on a loopback port each. Replaced atomically: a child that
        (re)starts or reloads reads the whole old file or the whole new one."""
        assert self._child_config is not None
        data = config.model_dump(mode="json", exclude_none=True)
        data["backends"] = self._resolved
        data["listener"].update(listen=self._addresses["listener"], reuse_port=True,
                                processes=1)
        if "grpc" in self._addresses:
            data["grpc"]["listen"] = self._addresses["grpc"]
        # Plain, loopback: only we call it.
        data["admin"] = {"listen": "127.0.0.1:0",
                         "token_file": str(self._child_config.with_name("admin.token"))}
        staged = self._child_config.with_suffix(".toml.new")
        staged.write_bytes(tomli_w.dumps(data).encode())
        os.replace(staged, self._child_config)

    async def reload(self) -> ReloadOutcome:
        """Validate the config source as a router would, then hand it to every child."""
        try:
            new = await asyncio.to_thread(self._source)
        except ConfigError as exc:
            return self._refused(InvalidInput(exc.problems))
        diff = config_diff.diff(self.config, new)
        spawned = [f"backends[{j}]: a backend with command is added" for j in diff.added
                   if new.backends[j].command]
        spawned += [f"backends[{i}]: a backend with command is removed" for i in diff.removed
                    if self.config.backends[i].command]
        if diff.restart or spawned:
            return self._refused(RestartRequired(
                [*diff.restart, *(f"{s}: needs a restart with listener.processes > 1"
                                  for s in spawned)]
            ))
        resolved: list[dict[str, Any]] = [new.backends[j].model_dump(mode="json", exclude_none=True)
                                          for j in range(len(new.backends))]
        for i, j in diff.kept:
            if new.backends[j].command:
                resolved[j] |= {"address": self._resolved[i]["address"], "command": []}
        changes = diff.describe(self.config, new)
        self._resolved, self.config = resolved, new
        self._write_child_config(new)
        self._signal_children(signal.SIGHUP)  # each child reloads config and certificates
        self._reload_own_certificates()
        self.reloads += 1
        log.info("config handed to %d router processes: %s", len(self._children),
                 "; ".join(changes) or "nothing changed")
        return ReloadOutcome(tuple(changes))

    def _refused(self, error: RouterError) -> ReloadOutcome:
        log.error("config reload refused, the running config stays: %s",
                  "; ".join(error.problems))
        return ReloadOutcome(error=error)

    async def _resolve_backend(self, backend: dict[str, Any]) -> dict[str, Any]:
        if not backend.get("command"):
            return backend
        host, port = parse_host_port(backend["address"])
        spawned = await self._backends.spawn(substitute(tuple(backend["command"]), port))
        return {**backend, "address": f"{host}:{spawned.port}", "command": []}

    async def _start_child(self, child: _Child) -> None:
        assert self._child_config is not None
        argv = [sys.executable, "-m", "router", "serve", "--supervised",
                "--config", str(self._child_config)]
        child.spawned = await self._routers.spawn(argv)

    async def serve(self, stop: Awaitable[object]) -> int:
        """Keep the children running until ``stop``; drain them; 0 if none dropped anything."""
        async with asyncio.TaskGroup() as group:
            watchers = [group.create_task(self._watch(child)) for child in self._children]
            await stop
            self.lifecycle.start_drain()
            log.info("draining %d router processes", len(self._children))
            self._signal_children(signal.SIGTERM)
            limit = (self.config.drain.shutdown_grace_s + self.config.drain.linger_s
                     + STOP_MARGIN_S)
            try:
                async with asyncio.timeout(limit):
                    await asyncio.gather(*watchers)
            except TimeoutError:
                log.error("router processes still running %.0fs after SIGTERM: killing", limit)
                self._signal_children(signal.SIGKILL)
                await asyncio.gather(*watchers)
        return 0 if all(c.exit_codes and c.exit_codes[-1] == 0 for c in self._children) else 1

    async def _watch(self, child: _Child) -> None:
        """Wait for the child to exit; restart it unless we are draining."""
        delay = RESTART_BACKOFF_S[0]
        while True:
            assert child.spawned is not None
            code = await child.spawned.process.wait()
            child.exit_codes.append(code)
            if self.lifecycle.draining:
                return
            log.error("router process %d (pid %d) exited with %d; restarting in %.0fs",
                      child.index, child.spawned.process.pid, code, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, RESTART_BACKOFF_S[1])
            if self.lifecycle.draining:
                return
            child.restarts += 1
            await self._start_child(child)

    def _signal_children(self, signum: int) -> None:
        for child in self._children:
            if child.spawned is not None and child.spawned.process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    child.spawned.process.send_signal(signum)

    def reload_certificates(self) -> list[str]:
        """Every child reloads its own files (SIGHUP), and the admin API's certificate and token
        are re-read here. Returns the problems here (logged too)."""
        self._signal_children(signal.SIGHUP)
        return self._reload_own_certificates()

    def _reload_own_certificates(self) -> list[str]:
        parts: list[Reloadable] = [self.admin.auth]
        if self.admin_tls is not None:
            parts.insert(0, self.admin_tls)
        return reload_each(parts)

    def force_exit(self) -> None:
        """Second signal: the children exit at once (their own second-signal rule)."""
        self._signal_children(signal.SIGTERM)
        self._backends.kill_now()

    async def close(self) -> None:
        await self.admin.close()
        limit = self.config.drain.shutdown_grace_s + self.config.drain.linger_s + STOP_MARGIN_S
        await self._routers.stop_all(timeout_s=limit)
        await self._backends.stop_all()
        for sock in self._reserved:
            sock.close()
        if self._tmp is not None:
            self._tmp.cleanup()

    def statistics(self) -> dict[str, Any]:
        return {"phase": self.lifecycle.phase.value,
                "processes": [c.info() for c in self._children],
                "backends_spawned": self._backends.statistics()}

    def __repr__(self) -> str:
        alive = sum(1 for c in self._children if c.info().alive)
        return f"Supervisor(processes={len(self._children)}, alive={alive})"
