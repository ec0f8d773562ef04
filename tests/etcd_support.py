"""A real etcd server for the registry tests, a relay that can cut one client off, and a
collector of watch events. Test modules import the fixture by name (``from
tests.etcd_support import etcd_server``).

``etcd_server`` starts ``etcd`` (Debian's ``etcd-server``; ``make test`` installs it) on two
free loopback ports with a data directory under the test's tmp_path, and waits for the line
in which it says it serves clients (bounded). ``stop`` (or ``kill``) then ``start`` restart
the same server: same data directory, same ports. Its heartbeat and election timeout are
shortened (50 ms / 500 ms) so that etcd's shortest lease, 1.5 election timeouts rounded up
to whole seconds, is 1 s.
"""

from __future__ import annotations

import asyncio
import shutil
import socket
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from router.control.launcher import LaunchedProcess, launch
from router.control.store import BackendRecord, RegistryStore, StoreEvent, apply

READY_TIMEOUT_S = 20.0
STOP_TIMEOUT_S = 5.0
# What etcd prints once its client listener is open: zap's message, and capnslog's (3.4's
# default logger, in case --logger is dropped).
_SERVING = ("serving client traffic insecurely", "serving insecure client requests")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _serving(lines: Sequence[str]) -> bool | None:
    return True if any(marker in line for line in lines for marker in _SERVING) else None


@dataclass
class EtcdServer:
    data_dir: Path
    client_port: int = field(default_factory=free_port)
    peer_port: int = field(default_factory=free_port)
    process: LaunchedProcess[bool] | None = None

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.client_port}"

    def argv(self) -> list[str]:
        binary = shutil.which("etcd")
        if binary is None:
            pytest.fail("etcd is not installed: `make system-packages` installs etcd-server")
        client, peer = f"http://{self.endpoint}", f"http://127.0.0.1:{self.peer_port}"
        return [
            binary, "--name", "test", "--data-dir", str(self.data_dir),
            "--listen-client-urls", client, "--advertise-client-urls", client,
            "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
            "--initial-cluster", f"test={peer}",
            "--heartbeat-interval", "50", "--election-timeout", "500",
            "--logger", "zap", "--log-outputs", "stdout",
        ]

    async def start(self) -> None:
        assert self.process is None, "already running"
        self.process = await launch(self.argv(), _serving, ready_timeout_s=READY_TIMEOUT_S)

    async def stop(self) -> None:
        """SIGTERM (SIGKILL after STOP_TIMEOUT_S), reaped."""
        if self.process is not None:
            process, self.process = self.process, None
            await process.stop(STOP_TIMEOUT_S)

    async def kill(self) -> None:
        """SIGKILL, reaped: etcd gets no chance to shut down cleanly."""
        if self.process is not None:
            process, self.process = self.process, None
            process.kill()
            await process.stop(STOP_TIMEOUT_S)

    async def restart(self) -> None:
        await self.stop()
        await self.start()


@pytest.fixture
async def etcd_server(tmp_path: Path) -> AsyncIterator[EtcdServer]:
    server = EtcdServer(tmp_path / "etcd")
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


class Relay:
    """A TCP relay on loopback to ``target``; ``cut()`` closes every relayed connection and
    refuses new ones (accepted, then closed at once) until ``restore()``."""

    def __init__(self, target_port: int) -> None:
        self._target_port = target_port
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self.is_cut = False
        self.port = 0

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    def cut(self) -> None:
        self.is_cut = True
        for writer in list(self._writers):
            writer.transport.abort()

    def restore(self) -> None:
        self.is_cut = False

    async def close(self) -> None:
        self.cut()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.is_cut:
            writer.transport.abort()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self._target_port)
        except OSError:
            writer.transport.abort()
            return
        self._writers |= {writer, up_writer}
        for src, dst in ((reader, up_writer), (up_reader, writer)):
            task = asyncio.create_task(self._pump(src, dst))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _pump(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        try:
            while data := await src.read(65536):
                dst.write(data)
                await dst.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            self._writers.discard(dst)
            dst.transport.abort()


class Collector:
    """Reads ``store.watch()`` in a task of its own: the events in order and the view they
    build. ``wait_until`` waits (bounded) for a condition on them, woken by each event."""

    def __init__(self, store: RegistryStore) -> None:
        self.events: list[StoreEvent] = []
        self.view: dict[str, BackendRecord] = {}
        self.ended = False
        self._changed = asyncio.Condition()
        self._task = asyncio.create_task(self._run(store))

    async def _run(self, store: RegistryStore) -> None:
        try:
            async for event in store.watch():
                apply(self.view, event)
                self.events.append(event)
                async with self._changed:
                    self._changed.notify_all()
        finally:
            self.ended = True
            async with self._changed:
                self._changed.notify_all()

    def kinds(self, backend_id: str) -> list[str]:
        return [e.kind for e in self.events if e.record.id == backend_id]

    async def wait_until(self, done: Callable[[Collector], bool], timeout_s: float) -> None:
        async with asyncio.timeout(timeout_s), self._changed:
            await self._changed.wait_for(lambda: done(self) or self._task.done())
        if self._task.done() and not done(self):
            self._task.result()  # re-raise what ended the watch
            raise AssertionError(f"the watch ended; events: {self.events}")

    async def wait_for_ids(self, ids: set[str], timeout_s: float) -> None:
        await self.wait_until(lambda c: set(c.view) == ids, timeout_s)

    async def stop(self) -> None:
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)
