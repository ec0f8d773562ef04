"""The simulated model server: its slots, loads and statistics in process (time injected),
then as real processes on both protocols."""

from __future__ import annotations

import asyncio
import json
import signal
import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from backends.modelsim import ModelSim, ModelSimConfig, NotLoaded, UnknownModel
from router.protocol.frames import FrameDecoder, encode_frame
from router.protocol.keyed import encode_keyed
from router.protocol.proto import grpc_predict_v2_pb2 as pb
from router.protocol.proto import triton_extensions_pb2 as triton
from tests.support import BackendProcess, backend_processes

IO_TIMEOUT_S = 5.0
SERVICE = "inference.GRPCInferenceService"


class Gates:
    """The sim's ``sleep``: each call waits until the test opens it (in call order), and the
    clock advances by the time asked for, so worker-side times are exact."""

    def __init__(self) -> None:
        self.now = 0.0
        self.asked: list[float] = []
        self._gates: list[asyncio.Event] = []

    async def sleep(self, seconds: float) -> None:
        gate = asyncio.Event()
        self.asked.append(seconds)
        self._gates.append(gate)
        await gate.wait()
        self.now += seconds

    async def open_next(self) -> None:
        """Open the oldest closed gate (waiting, bounded, for it to be asked for)."""
        for _ in range(100):  # bounded: the request runs to its next sleep in a few steps
            closed = [g for g in self._gates if not g.is_set()]
            if closed:
                break
            await asyncio.sleep(0)
        assert closed, "nothing asked to sleep"
        closed[0].set()
        for _ in range(5):  # let the woken request run to its next wait
            await asyncio.sleep(0)


def make_sim(**config: Any) -> tuple[ModelSim, Gates]:
    gates = Gates()
    return ModelSim(ModelSimConfig(**config), lambda: gates.now, gates.sleep), gates


async def serve_one(sim: ModelSim, gates: Gates, model: str) -> float:
    task = asyncio.create_task(sim.infer(model))
    while not task.done():
        await gates.open_next()
    return task.result()


async def test_model_use_counts_each_models_requests_here_and_changes_are_told() -> None:
    sim, gates = make_sim(slots=1, load_s=0.4, service_s=0.05)
    changes: list[list[str]] = []
    sim.on_change = lambda: changes.append(sim.resident())
    tasks = [asyncio.create_task(sim.infer(m)) for m in ("a", "a", "b")]
    await asyncio.sleep(0)
    # A worker is on a (loading it), so b goes over the one slot; every request is here.
    assert sim.model_use() == {"a": 2, "b": 1}
    assert changes == [["a"], ["a", "b"]]
    while not all(t.done() for t in tasks):  # bounded: each step opens one sleep
        await gates.open_next()
    assert sim.model_use() == {}  # every one answered: none left out at 0
    assert sim.unload("b") and changes[-1] == ["a"]


async def test_least_recently_used_model_is_evicted_and_hits_cost_service_only() -> None:
    sim, gates = make_sim(slots=2, load_s=0.4, service_s=0.05)
    times = [await serve_one(sim, gates, m) for m in ["a", "b", "a", "c", "b", "a"]]
    # a load, b load, a hit, c evicts b (a was used later), b evicts a, a evicts c.
    assert times == pytest.approx([0.45, 0.45, 0.05, 0.45, 0.45, 0.45])
    stats = sim.statistics()
    assert (stats["requests"], stats["misses"], stats["loads"], stats["evictions"]) == (6, 5, 5, 3)
    assert stats["models"]["a"] == {"requests": 3, "misses": 2, "loads": 2, "evictions": 1}
    assert stats["resident"] == ["b", "a"]
    assert stats["worker_time_s"]["mean"] == pytest.approx(sum(times) / 6)


async def test_a_model_in_use_is_never_evicted_the_server_goes_over_its_slots() -> None:
    sim, gates = make_sim(slots=1, load_s=0.4, service_s=0.05, concurrency=2)
    first = asyncio.create_task(sim.infer("a"))
    await gates.open_next()  # a loaded; its service is under way
    second = asyncio.create_task(sim.infer("b"))
    await asyncio.sleep(0)  # b's load begins while a is in use: a stays, over the one slot
    assert sim.statistics()["evictions"] == 0 and sim.overcommits == 1
    for _ in range(3):  # a's service, b's load, b's service
        await gates.open_next()
    await asyncio.gather(first, second)
    assert gates.asked == [0.4, 0.05, 0.4, 0.05]
    assert sorted(sim.statistics()["resident"]) == ["a", "b"]


async def test_the_next_load_after_a_spell_over_the_slots_brings_it_back_under_them() -> None:
    sim, gates = make_sim(slots=1, load_s=0.4, service_s=0.05, concurrency=2)
    first = asyncio.create_task(sim.infer("a"))
    await gates.open_next()  # a loaded, in use
    second = asyncio.create_task(sim.infer("b"))
    for _ in range(3):  # a's service, b's load, b's service
        await gates.open_next()
    await asyncio.gather(first, second)
    assert sorted(sim.statistics()["resident"]) == ["a", "b"]  # over its one slot, both idle
    await serve_one(sim, gates, "c")  # c's load evicts both: one slot, one model
    stats = sim.statistics()
    assert stats["resident"] == ["c"] and stats["evictions"] == 2


async def test_memory_is_fixed_a_model_whose_requests_only_wait_is_evicted_and_reloaded() -> None:
    sim, gates = make_sim(slots=2, load_s=0.4, service_s=0.05, concurrency=1)
    for model in ("a", "b"):
        await serve_one(sim, gates, model)
    running = asyncio.create_task(sim.infer("a"))  # a hit, on the worker
    await asyncio.sleep(0)
    waiting = asyncio.create_task(sim.infer("b"))  # b's request waits for the worker
    await asyncio.sleep(0)
    newcomer = asyncio.create_task(sim.infer("c"))  # both slots wanted: b (only waited) goes
    await asyncio.sleep(0)
    assert sim.statistics()["evicted_waiting"] == 1 and sim.overcommits == 0
    while not newcomer.done():
        await gates.open_next()
    await asyncio.gather(running, waiting)
    # a's service; b loaded again (evicting a, idle by then) and served; c loaded and served.
    assert gates.asked[-5:] == [0.05, 0.4, 0.05, 0.4, 0.05]
    stats = sim.statistics()
    assert (stats["misses"], stats["evictions"], sorted(stats["resident"])) == (4, 2, ["b", "c"])


async def test_requests_for_a_model_being_loaded_wait_for_that_one_load() -> None:
    sim, gates = make_sim(slots=2, load_s=0.4, service_s=0.05, concurrency=2)
    tasks = [asyncio.create_task(sim.infer("a")) for _ in range(2)]
    for _ in range(3):  # one load, two services
        await gates.open_next()
    await asyncio.gather(*tasks)
    assert gates.asked == [0.4, 0.05, 0.05]
    stats = sim.statistics()
    assert (stats["requests"], stats["misses"], stats["loads"]) == (2, 2, 1)


async def test_explicit_control_serves_only_loaded_models_and_unload_spares_one_in_use() -> None:
    sim, gates = make_sim(slots=2, load_s=0.4, service_s=0.05, control="explicit",
                          models=("a", "b"))
    with pytest.raises(NotLoaded):
        await sim.infer("a")
    with pytest.raises(UnknownModel):
        await sim.infer("z")
    load = asyncio.create_task(sim.load("a"))
    await asyncio.sleep(0)
    assert sim.index() == [("a", "LOADING"), ("b", "UNAVAILABLE")]
    await gates.open_next()
    await load
    assert sim.index() == [("a", "READY"), ("b", "UNAVAILABLE")]
    busy = asyncio.create_task(sim.infer("a"))
    await asyncio.sleep(0)
    assert not sim.unload("a")  # in use
    await gates.open_next()
    await busy
    assert sim.unload("a") and not sim.loaded("a") and sim.unloads == 1


# -- as processes ------------------------------------------------------------------------------


@pytest.fixture
def modelsim() -> Iterator[Callable[..., BackendProcess]]:
    with backend_processes("backends.modelsim") as start:
        yield start


def read_frames(sock: socket.socket, count: int) -> list[bytes]:
    decoder = FrameDecoder()
    frames: list[bytes] = []
    for _ in range(1000):  # bounded; each recv blocks at most IO_TIMEOUT_S
        if len(frames) >= count:
            return frames
        data = sock.recv(65536)
        assert data, f"closed after {len(frames)} frames"
        frames += decoder.feed(data)
    raise AssertionError("too many reads")


def stop_and_read_stats(backend: BackendProcess, path: Path) -> dict[str, Any]:
    backend.proc.send_signal(signal.SIGTERM)
    assert backend.proc.wait(timeout=IO_TIMEOUT_S) == 0
    stats: dict[str, Any] = json.loads(path.read_text())
    return stats


def test_keyed_frames_are_answered_in_order_with_their_bodies_and_stats_on_exit(
    modelsim: Callable[..., BackendProcess], tmp_path: Path
) -> None:
    stats_file = tmp_path / "stats.json"
    backend = modelsim("--slots", "2", "--load-ms", "30", "--service-ms", "2",
                       "--concurrency", "2", "--stats", str(stats_file))
    keys = ["a", "b", "a", "c", None, "a"]
    with socket.create_connection(("127.0.0.1", backend.port), timeout=IO_TIMEOUT_S) as sock:
        payloads = [encode_keyed(k, f"body-{i}".encode()) for i, k in enumerate(keys)]
        sock.sendall(b"".join(encode_frame(p) for p in [*payloads, b""]))  # pipelined + probe
        assert read_frames(sock, 7) == [f"body-{i}".encode() for i in range(6)] + [b""]
    stats = stop_and_read_stats(backend, stats_file)
    # All six arrive at once: a, b and c each take a slot (c over the two: a and b are in
    # use) and are loaded once each, by the first of their requests a worker takes: those are
    # the misses; the second a is taken after its load.
    assert (stats["requests"], stats["loads"], stats["misses"], stats["overcommits"]) == (
        6, 3, 3, 1)
    assert set(stats["models"]) == {"a", "b", "c"}


def test_a_model_outside_the_catalogue_closes_the_connection(
    modelsim: Callable[..., BackendProcess],
) -> None:
    backend = modelsim("--models", "a,b", "--load-ms", "1", "--service-ms", "1")
    with socket.create_connection(("127.0.0.1", backend.port), timeout=IO_TIMEOUT_S) as sock:
        sock.sendall(encode_frame(encode_keyed("z", b"x")))
        assert sock.recv(16) == b""


async def test_grpc_ready_index_load_unload_and_infer(
    modelsim: Callable[..., BackendProcess], tmp_path: Path
) -> None:
    stats_file = tmp_path / "stats.json"
    backend = modelsim("--protocol", "grpc", "--models", "a,b,c", "--slots", "2",
                       "--load-ms", "20", "--service-ms", "1", "--model-control", "explicit",
                       "--preload", "a", "--stats", str(stats_file))
    async with grpc.aio.insecure_channel(backend.address) as channel:
        def call(method: str, request: Any, response: Any) -> Any:
            return channel.unary_unary(
                f"/{SERVICE}/{method}", request_serializer=lambda m: m.SerializeToString(),
                response_deserializer=response.FromString,
            )(request, timeout=IO_TIMEOUT_S)

        async def index() -> dict[str, str]:
            reply = await call("RepositoryIndex", triton.RepositoryIndexRequest(),
                               triton.RepositoryIndexResponse)
            return {m.name: m.state for m in reply.models}

        async def ready(name: str) -> bool:
            reply = await call("ModelReady", pb.ModelReadyRequest(name=name),
                               pb.ModelReadyResponse)
            return bool(reply.ready)

        def infer(name: str) -> Any:
            request = pb.ModelInferRequest(model_name=name, id="r1")
            request.inputs.add(name="INPUT0", datatype="BYTES", shape=[1])
            request.raw_input_contents.append(b"payload")
            return call("ModelInfer", request, pb.ModelInferResponse)

        assert await index() == {"a": "READY", "b": "UNAVAILABLE", "c": "UNAVAILABLE"}
        assert await ready("a") and not await ready("b")
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await infer("b")  # explicit control: not loaded
        assert refused.value.code() == grpc.StatusCode.NOT_FOUND
        await call("RepositoryModelLoad", pb.RepositoryModelLoadRequest(model_name="b"),
                   pb.RepositoryModelLoadResponse)
        reply = await infer("b")
        assert reply.raw_output_contents == [b"payload"] and reply.id == "r1"
        await call("RepositoryModelLoad", pb.RepositoryModelLoadRequest(model_name="c"),
                   pb.RepositoryModelLoadResponse)  # evicts a, the least recently used
        assert await index() == {"a": "UNAVAILABLE", "b": "READY", "c": "READY"}
        await call("RepositoryModelUnload", pb.RepositoryModelUnloadRequest(model_name="b"),
                   pb.RepositoryModelUnloadResponse)
        assert await index() == {"a": "UNAVAILABLE", "b": "UNAVAILABLE", "c": "READY"}
        with pytest.raises(grpc.aio.AioRpcError) as unknown:
            await infer("z")
        assert unknown.value.code() == grpc.StatusCode.NOT_FOUND
    stats = stop_and_read_stats(backend, stats_file)
    assert (stats["loads"], stats["evictions"], stats["unloads"]) == (3, 1, 1)
    assert stats["models"]["b"]["requests"] == 1
