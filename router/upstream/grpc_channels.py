"""Channels to gRPC backends.

``GrpcChannels`` keeps one ``grpc.aio`` channel per gRPC backend address: created on first use,
shared by every call to that backend (HTTP/2 multiplexes them over one connection), and closed
by ``close_idle`` once the backend has carried nothing for ``idle_timeout_s``. Unary callables
are cached per method, since building one costs about as much as a small call's Python
overhead. Probes do not count as use, so a channel that only carries probes still goes idle.

A backend registered with ``use_tls`` gets a secure channel: its certificate verified against
the ``BackendTls`` CA for ``server_name`` (``grpc.ssl_target_name_override``), and the router's
client certificate if one is configured. Credentials are read when a channel opens, so after a
certificate reload the backend's next channel (after an idle close) uses the new files, while
the open one keeps its connection.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import grpc

from router.core.clock import Clock
from router.tls.context import BackendTls


class Backend(Protocol):
    """What a channel needs to know of its backend."""

    @property
    def address(self) -> str: ...

    @property
    def inflight(self) -> int: ...


def channel_options(max_message_bytes: int, reconnect_max_s: float) -> list[tuple[str, Any]]:
    return [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
        # The router retries on another backend itself, within its own budget.
        ("grpc.enable_retries", 0),
        # Its own subchannel per channel, so closing one never touches another's connection.
        ("grpc.use_local_subchannel_pool", 1),
        # gRPC's default backoff grows to 120 s; a restarted backend should be found by the
        # next health pass, not minutes later (grpc.reconnect_backoff_max_s).
        ("grpc.initial_reconnect_backoff_ms", 100),
        ("grpc.min_reconnect_backoff_ms", 100),
        ("grpc.max_reconnect_backoff_ms", int(reconnect_max_s * 1000)),
    ]


@dataclass(eq=False)
class _Entry:
    channel: grpc.aio.Channel
    last_used: float
    unary: dict[str, grpc.aio.UnaryUnaryMultiCallable] = field(default_factory=dict)


class GrpcChannels:
    def __init__(
        self, clock: Clock, *, max_message_bytes: int, idle_timeout_s: float,
        reconnect_max_s: float = 2.0,
    ) -> None:
        self._clock = clock
        self._options = channel_options(max_message_bytes, reconnect_max_s)
        self._idle_timeout_s = idle_timeout_s
        self._entries: dict[str, _Entry] = {}
        self._tls: dict[str, BackendTls] = {}
        self.opened = 0
        self.closed = 0

    def use_tls(self, address: str, tls: BackendTls) -> None:
        """Reach the backend at ``address`` over TLS from its next channel on."""
        self._tls[address] = tls

    def _open(self, address: str) -> grpc.aio.Channel:
        tls = self._tls.get(address)
        if tls is None:
            return grpc.aio.insecure_channel(address, options=self._options)
        material = tls.material
        credentials = grpc.ssl_channel_credentials(
            root_certificates=material.ca,
            private_key=material.key or material.cert_chain,
            certificate_chain=material.cert_chain,
        )
        options = [*self._options, ("grpc.ssl_target_name_override", tls.server_name)]
        return grpc.aio.secure_channel(address, credentials, options=options)

    def _entry(self, backend: Backend, *, use: bool = True) -> _Entry:
        entry = self._entries.get(backend.address)
        now = self._clock.now()
        if entry is None:
            channel = self._open(backend.address)
            entry = self._entries[backend.address] = _Entry(channel, now)
            self.opened += 1
        elif use:
            entry.last_used = now
        return entry

    def channel(self, backend: Backend) -> grpc.aio.Channel:
        return self._entry(backend).channel

    def unary(self, backend: Backend, method: str) -> grpc.aio.UnaryUnaryMultiCallable:
        """A raw-bytes unary callable for ``method`` on ``backend``'s channel."""
        entry = self._entry(backend)
        callable_ = entry.unary.get(method)
        if callable_ is None:
            callable_ = entry.unary[method] = entry.channel.unary_unary(method)
        return callable_

    def probe_channel(self, backend: Backend) -> grpc.aio.Channel:
        """The backend's channel, opened if need be, without counting as use."""
        return self._entry(backend, use=False).channel

    def has_channel(self, backend: Backend) -> bool:
        return backend.address in self._entries

    async def close_idle(self, backends: Sequence[Backend]) -> int:
        """Close the channels of backends with nothing in flight for ``idle_timeout_s``."""
        deadline = self._clock.now() - self._idle_timeout_s
        idle = [
            b for b in backends
            if (e := self._entries.get(b.address)) and b.inflight == 0 and e.last_used <= deadline
        ]
        for backend in idle:
            await self._close(backend.address)
        return len(idle)

    async def _close(self, address: str) -> None:
        entry = self._entries.pop(address, None)
        if entry is not None:
            self.closed += 1
            await entry.channel.close()

    async def close_backend(self, address: str) -> None:
        """Close the channel of a backend that has left the registry (none: nothing to do)."""
        await self._close(address)

    async def close_all(self) -> None:
        for address in list(self._entries):
            await self._close(address)

    def statistics(self) -> dict[str, int]:
        return {"open": len(self._entries), "opened": self.opened, "closed": self.closed}

    def __repr__(self) -> str:
        return f"GrpcChannels(open={len(self._entries)})"

