"""Persisted desired state: what the router was told at run time that its config file does not
hold, saved as one TOML file and restored on start.

What is persisted (``DesiredState``, format version 1): backends added through the admin API
(with their drain flag), drain flags and weight overrides on static backends (by backend id),
managed instances added through the admin API (their definitions, replica count included),
and the replica counts set through the API on instances of the config file. The directory
and the replica manager each own some of these fields and save them through a ``StatePart``
of the one file. Registered (leased) backends are
not: after a restart their next heartbeat gets NOT_FOUND and they register again, within one
heartbeat interval, so a persisted copy could only be stale.

``StateFile`` owns the file. Invariants:

- The file on disk is always one whole state, the old one or the new one. A save writes a
  temporary file in the same directory (the same filesystem, so the rename is atomic), fsyncs
  it, renames it over the file with ``os.replace``, then fsyncs the directory so that the
  rename itself survives a power loss. A crash at any step leaves the old file (at worst
  beside a stray ``.<name>.*.tmp``).
- A save never raises an I/O error into its caller: a full disk or a missing permission is
  logged at ERROR and counted (``statistics()``); the router keeps its state in memory and
  the next save tries again.
- ``save_async`` does the blocking part in a thread (``asyncio.to_thread``), so the event loop
  never waits for a disk. Writes are serialised and the last state wins: a save queued while
  another is written is written after it, with the newest state queued by then (the states
  in between are superseded, never written late), and a write older than one already tried
  is skipped. Each write is a task owned by the ``StateFile``, so a caller cancelled mid-save
  neither cancels the write nor lets a second writer start; ``flush()`` waits for them all.
- ``load`` never raises for what is in the file. A file that cannot be read, is not UTF-8
  TOML or does not validate (wrong types, unknown keys, a repeated id: the message names the
  field path) is reported in one ERROR line with its path and the problem, renamed
  ``<name>.corrupt-<UTC timestamp>`` beside it, and the empty state is returned, so the
  router starts from its config. A missing file is the empty state.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import tempfile
import threading
import time
import tomllib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated, Literal, Protocol, TypedDict

import tomli_w
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    Strict,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from router.core.config import (
    MAX_REPLICAS,
    Bool,
    InstanceConfig,
    InstanceName,
    ModelName,
    _format_location,
    check_process_arg,
    check_text,
    parse_host_port,
)
from router.core.errors import quoted

log = logging.getLogger(__name__)

STATE_VERSION = 1
# A state of 1,000 API backends is about 200 KiB; a file far past that is not ours (a path
# pointed at the wrong file), and reading it whole would stall the start.
MAX_STATE_BYTES = 16 * 1024 * 1024
# sun_path holds 108 bytes including the terminating NUL.
MAX_UNIX_PATH_BYTES = 107
# Suffixes tried after a timestamp already taken by an earlier set-aside file.
MAX_SET_ASIDE_SUFFIX = 100
TIMESTAMP_FORMAT = "%Y%m%dT%H%M%SZ"

StateProtocol = Literal["frames", "grpc"]  # "frames": the length-prefixed protocol


def _check_id(value: str) -> str:
    if not 1 <= len(value) <= 256 or not value.isprintable() or any(c.isspace() for c in value):
        raise ValueError(f"expected 1 to 256 printable characters, no spaces, got {quoted(value)}")
    return value


def _check_backend_address(value: str) -> str:
    if value.startswith("unix:"):
        path = value.removeprefix("unix:")
        check_process_arg(path)
        if not path.startswith("/") or len(path.encode("utf-8")) > MAX_UNIX_PATH_BYTES:
            raise ValueError(
                f"expected unix:/ABSOLUTE/PATH of at most {MAX_UNIX_PATH_BYTES} bytes, "
                f"got {quoted(value)}"
            )
        return value
    if parse_host_port(value)[1] == 0:
        raise ValueError(f"a backend's port cannot be 0, got {quoted(value)}")
    return value


Text = Annotated[str, Strict(), AfterValidator(check_text)]
BackendId = Annotated[str, Strict(), AfterValidator(_check_id)]
BackendAddress = Annotated[
    str, Strict(), AfterValidator(_check_backend_address),
    Field(json_schema_extra={"format": "HOST:PORT or unix:/PATH"}),
]
LabelKey = Annotated[Text, Field(min_length=1, max_length=256)]
Weight = Annotated[int, Strict(), Field(ge=1, le=1000)]  # the range of a config backend's weight


class _Record(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ApiBackend(_Record):
    """A backend added through the admin API."""

    id: BackendId
    address: BackendAddress
    protocol: StateProtocol = "frames"
    models: tuple[ModelName, ...] = ()
    weight: Weight = 1
    labels: dict[LabelKey, Text] = {}
    drained: Bool = False


class StaticOverride(_Record):
    """What the admin API changed on a backend of the config file (by its id)."""

    drained: Bool = False
    weight: Weight | None = None  # None: the config's weight


# A managed instance as the replica manager runs it: the config's definition, one schema for
# the config file, the admin API and this file.
ManagedInstance = InstanceConfig
Replicas = Annotated[int, Strict(), Field(ge=0, le=MAX_REPLICAS)]


class DesiredState(_Record):
    """Everything the state file holds; ``DesiredState()`` is the empty state."""

    version: Annotated[int, Strict()] = STATE_VERSION
    backends: tuple[ApiBackend, ...] = ()
    static: dict[BackendId, StaticOverride] = {}
    instances: tuple[ManagedInstance, ...] = ()  # added through the admin API
    # Replica counts the admin API set on instances of the config file (by name).
    scaled: dict[InstanceName, Replicas] = {}

    @field_validator("version")
    @classmethod
    def _known_version(cls, version: int) -> int:
        if version != STATE_VERSION:
            raise PydanticCustomError(
                "state_version", "version {version} is not supported (this router reads "
                "version {supported})", {"version": version, "supported": STATE_VERSION},
            )
        return version

    def _repeats(self) -> Iterator[tuple[str, str, str]]:
        """(key, value, earlier key) for every id, address or name already used earlier."""
        fields: list[tuple[str, list[str]]] = [
            ("id", [b.id for b in self.backends]),
            ("address", [b.address for b in self.backends]),
        ]
        for name, values in fields:
            seen: dict[str, str] = {}
            for i, value in enumerate(values):
                if value in seen:
                    yield f"backends[{i}].{name}", value, seen[value]
                seen.setdefault(value, f"backends[{i}].{name}")
        names: dict[str, str] = {}
        for i, instance in enumerate(self.instances):
            if instance.name in names:
                yield f"instances[{i}].name", instance.name, names[instance.name]
            names.setdefault(instance.name, f"instances[{i}].name")

    @model_validator(mode="after")
    def _distinct(self) -> DesiredState:
        repeats = list(self._repeats())
        if repeats:
            raise PydanticCustomError(
                "repeated", "a backend id or address, or an instance name, is used twice",
                {"repeats": repeats},
            )
        return self


class CorruptState(ValueError):
    """What is wrong with the bytes of a state file; the message names the line or field."""


def encode(state: DesiredState) -> bytes:
    """The TOML of ``state``: defaults left out, except ``version``, which leads."""
    body = state.model_dump(mode="json", exclude_defaults=True)
    body.pop("version", None)
    return tomli_w.dumps({"version": state.version, **body}).encode("utf-8")


def _problems(exc: ValidationError) -> Iterator[str]:
    for err in exc.errors():
        if err["type"] == "repeated":
            for key, value, earlier in err["ctx"]["repeats"]:
                yield f"{key}: {quoted(value)} is already used by {earlier}"
            continue
        msg = "unknown key" if err["type"] == "extra_forbidden" else err["msg"]
        yield f"{_format_location(err['loc'])}: {msg}"


def decode(data: bytes) -> DesiredState:
    """The state in ``data``; ``CorruptState`` if it is not UTF-8 TOML of a valid state."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise CorruptState(f"is not UTF-8 (byte {exc.start})") from None
    try:
        mapping = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise CorruptState(f"is not valid TOML: {exc}") from None
    try:
        return DesiredState.model_validate(mapping)
    except ValidationError as exc:
        raise CorruptState("does not validate: " + "; ".join(_problems(exc))) from None


class StateStatistics(TypedDict):
    path: str
    saves_ok: int
    saves_failed: int
    saves_superseded: int  # not written: a newer state queued meanwhile was written instead
    set_aside: int  # corrupt files renamed by ``load``
    last_error: str | None  # why the last failed save failed


def _fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _strerror(exc: OSError) -> str:
    return exc.strerror or str(exc)


class StateFile:
    """One state file: ``load()`` at start, ``save_async()`` on every change.

    ``clock`` is wall-clock time in seconds since the epoch (``time.time``): it names the
    files set aside in UTC, which an operator matches against logs; the router's monotonic
    ``Clock`` has no calendar.
    """

    def __init__(self, path: Path | str, clock: Callable[[], float] = time.time) -> None:
        self.path = Path(path)
        self._clock = clock
        # Serialises the blocking writes, whichever thread (or sync caller) runs them.
        self._write_lock = threading.Lock()
        # Serialises the async saves: one write task at a time takes the newest state.
        self._queue_lock = asyncio.Lock()
        self._generations = itertools.count(1)
        self._newest: tuple[int, DesiredState] | None = None
        self._attempted = 0  # the newest generation a write was tried for
        self._last_ok = True
        self._tasks: set[asyncio.Task[bool]] = set()
        self._saves_ok = 0
        self._saves_failed = 0
        self._saves_superseded = 0
        self._set_aside = 0
        self._last_error: str | None = None
        self.current: DesiredState | None = None  # loaded, then as the parts last saved it

    # -- loading -------------------------------------------------------------------------------

    def load(self) -> DesiredState:
        """The state in the file; the empty state if it is missing, or corrupt (set aside)."""
        try:
            with self.path.open("rb") as fh:
                data = fh.read(MAX_STATE_BYTES + 1)
        except FileNotFoundError:
            log.info("no state file at %s: starting from the config", self.path)
            self.current = DesiredState()
            return self.current
        except OSError as exc:
            return self._set_aside_corrupt(f"cannot be read: {_strerror(exc)}")
        if len(data) > MAX_STATE_BYTES:
            return self._set_aside_corrupt(f"is larger than {MAX_STATE_BYTES} bytes")
        try:
            state = decode(data)
        except CorruptState as exc:
            return self._set_aside_corrupt(str(exc))
        log.info(
            "state restored from %s: %d API backends, %d overrides, %d managed instances",
            self.path, len(state.backends), len(state.static), len(state.instances),
        )
        self.current = state
        return state

    def _set_aside_corrupt(self, problem: str) -> DesiredState:
        stamp = time.strftime(TIMESTAMP_FORMAT, time.gmtime(self._clock()))
        try:
            target = self._free_name(f"{self.path.name}.corrupt-{stamp}")
            os.rename(self.path, target)
        except OSError as exc:
            outcome = f"could not be set aside ({_strerror(exc)})"
        else:
            self._set_aside += 1
            outcome = f"set aside as {target}"
            # The rename is done; should its fsync fail, a power loss at worst brings the
            # corrupt file back under its name, to be set aside again on the next start.
            with contextlib.suppress(OSError):
                _fsync_directory(self.path.parent)
        log.error("state file %s %s; %s; starting from the config", self.path, problem, outcome)
        self.current = DesiredState()
        return self.current

    def _free_name(self, name: str) -> Path:
        suffixed = (f"{name}-{i}" for i in range(1, MAX_SET_ASIDE_SUFFIX))
        candidates = itertools.chain([name], suffixed)
        for candidate in candidates:
            target = self.path.with_name(candidate)
            if not os.path.lexists(target):
                return target
        raise FileExistsError(0, f"{name} and its {MAX_SET_ASIDE_SUFFIX - 1} suffixes exist")

    # -- saving --------------------------------------------------------------------------------

    def save(self, state: DesiredState) -> bool:
        """Write ``state`` now, blocking (start-up, shutdown, tests); False if it failed."""
        return self._save(next(self._generations), state)

    def save_async(self, state: DesiredState) -> asyncio.Future[bool]:
        """Queue ``state`` to be written in a thread; await the result for the outcome (False:
        the write failed). Needs a running loop.

        The state is queued at the call, not when the result is awaited, so the last call
        wins and a sync callback may save without awaiting. The write is a task of this
        object (``flush()`` waits for it): cancelling whoever awaits does not cancel it.
        """
        self._newest = (next(self._generations), state)
        task = asyncio.get_running_loop().create_task(self._save_newest(), name=f"save {self}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return asyncio.shield(task)

    async def flush(self) -> None:
        """Wait until every save requested so far has been written (or has failed)."""
        while self._tasks:
            await asyncio.gather(*self._tasks)

    async def _save_newest(self) -> bool:
        async with self._queue_lock:
            assert self._newest is not None  # set before this task was created
            generation, state = self._newest
            if generation <= self._attempted:  # written by the task before this one
                self._saves_superseded += 1
                return self._last_ok
            return await asyncio.to_thread(self._save, generation, state)

    def _save(self, generation: int, state: DesiredState) -> bool:
        with self._write_lock:
            if generation <= self._attempted:
                self._saves_superseded += 1
                return self._last_ok
            self._attempted = generation
            try:
                self._write(encode(state))
            except OSError as exc:
                self._saves_failed += 1
                self._last_error = f"{_strerror(exc)} ({exc.filename or self.path})"
                self._last_ok = False
                log.error("state file %s: save failed: %s; the previous file stays, the next "
                          "change tries again", self.path, self._last_error)
                return False
            self._saves_ok += 1
            self._last_ok = True
            return True

    def _write(self, data: bytes) -> None:
        directory = self.path.parent
        directory.mkdir(parents=True, exist_ok=True)
        # 0600 (mkstemp's mode): managed instances' env may carry credentials.
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{self.path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            with contextlib.suppress(OSError):  # the error that brought us here is reported
                os.unlink(tmp)
            raise
        _fsync_directory(directory)

    def part(self, *fields: str) -> StatePart:
        """The view of one owner of some of the state's fields (the directory's backends and
        overrides, the replica manager's instances): see ``StatePart``."""
        unknown = set(fields) - set(DesiredState.model_fields)
        if unknown:
            raise ValueError(f"DesiredState has no fields {sorted(unknown)}")
        return StatePart(self, fields)

    # -- introspection -------------------------------------------------------------------------

    def statistics(self) -> StateStatistics:
        return {
            "path": str(self.path),
            "saves_ok": self._saves_ok,
            "saves_failed": self._saves_failed,
            "saves_superseded": self._saves_superseded,
            "set_aside": self._set_aside,
            "last_error": self._last_error,
        }

    def __repr__(self) -> str:
        return (f"StateFile({str(self.path)!r}, saves_ok={self._saves_ok}, "
                f"saves_failed={self._saves_failed})")



class DesiredStateStore(Protocol):
    """What an owner of desired state is given: a ``StateFile``, or one ``StatePart`` of it."""

    def load(self) -> DesiredState: ...

    def save_async(self, state: DesiredState) -> asyncio.Future[bool]: ...

    async def flush(self) -> None: ...


class StatePart:
    """Several owners share one state file, each saving only its own fields: ``save_async``
    takes ``fields`` from the state it is given and the other fields from the state the
    file last loaded or saved, so no owner's save loses another's. ``load`` reads the file
    once, however many parts ask."""

    def __init__(self, file: StateFile, fields: tuple[str, ...]) -> None:
        self.file = file
        self.fields = fields

    def load(self) -> DesiredState:
        current = self.file.current
        return current if current is not None else self.file.load()

    def save_async(self, state: DesiredState) -> asyncio.Future[bool]:
        base = self.file.current if self.file.current is not None else DesiredState()
        merged = base.model_copy(update={name: getattr(state, name) for name in self.fields})
        self.file.current = merged
        return self.file.save_async(merged)

    async def flush(self) -> None:
        await self.file.flush()

    def __repr__(self) -> str:
        return f"StatePart({self.file!r}, fields={self.fields})"
