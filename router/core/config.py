"""One frozen, validated configuration tree.

Every option is declared once, here, with its unit in its name, its default, its range and a
description; ``config_reference`` renders docs/configuration.md from this schema. The TOML
file, the CLI flags (which override the file) and the embedded default all go through
``load``/``from_mapping``, so validation happens in one place. Unknown keys, a value of the
wrong type (numbers are strict: ``true`` is not 1), non-finite numbers and one address used
twice are errors, and every error names its key path and file; ``check-config`` prints all of
them, not just the first.
"""

from __future__ import annotations

import re
import sys
import tomllib
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    Strict,
    ValidationError,
    model_validator,
)
from pydantic_core import PydanticCustomError

from router.core.errors import ConfigError, quoted

# Every duration is capped. Where one becomes whole milliseconds for a C int (gRPC channel
# arguments), ``inf`` or 1e308 raises OverflowError, and so does anything past 2^31 ms (24.8
# days); nothing the router waits for needs longer than a day.
MAX_DURATION_S = 86_400.0

# Strict: a bool or a string is not a number (TOML ``queue_size = true`` is an error, not 1), and
# ``inf``/``nan`` are refused. An integer is a fine float (``queue_timeout_s = 5``).
Int = Annotated[int, Strict()]
Bool = Annotated[bool, Strict()]
Seconds = Annotated[float, Strict(), Field(gt=0, le=MAX_DURATION_S, allow_inf_nan=False)]
Policy = Literal["least_connections", "round_robin", "random", "power_of_two_choices"]
C_INT_MAX = 0x7FFF_FFFF  # the largest value a C int (listen backlog, gRPC channel argument) holds


def parse_host_port(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    # isdigit() alone takes superscripts (int() refuses them) and other scripts' digits (int()
    # reads them: Arabic-Indic "\u0667\u0660" is 70).
    if not sep or not host or not (port.isascii() and port.isdigit()) or int(port) > 65535:
        raise ValueError(f"expected HOST:PORT, got {quoted(value)}")
    return host.strip("[]"), int(port)


def _check_address(value: str) -> str:
    parse_host_port(value)
    return value


Address = Annotated[
    str, AfterValidator(_check_address), Field(json_schema_extra={"format": "HOST:PORT"})
]


def _check_model(value: str) -> str:
    name, sep, version = value.partition(":")
    if not name or (sep and not version) or value != value.strip() or ":" in version:
        raise ValueError(f'expected "name" or "name:version", got {quoted(value)}')
    return value


ModelName = Annotated[
    str, AfterValidator(_check_model),
    Field(json_schema_extra={"format": '"name" or "name:version"'}),
]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ListenerConfig(_Section):
    """The length-prefixed TCP front door."""

    listen: Address = Field(
        "127.0.0.1:7070", description="Address of the length-prefixed TCP front door; port 0 "
        "picks a free port.",
    )
    backlog: Int = Field(
        4096, ge=1, le=C_INT_MAX,
        description="listen(2) backlog: connections the kernel queues before the router "
        "accepts them (the kernel caps it at net.core.somaxconn).",
    )
    max_frame_bytes: Int = Field(
        16 * 1024 * 1024, ge=1, le=C_INT_MAX,
        description="Largest request or response payload, in bytes; a larger request is "
        "answered FRAME_TOO_LARGE and its connection closed. Also caps backend replies.",
    )
    read_timeout_s: Seconds = Field(
        10.0, description="Seconds a partial frame may sit unfinished before the client is "
        "answered READ_TIMEOUT and its connection closed.",
    )
    idle_timeout_s: Seconds = Field(
        300.0, description="Seconds a client connection with nothing in flight may sit before "
        "the router closes it.",
    )
    max_pipelined: Int = Field(
        128, ge=1, description="Unanswered requests per client connection; the router stops "
        "reading a connection beyond it.",
    )
    reuse_port: Bool = Field(
        False, description="SO_REUSEPORT on the TCP and gRPC listeners, so another router may "
        "share the ports (rolling restarts).",
    )
    processes: Int = Field(
        1, ge=1, le=64, description="Router processes sharing the listen ports "
        "(SO_REUSEPORT), run by one supervisor process; 1 serves in-process.",
    )


class GrpcConfig(_Section):
    """The gRPC front door (off unless ``listen`` is set) and the channels to gRPC backends."""

    listen: Address | None = Field(
        None, description="Address of the gRPC front door: any service proxied, KServe v2 "
        "routed by model. Unset: no gRPC front door.",
    )
    max_message_bytes: Int = Field(
        16 * 1024 * 1024, ge=1, le=C_INT_MAX,
        description="Largest gRPC message accepted from a client or a backend, each way, in "
        "bytes (gRPC's own default, 4 MiB, is too small for image batches).",
    )
    max_calls_per_backend: Int = Field(
        256, ge=1, description="Calls (unary and streams) in flight to one gRPC backend; beyond "
        "it calls wait in the dispatch queue (queue_size and queue_timeout_s apply), as TCP "
        "requests wait for a pooled connection.",
    )
    channel_idle_timeout_s: Seconds = Field(
        60.0, description="Seconds a channel to a gRPC backend may carry no call (probes do "
        "not count) before it is closed.",
    )
    # Below 0.1 s it would undercut gRPC's first reconnect wait, which the router sets to 100 ms.
    reconnect_backoff_max_s: Annotated[float, Strict()] = Field(
        2.0, ge=0.1, le=MAX_DURATION_S, allow_inf_nan=False,
        description="Longest wait, in seconds, between reconnect attempts to a gRPC backend "
        "(gRPC's own default grows to 120 s; a restarted backend should be found within a "
        "health interval or two).",
    )


class AdminConfig(_Section):
    """The admin HTTP API: /metrics, /healthz, /readyz, /backends, /stats."""

    listen: Address = Field(
        "127.0.0.1:7072", description="Address of the admin HTTP API; port 0 picks a free port."
    )


class DispatchConfig(_Section):
    """Where requests wait for room on a backend, and retries."""

    queue_size: Int = Field(
        4096, ge=1, description="Requests waiting for a backend (soft bound): at it, client "
        "connections stop being read and new gRPC calls are answered RESOURCE_EXHAUSTED.",
    )
    queue_timeout_s: Seconds = Field(
        5.0, description="Seconds a request may wait for a backend, counted from its "
        "acceptance; past it the request is answered OVERLOADED.",
    )
    request_timeout_s: Seconds = Field(
        30.0, description="Seconds per attempt on a backend, from sending to the whole reply; "
        "past it the attempt fails with BACKEND_TIMEOUT (not retried).",
    )
    max_retries: Int = Field(
        2, ge=0, description="Extra attempts on other backends after a failure before any "
        "reply byte (refused, reset, closed).",
    )
    policy: Policy = Field(
        "least_connections", description="How a backend is chosen among the healthy ones "
        "that serve the request.",
    )


class PoolConfig(_Section):
    """The connections to each TCP backend."""

    max_connections: Int = Field(
        64, ge=1, description="Open connections per backend: idle, in use and dialling."
    )
    # 32: measured 12-25 % more throughput than 8 at 50 clients (bigger batches per write).
    pipeline_depth: Int = Field(
        32, ge=1, le=1024, description="Requests in flight per backend connection (answers "
        "come back in order); 1 sends one request at a time.",
    )
    connect_timeout_s: Seconds = Field(
        2.0, description="Seconds a dial to a backend may take before it fails (and the "
        "request is retried on another backend).",
    )
    idle_timeout_s: Seconds = Field(
        60.0, description="Seconds an idle pooled connection is kept before it is closed."
    )
    max_lifetime_s: Seconds = Field(
        600.0, description="Seconds after which a connection is closed, once its current "
        "requests are answered.",
    )


class HealthConfig(_Section):
    """Health of every backend: active probes, and passive counting of failed requests."""

    probe: Literal["frame", "connect"] = Field(
        "frame", description='"frame": a TCP backend must echo a zero-length frame, a gRPC '
        'backend answer grpc.health.v1 Check; "connect": a TCP connect (gRPC: the channel '
        "connecting) is enough.",
    )
    interval_s: Seconds = Field(
        2.0, description="Seconds between two health passes over every backend; a backend out "
        "of rotation comes back at the first pass its probe succeeds.",
    )
    timeout_s: Seconds = Field(
        1.0, description="Seconds a probe may take before it counts as failed."
    )
    failure_threshold: Int = Field(
        3, ge=1, description="Consecutive failed requests (refused, reset, timed out) that "
        "take a backend out of rotation; any success resets the count.",
    )
    panic_threshold: Annotated[float, Strict()] = Field(
        0.5, ge=0.0, le=1.0, allow_inf_nan=False, description="Fraction of a group's backends "
        "(same protocol and model) that must be healthy for health to decide routing; below "
        "it every backend of the group is tried (Envoy's panic threshold). 0 turns it off.",
    )


class DrainConfig(_Section):
    """SIGTERM: stop accepting, answer what was accepted, then exit."""

    shutdown_grace_s: Seconds = Field(
        30.0, description="Seconds to wait for accepted requests to be answered after SIGTERM; "
        "what is still unanswered then is dropped.",
    )
    linger_s: Seconds = Field(
        2.0, description="Seconds to wait for a client's FIN after the router's own (sent at a "
        "request boundary), and for the gRPC server's last answers to go out.",
    )


class AccessLogConfig(_Section):
    """One JSON line per TCP request and per gRPC call (off unless ``path`` is set)."""

    path: str | None = Field(
        None, min_length=1, description='File the access log is appended to (created if '
        'missing), or "-" for stdout. Unset: no access log, and no cost per request.',
    )
    buffer_lines: Int = Field(
        16_384, ge=1, le=1_000_000, description="Lines waiting in memory for the writer thread; "
        "beyond it new lines are dropped and counted (the loop never waits for the disk).",
    )


class BackendConfig(_Section):
    """One backend; any number of ``[[backends]]`` entries."""

    address: Address = Field(
        description="Address of the backend. With ``command``, port 0 lets the process pick a "
        "free port.",
    )
    weight: Int = Field(
        1, ge=1, le=1000, description="Share of traffic relative to the other backends, for "
        "the policies that weigh.",
    )
    models: tuple[ModelName, ...] = Field(
        (), description='Models this backend serves, "name" (every version) or '
        '"name:version"; gRPC calls are routed by these.',
    )
    protocol: Literal["tcp", "grpc"] = Field(
        "tcp", description='"tcp": length-prefixed frames; "grpc": gRPC (KServe v2 or any '
        "service). A backend only ever gets traffic of its own protocol.",
    )
    command: tuple[str, ...] = Field(
        (), description='When set, the router starts this process itself: "{port}" and '
        '"{python}" are substituted, and the process must print "READY <port>" once it '
        "listens.",
    )


# Hosts that bind every interface: they collide with any host on the same port.
_WILDCARD_HOSTS = frozenset({"0.0.0.0", "::", "*"})


def _collide(a: str, b: str) -> bool:
    """Whether two listen addresses cannot both be bound; port 0 ("any free port") never
    collides. Hosts are compared as written (no name resolution)."""
    (host_a, port_a), (host_b, port_b) = parse_host_port(a), parse_host_port(b)
    if port_a == 0 or port_a != port_b:
        return False
    host_a, host_b = host_a.lower(), host_b.lower()
    return host_a == host_b or host_a in _WILDCARD_HOSTS or host_b in _WILDCARD_HOSTS


class RouterConfig(_Section):
    listener: ListenerConfig = ListenerConfig()
    grpc: GrpcConfig = GrpcConfig()
    admin: AdminConfig = AdminConfig()
    dispatch: DispatchConfig = DispatchConfig()
    pool: PoolConfig = PoolConfig()
    health: HealthConfig = HealthConfig()
    drain: DrainConfig = DrainConfig()
    access_log: AccessLogConfig = AccessLogConfig()
    backends: tuple[BackendConfig, ...] = ()

    def _addresses_in_use(self) -> Iterator[tuple[str, str, str]]:
        """(key, address, earlier key) for every address already taken by an earlier key:
        two listeners on one address, or one backend listed twice."""
        listeners = [("listener.listen", self.listener.listen), ("admin.listen", self.admin.listen)]
        if self.grpc.listen is not None:
            listeners.insert(1, ("grpc.listen", self.grpc.listen))
        for i, (key, address) in enumerate(listeners):
            for earlier, other in listeners[:i]:
                if _collide(address, other):
                    yield key, address, earlier
        seen: dict[str, str] = {}
        for i, backend in enumerate(self.backends):
            if parse_host_port(backend.address)[1] == 0:
                continue  # spawned on a free port: each gets its own
            key = f"backends[{i}].address"
            if backend.address in seen:
                yield key, backend.address, seen[backend.address]
            seen.setdefault(backend.address, key)

    @model_validator(mode="after")
    def _distinct_addresses(self) -> RouterConfig:
        conflicts = list(self._addresses_in_use())
        if conflicts:
            raise PydanticCustomError(
                "address_in_use", "address already in use", {"conflicts": conflicts}
            )
        return self


ECHO_COMMAND = ("{python}", "-m", "backends.echo", "--port", "{port}")

# The embedded default: `inference-router serve` with no config and no --backend.
EMBEDDED_DEFAULT: dict[str, Any] = {
    "backends": [
        {"address": "127.0.0.1:0", "command": list(ECHO_COMMAND)},
        {"address": "127.0.0.1:0", "command": list(ECHO_COMMAND)},
    ]
}


# A key TOML writes without quotes; any other key from the file is shown quoted, so that a key
# such as "a\nb" or "" cannot break a problem's one line or pass for another key.
_BARE_KEY = re.compile(r"[A-Za-z0-9_-]{1,64}")


def _format_location(loc: tuple[int | str, ...]) -> str:
    parts: list[str] = []
    for item in loc:
        if isinstance(item, int):
            parts.append(f"[{item}]")
        else:
            name = item if _BARE_KEY.fullmatch(item) else quoted(item, 64)
            parts.append(f".{name}" if parts else name)
    return "".join(parts) or "(top level)"


def from_mapping(data: Mapping[str, Any], source: str = "<config>") -> RouterConfig:
    """Validate a mapping; raise ``ConfigError`` listing every problem as ``source: key: why``."""
    try:
        return RouterConfig.model_validate(data)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            if err["type"] == "address_in_use":
                problems += [
                    f"{source}: {key}: {quoted(address)} is already used by {earlier}"
                    for key, address, earlier in err["ctx"]["conflicts"]
                ]
                continue
            msg = "unknown key" if err["type"] == "extra_forbidden" else err["msg"]
            problems.append(f"{source}: {_format_location(err['loc'])}: {msg}")
        raise ConfigError(problems) from None


def read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read: {exc.strerror}"]) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"{path}: not valid TOML: {exc}"]) from None
    except UnicodeDecodeError as exc:
        raise ConfigError([f"{path}: not valid TOML: not UTF-8 at byte {exc.start}"]) from None
    except RecursionError:  # tomllib recurses once per nested array or inline table
        raise ConfigError([f"{path}: not valid TOML: nested too deeply"]) from None


def load(path: Path) -> RouterConfig:
    return from_mapping(read_toml(path), str(path))


def merge(base: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """Deep-merge ``overrides`` into ``base`` (tables merge, everything else replaces)."""
    merged = dict(base)
    for key, value in overrides.items():
        current = merged.get(key)
        if isinstance(current, Mapping) and isinstance(value, Mapping):
            merged[key] = merge(current, value)
        else:
            merged[key] = value
    return merged


def substitute(command: tuple[str, ...], port: int) -> list[str]:
    return [arg.replace("{python}", sys.executable).replace("{port}", str(port)) for arg in command]
