"""Readiness, defined once: the router is ready while it is not draining and at least one
backend is in rotation.

Each caller asks for the backends it can use: ``/readyz`` for any protocol, the gRPC health
service and KServe ServerReady for gRPC backends, KServe ModelReady for gRPC backends serving
one model. From the first moment of a drain the answer is not ready, whatever the backends.
"""

from __future__ import annotations

from router.dispatch.backends import Registry
from router.lifecycle.state import Lifecycle


class Readiness:
    def __init__(self, registry: Registry, lifecycle: Lifecycle) -> None:
        self._registry = registry
        self._lifecycle = lifecycle

    def not_ready_because(self, kind: str | None = None, model: str | None = None) -> str | None:
        """Why the router is not ready for traffic to backends of protocol ``kind`` (any, if
        None) serving model key ``model`` (any, if None); None while it is ready."""
        if self._lifecycle.draining:
            return "draining"
        if not self._in_rotation(kind, model):
            return "no healthy backend" + (f" of protocol {kind}" if kind else "")
        return None

    def ready(self, kind: str | None = None, model: str | None = None) -> bool:
        return self.not_ready_because(kind, model) is None

    def _in_rotation(self, kind: str | None, model: str | None) -> bool:
        if kind is None:
            return any(b.healthy and (model is None or b.serves(model)) for b in self._registry)
        return any(b.healthy for b in self._registry.serving(kind, model))

    def __repr__(self) -> str:
        return f"Readiness(ready={self.ready()})"
