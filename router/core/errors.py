"""The router's error tree.

Every error the router reports has a stable ``code`` (what clients and tests match on, never
the message text), whose ``fault`` it was (the client's, a backend's, or the router's own
capacity), and hints for the HTTP and gRPC status it maps to. The classes carry no behaviour
beyond that, so every layer can import them.
"""

from __future__ import annotations

from typing import ClassVar, Literal

Fault = Literal["client", "backend", "router", "config"]


class RouterError(Exception):
    """Base of every error the router raises on purpose."""

    code: ClassVar[str] = "INTERNAL"
    fault: ClassVar[Fault] = "router"
    http_status: ClassVar[int] = 500
    grpc_status: ClassVar[str] = "INTERNAL"

    def __init__(self, message: str = "") -> None:
        super().__init__(message or self.code)
        self.message = message or self.code

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


class NoBackend(RouterError):
    code = "NO_BACKEND"
    http_status = 503
    grpc_status = "UNAVAILABLE"


class UnknownModel(RouterError):
    code = "UNKNOWN_MODEL"
    fault = "client"
    http_status = 404
    grpc_status = "NOT_FOUND"


# -- the client's fault ------------------------------------------------------------------------


class UnknownService(RouterError):
    """A gRPC health check for a service the router does not answer for."""

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


# -- a backend's fault -------------------------------------------------------------------------


class BackendError(RouterError):
    fault = "backend"
    http_status = 502
    grpc_status = "UNAVAILABLE"


class BackendUnavailable(BackendError):
    """Connect refused/timed out, or the connection closed before any response byte.

    The request never produced an answer, so it is safe to retry on another backend.
    """

    code = "BACKEND_UNAVAILABLE"


class BackendTimeout(BackendError):
    code = "BACKEND_TIMEOUT"
    http_status = 504
    grpc_status = "DEADLINE_EXCEEDED"


class BackendProtocolError(BackendError):
    """A malformed or oversize response: the connection is discarded, the request not retried."""

    code = "BACKEND_PROTOCOL_ERROR"
    grpc_status = "INTERNAL"


# -- configuration -----------------------------------------------------------------------------


class ConfigError(RouterError):
    """One or more configuration problems, each naming its key path and file."""

    code = "CONFIG_INVALID"
    fault = "config"

    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = problems
