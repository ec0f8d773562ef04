"""Types shared by the control plane (which owns them) and the data plane (which reads them)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Protocol = Literal["tcp", "grpc"]  # "tcp": length-prefixed frames
Source = Literal["static", "api", "registered", "managed"]


@dataclass(frozen=True, slots=True)
class BackendSpec:
    """Who a backend is, as the control plane knows it; never changed in place (a new spec
    replaces the old one). What the data plane learns while serving (health, load, its
    connections) lives in ``dispatch.backends.Backend``, beside it."""

    id: str
    address: str  # HOST:PORT
    protocol: Protocol = "tcp"
    models: tuple[str, ...] = ()  # "name" (every version) or "name:version"
    weight: int = 1
    labels: tuple[tuple[str, str], ...] = ()
    source: Source = "static"

    @property
    def host(self) -> str:
        return self.address.rpartition(":")[0].strip("[]")

    @property
    def port(self) -> int:
        return int(self.address.rpartition(":")[2])
