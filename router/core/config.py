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

import ipaddress
import re
import sys
import tomllib
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    Strict,
    ValidationError,
    model_validator,
)
from pydantic_core import PydanticCustomError

from router.core.errors import ConfigError, quoted
from router.core.types import UNIX_SCHEME

# Every duration is capped. Where one becomes whole milliseconds for a C int (gRPC channel
# arguments), ``inf`` or 1e308 raises OverflowError, and so does anything past 2^31 ms (24.8
# days); nothing the router waits for needs longer than a day.
MAX_DURATION_S = 86_400.0

# Strict: a bool or a string is not a number (TOML ``queue_size = true`` is an error, not 1), and
# ``inf``/``nan`` are refused. An integer is a fine float (``queue_timeout_s = 5``).
Int = Annotated[int, Strict()]
Bool = Annotated[bool, Strict()]
Seconds = Annotated[float, Strict(), Field(gt=0, le=MAX_DURATION_S, allow_inf_nan=False)]
Policy = Literal["least_connections", "round_robin", "random", "power_of_two_choices",
                 "common_queue", "consistent_hash_bounded", "affinity"]
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


# sun_path holds 108 bytes, its terminating NUL included.
MAX_UNIX_PATH_BYTES = 107


def is_unix_address(value: str) -> bool:
    return value.startswith(UNIX_SCHEME)


def check_unix_address(value: str) -> str:
    """``unix:/absolute/path``, returned unchanged; ValueError otherwise."""
    path = value[len(UNIX_SCHEME):]
    # Absolute: routers sharing a store do not share a working directory, and a spawned or
    # restarted router may run elsewhere. "//" would be read by gRPC as the authority of a
    # unix:// URI.
    if not path.startswith("/") or path.startswith("//") or "\x00" in path:
        raise ValueError(f"expected unix:/absolute/path, got {quoted(value)}")
    if len(path.encode("utf-8", "surrogatepass")) > MAX_UNIX_PATH_BYTES:
        raise ValueError(f"a unix socket path is at most {MAX_UNIX_PATH_BYTES} bytes")
    return value


def _check_backend_address(value: str) -> str:
    return check_unix_address(value) if is_unix_address(value) else _check_address(value)


# Where a configured backend listens: HOST:PORT (port 0 only with ``command``) or a unix socket.
BackendAddress = Annotated[
    str, AfterValidator(_check_backend_address),
    Field(json_schema_extra={"format": "HOST:PORT or unix:/path"}),
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


LabelName = Annotated[str, Field(min_length=1, max_length=128, pattern=r"^[^\s\x00-\x1f\x7f]+$")]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _invalid(message: str) -> PydanticCustomError:
    """A model validator's error: reported as ``file: section: message``, no prefix."""
    return PydanticCustomError("invalid", message)


def _check_path(value: str) -> str:
    if not value or value != value.strip() or "\x00" in value:
        raise ValueError(f"expected a file path, got {quoted(value)}")
    return value


# A file path, relative to the router's working directory (never empty, padded or with NUL).
FilePath = Annotated[
    str, Strict(), AfterValidator(_check_path), Field(json_schema_extra={"format": "path"})
]
Names = tuple[Annotated[str, Field(min_length=1)], ...]


class ServerTlsConfig(_Section):
    """TLS on this listener: TLS 1.2 or later, ECDHE key exchange with AES-GCM or ChaCha20
    (gRPC: its own equivalent suites, ALPN ``h2``). The table being present turns it on. With
    ``client_ca_file``, mutual TLS: clients present certificates signed by that CA, and the
    ``allowed_client_*`` lists, when any is set, name the only client identities let in (a
    match on any one entry is enough). The certificate, key and CA are re-read on SIGHUP."""

    cert_file: FilePath = Field(
        description="PEM file with the listener's certificate, then any intermediates."
    )
    key_file: FilePath | None = Field(
        None, description="PEM file with the certificate's private key. Unset: the key is in "
        "cert_file.",
    )
    client_ca_file: FilePath | None = Field(
        None, description="PEM file of the CA certificates that sign client certificates: "
        "turns on mutual TLS. Unset: clients are not asked for a certificate.",
    )
    require_client_cert: Bool = Field(
        True, description="With client_ca_file: a client without a valid certificate fails "
        "the handshake. false: a certificate is verified if presented (admin only: a client "
        "without one falls back to the bearer token; gRPC cannot ask for an optional one).",
    )
    min_version: Literal["1.2", "1.3"] = Field(
        "1.2", description="Oldest TLS version accepted (TCP and admin listeners; gRPC accepts "
        "1.2 and 1.3).",
    )
    allowed_client_cns: Names = Field(
        (), description="Client certificate subject common names let in, exact match.",
    )
    allowed_client_dns: Names = Field(
        (), description="Client certificate DNS subject alternative names let in, exact match.",
    )
    allowed_client_uris: Names = Field(
        (), description="Client certificate URI subject alternative names let in, exact match "
        '(SPIFFE IDs such as "spiffe://example.org/ns/prod/sa/worker").',
    )

    @property
    def allow_list(self) -> bool:
        return bool(self.allowed_client_cns or self.allowed_client_dns or self.allowed_client_uris)

    @model_validator(mode="after")
    def _allow_list_needs_a_ca(self) -> ServerTlsConfig:
        if self.allow_list and self.client_ca_file is None:
            raise _invalid("allowed_client_* lists need client_ca_file (mutual TLS)")
        return self


class BackendTlsConfig(_Section):
    """TLS from the router to backends (frame and gRPC alike): the backend's certificate is
    verified against ``ca_file`` (or the system's trust store) for ``server_name``, and the
    router presents ``cert_file`` when the backend asks for a client certificate. The
    client certificate and CA are re-read on SIGHUP."""

    enabled: Bool | None = Field(
        None, description="Speak TLS to the backend. In [backend_tls] (the default of every "
        "backend) unset means off; in a backend's own tls table, which replaces [backend_tls] "
        "whole, unset means on (enabled = false: plaintext to that backend).",
    )
    ca_file: FilePath | None = Field(
        None, description="PEM file of the CA certificates a backend's certificate must chain "
        "to. Unset: the system's trust store.",
    )
    server_name: str | None = Field(
        None, min_length=1, description="Name the backend's certificate must carry (and SNI). "
        "Unset: the host of the backend's address.",
    )
    cert_file: FilePath | None = Field(
        None, description="PEM file with the router's client certificate for backends that "
        "require one. Unset: none is presented.",
    )
    key_file: FilePath | None = Field(
        None, description="PEM file with the client certificate's private key. Unset: the key "
        "is in cert_file.",
    )

    @model_validator(mode="after")
    def _key_needs_a_cert(self) -> BackendTlsConfig:
        if self.key_file is not None and self.cert_file is None:
            raise _invalid("key_file needs cert_file")
        return self


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an address as written in the config) only ever reaches this machine."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name other than localhost may resolve anywhere


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
    # 20,000: twice the 10,000 clients of `make bench-10k`, at ~3-4 KiB of RSS each (80 MiB).
    max_connections: Int = Field(
        20_000, ge=1, description="Open client connections; one more is answered "
        "CONNECTION_LIMIT and closed at once. Needs that many open files (the router raises its "
        "soft RLIMIT_NOFILE towards it and warns when the hard limit is lower).",
    )
    max_connections_per_ip: Int = Field(
        0, ge=0, description="Open client connections from one IP address; one more is "
        "answered CONNECTION_LIMIT and closed at once. 0: no per-address limit (clients behind "
        "one NAT share an address).",
    )
    # 128 MiB: eight frames of the default max_frame_bytes being read at once.
    max_buffered_bytes: Int = Field(
        128 * 1024 * 1024, ge=1024, le=C_INT_MAX, description="Bytes of partly read frames "
        "the router holds across all client connections. A frame being read is charged its "
        "whole size; one that does not fit waits, its connection unread, until there is room; "
        "a frame larger than this is answered FRAME_TOO_LARGE (docs/operations.md, Limits).",
    )
    keyed: Bool = Field(
        False, description="Keyed mode: each request frame's payload starts with a 1-byte "
        "key length and a routing key, the model (docs/protocol.md, Keyed frames); requests "
        "go only to backends serving it and are forwarded unchanged. Off: plain frames, "
        "never looked into.",
    )
    reuse_port: Bool = Field(
        False, description="SO_REUSEPORT on the TCP and gRPC listeners, so another router may "
        "share the ports (rolling restarts).",
    )
    processes: Int = Field(
        1, ge=1, le=64, description="Router processes sharing the listen ports "
        "(SO_REUSEPORT), run by one supervisor process; 1 serves in-process.",
    )
    tls: ServerTlsConfig | None = Field(
        None, description="TLS on the length-prefixed listener; unset: plaintext.",
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
    max_connections: Int = Field(
        20_000, ge=1, le=C_INT_MAX, description="Open gRPC client connections (grpc core's "
        "grpc.max_allowed_incoming_connections): one more is closed at once, which its client "
        "sees as UNAVAILABLE.",
    )
    max_concurrent_calls: Int = Field(
        4096, ge=1, le=C_INT_MAX, description="gRPC calls in progress on the front door, "
        "streams and health watches included; one more is answered RESOURCE_EXHAUSTED before "
        "its message is read.",
    )
    max_concurrent_streams: Int = Field(
        256, ge=1, le=C_INT_MAX, description="Calls in progress on one HTTP/2 connection "
        "(SETTINGS_MAX_CONCURRENT_STREAMS); a client's further calls wait on its side.",
    )
    reconnect_backoff_max_s: Annotated[float, Strict()] = Field(
        2.0, ge=0.1, le=MAX_DURATION_S, allow_inf_nan=False,
        description="Longest wait, in seconds, between reconnect attempts to a gRPC backend "
        "(gRPC's own default grows to 120 s; a restarted backend should be found within a "
        "health interval or two).",
    )
    tls: ServerTlsConfig | None = Field(
        None, description="TLS on the gRPC front door; unset: plaintext.",
    )

    @model_validator(mode="after")
    def _grpc_cannot_ask_for_an_optional_cert(self) -> GrpcConfig:
        tls = self.tls
        if tls is not None and tls.client_ca_file is not None and not tls.require_client_cert:
            raise _invalid("tls.require_client_cert = false: gRPC asks for a client "
                           "certificate only when it requires one")
        return self


class AdminConfig(_Section):
    """The admin HTTP API: /metrics, /healthz, /readyz, /backends, /stats. Mutating endpoints
    need an allowed client certificate (``tls.client_ca_file``) or the bearer token of
    ``token_file``; on an address other than loopback every endpoint but /healthz and /readyz
    does, and one of the two must be configured."""

    listen: Address = Field(
        "127.0.0.1:7072", description="Address of the admin HTTP API; port 0 picks a free port."
    )
    token_file: FilePath | None = Field(
        None, description="File holding the bearer token (surrounding whitespace stripped) "
        "that authorizes requests as `Authorization: Bearer TOKEN`; re-read on SIGHUP.",
    )
    tls: ServerTlsConfig | None = Field(
        None, description="TLS on the admin API; unset: plain HTTP.",
    )

    @property
    def has_credentials(self) -> bool:
        """Whether some request can authenticate: a token, or client certificates."""
        return self.token_file is not None or (
            self.tls is not None and self.tls.client_ca_file is not None
        )

    @model_validator(mode="after")
    def _open_only_on_loopback(self) -> AdminConfig:
        if not is_loopback(parse_host_port(self.listen)[0]) and not self.has_credentials:
            raise _invalid(f"listen {quoted(self.listen)} is reachable from other machines: "
                           "set token_file or tls.client_ca_file, or listen on a loopback "
                           "address")
        return self


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
        "that serve the request. ``affinity``: where its model is loaded, loaded where that "
        "costs least ([affinity]); ``consistent_hash_bounded``: sticky on the routing key "
        "(``x-route-key``, else the model) with bounded load; ``common_queue``: the least busy "
        "backend, whatever its model.",
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



class StateConfig(_Section):
    """What the admin API changes (not in this file), saved as TOML and restored on start."""

    file: FilePath | None = Field(
        None, description="Path of the state file (relative: to the working directory): "
        "backends added through the admin API, drain flags and weight overrides, managed "
        "instances; written atomically on every change and read on start. A corrupt file is "
        "renamed ``FILE.corrupt-YYYYMMDDTHHMMSSZ`` (UTC) and the router starts from this "
        "config. Unset: nothing is persisted.",
    )


def _frames_is_tcp(value: object) -> object:
    return "tcp" if value == "frames" else value


def _check_prefix(value: str) -> str:
    if not value.endswith("/"):
        # "/a/b" would also cover the keys of "/a/bc/": one prefix must never hold another's.
        raise ValueError(f'must end with "/", got {quoted(value)}')
    return value


class RegistryConfig(_Section):
    """Where backend records live: this router's memory, or etcd, shared by many routers."""

    store: Literal["memory", "etcd"] = Field(
        "memory", description='"memory": this router alone knows its records, and leased ones '
        'are lost when it stops; "etcd": records and their leases live in etcd, and every '
        "router watching the prefix routes to them.",
    )
    etcd_endpoints: tuple[Address, ...] = Field(
        ("127.0.0.1:2379",), min_length=1, max_length=16,
        description="Client addresses of the etcd cluster; an operation that cannot reach one "
        "tries the next.",
    )
    etcd_prefix: Annotated[str, AfterValidator(_check_prefix)] = Field(
        "/inference-router/backends/", min_length=1, max_length=256,
        description='Key prefix under which each record is stored as JSON (key: prefix + '
        'backend id); routers sharing a fleet use the same prefix. Must end with "/".',
    )
    etcd_timeout_s: Seconds = Field(
        2.0, description="Seconds one etcd operation (put, refresh, delete, get, list) may take "
        "on one endpoint, waiting for a connection included, before the next endpoint is "
        "tried; when none answers it fails with STORE_UNAVAILABLE.",
    )
    # Not below the first wait (0.1 s) it caps.
    etcd_reconnect_backoff_max_s: Annotated[float, Strict()] = Field(
        1.0, ge=0.1, le=MAX_DURATION_S, allow_inf_nan=False,
        description="Longest wait, in seconds, between two attempts to watch etcd again after "
        "losing it (the wait starts at 0.1 s and doubles); the router keeps routing on its "
        "last view meanwhile.",
    )
    max_backends: Int = Field(
        10_000, ge=1, le=1_000_000, description="Backend records the store holds at most; a "
        "new record beyond it is refused with MAX_BACKENDS_REACHED.",
    )


class AffinityConfig(_Section):
    """Model-affinity routing (``dispatch.policy = "affinity"``) and the bound of
    ``consistent_hash_bounded``. A backend's ``model_slots`` and ``concurrency`` labels
    override the defaults here."""

    load_bound: float = Field(
        1.25, ge=1.0, le=100.0, allow_inf_nan=False, strict=True,
        description="c: a model's copies (and a hash key's backend) take at most c x the mean "
        "load before the next one takes the request.",
    )
    min_residency_s: float = Field(
        10.0, ge=0.0, le=MAX_DURATION_S, allow_inf_nan=False, strict=True,
        description="Churn guard: a model used within this many seconds is not evicted to "
        "load another, unless no backend could load otherwise.",
    )
    load_time_s: Seconds = Field(
        1.0, description="A model's load time until the router has measured it.",
    )
    service_time_s: Seconds = Field(
        0.05, description="A request's service time until the router has measured it.",
    )
    demand_window_s: Seconds = Field(
        10.0, description="How far back a model's demand is remembered (the decay "
        "constant of its arrival rate), for the copies it wants.",
    )
    model_slots: Int = Field(
        4, ge=1, le=4096, description="Models a backend holds at once, unless its "
        "``model_slots`` label says otherwise.",
    )
    concurrency: Int = Field(
        1, ge=1, le=1_000_000, description="Requests a backend works on at once, unless its "
        "``concurrency`` label says otherwise: past it a request waits.",
    )
    index_interval_s: float = Field(
        5.0, ge=0.0, le=MAX_DURATION_S, allow_inf_nan=False, strict=True,
        description="Seconds between two reads of each gRPC backend's ``RepositoryIndex`` "
        "(what it holds) while the policy is ``affinity``; 0: never.",
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

    address: BackendAddress = Field(
        description="Address of the backend: HOST:PORT, or ``unix:/absolute/path`` for a unix "
        "socket (both protocols; no TLS, no ``command``). With ``command``, port 0 lets the "
        "process pick a free port. A host name (not an IP address, and without ``command``) "
        "is resolved at start and every ``dns_refresh_s``: each address it resolves to is one "
        "backend.",
    )
    weight: Int = Field(
        1, ge=1, le=1000, description="Share of traffic relative to the other backends, for "
        "the policies that weigh.",
    )
    models: tuple[ModelName, ...] = Field(
        (), description='Models this backend serves, "name" (every version) or '
        '"name:version", or "*" for any model (a server that loads models on demand); gRPC '
        "calls and keyed frames are routed by these.",
    )
    protocol: Annotated[Literal["tcp", "grpc"], BeforeValidator(_frames_is_tcp)] = Field(
        "tcp", description='"frames" (also spelled "tcp"): length-prefixed frames, the name the '
        'admin API and the state file use; "grpc": gRPC (KServe v2 or any service). A '
        "backend only ever gets traffic of its own protocol.",
    )
    dns_refresh_s: Seconds = Field(
        5.0, description="Seconds between two resolutions of a host name in ``address``: "
        "addresses that appear join, those that disappear drain and leave; a failed "
        "resolution keeps the last addresses (Envoy's STRICT_DNS).",
    )
    command: tuple[str, ...] = Field(
        (), description='When set, the router starts this process itself: "{port}" and '
        '"{python}" are substituted, and the process must print "READY <port>" once it '
        "listens.",
    )
    tls: BackendTlsConfig | None = Field(
        None, description="TLS to this backend; unset: [backend_tls].",
    )
    labels: dict[LabelName, Annotated[str, Field(max_length=256)]] = Field(
        default_factory=dict, max_length=64, description="Free-form labels; "
        "``model_slots`` and ``concurrency`` tell the affinity policy the backend's shape.",
    )

    @property
    def is_unix(self) -> bool:
        return is_unix_address(self.address)

    @model_validator(mode="after")
    def _unix_spawns_nothing(self) -> BackendConfig:
        if self.is_unix and self.command:
            raise _invalid("command needs a HOST:PORT address (the process announces its "
                           "port); a unix socket backend is started by something else")
        return self


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
    state: StateConfig = StateConfig()
    backend_tls: BackendTlsConfig = BackendTlsConfig()
    registry: RegistryConfig = RegistryConfig()
    access_log: AccessLogConfig = AccessLogConfig()
    affinity: AffinityConfig = AffinityConfig()
    backends: tuple[BackendConfig, ...] = ()

    def tls_of(self, backend: BackendConfig) -> BackendTlsConfig | None:
        """The TLS settings a backend is reached with; None: plaintext."""
        if backend.tls is not None:
            return backend.tls if backend.tls.enabled is not False else None
        return self.backend_tls if self.backend_tls.enabled else None

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
            if not backend.is_unix and parse_host_port(backend.address)[1] == 0:
                continue  # spawned on a free port: each gets its own
            key = f"backends[{i}].address"
            if backend.address in seen:
                yield key, backend.address, seen[backend.address]
            seen.setdefault(backend.address, key)

    @model_validator(mode="after")
    def _no_tls_over_unix(self) -> RouterConfig:
        # TLS authenticates a peer across a network; a unix socket's peer is on this machine
        # and its file permissions decide who may connect.
        problems = [
            (f"backends[{i}].address", "TLS over a unix socket is not supported ("
             + ("its tls table" if backend.tls is not None else "[backend_tls]")
             + " turns it on): set tls = { enabled = false } on this backend")
            for i, backend in enumerate(self.backends)
            if backend.is_unix and self.tls_of(backend) is not None
        ]
        if problems:
            raise PydanticCustomError("keyed", "invalid", {"problems": problems})
        return self

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
            if err["type"] == "keyed":  # a rule across sections, reported at the key it names
                problems += [f"{source}: {key}: {why}" for key, why in err["ctx"]["problems"]]
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
