"""router.control.state: the desired state, its TOML file, atomic saves, corrupt files.

Real files in tmp_path. Failures the disk would have to produce (ENOSPC, a crash between write
and rename) are injected by wrapping ``os.fsync`` / ``os.replace``; everything else (a parent
that is a file, a path that is a directory) is real. Waits are on threading events with a
bound, never sleeps.
"""

from __future__ import annotations

import asyncio
import calendar
import errno
import json
import logging
import os
import re
import stat
import threading
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import tomli_w
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from router import cli
from router.control.state import (
    MAX_STATE_BYTES,
    ApiBackend,
    CorruptState,
    DesiredState,
    ManagedInstance,
    StateFile,
    StaticOverride,
    decode,
    encode,
)
from router.core.config import from_mapping
from router.core.errors import ConfigError

REPO_ROOT = Path(__file__).resolve().parent.parent
WAIT_S = 5.0  # bound on every wait for a writer thread
# 2026-11-23T10:15:00Z, so set-aside names are known in advance.
NOW = float(calendar.timegm((2026, 11, 23, 10, 15, 0)))
STAMP = "20261123T101500Z"

FULL = DesiredState(
    backends=(
        ApiBackend(id="gpu-7", address="10.0.0.7:9000", protocol="grpc",
                   models=("llama", "resnet:2"), weight=5, labels={"zone": "eu-1", "gpu": "a100"}),
        ApiBackend(id="worker-1", address="unix:/tmp/worker-1.sock", drained=True),
    ),
    static={"127.0.0.1:9001": StaticOverride(drained=True),
            "127.0.0.1:9002": StaticOverride(weight=3)},
    instances=(
        ManagedInstance(name="echo", command=("{python}", "-m", "backends.echo"), replicas=2,
                        models=("echo",), env={"LOG_LEVEL": "debug"}, workdir="/srv",
                        base_port=9100, gpu=(0, 1)),
    ),
    scaled={"from-config": 3},
)


KEY = "127.0.0.1:9001"


def state_with_weight(weight: int) -> DesiredState:
    return DesiredState(static={KEY: StaticOverride(weight=weight)})


def fixed_clock() -> float:
    return NOW


def error_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == "router.control.state" and r.levelno == logging.ERROR]


# -- the model and its TOML ------------------------------------------------------------------


def test_round_trip_through_a_file(tmp_path: Path) -> None:
    path = tmp_path / "state.toml"
    states = StateFile(path)
    assert states.save(FULL) is True
    assert StateFile(path).load() == FULL
    text = path.read_text()
    assert text.startswith("version = 1\n")
    assert tomllib.loads(text)["static"]["127.0.0.1:9002"] == {"weight": 3}
    assert states.statistics()["saves_ok"] == 1


def test_the_empty_state_is_just_a_version() -> None:
    assert encode(DesiredState()) == b"version = 1\n"
    assert decode(b"version = 1\n") == DesiredState()
    assert decode(b"") == DesiredState()  # version 1 is the default


def test_a_missing_file_is_the_empty_state(tmp_path: Path,
                                           caplog: pytest.LogCaptureFixture) -> None:
    states = StateFile(tmp_path / "absent" / "state.toml", clock=fixed_clock)
    assert states.load() == DesiredState()
    assert error_lines(caplog) == []
    assert states.statistics()["set_aside"] == 0
    assert list(tmp_path.iterdir()) == []


def test_the_file_is_private_to_its_owner(tmp_path: Path) -> None:
    path = tmp_path / "state.toml"
    StateFile(path).save(FULL)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600  # instances' env may hold credentials


def test_a_save_creates_the_missing_directory(tmp_path: Path) -> None:
    path = tmp_path / "var" / "lib" / "state.toml"
    assert StateFile(path).save(FULL) is True
    assert decode(path.read_bytes()) == FULL


@pytest.mark.parametrize(
    ("build", "fragment"),
    [
        (lambda: ApiBackend(id="a", address="unix:relative.sock"), "unix:/ABSOLUTE/PATH"),
        (lambda: ApiBackend(id="a", address="unix:/" + "x" * 107), "at most 107 bytes"),
        (lambda: ApiBackend(id="a", address="host:0"), "port cannot be 0"),
        (lambda: ApiBackend(id="a", address="nowhere"), "HOST:PORT"),
        (lambda: ApiBackend(id="a b", address="h:1"), "no spaces"),
        (lambda: ApiBackend(id="a", address="h:1", weight=0), "greater than or equal to 1"),
        (lambda: ApiBackend(id="a", address="h:1", protocol="tcp"), "'frames' or 'grpc'"),
        (lambda: ApiBackend(id="a", address="h:1", labels={"k": "\ud800"}), "lone surrogate"),
        (lambda: ManagedInstance(name="x", command=()), "at least 1 item"),
        (lambda: ManagedInstance(name="x", command=("",)), "program"),
        (lambda: ManagedInstance(name="x", command=("a\x00b",)), "NUL"),
        (lambda: ManagedInstance(name="../x", command=("a",)), "pattern"),
        (lambda: ManagedInstance(name="x", command=("a",), base_port=0),
         "greater than or equal to 1"),
        (lambda: ManagedInstance(name="x", command=("a",), gpu=-1), "greater than or equal to 0"),
        (lambda: ManagedInstance(name="..", command=("a",)), "pattern"),
        (lambda: ManagedInstance(name="x", command=("a",), env={"A=B": "c"}), "pattern"),
        (lambda: StaticOverride(drained=1), "valid boolean"),
    ],
)
def test_records_refuse_what_cannot_be_served(build: Callable[[], object], fragment: str) -> None:
    with pytest.raises(ValidationError) as info:
        build()
    assert fragment in str(info.value)


def test_records_are_frozen() -> None:
    with pytest.raises(ValidationError):
        FULL.backends[0].weight = 2  # type: ignore[misc]


def test_repeated_ids_addresses_and_names_name_both_fields() -> None:
    data = {
        "backends": [{"id": "a", "address": "h:1"}, {"id": "a", "address": "h:1"}],
        "instances": [{"name": "e", "command": ["x"]}, {"name": "e", "command": ["y"]}],
    }
    with pytest.raises(CorruptState) as info:
        decode(json_to_toml(data))
    message = str(info.value)
    assert "backends[1].id: 'a' is already used by backends[0].id" in message
    assert "backends[1].address: 'h:1' is already used by backends[0].address" in message
    assert "instances[1].name: 'e' is already used by instances[0].name" in message


def json_to_toml(data: dict[str, Any]) -> bytes:
    return tomli_w.dumps(data).encode()


# -- atomic writes ---------------------------------------------------------------------------


def test_a_crash_between_write_and_replace_leaves_the_old_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
) -> None:
    path = tmp_path / "state.toml"
    states = StateFile(path)
    assert states.save(FULL)
    before = path.read_bytes()

    def crash(src: str, dst: str) -> None:
        raise OSError(errno.EIO, "Input/output error", src)

    monkeypatch.setattr(os, "replace", crash)
    assert states.save(state_with_weight(9)) is False
    assert path.read_bytes() == before
    assert decode(path.read_bytes()) == FULL
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.toml"]  # no temp file left
    stats = states.statistics()
    assert (stats["saves_ok"], stats["saves_failed"]) == (1, 1)
    assert "Input/output error" in str(stats["last_error"])
    [line] = error_lines(caplog)
    assert str(path) in line and "save failed" in line


def test_the_file_is_fsynced_then_replaced_then_the_directory_fsynced(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    events: list[tuple[str, ...]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        kind = "dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file"
        events.append(("fsync", kind, os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(src: str, dst: str) -> None:
        events.append(("replace", str(src), str(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    path = tmp_path / "state.toml"
    assert StateFile(path).save(FULL)
    [(_, file_kind, tmp), (_, src, dst), (_, dir_kind, directory)] = events
    assert [e[0] for e in events] == ["fsync", "replace", "fsync"]
    assert (file_kind, dir_kind) == ("file", "dir")
    assert src == tmp and Path(tmp).parent == tmp_path  # the temporary file, same directory
    assert dst == str(path)
    assert Path(directory) == tmp_path


# -- failed saves ----------------------------------------------------------------------------


def test_a_full_disk_is_counted_and_logged_and_does_not_raise(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
) -> None:
    path = tmp_path / "state.toml"
    states = StateFile(path)
    real_fsync = os.fsync

    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)
    assert states.save(FULL) is False
    assert not path.exists()
    assert list(tmp_path.iterdir()) == []  # the temporary file is removed
    assert states.statistics()["saves_failed"] == 1
    assert "No space left on device" in str(states.statistics()["last_error"])
    [line] = error_lines(caplog)
    assert str(path) in line and "No space left on device" in line

    monkeypatch.setattr(os, "fsync", real_fsync)  # space again: the next save goes through
    assert states.save(FULL) is True
    assert decode(path.read_bytes()) == FULL


async def test_a_failed_async_save_returns_false(tmp_path: Path,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    states = StateFile(blocker / "state.toml")  # a real failure: the parent is a file
    assert await states.save_async(FULL) is False
    stats = states.statistics()
    assert (stats["saves_ok"], stats["saves_failed"]) == (0, 1)
    assert "not-a-directory" in str(stats["last_error"])
    [line] = error_lines(caplog)
    assert str(blocker / "state.toml") in line


# -- corrupt files ---------------------------------------------------------------------------

CORRUPT = {
    "not TOML": (b"[[backends]\nid = 1\n", "is not valid TOML", "line 1"),
    "not UTF-8": (b"version = 1\n# \xff\xfe\n", "is not UTF-8", "byte 14"),
    "wrong type": (b'[[backends]]\nid = "a"\naddress = "h:1"\nweight = "heavy"\n',
                   "does not validate", "backends[0].weight: Input should be a valid integer"),
    "unknown key": (b'[static."h:1"]\ndrained = true\ncolour = "red"\n',
                    "does not validate", "static.'h:1'.colour: unknown key"),
    "unknown top-level key": (b'backend = []\n', "does not validate", "backend: unknown key"),
    "newer version": (b"version = 2\n", "does not validate",
                      "version: version 2 is not supported (this router reads version 1)"),
    "bad nested type": (b'[[instances]]\nname = "e"\ncommand = "python -m x"\n',
                        "does not validate", "instances[0].command: "),
}


@pytest.mark.parametrize("case", sorted(CORRUPT))
def test_a_corrupt_file_is_reported_set_aside_and_gives_the_empty_state(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, case: str,
) -> None:
    content, problem, detail = CORRUPT[case]
    path = tmp_path / "state.toml"
    path.write_bytes(content)
    states = StateFile(path, clock=fixed_clock)
    assert states.load() == DesiredState()
    aside = tmp_path / f"state.toml.corrupt-{STAMP}"
    assert sorted(tmp_path.iterdir()) == [aside]
    assert aside.read_bytes() == content
    [line] = error_lines(caplog)
    assert line.startswith(f"state file {path} {problem}")
    assert detail in line
    assert f"set aside as {aside}" in line and line.endswith("starting from the config")
    assert "\n" not in line
    assert states.statistics()["set_aside"] == 1
    assert states.save(FULL) and StateFile(path).load() == FULL  # the router goes on saving


def test_two_corrupt_files_in_one_second_keep_both(tmp_path: Path) -> None:
    path = tmp_path / "state.toml"
    states = StateFile(path, clock=fixed_clock)
    for content in (b"first = [", b"second = ["):
        path.write_bytes(content)
        assert states.load() == DesiredState()
    assert (tmp_path / f"state.toml.corrupt-{STAMP}").read_bytes() == b"first = ["
    assert (tmp_path / f"state.toml.corrupt-{STAMP}-1").read_bytes() == b"second = ["


def test_an_unreadable_file_is_reported_and_set_aside(tmp_path: Path,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "state.toml"
    path.mkdir()  # read(2) on it fails with EISDIR, whoever runs the test
    assert StateFile(path, clock=fixed_clock).load() == DesiredState()
    assert (tmp_path / f"state.toml.corrupt-{STAMP}").is_dir()
    [line] = error_lines(caplog)
    assert line.startswith(f"state file {path} cannot be read: Is a directory")


def test_a_huge_file_is_not_read_whole(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "state.toml"
    with path.open("wb") as fh:
        fh.truncate(MAX_STATE_BYTES + 1)  # sparse: no disk used
    assert StateFile(path, clock=fixed_clock).load() == DesiredState()
    [line] = error_lines(caplog)
    assert f"is larger than {MAX_STATE_BYTES} bytes" in line


def test_a_file_that_cannot_be_set_aside_says_so(tmp_path: Path,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "state.toml"
    path.write_bytes(b"x = [")
    for name in [f"state.toml.corrupt-{STAMP}", *(f"state.toml.corrupt-{STAMP}-{i}"
                                                  for i in range(1, 100))]:
        (tmp_path / name).write_bytes(b"")
    assert StateFile(path, clock=fixed_clock).load() == DesiredState()
    assert path.read_bytes() == b"x = ["
    [line] = error_lines(caplog)
    assert "could not be set aside" in line


# -- concurrent saves ------------------------------------------------------------------------


class ReplaceSpy:
    """Wraps ``os.replace``: records the weight of every state renamed into place and the most
    renames ever running at once; with ``hold_first``, the first rename waits for ``release``."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, hold_first: bool = False) -> None:
        self.written: list[int] = []
        self.most = 0
        self.entered, self.release = threading.Event(), threading.Event()
        self._active, self._guard, self._hold = 0, threading.Lock(), hold_first
        self._real = os.replace
        monkeypatch.setattr(os, "replace", self)

    def __call__(self, src: str, dst: str) -> None:
        with self._guard:
            self._active += 1
            self.most = max(self.most, self._active)
        try:
            if self._hold and not self.entered.is_set():
                self.entered.set()
                assert self.release.wait(WAIT_S)
            self._real(src, dst)
            self.written.append(decode(Path(dst).read_bytes()).static[KEY].weight or 0)
        finally:
            with self._guard:
                self._active -= 1


async def test_saves_from_many_tasks_end_with_the_last_state(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    spy = ReplaceSpy(monkeypatch)
    path = tmp_path / "state.toml"
    states = StateFile(path)

    async def change(weight: int) -> bool:
        return await states.save_async(state_with_weight(weight))

    async with asyncio.TaskGroup() as group:
        tasks = [group.create_task(change(w)) for w in range(1, 51)]
    assert all(t.result() for t in tasks)
    assert decode(path.read_bytes()) == state_with_weight(50)
    assert spy.most == 1 and spy.written[-1] == 50
    stats = states.statistics()
    assert stats["saves_failed"] == 0
    assert stats["saves_ok"] + stats["saves_superseded"] == 50


async def test_saves_queued_during_a_write_go_after_it_and_only_the_newest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    spy = ReplaceSpy(monkeypatch, hold_first=True)
    path = tmp_path / "state.toml"
    states = StateFile(path)
    first = states.save_async(state_with_weight(1))
    assert await asyncio.to_thread(spy.entered.wait, WAIT_S)  # 1 is being renamed into place
    queued = [states.save_async(state_with_weight(w)) for w in range(2, 51)]
    spy.release.set()
    assert await asyncio.wait_for(asyncio.gather(first, *queued), WAIT_S) == [True] * 50
    assert spy.written == [1, 50]  # never an older state after a newer one
    assert spy.most == 1
    assert decode(path.read_bytes()) == state_with_weight(50)
    stats = states.statistics()
    assert (stats["saves_ok"], stats["saves_superseded"]) == (2, 48)


async def test_a_cancelled_caller_neither_stops_its_write_nor_lets_an_older_one_win(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    spy = ReplaceSpy(monkeypatch, hold_first=True)
    path = tmp_path / "state.toml"
    states = StateFile(path)

    async def change(weight: int) -> bool:
        return await states.save_async(state_with_weight(weight))

    first = asyncio.create_task(change(1))
    assert await asyncio.to_thread(spy.entered.wait, WAIT_S)  # the write of 1 is under way
    first.cancel()
    with pytest.raises(asyncio.CancelledError):
        await first
    second = asyncio.create_task(change(2))
    spy.release.set()
    assert await asyncio.wait_for(second, WAIT_S) is True
    await asyncio.wait_for(states.flush(), WAIT_S)
    assert spy.written == [1, 2]  # the cancelled caller's write finished, the newer one after
    assert spy.most == 1
    assert decode(path.read_bytes()) == state_with_weight(2)


async def test_a_caller_cancelled_while_its_save_waits_still_gets_it_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    spy = ReplaceSpy(monkeypatch, hold_first=True)
    path = tmp_path / "state.toml"
    states = StateFile(path)
    first = states.save_async(state_with_weight(1))
    assert await asyncio.to_thread(spy.entered.wait, WAIT_S)
    # Queued behind the write of 1; cancelling what it returned is what cancelling a caller
    # awaiting it does.
    waiting = states.save_async(state_with_weight(2))
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    spy.release.set()
    assert await asyncio.wait_for(first, WAIT_S) is True
    await asyncio.wait_for(states.flush(), WAIT_S)
    assert spy.written == [1, 2]
    assert decode(path.read_bytes()) == state_with_weight(2)


async def test_a_save_from_a_sync_callback_is_written_by_flush(tmp_path: Path) -> None:
    path = tmp_path / "state.toml"
    states = StateFile(path)
    states.save_async(FULL)  # not awaited, as a sync callback (a registry event) would call it
    await asyncio.wait_for(states.flush(), WAIT_S)
    assert decode(path.read_bytes()) == FULL


# -- the property ----------------------------------------------------------------------------

# Printable text without spaces (what an id may be), and any text UTF-8 can hold.
ids = st.text(st.characters(categories=("L", "N", "P", "S")), min_size=1, max_size=12)
text = st.text(st.characters(codec="utf-8"), max_size=12)
args = st.text(st.characters(codec="utf-8", exclude_characters="\x00"), max_size=12)
names = st.text(st.characters(categories=("L", "N"), include_characters="._-/"), min_size=1,
                max_size=8)
models = st.builds(lambda n, v: n if v is None else f"{n}:{v}", names, st.none() | names)
addresses = st.one_of(
    st.builds("{}:{}".format, st.sampled_from(["127.0.0.1", "localhost", "[::1]", "b-1.lan"]),
              st.integers(1, 65535)),
    st.builds("unix:/{}".format, st.text(st.characters(categories=("L", "N"),
                                                       include_characters="/._-"), max_size=40)),
)
backends = st.fixed_dictionaries(
    {"id": ids, "address": addresses},
    optional={
        "protocol": st.sampled_from(["frames", "grpc"]),
        "models": st.lists(models, max_size=3),
        "weight": st.integers(1, 1000),
        "labels": st.dictionaries(text.filter(bool), text, max_size=3),
        "drained": st.booleans(),
    },
)
overrides = st.fixed_dictionaries(
    {}, optional={"drained": st.booleans(), "weight": st.integers(1, 1000)},
)
instances = st.fixed_dictionaries(
    {"name": st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._-]{0,15}", fullmatch=True),
     "command": st.lists(args, min_size=1, max_size=4).filter(lambda c: bool(c[0]))},
    optional={
        "replicas": st.integers(0, 256),
        "protocol": st.sampled_from(["frames", "grpc"]),
        "models": st.lists(models, max_size=3),
        "env": st.dictionaries(st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,10}", fullmatch=True),
                               args, max_size=3),
        "workdir": args.filter(bool),
        "base_port": st.integers(1, 65535),
        "gpu": st.one_of(st.integers(0, 1023), st.lists(st.integers(0, 1023), max_size=3)),
    },
)
states = st.builds(
    lambda b, s, i, n: DesiredState.model_validate({"backends": b, "static": s, "instances": i,
                                                    "scaled": n}),
    st.lists(backends, max_size=4, unique_by=(lambda b: b["id"], lambda b: b["address"])),
    st.dictionaries(ids, overrides, max_size=4),
    st.lists(instances, max_size=3, unique_by=lambda i: i["name"]),
    st.dictionaries(st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._-]{0,15}", fullmatch=True),
                    st.integers(0, 256), max_size=3),
)


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(state=states)
def test_any_state_survives_a_save_and_a_load(tmp_path: Path, state: DesiredState) -> None:
    path = tmp_path / "state.toml"  # one file, replaced by every example
    files = StateFile(path)
    assert files.save(state) is True
    assert files.load() == state
    assert decode(encode(state)) == state


# -- the config section, the flag, the image -------------------------------------------------


def test_the_state_file_is_off_by_default_and_set_by_the_config() -> None:
    assert from_mapping({}).state.file is None
    assert from_mapping({"state": {"file": "/var/lib/x/state.toml"}}).state.file == (
        "/var/lib/x/state.toml")


@pytest.mark.parametrize(("value", "fragment"), [("", "expected a file path"),
                                                 (3, "valid string")])
def test_a_bad_state_file_setting_names_its_key(value: object, fragment: str) -> None:
    with pytest.raises(ConfigError) as info:
        from_mapping({"state": {"file": value}}, "cfg.toml")
    [problem] = info.value.problems
    assert problem.startswith("cfg.toml: state.file: ") and fragment in problem


def test_the_state_file_flag_sets_state_file() -> None:
    args = cli._parser().parse_args(["serve", "--state-file", "s.toml"])
    assert cli.build_config(args).state.file == "s.toml"


def _dockerfile_instruction(name: str) -> Any:
    lines = (REPO_ROOT / "Dockerfile").read_text().replace("\\\n", " ").splitlines()
    [line] = [ln for ln in lines if ln.startswith(f"{name} ")]
    return json.loads(line.removeprefix(f"{name} "))


def test_the_docker_image_persists_state_on_its_volume() -> None:
    args = cli._parser().parse_args([*_dockerfile_instruction("ENTRYPOINT")[1:],
                                     *_dockerfile_instruction("CMD")])
    state_file = cli.build_config(args).state.file
    assert state_file is not None
    assert str(Path(state_file).parent) in _dockerfile_instruction("VOLUME")


def test_the_operations_example_is_a_valid_state() -> None:
    page = (REPO_ROOT / "docs" / "operations.md").read_text()
    section = page.split("\n## Persisted state\n", 1)[1].split("\n## ", 1)[0]
    [example] = re.findall(r"```toml\n(.*?)```", section, re.DOTALL)
    state = decode(example.encode())
    assert state.backends and state.static and state.instances
