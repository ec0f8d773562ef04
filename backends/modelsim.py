"""A simulated model server, for the affinity tests and benchmarks.

It holds at most ``--slots`` models at once. A request for a model it holds costs
``--service-ms``; one for a model it does not hold first loads it (``--load-ms``).
``--concurrency`` requests are worked on at once (1: one task at a time, as in the seed
experiment); the others wait in arrival order. Its slots are kept as an LRU cache at the
moment a request arrives: the request's model moves to the most recently used end and stays
while any request for it waits or runs; a model it lacks takes a slot at once, evicting least
recently used models until one is free, and is loaded by the first request for it that a
worker takes (that worker spends the load), the others waiting for that one load. Memory is
fixed: the victim is a model no request uses, else (every slot wanted) one whose requests
only wait, which then load it again when a worker takes them (``evicted_waiting``); only with
a worker on every model does the server go over its slots (``overcommits``), until its next
load evicts it back under them.

Two ways in (``--protocol``):

* ``frames``: keyed length-prefixed frames (``router.protocol.keyed``: a 1-byte key length,
  the model key, the body); the answer is the body. A frame without a key is served without a
  model (service time only); the zero-length frame (the router's probe) is answered at once.
  Answers go out in request order on each connection.
* ``grpc``: KServe v2 on ``backends.kserve`` (the model is ``model_name``; the answer is the
  ``identity`` model's), plus ``ModelReady`` (loaded), Triton's ``RepositoryIndex`` (every
  model of the catalogue, or every resident one, with its state READY, LOADING or
  UNAVAILABLE), and ``RepositoryModelLoad``/``Unload``. ``--model-control explicit`` is
  Triton's explicit model control: an inference for a model that is not loaded is NOT_FOUND
  instead of loading it. ``--fail-load MODELS``: RepositoryModelLoad of these models fails
  (INTERNAL, after the load time), as a model whose files are broken does.
  ``--no-repository-index``: RepositoryIndex is UNIMPLEMENTED (a KServe server that only
  answers ``ModelReady``).

``--models`` names the catalogue (any other model is unknown: NOT_FOUND, or a closed
connection on frames); without it every model key is served. ``--preload`` loads models
before the server announces itself.

Worker-side statistics (requests; misses, the requests whose model was not loaded when a
worker took them, so that their worker-side time has a load in it, and when each began on
the monotonic clock; loads; evictions; and each request's worker-side time, from the moment
a worker takes it, load included) are
written as JSON to ``--stats FILE`` on exit (SIGTERM or SIGINT). Prints ``READY <port>``
(``READY unix:<path>``) once listening.

With ``--register URL`` it joins a router's fleet by itself (``backends.registering``): its
catalogue (or ``"*"``) as its models, ``model_slots`` and ``concurrency`` labels, and every
heartbeat carries the models it holds (``loaded_models``, least recently used first) and
each model's requests here, running or waiting (``model_use``): what an affinity router's
residency view reads, and how routers sharing the backend see each other's queues. A change
of what it holds (a load begun, an eviction) brings the next heartbeat forward
(``Registration.report_soon``), so routers sharing it hear of it within milliseconds.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import time
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, cast

import grpc
import uvloop

from backends import kserve, registering
from backends.command_line import add_listen_arguments, stop_on_signals
from backends.echo import listen_frames
from backends.registering import RegisterOptions
from router.core.errors import BadRoutingKey, FrameTooLarge
from router.protocol.frames import DEFAULT_MAX_FRAME_BYTES, FrameDecoder, encode_frames
from router.protocol.keyed import split
from router.protocol.kserve import read_repository_model
from router.protocol.proto import grpc_predict_v2_pb2 as pb
from router.protocol.proto import triton_extensions_pb2 as triton

MAX_SAMPLES = 100_000  # worker-side times kept for the stats file (a bench run sends fewer)
Control = Literal["implicit", "explicit"]


@dataclass(frozen=True, slots=True)
class ModelSimConfig:
    host: str = "127.0.0.1"
    port: int = 0
    unix: str | None = None
    protocol: Literal["frames", "grpc"] = "frames"
    slots: int = 2
    load_s: float = 0.39
    service_s: float = 0.04
    concurrency: int = 1
    models: tuple[str, ...] = ()  # the catalogue; () serves every model key
    preload: tuple[str, ...] = ()
    control: Control = "implicit"
    fail_load: tuple[str, ...] = ()  # RepositoryModelLoad of these fails
    repository_index: bool = True  # False: RepositoryIndex is UNIMPLEMENTED
    stats: str | None = None
    register: RegisterOptions | None = None  # join this router's fleet (--register)

    def __post_init__(self) -> None:
        if self.slots < 1 or self.concurrency < 1:
            raise ValueError("--slots and --concurrency must be >= 1")
        if not (math.isfinite(self.load_s) and math.isfinite(self.service_s)) or min(
                self.load_s, self.service_s) < 0:
            raise ValueError("--load-ms and --service-ms must be finite and >= 0")
        if len(self.preload) > self.slots:
            raise ValueError(f"--preload names {len(self.preload)} models for {self.slots} slots")
        unknown = [m for m in self.preload if self.models and m not in self.models]
        if unknown:
            raise ValueError(f"--preload names models outside --models: {unknown}")


class UnknownModel(Exception):
    """A model outside the catalogue."""


class NotLoaded(Exception):
    """Explicit model control: an inference for a model that is not loaded."""


@dataclass(eq=False)
class _Resident:
    """A model in a slot: being loaded (``ready`` unset) or loaded."""

    ready: asyncio.Event = field(default_factory=asyncio.Event)
    users: int = 0  # requests that arrived for it and are not answered yet
    running: int = 0  # of those, the ones a worker has taken
    loading: bool = False  # a worker is loading it now


@dataclass
class _Counts:
    requests: int = 0
    misses: int = 0
    loads: int = 0
    evictions: int = 0


class ModelSim:
    """The server's models, workers and statistics, shared by both protocols."""

    def __init__(
        self, config: ModelSimConfig, now: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        """``now`` and ``sleep``: the clock the times are spent and measured on (a test
        passes its own)."""
        self.config = config
        self._now = now
        self._sleep = sleep
        self._slots: OrderedDict[str, _Resident] = OrderedDict()  # least recently used first
        self._workers = asyncio.Semaphore(config.concurrency)
        self.counts = _Counts()
        self.by_model: dict[str, _Counts] = {}
        self.unloads = 0
        self.load_failures = 0  # RepositoryModelLoad calls refused (--fail-load)
        self.overcommits = 0  # loads with a worker on every model: over the slots instead
        self.evicted_waiting = 0  # evictions of a model whose requests waited for a worker
        self.worker_time_s = 0.0
        self.samples: deque[float] = deque(maxlen=MAX_SAMPLES)
        # model -> its requests here (arrived, not answered): a heartbeat's model_use
        self._in_use = registering.ModelUse()
        # Told when the models it holds change (a registered server reports them soon).
        self.on_change: Callable[[], None] = lambda: None
        # When each miss began (``now``: CLOCK_MONOTONIC in a process, shared by all on
        # the machine), so that a benchmark can count the misses after its warm-up.
        self.miss_times: deque[float] = deque(maxlen=MAX_SAMPLES)

    def check(self, model: str) -> None:
        if self.config.models and model not in self.config.models:
            raise UnknownModel(f"unknown model {model!r}")

    def loaded(self, model: str) -> bool:
        resident = self._slots.get(model)
        return resident is not None and resident.ready.is_set()

    async def infer(self, model: str | None) -> float:
        """Serve one request for ``model`` (None: no model); its worker-side time."""
        resident = None
        if model is not None:
            self.check(model)
            if self.config.control == "explicit" and model not in self._slots:
                raise NotLoaded(f"model {model!r} is not loaded")
            resident = self._arrive(model)
            self._in_use.begin(model)
        self.counts.requests += 1
        try:
            async with self._workers:
                began = self._now()
                if resident is not None and self._slots.get(model or "") is not resident:
                    # Evicted while this request waited (every slot was wanted): it loads
                    # the model again.
                    self._leave(model or "", resident)
                    resident = self._take_slot(model or "")
                if resident is not None:
                    resident.running += 1
                    await self._use(model or "", resident)
                await self._sleep(self.config.service_s)
                elapsed = self._now() - began
        finally:
            if resident is not None:
                resident.running = max(0, resident.running - 1)
                self._leave(model or "", resident)
                self._in_use.end(model or "")
        self.worker_time_s += elapsed
        self.samples.append(elapsed)
        return elapsed

    def _arrive(self, model: str) -> _Resident:
        """A request for ``model`` arrives: the model is used now (it moves to the end of the
        LRU order) and kept while the request waits or runs; one it lacks takes a slot now,
        loaded by the first request for it that a worker takes."""
        self.by_model.setdefault(model, _Counts()).requests += 1
        return self._take_slot(model)

    def _take_slot(self, model: str) -> _Resident:
        resident = self._slots.get(model)
        if resident is None:
            resident = self._begin_load(model)
        else:
            self._slots.move_to_end(model)
        resident.users += 1
        return resident

    async def _use(self, model: str, resident: _Resident) -> None:
        """On a worker: load the model if it is owed a load, else wait for its load; either
        way the request is a miss (its worker-side time has load in it)."""
        if resident.ready.is_set():
            return
        self.counts.misses += 1
        self.by_model[model].misses += 1
        self.miss_times.append(self._now())
        if resident.loading:
            await resident.ready.wait()
            return
        resident.loading = True
        try:
            await self._sleep(self.config.load_s)
        finally:
            resident.loading = False
        resident.ready.set()

    def model_use(self) -> dict[str, int]:
        """model -> its requests here, running or waiting for a worker (an evicted model's
        waiting requests too: they load it again)."""
        return self._in_use.counts()

    def _leave(self, model: str, resident: _Resident) -> None:
        resident.users -= 1
        if not resident.users and not resident.ready.is_set() and not resident.loading \
                and self._slots.get(model) is resident:
            del self._slots[model]  # its load never happened (cancelled): the slot is free

    def _begin_load(self, model: str) -> _Resident:
        """Take a slot for ``model``, evicting least recently used models not in use until
        one is free: after a spell over its slots (every model was in use), a load brings it
        back under them, as a server's fixed memory would."""
        while len(self._slots) >= self.config.slots:
            victim = self._victim()
            if victim is None:
                self.overcommits += 1
                break
            del self._slots[victim]
            self.counts.evictions += 1
            self.by_model.setdefault(victim, _Counts()).evictions += 1
        resident = self._slots[model] = _Resident()
        self.counts.loads += 1
        self.by_model.setdefault(model, _Counts()).loads += 1
        self.on_change()
        return resident

    def _victim(self) -> str | None:
        """The least recently used loaded model no request uses; else (memory is fixed) the
        least recently used loaded one no worker is on, whose waiting requests then load it
        again (``evicted_waiting``); None when a worker is on every model."""
        idle = next((name for name, r in self._slots.items()
                     if not r.users and r.ready.is_set()), None)
        if idle is not None:
            return idle
        waited = next((name for name, r in self._slots.items()
                       if not r.running and not r.loading and r.ready.is_set()), None)
        if waited is not None:
            self.evicted_waiting += 1
        return waited

    async def load(self, model: str) -> None:
        """Load ``model`` (RepositoryModelLoad), without a worker; at once if resident."""
        self.check(model)
        resident = self._slots.get(model)
        if resident is None:
            resident = self._begin_load(model)
        else:
            self._slots.move_to_end(model)
        resident.users += 1  # kept while it loads
        try:
            if resident.loading:
                await resident.ready.wait()
            elif not resident.ready.is_set():
                resident.loading = True
                try:
                    await self._sleep(self.config.load_s)
                finally:
                    resident.loading = False
                resident.ready.set()
        finally:
            self._leave(model, resident)

    def unload(self, model: str) -> bool:
        """Unload ``model`` (RepositoryModelUnload) unless a request uses it; True if it was
        unloaded."""
        self.check(model)
        resident = self._slots.get(model)
        if resident is None or resident.users or not resident.ready.is_set():
            return False
        del self._slots[model]
        self.unloads += 1
        self.on_change()
        return True

    def index(self) -> list[tuple[str, str]]:
        """(model, state) of the catalogue (or of the resident models, without one)."""
        names = self.config.models or tuple(self._slots)
        return [(name, self._state(name)) for name in names]

    def _state(self, model: str) -> str:
        resident = self._slots.get(model)
        if resident is None:
            return "UNAVAILABLE"
        return "READY" if resident.ready.is_set() else "LOADING"

    def resident(self) -> list[str]:
        """The models it holds: loaded, or taking a slot while their load is owed or under
        way (requests for them are served here once it is done)."""
        return list(self._slots)

    def statistics(self) -> dict[str, Any]:
        samples = sorted(self.samples)
        requests = len(samples)
        return {
            "config": {**asdict(self.config), "models": list(self.config.models)},
            **asdict(self.counts),
            "unloads": self.unloads,
            "load_failures": self.load_failures,
            "overcommits": self.overcommits,
            "evicted_waiting": self.evicted_waiting,
            "worker_time_s": {
                "total": self.worker_time_s,
                "mean": self.worker_time_s / requests if requests else 0.0,
                "p99": samples[min(requests - 1, int(requests * 0.99))] if requests else 0.0,
            },
            "worker_times_s": samples if len(samples) == len(self.samples) else [],
            "miss_times_s": list(self.miss_times),
            "models": {name: asdict(c) for name, c in sorted(self.by_model.items())},
            "resident": self.resident(),
        }


# -- keyed frames ------------------------------------------------------------------------------


class FramesProtocol(asyncio.Protocol):
    """One connection: each keyed frame served as its own task, answers in request order."""

    def __init__(self, sim: ModelSim, tasks: set[asyncio.Task[bytes]],
                 connections: set[FramesProtocol]) -> None:
        self._sim = sim
        self._tasks = tasks
        self._connections = connections
        self._decoder = FrameDecoder(DEFAULT_MAX_FRAME_BYTES)
        self._transport: asyncio.Transport | None = None
        self._pending: deque[asyncio.Future[bytes]] = deque()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)
        self._connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self._connections.discard(self)
        self._transport = None
        for pending in self._pending:
            pending.cancel()
        self._pending.clear()

    def data_received(self, data: bytes) -> None:
        try:
            frames = self._decoder.feed(data)
        except FrameTooLarge:
            self.abort()
            return
        loop = asyncio.get_running_loop()
        for payload in frames:
            if not payload:  # the router's probe
                done: asyncio.Future[bytes] = loop.create_future()
                done.set_result(b"")
                self._pending.append(done)
                continue
            try:
                model, body = split(payload)
                if model is not None:
                    self._sim.check(model)
            except (BadRoutingKey, UnknownModel):
                self.abort()  # a backend cannot send error frames: the router sees a failure
                return
            task = loop.create_task(self._serve(model, body))
            self._tasks.add(task)
            task.add_done_callback(self._done)
            self._pending.append(task)
        self._flush()  # probes at the head are answered at once

    async def _serve(self, model: str | None, body: bytes) -> bytes:
        await self._sim.infer(model)
        return body

    def _done(self, task: asyncio.Task[bytes]) -> None:
        self._tasks.discard(task)
        self._flush()

    def _flush(self) -> None:
        """Write every answer ready at the head of the line, in one write."""
        replies: list[bytes] = []
        pending = self._pending
        while pending and pending[0].done():
            head = pending.popleft()
            if head.cancelled() or head.exception() is not None:
                self.abort()
                return
            replies.append(head.result())
        if replies and self._transport is not None:
            self._transport.write(encode_frames(replies))

    def abort(self) -> None:
        if self._transport is not None:
            self._transport.abort()


# -- KServe gRPC -------------------------------------------------------------------------------


class ModelSimServicer(kserve.KServeBackend):
    """``backends.kserve``'s service, with the models of a ``ModelSim``."""

    def __init__(self, config: kserve.KServeConfig, port: int, sim: ModelSim) -> None:
        super().__init__(config, port)
        self.sim = sim

    def _served(self, name: str) -> None:
        try:
            self.sim.check(name)
        except UnknownModel as exc:
            raise kserve.InferError(grpc.StatusCode.NOT_FOUND, str(exc)) from None

    def labels(self) -> dict[str, str]:
        return shape_labels(self.sim.config)

    def loaded_models(self) -> list[str]:
        return self.sim.resident()

    async def _infer(self, request: pb.ModelInferRequest) -> pb.ModelInferResponse:
        self._served(request.model_name)
        try:
            await self.sim.infer(request.model_name)
        except NotLoaded as exc:
            raise kserve.InferError(grpc.StatusCode.NOT_FOUND, str(exc)) from None
        response = kserve.identity(request)
        response.model_name, response.model_version, response.id = (
            request.model_name, kserve.VERSION, request.id
        )
        self.inferences += 1
        return response

    async def model_ready(self, request: pb.ModelReadyRequest, context: kserve.Context) -> Any:
        return pb.ModelReadyResponse(ready=self.sim.loaded(request.name))

    async def model_metadata(
        self, request: pb.ModelMetadataRequest, context: kserve.Context
    ) -> Any:
        await self._check_served(request.name, context)
        return pb.ModelMetadataResponse(
            name=request.name, versions=[kserve.VERSION], platform=kserve.PLATFORM
        )

    async def model_statistics(
        self, request: triton.ModelStatisticsRequest, context: kserve.Context
    ) -> Any:
        names = [request.name] if request.name else sorted(self.sim.by_model)
        for name in names:
            await self._check_served(name, context)
        counts = self.sim.by_model
        return triton.ModelStatisticsResponse(model_stats=[
            triton.ModelStatistics(
                name=name, version=kserve.VERSION,
                inference_count=counts[name].requests if name in counts else 0,
                execution_count=counts[name].requests if name in counts else 0,
            ) for name in names
        ])

    async def repository_load(self, payload: bytes, context: kserve.Context) -> bytes:
        name = read_repository_model(payload).name
        await self._check_served(name, context)
        if name in self.sim.config.fail_load:
            self.sim.load_failures += 1
            await asyncio.sleep(self.sim.config.load_s)
            await context.abort(grpc.StatusCode.INTERNAL, f"failed to load {name!r}")
        await self.sim.load(name)
        return pb.RepositoryModelLoadResponse(model_name=name, isLoaded=True).SerializeToString()

    async def repository_unload(self, payload: bytes, context: kserve.Context) -> bytes:
        name = read_repository_model(payload).name
        await self._check_served(name, context)
        if not self.sim.unload(name) and self.sim.loaded(name):
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                f"model {name!r} is in use")
        return pb.RepositoryModelUnloadResponse(
            model_name=name, isUnloaded=True
        ).SerializeToString()

    async def repository_index(
        self, request: triton.RepositoryIndexRequest, context: kserve.Context
    ) -> Any:
        return triton.RepositoryIndexResponse(models=[
            triton.RepositoryIndexResponse.ModelIndex(name=name, version=kserve.VERSION,
                                                      state=state)
            for name, state in self.sim.index() if not request.ready or state == "READY"
        ])

    def methods(self) -> dict[str, Any]:
        methods = super().methods()
        if self.sim.config.repository_index:
            methods["RepositoryIndex"] = kserve.unary(
                self.repository_index, triton.RepositoryIndexRequest,
                triton.RepositoryIndexResponse)
        return methods


# -- running -----------------------------------------------------------------------------------


def registered_models(config: ModelSimConfig) -> tuple[str, ...]:
    """What it registers as serving: its catalogue, or "*" (any model) without one."""
    return config.models or ("*",)


def shape_labels(config: ModelSimConfig) -> dict[str, str]:
    """The labels that tell an affinity router its slots and concurrency."""
    return {"model_slots": str(config.slots), "concurrency": str(config.concurrency)}


async def serve(config: ModelSimConfig, stop: asyncio.Event) -> ModelSim:
    """Preload, listen, announce, serve until ``stop`` is set; the sim, for its statistics."""
    sim = ModelSim(config)
    for model in config.preload:
        await sim.load(model)
    if config.protocol == "grpc":
        grpc_config = kserve.KServeConfig(host=config.host, port=config.port, unix=config.unix,
                                          models=registered_models(config),
                                          register=config.register)
        await kserve.serve(grpc_config, stop, lambda c, port: ModelSimServicer(c, port, sim))
        return sim
    tasks: set[asyncio.Task[bytes]] = set()
    connections: set[FramesProtocol] = set()
    server, ready = await listen_frames(
        lambda: FramesProtocol(sim, tasks, connections), config.host, config.port, config.unix,
    )
    port = 0 if config.unix is not None else server.sockets[0].getsockname()[1]
    address = "" if config.register is None else registering.advertised(
        config.register, host=config.host, port=port, unix=config.unix)
    try:
        async with registering.lease(
                config.register, address=address, protocol="frames",
                models=registered_models(config), inflight=lambda: len(tasks),
                loaded_models=sim.resident, model_use=sim.model_use,
                labels=shape_labels(config)) as registration:
            if registration is not None:
                sim.on_change = registration.report_soon
            print(ready, flush=True)
            await stop.wait()
    finally:
        server.close()
        for conn in list(connections):
            conn.abort()
        for task in list(tasks):
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(*tasks, return_exceptions=True)
        await server.wait_closed()
    return sim


async def _main_async(config: ModelSimConfig) -> dict[str, Any]:
    stop = stop_on_signals()
    sim = await serve(config, stop)
    return sim.statistics()


def _names(text: str) -> tuple[str, ...]:
    return tuple(name for name in text.split(",") if name)


def parse_args(argv: list[str] | None = None) -> ModelSimConfig:
    parser = argparse.ArgumentParser(prog="python -m backends.modelsim", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_listen_arguments(parser)
    parser.add_argument("--protocol", choices=("frames", "grpc"), default="frames")
    parser.add_argument("--slots", type=int, default=2, help="models held at once")
    parser.add_argument("--load-ms", type=float, default=390.0, help="time to load a model")
    parser.add_argument("--service-ms", type=float, default=40.0, help="time per request")
    parser.add_argument("--concurrency", type=int, default=1, help="requests worked on at once")
    parser.add_argument("--models", default="", help="comma-separated catalogue (default: any)")
    parser.add_argument("--preload", default="", help="comma-separated models loaded at start")
    parser.add_argument("--model-control", choices=("implicit", "explicit"), default="implicit",
                        help="explicit: only RepositoryModelLoad loads (gRPC)")
    parser.add_argument("--fail-load", default="", metavar="MODELS",
                        help="comma-separated models whose RepositoryModelLoad fails (gRPC)")
    parser.add_argument("--no-repository-index", action="store_true",
                        help="RepositoryIndex is UNIMPLEMENTED; ModelReady still answers (gRPC)")
    parser.add_argument("--stats", metavar="FILE", default=None,
                        help="write worker-side statistics as JSON to FILE on exit")
    registering.add_arguments(parser)
    args = parser.parse_args(argv)
    register = registering.options(args, parser)
    try:
        return ModelSimConfig(
            host=args.host, port=args.port or 0, unix=args.unix, protocol=args.protocol,
            slots=args.slots, load_s=args.load_ms / 1000.0, service_s=args.service_ms / 1000.0,
            concurrency=args.concurrency, models=_names(args.models),
            preload=_names(args.preload), control=args.model_control,
            fail_load=_names(args.fail_load), repository_index=not args.no_repository_index,
            stats=args.stats,
            register=register,
        )
    except ValueError as exc:
        parser.error(str(exc))


def main(argv: list[str] | None = None) -> None:
    config = parse_args(argv)
    statistics = uvloop.run(_main_async(config))
    if config.stats is not None:
        with open(config.stats, "w", encoding="utf-8") as fh:
            json.dump(statistics, fh)


if __name__ == "__main__":
    main()
