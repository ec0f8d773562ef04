"""The replica manager's pure parts: placeholders, the checks of an instance definition,
restart backoff and crash loops (on a ManualClock), port allocation (with a fake bind check),
GPU checks, and its logs (rotation, Python slice semantics, following)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from router.control.instances.gpus import check_gpus, count_gpus, visible_devices
from router.control.instances.logs import FOLLOW_BACKLOG, Follower, ReplicaLog, read_lines
from router.control.instances.manager import writable_log_dir
from router.control.instances.ports import PortAllocator, can_bind
from router.control.instances.restarts import RestartTracker
from router.core import placeholders
from router.core.clock import ManualClock
from router.core.config import (
    InstanceConfig,
    ManagerRestartConfig,
    from_mapping,
    instance_problems,
)
from router.core.errors import (
    ConfigError,
    InvalidGpuId,
    InvalidInstanceConfig,
    InvalidPort,
    PortAllocationFailed,
    PortConflict,
)

# -- placeholders ----------------------------------------------------------------------------

VALUES = {"port": "20001", "unix": "/tmp/s.sock", "host": "127.0.0.1", "name": "echo",
          "replica": "3", "model": "llama", "python": "/usr/bin/python3"}


@pytest.mark.parametrize(("template", "expected"), [
    ("--port={port}", "--port=20001"),
    ("{python}", "/usr/bin/python3"),
    ("{name}-{replica}.log", "echo-3.log"),
    ("{{port}}", "{port}"),  # doubled braces are literal
    ('{{"a": {replica}}}', '{"a": 3}'),
    ("no placeholder", "no placeholder"),
    ("{host}:{port}", "127.0.0.1:20001"),
])
def test_placeholders_are_substituted(template: str, expected: str) -> None:
    assert placeholders.substitute(template, VALUES) == expected


@pytest.mark.parametrize(("template", "fragment"), [
    ("{prot}", "unknown placeholder {prot}"),
    ("{}", "unknown placeholder {}"),
    ("{0}", "unknown placeholder {0}"),
    ("{port!r}", "unknown placeholder {port!r}"),
    ("{port:5}", "unknown placeholder {port:5}"),
    ("{port.real}", "unknown placeholder {port.real}"),
    ("a}b", "Single '}'"),
    ("a{b", "expected '}'"),
])
def test_a_bad_placeholder_is_refused_with_what_is_wrong(template: str, fragment: str) -> None:
    with pytest.raises(placeholders.PlaceholderError) as info:
        placeholders.fields(template)
    assert fragment in str(info.value)


text_without_braces = st.text(st.characters(blacklist_characters="{}"), max_size=20)


@settings(max_examples=200)
@given(st.lists(st.one_of(text_without_braces,
                          st.sampled_from(["{{", "}}"]),
                          st.sampled_from([f"{{{n}}}" for n in VALUES])), max_size=8))
def test_substitution_is_piecewise(pieces: list[str]) -> None:
    """Any template made of literal text, escaped braces and known placeholders substitutes
    piece by piece."""
    expected = "".join("{" if p == "{{" else "}" if p == "}}" else
                       VALUES[p[1:-1]] if p.startswith("{") and p[1:-1] in VALUES else p
                       for p in pieces)
    assert placeholders.substitute("".join(pieces), VALUES) == expected


# -- the checks of a definition --------------------------------------------------------------


def instance(**fields: object) -> InstanceConfig:
    return InstanceConfig.model_validate({"name": "m", "command": ["srv", "--port", "{port}"],
                                          **fields})


@pytest.mark.parametrize(("fields", "kind", "fragment"), [
    ({"command": ["srv"]}, InvalidInstanceConfig, "neither {port} nor {unix}"),
    ({"command": ["srv", "{port}", "{unix}"]}, InvalidInstanceConfig, "both appear"),
    ({"command": ["srv", "{nope}"]}, InvalidInstanceConfig, "unknown placeholder {nope}"),
    ({"command": ["srv", "{port}", "{model}"]}, InvalidInstanceConfig, "{model} needs a model"),
    ({"base_port": 80}, InvalidPort, "below 1024"),
    ({"base_port": 65530, "replicas": 6}, InvalidPort, "past 65535"),
    ({"command": ["srv", "{unix}"], "base_port": 9000}, InvalidInstanceConfig, "unix sockets"),
])
def test_a_definition_that_cannot_run_names_its_problem(
        fields: dict[str, object], kind: type[Exception], fragment: str) -> None:
    problems = instance_problems(instance(**fields))
    assert problems, fields
    assert any(isinstance(e, kind) and fragment in e.message for _, e in problems), problems


def test_a_port_from_env_is_enough_and_base_port_fits() -> None:
    assert instance_problems(instance(command=["srv"], env={"PORT": "{port}"})) == []
    assert instance_problems(instance(base_port=1023, replicas=3)) == []  # 1024..1026
    assert instance_problems(instance(base_port=65532, replicas=3)) == []  # ..65535


def test_the_config_file_reports_instance_problems_at_their_keys() -> None:
    with pytest.raises(ConfigError) as info:
        from_mapping({
            "manager": {"max_instances": 3},
            "instances": [
                {"name": "a", "command": ["x", "{port}"], "base_port": 9000, "replicas": 2},
                {"name": "b", "command": ["x", "{port}"], "base_port": 9001, "replicas": 1},
                {"name": "a", "command": ["x", "{bad}"]},
            ],
        }, "cfg.toml")
    assert info.value.problems == [
        "cfg.toml: instances[1].base_port: ports 9002-9002 overlap those of instances[0]",
        "cfg.toml: instances[2].name: 'a' is already used by instances[0].name",
        "cfg.toml: instances[2].command[1]: unknown placeholder {bad} (known: {port}, {unix}, "
        "{host}, {name}, {replica}, {model}, {python}; write {{ and }} for literal braces)",
        "cfg.toml: instances: 4 replicas in all, more than manager.max_instances (3)",
    ]


@pytest.mark.parametrize("value", [[], [20000], {}, [1, 2, 3]])
def test_a_port_range_of_the_wrong_shape_is_one_problem_at_its_key(value: object) -> None:
    with pytest.raises(ConfigError) as info:
        from_mapping({"manager": {"port_range": value}}, "cfg.toml")
    [problem] = info.value.problems
    assert problem.startswith("cfg.toml: manager.port_range: "), problem


@pytest.mark.parametrize(("overrides", "fragment"), [
    ({"listener": {"processes": 2}}, "need listener.processes = 1"),
    ({"manager": {"port_range": [80, 90]}}, "below 1024"),
    ({"manager": {"port_range": [3000, 2000]}}, "above the last"),
    ({"manager": {"restart": {"backoff_initial_s": 90.0}}}, "above backoff_max_s"),
])
def test_manager_settings_that_cannot_work_are_config_errors(
        overrides: dict[str, object], fragment: str) -> None:
    with pytest.raises(ConfigError) as info:
        from_mapping({**overrides, "instances": [{"name": "a", "command": ["x", "{port}"]}]})
    assert any(fragment in p for p in info.value.problems), info.value.problems


# -- restarts --------------------------------------------------------------------------------


def spawns_of_a_command_that_exits_at_once(config: ManagerRestartConfig, seconds: float
                                           ) -> list[float]:
    """When each start happens over ``seconds`` if every start fails at once."""
    clock = ManualClock(start=0.0)
    tracker = RestartTracker(config)
    spawns = []
    for _ in range(1000):  # bounded: far more than any backoff allows in the time
        if clock.now() >= seconds:
            break
        spawns.append(clock.now())
        clock.advance(tracker.failed(clock.now()))
    return spawns


def test_a_command_that_exits_at_once_is_started_five_times_in_30_seconds() -> None:
    spawns = spawns_of_a_command_that_exits_at_once(ManagerRestartConfig(), 30.0)
    assert spawns == [0.0, 1.0, 3.0, 7.0, 15.0]  # 1 s doubling; then crash_loop: 60 s


def test_crash_loop_caps_restarts_at_the_longest_backoff() -> None:
    config = ManagerRestartConfig(backoff_initial_s=0.1, backoff_max_s=1000.0,
                                  crash_loop_exits=3, crash_loop_window_s=5.0)
    clock = ManualClock(start=0.0)
    tracker = RestartTracker(config)
    delays = [tracker.failed(clock.now()) for _ in range(2)]
    assert delays == [0.1, 0.2] and not tracker.crash_loop(clock.now())
    assert tracker.failed(clock.now()) == 1000.0  # the third failure within 5 s
    assert tracker.crash_loop(clock.now())
    assert tracker.failed(clock.now()) == 1000.0


def test_staying_up_ends_crash_loop_and_starts_the_doubling_over() -> None:
    config = ManagerRestartConfig(backoff_initial_s=1.0, backoff_max_s=8.0,
                                  crash_loop_exits=3, crash_loop_window_s=20.0)
    clock = ManualClock(start=0.0)
    tracker = RestartTracker(config)
    for _ in range(3):
        tracker.failed(clock.now())
    assert tracker.crash_loop(clock.now())
    tracker.up(clock.now())
    clock.advance(19.0)
    assert tracker.crash_loop(clock.now())  # not up a whole window yet
    clock.advance(1.0)
    assert not tracker.crash_loop(clock.now())
    assert tracker.failed(clock.now()) == 1.0  # up longer than backoff_max_s: from the start


def test_a_short_run_keeps_the_backoff_growing() -> None:
    config = ManagerRestartConfig(backoff_initial_s=1.0, backoff_max_s=60.0,
                                  crash_loop_exits=100, crash_loop_window_s=120.0)
    clock = ManualClock(start=0.0)
    tracker = RestartTracker(config)
    assert tracker.failed(clock.now()) == 1.0
    tracker.up(clock.now())
    clock.advance(10.0)  # up 10 s, less than backoff_max_s
    assert tracker.failed(clock.now()) == 2.0
    assert tracker.failures_total == 2


# -- ports -----------------------------------------------------------------------------------


class Machine:
    """A fake bind check: the ports other programs hold."""

    def __init__(self, busy: set[int] | None = None) -> None:
        self.busy = busy or set()
        self.checked: list[int] = []

    def is_free(self, host: str, port: int) -> bool:
        self.checked.append(port)
        return port not in self.busy


def test_ports_come_from_the_range_skipping_busy_and_held_ones() -> None:
    machine = Machine({20001})
    ports = PortAllocator("127.0.0.1", (20000, 20004), machine.is_free)
    assert [ports.allocate(f"r-{i}") for i in range(3)] == [20000, 20002, 20003]
    ports.release(20000, "r-0")
    assert ports.allocate("r-3") == 20004  # a released port is the last handed out again
    assert ports.allocate("r-4") == 20000
    with pytest.raises(PortAllocationFailed, match="20000-20004"):
        ports.allocate("r-5")


def test_a_base_port_that_is_held_or_bound_is_a_conflict() -> None:
    machine = Machine({9002})
    ports = PortAllocator("127.0.0.1", (20000, 20009), machine.is_free)
    ports.reserve(9001, "a-0")
    ports.reserve(9001, "a-0")  # its own port again: fine
    with pytest.raises(PortConflict, match="held by replica a-0"):
        ports.reserve(9001, "b-0")
    with pytest.raises(PortConflict, match="in use by another program"):
        ports.reserve(9002, "a-1")
    assert ports.holder(9002) is None  # a refused reservation holds nothing
    machine.busy.add(9001)
    with pytest.raises(PortConflict, match="in use"):
        ports.check(9001, "a-0")  # taken meanwhile, before a restart


def test_the_bind_check_sees_a_listener() -> None:
    import socket

    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        assert not can_bind("127.0.0.1", port)
    assert can_bind("127.0.0.1", port)


# -- GPUs ------------------------------------------------------------------------------------


def test_gpus_are_counted_from_the_driver_and_checked(tmp_path: Path) -> None:
    assert count_gpus(None, tmp_path / "absent") == 0
    for bus in ("0000:01:00.0", "0000:02:00.0"):
        (tmp_path / bus).mkdir()
    assert count_gpus(None, tmp_path) == 2
    assert count_gpus(4, tmp_path) == 4  # manager.gpus wins
    check_gpus(instance(gpu=1), 2)
    check_gpus(instance(), 0)  # asks for none: runs anywhere
    with pytest.raises(InvalidGpuId, match="gpu 2: this machine has GPUs 0-1"):
        check_gpus(instance(gpu=[0, 2]), 2)
    with pytest.raises(InvalidGpuId, match="has no GPU"):
        check_gpus(instance(gpu=0), 0)


def test_a_gpu_list_is_cycled_over_the_replicas() -> None:
    assert [visible_devices(instance(gpu=[2, 5]), i) for i in range(3)] == ["2", "5", "2"]
    assert visible_devices(instance(gpu=1), 7) == "1"
    assert visible_devices(instance(), 0) is None


# -- logs ------------------------------------------------------------------------------------


def write_lines(log: ReplicaLog, lines: list[str]) -> None:
    for line in lines:
        log.write(f"{line}\n".encode())


def test_a_log_rotates_by_size_and_keeps_its_backups(tmp_path: Path) -> None:
    log = ReplicaLog(tmp_path / "0.log", max_bytes=20, backups=2)
    write_lines(log, [f"line {i:02d}" for i in range(10)])  # 8 bytes each: two per file
    assert [p.name for p in log.paths()] == ["0.log.2", "0.log.1", "0.log"]
    assert (tmp_path / "0.log").read_text() == "line 08\nline 09\n"
    kept = read_lines(log.paths(), None, None)
    assert kept.lines == [f"line {i:02d}" for i in range(4, 10)]  # the oldest were dropped
    log.close()  # one process ended; the next one appends
    write_lines(log, ["again"])  # 0.log is full: rotated first
    assert (tmp_path / "0.log").read_text() == "again\n"
    assert read_lines(log.paths(), -3, None).lines == ["line 08", "line 09", "again"]


slice_bounds = st.one_of(st.none(), st.integers(-40, 40))


@settings(max_examples=300, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lines=st.lists(st.text(st.characters(blacklist_categories=["Cs", "Cc", "Zl", "Zp"]),
                              max_size=12), max_size=30),
       start=slice_bounds, end=slice_bounds, max_bytes=st.integers(1024, 4096),
       limit=st.integers(1, 50))
def test_reading_a_log_is_python_slicing(tmp_path_factory: pytest.TempPathFactory,
                                         lines: list[str], start: int | None, end: int | None,
                                         max_bytes: int, limit: int) -> None:
    log = ReplicaLog(tmp_path_factory.mktemp("log") / "0.log", max_bytes=max_bytes, backups=100)
    write_lines(log, lines)
    got = read_lines(log.paths(), start, end, limit)
    expected = lines[start:end]
    assert got.lines == expected[:limit]
    assert got.truncated == (len(expected) > limit)
    assert got.total == len(lines)
    if expected:
        assert lines[got.start] == expected[0]


async def test_a_follower_gets_the_range_then_every_later_line_once(tmp_path: Path) -> None:
    log = ReplicaLog(tmp_path / "0.log", max_bytes=1 << 20, backups=1)
    write_lines(log, ["a", "b"])
    log.hold()  # a reader takes its range: writes wait
    write_lines(log, ["c"])
    taken = await asyncio.to_thread(read_lines, log.paths(), None, None)
    follower = log.follow()
    log.release()
    write_lines(log, ["d"])
    log.end()
    followed = [line async for line in _drain(follower)]
    assert taken.lines == ["a", "b"]
    assert followed == ["c", "d"]  # none missed, none twice
    assert read_lines(log.paths(), None, None).lines == ["a", "b", "c", "d"]


async def _drain(follower: Follower) -> AsyncIterator[str]:
    for _ in range(100):
        line = await asyncio.wait_for(follower.next_line(), 5)
        if line is None:
            return
        yield line


async def test_a_follower_that_falls_behind_is_ended(tmp_path: Path) -> None:
    log = ReplicaLog(tmp_path / "0.log", max_bytes=1 << 30, backups=0)
    follower = log.follow()
    write_lines(log, ["x"] * (FOLLOW_BACKLOG + 5))
    assert len(follower.lines) == FOLLOW_BACKLOG + 1 and follower.lines[-1] is None
    assert log.statistics()["followers"] == 0


def test_an_unwritable_log_dir_falls_back_to_a_temporary_one(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("a file where the log directory should be")
    assert writable_log_dir(None, tmp_path / "logs") == tmp_path / "logs"
    fallback = writable_log_dir(str(blocker / "instances"), tmp_path / "unused")
    try:
        assert fallback.is_dir() and fallback.name.startswith("inference-router-logs-")
        assert any("cannot be written" in r.getMessage() for r in caplog.records)
    finally:
        fallback.rmdir()
