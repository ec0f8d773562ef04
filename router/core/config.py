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
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from router.core import placeholders
from router.core.errors import (
    ConfigError,
    InvalidInput,
    InvalidInstanceConfig,
    InvalidPort,
    quoted,
)
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
        "answered READ_TIMEOUT and its connection closed (from 1 s up, up to 0.25 s later: "
        "such deadlines share timers).",
    )
    idle_timeout_s: Seconds = Field(
        300.0, description="Seconds a client connection with nothing in flight may sit before "
        "the router closes it (from 1 s up, up to 0.25 s later: such deadlines share timers).",
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
    policy: Policy | None = Field(
        None, description="The balancing policy of this listener's requests (the values of "
        "``dispatch.policy``); a model group's policy comes first (docs/operations.md, "
        "Policies per listener and model group). Unset: ``dispatch.policy``.",
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
    engine: Literal["relay", "grpcio"] = Field(
        "relay", description="How gRPC calls are carried: \"relay\" relays HTTP/2 frames "
        "between client and backend connections (pooled, multiplexed; no protobuf decoded "
        "except a KServe request's model fields); \"grpcio\" runs a grpc.aio server and a "
        "grpc.aio client call per call.",
    )
    relay_connections_per_backend: Int = Field(
        4, ge=1, le=64, description="engine = \"relay\": most HTTP/2 connections to one gRPC "
        "backend; a second is opened once the first carries 64 streams, and so on.",
    )
    # 1 s: a client's PING ack takes a round trip; one that never acks must not hold the
    # final GOAWAY (and so the drain) for longer than this.
    drain_goaway_timeout_s: Seconds = Field(
        1.0, description="engine = \"relay\": on drain, each client connection gets a GOAWAY "
        "notice (last-stream-id 2^31-1) and a PING; the final GOAWAY, naming the last call "
        "taken, follows the PING's ack or this many seconds, whichever is first.",
    )
    # 300 s: grpc-go's and grpc core's servers take a PING sooner than 5 min after the last
    # for abuse (GOAWAY ENHANCE_YOUR_CALM, "too_many_pings") once a few have come.
    relay_keepalive_s: Seconds = Field(
        300.0, description="engine = \"relay\": seconds a backend connection may receive "
        "nothing before the router sends it a PING.",
    )
    relay_keepalive_timeout_s: Seconds = Field(
        10.0, description="engine = \"relay\": seconds a keepalive PING may go unanswered; "
        "then the connection is closed and its calls not yet answered are retried elsewhere.",
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
    policy: Policy | None = Field(
        None, description="The balancing policy of this front door's calls (the values of "
        "``dispatch.policy``); a model group's policy comes first. Unset: ``dispatch.policy``.",
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
    """The admin HTTP API: /metrics, /healthz, /readyz, /backends, /stats, /v1/backends; and
    the admin gRPC listener (``grpc_listen``). Mutating endpoints need an allowed client
    certificate (``tls.client_ca_file``) or the bearer token of ``token_file``; on an address
    other than loopback every endpoint but /healthz and /readyz does, and one of the two must
    be configured."""

    listen: Address = Field(
        "127.0.0.1:7072", description="Address of the admin HTTP API; port 0 picks a free port."
    )
    grpc_listen: Address | None = Field(
        None, description="Address of the admin gRPC listener: the backend registry "
        "(inference_router.v1.Registry) and AnyServe's anyserve.WorkerManagement, with the "
        "credentials of the HTTP API (tls, token_file: `authorization: Bearer TOKEN` "
        "metadata). Port 0 picks a free port. Unset: no admin gRPC listener.",
    )
    anyserve_listen: Address | None = Field(
        None, description="Address of a listener serving only anyserve.WorkerManagement, "
        "plaintext and without credentials, as AnyServe's own management port does (its "
        "workers send none): a loopback address only, since anyone who reaches it can add "
        "backends. Unset: AnyServe's workers register on grpc_listen, with credentials.",
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
        for key, address in (("listen", self.listen), ("grpc_listen", self.grpc_listen)):
            if address is None or is_loopback(parse_host_port(address)[0]):
                continue
            if not self.has_credentials:
                raise _invalid(f"{key} {quoted(address)} is reachable from other machines: "
                               "set token_file or tls.client_ca_file, or listen on a loopback "
                               "address")
        anyserve = self.anyserve_listen
        if anyserve is not None and not is_loopback(parse_host_port(anyserve)[0]):
            raise _invalid(f"anyserve_listen {quoted(anyserve)} takes registrations without "
                           "credentials: it must be a loopback address (workers elsewhere "
                           "register on grpc_listen with the admin credential)")
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
    """The connections to each TCP backend; ``idle_timeout_s`` and ``max_lifetime_s`` apply to
    the relay's HTTP/2 connections to gRPC backends too."""

    max_connections: Int = Field(
        64, ge=1, description="Open connections per backend: idle, in use and dialling."
    )
    # 32: measured 12-25 % more throughput than 8 at 50 clients (bigger batches per write).
    pipeline_depth: Int = Field(
        32, ge=1, le=1024, description="Requests in flight per backend connection (answers "
        "come back in order); 1 sends one request at a time.",
    )
    # 256: 10,000 clients on one backend fit its 64 connections (64 x 157) with room.
    max_pipeline_depth: Int = Field(
        256, ge=1, le=1024, description="Requests in flight per backend connection when "
        "requests wait and every connection max_connections allows is open: the depth grows "
        "from pipeline_depth to what carries them, up to this, and falls back as demand does. "
        "Never below pipeline_depth; a pool with pipeline_depth = 1 is never pipelined.",
    )
    connect_timeout_s: Seconds = Field(
        2.0, description="Seconds a dial to a backend may take before it fails (and the "
        "request is retried on another backend).",
    )
    idle_timeout_s: Seconds = Field(
        60.0, description="Seconds an idle pooled connection is kept before it is closed "
        "(on the gRPC relay: a backend connection that carries no stream)."
    )
    max_lifetime_s: Seconds = Field(
        600.0, description="Seconds after which a connection is closed, once its current "
        "requests are answered (on the gRPC relay: after a GOAWAY, once its streams end).",
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


def _check_network(value: str) -> str:
    try:
        ipaddress.ip_network(value)
    except ValueError:
        raise ValueError(f"expected a network such as 10.0.0.0/8, got {quoted(value)}") from None
    return value


Network = Annotated[str, AfterValidator(_check_network)]


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
    allowed_networks: tuple[Network, ...] = Field(
        (), max_length=256, description='Networks (CIDR, e.g. "10.0.0.0/8") whose addresses '
        "backends may register or be added at through the admin API; a registration at an "
        "address outside them, or at a host name, is refused with ADDRESS_NOT_ALLOWED, so a "
        "caller holding the admin credential cannot point the router at arbitrary hosts. "
        "Empty: any address. Unix sockets: ``allow_unix``. Replicas the router starts itself "
        "are not checked.",
    )
    allow_unix: Bool = Field(
        True, description="Whether backends may register at a unix socket (``unix:/path``).",
    )

    def allows(self, address: str) -> bool:
        """Whether a backend may register at ``address`` (``HOST:PORT`` or ``unix:/path``)."""
        if is_unix_address(address):
            return self.allow_unix
        if not self.allowed_networks:
            return True
        try:
            ip = ipaddress.ip_address(parse_host_port(address)[0])
        except ValueError:
            return False  # a host name: what it resolves to can change after the check
        return any(ip in ipaddress.ip_network(net) for net in self.allowed_networks)


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
        description="Churn guard: a load goes to a backend whose least recently used model "
        "was not used within this many seconds, unless only such backends could start it "
        "now (then the guard gives way: reason forced).",
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


def _check_model_pattern(value: str) -> str:
    if not value or value != value.strip() or "\x00" in value:
        raise ValueError('expected a model name or a glob such as "llama-*", got '
                         f"{quoted(value)}")
    return value


# A model name as requests carry it ("name" or "name:version"), or a shell-style glob over
# such names (fnmatch, case-sensitive: *, ?, [seq], [!seq]).
ModelPattern = Annotated[
    str, Strict(), AfterValidator(_check_model_pattern),
    Field(json_schema_extra={"format": 'model name or glob, e.g. "llama-*"'}),
]
# Policies with a load bound, and the policy with a churn guard.
BOUNDED_POLICIES = ("affinity", "consistent_hash_bounded")


class ModelGroupConfig(_Section):
    """A model group: the requests for its models are placed by its own policy, whichever
    listener they came in on. A request's model picks the first group (in file order) with a
    name or glob matching it; precedence: model group, then the listener's ``policy``, then
    ``dispatch.policy``. Any number of ``[[model_groups]]`` entries."""

    name: Annotated[str, Strict(), Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")] = Field(
        description="Letters, digits, '-', '_' and '.' (first a letter or digit), at most 64; "
        "unique. Shown by /v1/debug/route.",
    )
    models: tuple[ModelPattern, ...] = Field(
        description='Model names ("name" or "name:version", matched exactly) and shell-style '
        'globs ("llama-*", "bert-?", "[ab]-*"), matched against the model a request names '
        "(KServe model_name, x-route-model, a keyed frame's key). A glob that matches no "
        "model is allowed.",
    )
    policy: Policy = Field(
        description="The policy placing this group's requests (the values of "
        "``dispatch.policy``).",
    )
    load_bound: float | None = Field(
        None, ge=1.0, le=100.0, allow_inf_nan=False, strict=True,
        description="policy affinity or consistent_hash_bounded: this group's c; unset: "
        "``affinity.load_bound``.",
    )
    min_residency_s: float | None = Field(
        None, ge=0.0, le=MAX_DURATION_S, allow_inf_nan=False, strict=True,
        description="policy affinity: this group's churn guard, in seconds; unset: "
        "``affinity.min_residency_s``.",
    )

    @field_validator("models")
    @classmethod
    def _some_model(cls, models: tuple[str, ...]) -> tuple[str, ...]:
        if not models:
            raise ValueError("a model group needs at least one model name or glob")
        return models

    @model_validator(mode="after")
    def _overrides_fit_the_policy(self) -> ModelGroupConfig:
        if self.load_bound is not None and self.policy not in BOUNDED_POLICIES:
            raise _invalid(f"load_bound applies to policy affinity or consistent_hash_bounded, "
                           f"not {self.policy}")
        if self.min_residency_s is not None and self.policy != "affinity":
            raise _invalid(f"min_residency_s applies to policy affinity, not {self.policy}")
        return self


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


def check_text(value: str) -> str:
    """``value`` unchanged if it can be written as UTF-8."""
    # A lone surrogate (JSON can carry "\ud800") validates as str but cannot be written as
    # UTF-8 (a state file, a process's argv).
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("not valid Unicode text (a lone surrogate)") from None
    return value


def check_process_arg(value: str) -> str:
    """``value`` unchanged if it can be one argument of a process."""
    check_text(value)
    if "\x00" in value:
        raise ValueError("a NUL character cannot be passed to a process")
    return value


# One argument of a process (or an environment value): any text but NUL.
ProcessArg = Annotated[str, Strict(), AfterValidator(check_process_arg)]
Port = Annotated[int, Strict(), Field(ge=1, le=65535)]
# An instance name names its replicas, their backend ids and their log files: no path
# separators, no spaces, and never "." or "..".
InstanceName = Annotated[str, Strict(), Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")]
EnvName = Annotated[str, Strict(), Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")]
GpuIndex = Annotated[int, Strict(), Field(ge=0, le=1023)]
MAX_REPLICAS = 256  # of one instance
LOWEST_PORT = 1024  # ports below are privileged: a replica is never given one


class InstanceConfig(_Section):
    """A managed instance: ``replicas`` copies of ``command``, started, health-checked,
    restarted and stopped by the router, each one a backend (source ``managed``) serving
    ``models`` over ``protocol``. The same definition is the body of ``POST /v1/instances``
    and an entry of the state file. In ``command`` and ``env`` values, ``{port}`` (or
    ``{unix}``), ``{host}``, ``{name}``, ``{replica}``, ``{model}`` and ``{python}`` are
    substituted per replica (``{{`` and ``}}`` are literal braces)."""

    name: InstanceName = Field(
        description="Letters, digits, '-', '_' and '.' (first a letter or digit), at most "
        "64: replica i is the backend NAME-i and logs to LOG_DIR/NAME/i.log.",
    )
    command: tuple[ProcessArg, ...] = Field(
        min_length=1, description="The program and its arguments (an argv list, no shell), "
        "with placeholders. It must listen where {port} or {unix} says; it is ready once it "
        "prints a READY line on stdout or its health probe answers.",
    )
    protocol: Literal["frames", "grpc"] = Field(
        "frames", description='"frames": the length-prefixed protocol; "grpc": gRPC '
        "(KServe v2 or any service).",
    )
    models: tuple[ModelName, ...] = Field(
        (), description='Models every replica serves, "name" or "name:version".',
    )
    replicas: Annotated[int, Strict(), Field(ge=0, le=MAX_REPLICAS)] = Field(
        1, description="Copies of the command to run.",
    )
    weight: Int = Field(1, ge=1, le=1000, description="Each replica's share of traffic.")
    env: dict[EnvName, ProcessArg] = Field(
        {}, description="Environment variables added to the router's own (placeholders "
        "substituted).",
    )
    gpu: GpuIndex | tuple[GpuIndex, ...] | None = Field(
        None, description="GPU index for CUDA_VISIBLE_DEVICES; a list gives replica i the "
        "GPU list[i % len(list)]. Checked against the GPUs present.",
    )
    workdir: ProcessArg | None = Field(
        None, min_length=1, description="Working directory of the replicas (it must exist); "
        "unset: the router's.",
    )
    base_port: Port | None = Field(
        None, description="Replica i listens on base_port + 1 + i (each checked free by "
        "binding before it starts; PORT_CONFLICT otherwise). Unset: ports from "
        "manager.port_range.",
    )
    startup_timeout_s: Seconds | None = Field(
        None, description="Seconds a replica may take to become ready before it is killed "
        "and restarted; unset: manager.startup_timeout_s.",
    )

    @field_validator("command")
    @classmethod
    def _program_named(cls, command: tuple[str, ...]) -> tuple[str, ...]:
        if not command[0]:
            raise ValueError("the program (first argument) is empty")
        return command


def instance_problems(instance: InstanceConfig) -> list[tuple[str, InvalidInput]]:
    """(key, error) for what makes a valid ``instance`` unable to run, as far as can be told
    without looking at the machine (the manager checks GPUs, the program and the working
    directory when it starts one): its placeholders and ports."""
    problems: list[tuple[str, InvalidInput]] = []
    templates = [(f"command[{i}]", arg) for i, arg in enumerate(instance.command)]
    templates += [(f"env.{key}", value) for key, value in instance.env.items()]
    names: set[str] = set()
    for key, template in templates:
        try:
            names |= placeholders.used([template])
        except placeholders.PlaceholderError as exc:
            problems.append((key, InvalidInstanceConfig(str(exc))))
    if problems:
        return problems
    if "port" in names and "unix" in names:
        problems.append(("command", InvalidInstanceConfig(
            "{port} and {unix} both appear: a replica listens on one address")))
    elif not names & {"port", "unix"}:
        problems.append(("command", InvalidInstanceConfig(
            "neither {port} nor {unix} appears in command or env: each replica must be told "
            "where to listen")))
    if "model" in names and not instance.models:
        problems.append(("models", InvalidInstanceConfig("{model} needs a model")))
    if instance.base_port is not None:
        if "unix" in names:
            problems.append(("base_port", InvalidInstanceConfig(
                "base_port with {unix}: the replicas listen on unix sockets")))
        problems += [("base_port", exc) for exc in base_port_problems(instance.base_port,
                                                                     instance.replicas)]
    return problems


def base_port_problems(base_port: int, replicas: int) -> list[InvalidPort]:
    """What is wrong with replicas 0 .. replicas - 1 on base_port + 1 + i."""
    first, last = base_port + 1, base_port + max(replicas, 1)
    if first < LOWEST_PORT:
        return [InvalidPort(f"base_port {base_port} puts replica 0 on port {first}, below "
                            f"{LOWEST_PORT} (privileged ports are not given to replicas)")]
    if last > 65535:
        return [InvalidPort(f"base_port {base_port} with {replicas} replicas needs port "
                            f"{last}, past 65535")]
    return []


class ManagerHealthConfig(_Section):
    """The replica manager's own health check of each replica (TEI Manager's defaults): the
    probe of its protocol (a zero-length frame echoed, or grpc.health.v1 Check) on a fresh
    connection. A replica that fails ``max_failures_before_restart`` checks in a row is
    restarted; a success resets the count. Separate from ``[health]``, which decides routing."""

    initial_delay_s: Annotated[float, Strict()] = Field(
        60.0, ge=0, le=MAX_DURATION_S, allow_inf_nan=False,
        description="Seconds after a replica is ready before its first check.",
    )
    interval_s: Seconds = Field(30.0, description="Seconds between two checks of a replica.")
    timeout_s: Seconds = Field(5.0, description="Seconds a check may take before it fails.")
    max_failures_before_restart: Int = Field(
        3, ge=0, le=1000, description="Failed checks in a row that restart a replica; 0: "
        "checks are logged and counted, never restart.",
    )


class ManagerRestartConfig(_Section):
    """How often a replica that exits (or fails its checks) is started again: after
    ``backoff_initial_s``, doubling up to ``backoff_max_s``. A replica that exits
    ``crash_loop_exits`` times within ``crash_loop_window_s`` is ``crash_loop``: restarted
    every ``backoff_max_s`` only, until it has stayed up for a whole window."""

    backoff_initial_s: Seconds = Field(1.0, description="Seconds before the first restart.")
    backoff_max_s: Seconds = Field(60.0, description="Longest wait between two restarts.")
    crash_loop_exits: Int = Field(
        5, ge=1, le=1000, description="Exits within the window that make a replica crash_loop.",
    )
    crash_loop_window_s: Seconds = Field(
        120.0, description="The window, in seconds, those exits are counted over.",
    )

    @model_validator(mode="after")
    def _initial_below_max(self) -> ManagerRestartConfig:
        if self.backoff_initial_s > self.backoff_max_s:
            raise _invalid("backoff_initial_s is above backoff_max_s")
        return self


class ManagerConfig(_Section):
    """The replica manager, which runs the ``[[instances]]`` (and those added through the
    admin API): where replicas listen and log, how many may run, and how they are started,
    checked and stopped. (TOML cannot hold ``[instances]`` beside ``[[instances]]``, so the
    settings are here.)"""

    host: Annotated[str, Field(min_length=1, max_length=255)] = Field(
        "127.0.0.1", description="{host}: the address replicas listen on, and the one the "
        "router (and, with a shared registry, every router) reaches them at.",
    )
    # A list of two rather than a fixed pair: a wrong length is one problem at this key.
    port_range: tuple[Port, ...] = Field(
        (20000, 29999), min_length=2, max_length=2, description="First and last port "
        "(inclusive) given to replicas without base_port; each is checked free by binding.",
    )
    max_instances: Int = Field(
        64, ge=0, le=4096, description="Replicas (processes) running at most, over every "
        "instance; more are refused with MAX_INSTANCES_REACHED.",
    )
    log_dir: FilePath | None = Field(
        None, description="Directory of the replicas' logs (LOG_DIR/NAME/i.log, stdout and "
        "stderr); unset: instances/ under the router's log directory. If it cannot be "
        "written, a temporary directory is used (with a warning).",
    )
    log_max_bytes: Int = Field(
        10 * 1024 * 1024, ge=1024, le=1 << 40, description="Size at which a replica's log is "
        "rotated (i.log -> i.log.1 -> ...).",
    )
    log_backups: Int = Field(3, ge=0, le=100, description="Rotated logs kept per replica.")
    socket_dir: FilePath | None = Field(
        None, description="Directory of the {unix} sockets (NAME-i.sock); unset: a private "
        "temporary directory.",
    )
    startup_timeout_s: Seconds = Field(
        120.0, description="Seconds a replica may take to become ready (Arctic's default) "
        "before it is killed and restarted.",
    )
    startup_probe_interval_s: Seconds = Field(
        0.5, description="Seconds between two probes of a starting replica that has not "
        "printed READY.",
    )
    stop_timeout_s: Seconds = Field(
        5.0, description="Seconds from SIGTERM to SIGKILL when a replica is stopped.",
    )
    drain_timeout_s: Seconds = Field(
        30.0, description="Seconds a replica being stopped (rolling restart, scale-down, "
        "delete) waits for its in-flight requests before SIGTERM.",
    )
    lease_ttl_s: Seconds = Field(
        10.0, description="Lease of each replica's record, renewed by the manager every "
        "third of it: with a shared registry, the records of a router that dies expire.",
    )
    gpus: Int | None = Field(
        None, ge=0, le=1024, description="GPUs on this machine; unset: counted from "
        "/proc/driver/nvidia/gpus.",
    )
    health: ManagerHealthConfig = Field(
        ManagerHealthConfig(), description="How replicas are checked once they are ready.",
    )
    restart: ManagerRestartConfig = Field(
        ManagerRestartConfig(), description="How soon a replica that failed starts again.",
    )

    @model_validator(mode="after")
    def _ports_allowed(self) -> ManagerConfig:
        first, last = self.port_range
        if first > last:
            raise _invalid(f"port_range {list(self.port_range)}: the first port is above "
                           "the last")
        if first < LOWEST_PORT:
            raise _invalid(f"port_range starts below {LOWEST_PORT}: privileged ports are "
                           "not given to replicas")
        return self


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
    manager: ManagerConfig = ManagerConfig()
    backends: tuple[BackendConfig, ...] = ()
    instances: tuple[InstanceConfig, ...] = ()
    model_groups: tuple[ModelGroupConfig, ...] = ()

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
        admin = self.admin
        listeners += [(f"admin.{key}", address) for key, address in (
            ("grpc_listen", admin.grpc_listen), ("anyserve_listen", admin.anyserve_listen),
        ) if address is not None]
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

    def _instance_problems(self) -> Iterator[tuple[str, str]]:
        """(key, why) for instances that cannot run as configured."""
        names: dict[str, int] = {}
        taken: list[tuple[int, int, int]] = []  # (first port, last port, instance index)
        for i, instance in enumerate(self.instances):
            if instance.name in names:
                yield (f"instances[{i}].name", f"{quoted(instance.name)} is already used by "
                       f"instances[{names[instance.name]}].name")
            names.setdefault(instance.name, i)
            for key, error in instance_problems(instance):
                yield f"instances[{i}].{key}", error.message
            if instance.base_port is not None and instance.replicas:
                first = instance.base_port + 1
                last = instance.base_port + instance.replicas
                for other_first, other_last, j in taken:
                    if first <= other_last and other_first <= last:
                        yield (f"instances[{i}].base_port", f"ports {first}-{last} overlap "
                               f"those of instances[{j}]")
                taken.append((first, last, i))
        total = sum(instance.replicas for instance in self.instances)
        if total > self.manager.max_instances:
            yield ("instances", f"{total} replicas in all, more than manager.max_instances "
                   f"({self.manager.max_instances})")
        if self.instances and self.listener.processes > 1:
            yield ("instances", "managed instances need listener.processes = 1 (each router "
                   "process would start its own replicas); use [[backends]] with command")

    @model_validator(mode="after")
    def _group_names_unique(self) -> RouterConfig:
        seen: dict[str, int] = {}
        problems = []
        for i, group in enumerate(self.model_groups):
            if group.name in seen:
                problems.append((f"model_groups[{i}].name", f"{quoted(group.name)} is already "
                                 f"used by model_groups[{seen[group.name]}].name"))
            seen.setdefault(group.name, i)
        if problems:
            raise PydanticCustomError("keyed", "invalid", {"problems": problems})
        return self

    @model_validator(mode="after")
    def _instances_can_run(self) -> RouterConfig:
        problems = list(self._instance_problems())
        if problems:
            raise PydanticCustomError("keyed", "invalid", {"problems": problems})
        return self

    @model_validator(mode="after")
    def _admin_grpc_in_one_process(self) -> RouterConfig:
        # Each router process holds its own directory; the supervisor of several serves only
        # the HTTP admin API, which forwards /v1 requests to every process.
        if self.listener.processes > 1:
            keys = [key for key, address in (("grpc_listen", self.admin.grpc_listen),
                                             ("anyserve_listen", self.admin.anyserve_listen))
                    if address is not None]
            if keys:
                raise PydanticCustomError("keyed", "invalid", {"problems": [
                    (f"admin.{key}", "needs listener.processes = 1 (each router process "
                     "holds its own backend directory)") for key in keys]})
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

# The embedded default: `inference-router serve` with no config and no --backend: two
# managed replicas of the echo backend.
EMBEDDED_DEFAULT: dict[str, Any] = {
    "instances": [{"name": "echo", "command": list(ECHO_COMMAND), "replicas": 2}],
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
