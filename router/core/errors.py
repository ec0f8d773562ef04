"""The router's error tree.

Every error the router reports has a stable ``code`` (what clients and tests match on, never
the message text), whose ``fault`` it was (the client's, a backend's, or the router's own
capacity), and hints for the HTTP and gRPC status it maps to. The classes carry no behaviour
beyond that, so every layer can import them.

Every error the router itself chooses is declared here, whichever layer raises it (a test
holds every ``RouterError`` subclass to this module, to a unique code and to valid status
hints). A status relayed from a backend is not a ``RouterError``: it carries the backend's own
status, never an ``x-router-error`` code.

Messages may echo what a client or a file sent (a model name, an address); ``quoted`` keeps
that echo short, since a gRPC status travels in a trailer that a client refuses past a few
KiB, and a 1 MiB model name would turn NOT_FOUND into a metadata-size error.
"""

from __future__ import annotations

import os
from typing import ClassVar, Literal

Fault = Literal["client", "backend", "router", "config"]

# How much of an echoed value a message keeps: a model name or address is far shorter, and
# 128 bytes (up to ~512 once escaped by repr) stay well inside gRPC's 8 KiB metadata limit.
QUOTE_LIMIT_BYTES = 128


def quoted(value: str | bytes, limit: int = QUOTE_LIMIT_BYTES) -> str:
    """``repr(value)`` if it is at most ``limit`` bytes (UTF-8), else the repr of its first
    ``limit`` bytes followed by ``... (N bytes)``."""
    if isinstance(value, str):
        data = value.encode("utf-8", "surrogatepass")
        if len(data) <= limit:
            return repr(value)
        head: str | bytes = data[:limit].decode("utf-8", "ignore")  # no split character
    else:
        data = value
        if len(data) <= limit:
            return repr(value)
        head = data[:limit]
    return f"{head!r}... ({len(data)} bytes)"


# gRPC trailing metadata on every status the router itself chose: its stable error code
# (OVERLOADED, NO_BACKEND, LEASE_NOT_FOUND, ...), so clients match on codes, not on details
# text. A backend's relayed status never carries it.
ROUTER_ERROR_HEADER = "x-router-error"


class RouterError(Exception):
    """Base of every error the router raises on purpose."""

    code: ClassVar[str] = "INTERNAL"
    fault: ClassVar[Fault] = "router"
    http_status: ClassVar[int] = 500
    grpc_status: ClassVar[str] = "INTERNAL"

    def __init__(self, message: str = "") -> None:
        super().__init__(message or self.code)
        self.message = message or self.code
        # Each problem on its own (a config or a request body may have several).
        self.problems: list[str] = [self.message]

    def __repr__(self) -> str:
        return f"{type(self).__name__}(code={self.code!r}, message={self.message!r})"


# -- the router's own capacity and lifecycle ---------------------------------------------------


class Overloaded(RouterError):
    code = "OVERLOADED"
    http_status = 503
    grpc_status = "RESOURCE_EXHAUSTED"


class Draining(RouterError):
    code = "DRAINING"
    http_status = 503
    grpc_status = "UNAVAILABLE"


class ConnectionLimit(RouterError):
    """A new client connection over ``listener.max_connections`` or
    ``listener.max_connections_per_ip``: answered with this and closed at once; nothing sent on
    it was accepted."""

    code = "CONNECTION_LIMIT"
    http_status = 503
    grpc_status = "RESOURCE_EXHAUSTED"


class NoBackend(RouterError):
    code = "NO_BACKEND"
    http_status = 503
    grpc_status = "UNAVAILABLE"


class Dropped(RouterError):
    """The drain's grace deadline passed with this request unanswered; the router gave up."""

    code = "DROPPED"
    http_status = 503
    grpc_status = "UNAVAILABLE"


class SpawnError(RouterError):
    """A process the router launched (a backend the config names with ``command``, a router
    process of the supervisor) did not start: it exited, closed its stdout, or did not announce
    itself in time."""

    code = "SPAWN_FAILED"
    fault = "config"


# -- the client's fault ------------------------------------------------------------------------


class UnknownModel(RouterError):
    code = "UNKNOWN_MODEL"
    fault = "client"
    http_status = 404
    grpc_status = "NOT_FOUND"


class UnknownService(RouterError):
    """A health check for a service the router does not answer for."""

    code = "UNKNOWN_SERVICE"
    fault = "client"
    http_status = 404
    grpc_status = "NOT_FOUND"


class DeadlineExceeded(RouterError):
    """The client's own deadline passed before an answer (gRPC calls carry one)."""

    code = "DEADLINE_EXCEEDED"
    fault = "client"
    http_status = 504
    grpc_status = "DEADLINE_EXCEEDED"


class Cancelled(RouterError):
    """The client cancelled the call before an answer."""

    code = "CANCELLED"
    fault = "client"
    http_status = 499
    grpc_status = "CANCELLED"


class ClientProtocolError(RouterError):
    """Malformed input from a client; the connection is answered with an error and closed."""

    code = "BAD_REQUEST"
    fault = "client"
    http_status = 400
    grpc_status = "INVALID_ARGUMENT"


class FrameTooLarge(ClientProtocolError):
    code = "FRAME_TOO_LARGE"
    http_status = 413


class TruncatedFrame(ClientProtocolError):
    code = "TRUNCATED_FRAME"


class ReadTimeout(ClientProtocolError):
    code = "READ_TIMEOUT"
    http_status = 408


class MalformedMessage(ClientProtocolError):
    """The request bytes are not a well-formed protobuf message, or name no model."""

    code = "MALFORMED_MESSAGE"


class BadCompressedMessage(ClientProtocolError):
    """A compressed gRPC message routed by model whose start does not decompress (bad data,
    or the model fields not within the bound the router decompresses)."""

    code = "BAD_COMPRESSED_MESSAGE"


class UnsupportedEncoding(RouterError):
    """A compressed gRPC message in a ``grpc-encoding`` the router cannot read (gRPC answers
    UNIMPLEMENTED for an encoding it does not support)."""

    code = "UNSUPPORTED_ENCODING"
    fault = "client"
    http_status = 415
    grpc_status = "UNIMPLEMENTED"


class BadRoutingKey(RouterError):
    """A keyed frame (``listener.keyed``) whose routing key is cut off or not a model key:
    that request is answered with this; the connection goes on (the frame boundary held)."""

    code = "BAD_ROUTING_KEY"
    fault = "client"
    http_status = 400
    grpc_status = "INVALID_ARGUMENT"


class ClientNotAllowed(RouterError):
    """A client with mutual TLS whose certificate names no identity on the listener's
    allow-list (or that presented none): refused before anything it sent is read."""

    code = "CLIENT_NOT_ALLOWED"
    fault = "client"
    http_status = 403
    grpc_status = "PERMISSION_DENIED"


class Unauthorized(RouterError):
    """An admin request that needs credentials and carries none."""

    code = "UNAUTHORIZED"
    fault = "client"
    http_status = 401
    grpc_status = "UNAUTHENTICATED"


class Forbidden(RouterError):
    """An admin request whose credentials (a bearer token) are not the configured ones."""

    code = "FORBIDDEN"
    fault = "client"
    http_status = 403
    grpc_status = "PERMISSION_DENIED"


# -- a backend's fault -------------------------------------------------------------------------


class BackendError(RouterError):
    """Base of a backend's failures; raised only as one of its subclasses."""

    code = "BACKEND_ERROR"
    fault = "backend"
    http_status = 502
    grpc_status = "UNAVAILABLE"


class BackendUnavailable(BackendError):
    """Connect refused/timed out, or the connection closed before any response byte.

    The request never produced an answer, so it is safe to retry on another backend.
    ``reused_connection``: the connection had answered earlier requests, so the backend may
    simply have closed a connection it kept open (a keep-alive limit), not have failed.
    """

    code = "BACKEND_UNAVAILABLE"

    def __init__(self, message: str = "", *, reused_connection: bool = False) -> None:
        super().__init__(message)
        self.reused_connection = reused_connection


class ModelLoadFailed(BackendUnavailable):
    """Explicit model control: the backend did not load the request's model
    (``RepositoryModelLoad`` failed or timed out). Nothing of the request was sent, so it is
    retried on another backend like ``BackendUnavailable``; this code means they ran out."""

    code = "MODEL_LOAD_FAILED"


class BackendTimeout(BackendError):
    code = "BACKEND_TIMEOUT"
    http_status = 504
    grpc_status = "DEADLINE_EXCEEDED"


class BackendProtocolError(BackendError):
    """A malformed or oversize response: the connection is discarded, the request not retried."""

    code = "BACKEND_PROTOCOL_ERROR"
    grpc_status = "INTERNAL"


# -- the registry store ------------------------------------------------------------------------


class StoreUnavailable(RouterError):
    """The registry store (etcd) could not be reached, did not answer within its timeout, or
    failed the operation; nothing is known to have changed, and the caller may try again."""

    code = "STORE_UNAVAILABLE"
    http_status = 503
    grpc_status = "UNAVAILABLE"


class StoreTimeout(StoreUnavailable):
    """A registry operation made of several store calls was not done within its bound; what
    it had done by then stands (a lease it granted expires with its TTL)."""

    code = "TIMEOUT"
    http_status = 504
    grpc_status = "DEADLINE_EXCEEDED"


class StoreFull(RouterError):
    """A new backend record would take the store past ``registry.max_backends``."""

    code = "MAX_BACKENDS_REACHED"
    fault = "client"
    http_status = 422
    grpc_status = "RESOURCE_EXHAUSTED"


class InvalidInput(RouterError):
    """Input that fails validation: a backend record (admin API, registration, the store), a
    request body, or a config read by a reload (the problems are then ``check-config``'s).
    ``problems`` names each field and why; nothing was changed."""

    code = "VALIDATION_ERROR"
    fault = "client"
    http_status = 400
    grpc_status = "INVALID_ARGUMENT"

    def __init__(self, problems: list[str] | str) -> None:
        listed = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("; ".join(listed))
        self.problems = listed


class BackendNotFound(RouterError):
    """No backend has the id a request named (admin API: ``/backends/{id}``)."""

    code = "BACKEND_NOT_FOUND"
    fault = "client"
    http_status = 404
    grpc_status = "NOT_FOUND"


class LeaseNotFound(RouterError):
    """A heartbeat for a lease the registry does not hold (expired, deregistered, or issued by
    a router that has restarted since): the backend registers again."""

    code = "LEASE_NOT_FOUND"
    fault = "client"
    http_status = 404
    grpc_status = "NOT_FOUND"


class BackendExists(RouterError):
    """The id of a new backend is taken by another one the registry will not replace (a
    static or API backend; registrations replace only registrations)."""

    code = "BACKEND_EXISTS"
    fault = "client"
    http_status = 409
    grpc_status = "ALREADY_EXISTS"


class AddressConflict(RouterError):
    """The address of a new backend is taken by a backend of another source (the config, the
    admin API), which a registration does not replace."""

    code = "ADDRESS_CONFLICT"
    fault = "client"
    http_status = 409
    grpc_status = "ALREADY_EXISTS"


class AddressNotAllowed(RouterError):
    """A registration at an address outside ``registry.allowed_networks`` (or a unix socket
    while ``registry.allow_unix`` is off)."""

    code = "ADDRESS_NOT_ALLOWED"
    fault = "client"
    http_status = 403
    grpc_status = "PERMISSION_DENIED"


class BackendIsStatic(RouterError):
    """A deregistration of a backend that the config file names: remove it from the config
    and reload (drain and weight work on it)."""

    code = "BACKEND_IS_STATIC"
    fault = "client"
    http_status = 409
    grpc_status = "FAILED_PRECONDITION"


# -- the replica manager -----------------------------------------------------------------------


class InstanceNotFound(RouterError):
    """No managed instance has the name a request named (``/v1/instances/{name}``)."""

    code = "INSTANCE_NOT_FOUND"
    fault = "client"
    http_status = 404
    grpc_status = "NOT_FOUND"


class InstanceExists(RouterError):
    """A new instance's name is taken by a running one: delete it first (there is no PATCH:
    changing an instance's command is DELETE + POST)."""

    code = "INSTANCE_EXISTS"
    fault = "client"
    http_status = 409
    grpc_status = "ALREADY_EXISTS"


class InstanceIsStatic(RouterError):
    """A deletion of an instance that the config file names: remove it there and reload
    (restart and scale work on it)."""

    code = "INSTANCE_IS_STATIC"
    fault = "client"
    http_status = 409
    grpc_status = "FAILED_PRECONDITION"


class PortConflict(RouterError):
    """A replica's port (``base_port + 1 + i``) is held by another replica or cannot be bound:
    something else listens there."""

    code = "PORT_CONFLICT"
    fault = "client"
    http_status = 409
    grpc_status = "ALREADY_EXISTS"


class InvalidInstanceConfig(InvalidInput):
    """An instance definition that validates as data but cannot run: an unknown placeholder,
    no ``{port}`` or ``{unix}`` for the replica to listen on, a program not found, a missing
    working directory."""

    code = "INVALID_CONFIG"


class InvalidPort(InvalidInput):
    """A port below 1024 (privileged), or a ``base_port`` whose replicas would pass 65535."""

    code = "INVALID_PORT"


class InvalidGpuId(InvalidInput):
    """A ``gpu`` index that names no GPU of this machine (or any, on a machine with none)."""

    code = "INVALID_GPU_ID"


class MaxInstancesReached(RouterError):
    """The replicas asked for would take the manager past ``manager.max_instances``."""

    code = "MAX_INSTANCES_REACHED"
    fault = "client"
    http_status = 422
    grpc_status = "RESOURCE_EXHAUSTED"


class PortAllocationFailed(RouterError):
    """Every port of ``manager.port_range`` is held by a replica or bound by something else."""

    code = "PORT_ALLOCATION_FAILED"
    fault = "client"
    http_status = 422
    grpc_status = "RESOURCE_EXHAUSTED"


class NotSupported(RouterError):
    """An admin operation this router cannot serve as it runs (the replica manager runs only
    in a single-process router: ``listener.processes = 1``)."""

    code = "NOT_SUPPORTED"
    fault = "client"
    http_status = 501
    grpc_status = "UNIMPLEMENTED"


class RouteNotFound(RouterError):
    """An HTTP request for a path the admin API does not declare."""

    code = "NOT_FOUND"
    fault = "client"
    http_status = 404
    grpc_status = "NOT_FOUND"


class MethodNotAllowed(RouterError):
    """An HTTP method the admin API does not declare for a path it does declare."""

    code = "METHOD_NOT_ALLOWED"
    fault = "client"
    http_status = 405
    grpc_status = "UNIMPLEMENTED"


class InternalError(RouterError):
    """An exception the router did not expect (a bug): answered 500 and logged with its
    traceback; the message never carries the exception's text."""

    code = "INTERNAL_ERROR"


# -- configuration -----------------------------------------------------------------------------


class ConfigError(RouterError):
    """One or more configuration problems, each naming its key path and file."""

    code = "CONFIG_INVALID"
    fault = "config"

    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = problems


class RestartRequired(ConfigError):
    """A reload read a valid config that changes what a running router cannot change (a
    listen address, the process count); the running config stays."""

    code = "RESTART_REQUIRED"
    http_status = 409
    grpc_status = "FAILED_PRECONDITION"


class ListenFailed(RouterError):
    """The router could not listen on a configured address (in use, not local, no
    permission); the message names the key, the address and the cause."""

    code = "LISTEN_FAILED"
    fault = "config"

    @classmethod
    def of(cls, key: str, address: str, exc: OSError) -> ListenFailed:
        # The kernel's reason alone: socket.create_server appends the address it was given.
        cause = os.strerror(exc.errno) if exc.errno else str(exc)
        return cls(f"cannot listen on {address} ({key}): {cause}")
