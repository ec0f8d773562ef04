"""Load on the router's admin API: registering backends and renewing their leases.

- ``register_all`` posts many ``POST /v1/backends`` from this process (aiohttp, keep-alive,
  ``concurrency`` at a time) and returns when each was answered.
- ``HeartbeatLoad`` runs ``PUT /v1/backends/{id}/lease`` for a set of backends in a process
  of its own (spawned), so its CPU is not charged to the process that measures the router:
  each id renewed once per ``interval_s``, the ids spread evenly over the interval (rate =
  ids / interval), by ``connections`` keep-alive connections, each one heartbeat at a time.
  A heartbeat that would start late starts at once; the counts say what rate was achieved.
  ``snapshot()`` asks it for its counts so far; ``stop()`` ends it and returns the last
  ones, with the send time of each backend's last renewal (``time.monotonic_ns()``, one
  clock for every process), from which a benchmark knows when each lease ends.

Every wait is bounded; the child process is stopped (and killed if need be) by ``stop``.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing as mp
import time
import traceback
from collections.abc import Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any, TypedDict

import aiohttp
import orjson
import uvloop

REQUEST_TIMEOUT_S = 10.0
# Spawning the child (interpreter, aiohttp) takes about half a second; a loaded machine more.
START_TIMEOUT_S = 30.0
REPLY_TIMEOUT_S = 30.0


def headers(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


class AdminError(Exception):
    """The admin API answered something other than what the benchmark expects."""


async def register_all(admin_url: str, token: str, registrations: Sequence[dict[str, Any]],
                       concurrency: int = 16, spacing_s: float = 0.0) -> dict[str, int]:
    """POST every registration, ``concurrency`` at a time, or (``spacing_s`` > 0) one after
    another, each ``spacing_s`` after the previous one started; ``{id: monotonic_ns when its
    201 arrived}``. Any other answer raises ``AdminError`` (a benchmark on a half-registered
    fleet measures nothing)."""
    answered: dict[str, int] = {}
    slots = asyncio.Semaphore(concurrency)
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)
    async with aiohttp.ClientSession(headers=headers(token), timeout=timeout) as session:

        async def one(body: dict[str, Any]) -> None:
            async with slots, session.post(f"{admin_url}/v1/backends", json=body) as response:
                text = await response.text()
                if response.status != 201:
                    raise AdminError(f"POST /v1/backends {body['id']}: {response.status} {text}")
                answered[body["id"]] = time.monotonic_ns()

        if spacing_s > 0:
            for body in registrations:
                next_at = time.monotonic() + spacing_s
                await one(body)
                await asyncio.sleep(max(0.0, next_at - time.monotonic()))
            return answered
        try:
            async with asyncio.TaskGroup() as group:
                for body in registrations:
                    group.create_task(one(body))
        except ExceptionGroup as failed:  # the first refusal says enough
            first = failed.exceptions[0]
            if isinstance(first, AdminError):
                raise first from None
            raise
    return answered


async def drain_all(admin_url: str, token: str, ids: Sequence[str], concurrency: int = 16
                    ) -> None:
    """``POST /v1/backends/{id}/drain`` for each: out of rotation, still members."""
    slots = asyncio.Semaphore(concurrency)
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)
    async with aiohttp.ClientSession(headers=headers(token), timeout=timeout) as session:

        async def one(backend_id: str) -> None:
            url = f"{admin_url}/v1/backends/{backend_id}/drain"
            async with slots, session.post(url) as response:
                if response.status != 200:
                    raise AdminError(f"POST {url}: {response.status} {await response.text()}")

        async with asyncio.TaskGroup() as group:
            for backend_id in ids:
                group.create_task(one(backend_id))


@dataclass(frozen=True, slots=True)
class HeartbeatSpec:
    admin_url: str
    token: str
    ids: tuple[str, ...]
    interval_s: float  # each id renewed once per interval
    connections: int = 8
    body: bytes = b"{}"  # a LoadReport
    # Leases renewed per request: 1 is PUT /v1/backends/{id}/lease each, more is one
    # PUT /v1/leases for that many ids (a process that runs many backends).
    batch: int = 1

    @property
    def rate_per_s(self) -> float:
        return len(self.ids) / self.interval_s


class HeartbeatCounts(TypedDict):
    ok: int
    not_found: int
    failed: int
    late: int  # heartbeats that started more than one spacing after their slot
    at_ns: int
    started_ns: int
    latencies_us: list[int]  # of every ok heartbeat since the last snapshot
    last_ok_sent_ns: dict[str, int]  # stop() only: per id, when its last renewal was sent


class _Beats:
    """The child's side: the schedule, the counters, the HTTP calls."""

    def __init__(self, spec: HeartbeatSpec) -> None:
        self.spec = spec
        self.counts: HeartbeatCounts = {
            "ok": 0, "not_found": 0, "failed": 0, "late": 0, "at_ns": 0,
            "started_ns": time.monotonic_ns(), "latencies_us": [], "last_ok_sent_ns": {},
        }
        self.stopping = asyncio.Event()

    async def run(self, session: aiohttp.ClientSession) -> None:
        spec = self.spec
        slots = self._slots()
        spacing_s = spec.interval_s / len(slots)
        start = time.monotonic()
        async with asyncio.TaskGroup() as group:
            for lane in range(min(spec.connections, len(slots))):
                group.create_task(self._lane(session, lane, start, spacing_s))

    def _slots(self) -> list[tuple[str, ...]]:
        """The ids renewed by each request of one interval, in order."""
        ids, batch = self.spec.ids, self.spec.batch
        return [ids[i:i + batch] for i in range(0, len(ids), batch)]

    async def _lane(self, session: aiohttp.ClientSession, lane: int, start: float,
                    spacing_s: float) -> None:
        """Slots lane, lane + L, lane + 2L, ... of the schedule, one request at a time."""
        slots = self._slots()
        lanes = min(self.spec.connections, len(slots))
        slot = lane
        while not self.stopping.is_set():
            due = start + slot * spacing_s
            wait = due - time.monotonic()
            if wait > 0:
                try:
                    await asyncio.wait_for(self.stopping.wait(), wait)
                    return
                except TimeoutError:
                    pass
            elif -wait > spacing_s * lanes:
                self.counts["late"] += 1
            chunk = slots[slot % len(slots)]
            if self.spec.batch > 1:
                await self._beat_many(session, chunk)
            else:
                await self._beat(session, chunk[0])
            slot += lanes

    async def _beat(self, session: aiohttp.ClientSession, backend_id: str) -> None:
        url = f"{self.spec.admin_url}/v1/backends/{backend_id}/lease"
        sent = time.monotonic_ns()
        try:
            async with session.put(url, data=self.spec.body,
                                   headers={"Content-Type": "application/json"}) as response:
                await response.read()
                status = response.status
        except (aiohttp.ClientError, TimeoutError):
            self.counts["failed"] += 1
            return
        if status == 200:
            self.counts["ok"] += 1
            self.counts["latencies_us"].append((time.monotonic_ns() - sent) // 1000)
            self.counts["last_ok_sent_ns"][backend_id] = sent
        elif status == 404:
            self.counts["not_found"] += 1
        else:
            self.counts["failed"] += 1

    async def _beat_many(self, session: aiohttp.ClientSession, ids: tuple[str, ...]) -> None:
        body = orjson.dumps({"leases": [{"id": backend_id} for backend_id in ids]})
        sent = time.monotonic_ns()
        try:
            async with session.put(f"{self.spec.admin_url}/v1/leases", data=body,
                                   headers={"Content-Type": "application/json"}) as response:
                answer = await response.read()
                status = response.status
        except (aiohttp.ClientError, TimeoutError):
            self.counts["failed"] += len(ids)
            return
        if status != 200:
            self.counts["failed"] += len(ids)
            return
        result = orjson.loads(answer)
        self.counts["ok"] += len(result["renewed"])
        self.counts["not_found"] += len(result["not_found"])
        self.counts["latencies_us"].append((time.monotonic_ns() - sent) // 1000)
        for backend_id in result["renewed"]:
            self.counts["last_ok_sent_ns"][backend_id] = sent

    def snapshot(self, final: bool) -> HeartbeatCounts:
        counts = dict(self.counts, at_ns=time.monotonic_ns())
        if not final:
            counts["last_ok_sent_ns"] = {}
        self.counts["latencies_us"] = []
        return counts  # type: ignore[return-value]


async def _child_main(spec: HeartbeatSpec, conn: Connection) -> None:
    beats = _Beats(spec)
    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()

    def on_command() -> None:
        try:
            command = conn.recv()
        except EOFError:
            command = "stop"
        if command == "snapshot":
            conn.send(("counts", beats.snapshot(final=False)))
        else:
            loop.remove_reader(conn.fileno())
            beats.stopping.set()
            if not done.done():
                done.set_result(None)

    connector = aiohttp.TCPConnector(limit=spec.connections)
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout,
                                     headers=headers(spec.token)) as session:
        loop.add_reader(conn.fileno(), on_command)
        conn.send(("ready", None))
        runner = asyncio.create_task(beats.run(session))
        await done
        await runner
    conn.send(("counts", beats.snapshot(final=True)))


def _child_entry(spec: HeartbeatSpec, conn: Connection) -> None:
    try:
        uvloop.run(_child_main(spec, conn))
    except Exception:
        conn.send(("error", traceback.format_exc()))
    finally:
        conn.close()


class HeartbeatLoad:
    """A heartbeat generator process (module docstring); ``start`` returns once it runs."""

    def __init__(self, spec: HeartbeatSpec) -> None:
        self.spec = spec
        ctx = mp.get_context("spawn")
        self._conn, child = ctx.Pipe(duplex=True)
        self._process = ctx.Process(target=_child_entry, args=(spec, child),
                                    name="bench-heartbeats", daemon=True)
        self._process.start()
        child.close()
        self._stopped = False
        self._expect("ready", START_TIMEOUT_S)

    @property
    def pid(self) -> int:
        assert self._process.pid is not None
        return self._process.pid

    def _expect(self, kind: str, timeout_s: float) -> Any:
        if not self._conn.poll(timeout_s):
            raise AdminError(f"the heartbeat process sent no {kind!r} within {timeout_s}s")
        got, value = self._conn.recv()
        if got != kind:
            raise AdminError(f"the heartbeat process: {got}: {value}")
        return value

    def snapshot(self) -> HeartbeatCounts:
        self._conn.send("snapshot")
        counts: HeartbeatCounts = self._expect("counts", REPLY_TIMEOUT_S)
        return counts

    def stop(self) -> HeartbeatCounts:
        """End the heartbeats (those in flight finish) and return the final counts."""
        if self._stopped:
            raise AdminError("the heartbeat process was stopped already")
        self._stopped = True
        try:
            self._conn.send("stop")
            counts: HeartbeatCounts = self._expect("counts", REPLY_TIMEOUT_S)
            return counts
        finally:
            self.close()

    def close(self) -> None:
        """Stop the process however it is (idempotent)."""
        if not self._stopped:
            self._stopped = True
            with contextlib.suppress(OSError):
                self._conn.send("stop")
        self._process.join(timeout=5.0)
        if self._process.is_alive():
            self._process.kill()
            self._process.join(timeout=5.0)
        self._conn.close()
