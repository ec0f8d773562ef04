"""Types shared by the control plane (which owns them) and the data plane (which reads them)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Protocol = Literal["tcp", "grpc"]  # "tcp": length-prefixed frames
Source = Literal["static", "api", "registered", "managed"]

UNIX_SCHEME = "unix:"  # a backend address "unix:/absolute/path" names a unix socket
# The most models one heartbeat report may list (``loaded_models``) or count (``model_use``):
# a backend holds a handful of models; 1,024 names of 256 bytes keep a report under 300 KiB.
MAX_REPORTED_MODELS = 1024
# The most requests a report may count for one model at one backend.
MAX_MODEL_USE = 1_000_000


@dataclass(frozen=True, slots=True)
class BackendSpec:
    """Who a backend is, as the control plane knows it; never changed in place (a new spec
    replaces the old one). What the data plane learns while serving (health, load, its
    connections) lives in ``dispatch.backends.Backend``, beside it."""

    id: str
    address: str  # HOST:PORT, or unix:/absolute/path
    protocol: Protocol = "tcp"
    models: tuple[str, ...] = ()  # "name" (every version) or "name:version"
    weight: int = 1
    labels: tuple[tuple[str, str], ...] = ()
    source: Source = "static"

    @property
    def is_unix(self) -> bool:
        """Whether the address is a unix socket path; then it has no host and no port."""
        return self.address.startswith(UNIX_SCHEME)

    @property
    def unix_path(self) -> str:
        """The socket path of a ``unix:`` address; ValueError for HOST:PORT."""
        if not self.is_unix:
            raise ValueError(f"{self.address} is not a unix socket address")
        return self.address[len(UNIX_SCHEME):]

    @property
    def host(self) -> str:
        """The host of a HOST:PORT address; ValueError for a unix socket (it has none)."""
        if self.is_unix:
            raise ValueError(f"{self.address} is a unix socket: it has no host")
        return self.address.rpartition(":")[0].strip("[]")

    @property
    def port(self) -> int:
        """The port of a HOST:PORT address; ValueError for a unix socket (it has none)."""
        if self.is_unix:
            raise ValueError(f"{self.address} is a unix socket: it has no port")
        return int(self.address.rpartition(":")[2])
