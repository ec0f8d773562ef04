"""What a reload changes: the difference between the running config and a new one, as data.

``diff(old, new)`` compares two validated configs key by key, and sorts every change into one
of three kinds:

* **Backends.** Entries are matched by identity (address, protocol and command), in order, so
  two identical spawned entries pair up one to one. A new entry without a partner is added (it
  joins), an old one without a partner is removed (it drains: no new requests, those in flight
  finish, then it leaves), and a matched pair whose other keys differ (weight, models,
  dns_refresh_s) is changed in place, for the requests placed from then on.
* **Instances** (``[[instances]]``) are left to the replica manager, which matches them by
  name: added, removed, scaled (only ``replicas`` changed) or replaced.
* **Live settings**, the keys of ``LIVE_KEYS``: applied to what starts after the reload
  (requests accepted, attempts started, connections dialled, health passes).
* **Everything else** (listen addresses, the process count, frame and message limits, ...):
  the running process cannot take it. A reload that changes any of these is refused as a
  whole, naming each key, and the running config stays. A key added to the schema is in this
  group until it is named in ``LIVE_KEYS``.

``plan_sync(current, desired)`` is the same difference one level down, between two sets of
``BackendSpec`` keyed by address: which join, which change, which drain. A reload and a DNS
refresh both end in it.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel

from router.core.config import BackendConfig, ModelGroupConfig, RouterConfig
from router.core.errors import RouterError
from router.core.types import BackendSpec

# Keys a running router applies on reload. Pipeline depth stays out: connections already open
# were filled to the old depth. The gRPC channel options and every listener setting are fixed
# when the channel or the listener is made.
LIVE_KEYS = frozenset({
    "dispatch.queue_size",
    "dispatch.queue_timeout_s",
    "dispatch.request_timeout_s",
    "dispatch.max_retries",
    "dispatch.policy",
    "listener.policy",
    "grpc.policy",
    "model_groups",
    "pool.max_connections",
    "pool.connect_timeout_s",
    "pool.idle_timeout_s",
    "pool.max_lifetime_s",
    "health.probe",
    "health.interval_s",
    "health.timeout_s",
    "health.failure_threshold",
    "health.panic_threshold",
    "grpc.max_calls_per_backend",
    "grpc.relay_keepalive_s",
    "grpc.relay_keepalive_timeout_s",
    "drain.shutdown_grace_s",
})

# What makes a backend entry the same backend in both configs.
_BACKEND_IDENTITY = ("address", "protocol", "command")


@dataclass(frozen=True, slots=True)
class ConfigDiff:
    restart: tuple[str, ...] = ()  # one message per changed key that needs a restart
    settings: tuple[tuple[str, Any, Any], ...] = ()  # (key, old, new) of live keys
    added: tuple[int, ...] = ()  # indexes into the new config's backends
    removed: tuple[int, ...] = ()  # indexes into the old config's backends
    kept: tuple[tuple[int, int], ...] = ()  # (old index, new index), changed or not
    backend_changes: tuple[str, ...] = ()  # what changed in the kept entries, as text

    @property
    def empty(self) -> bool:
        return not (self.restart or self.settings or self.added or self.removed
                    or self.backend_changes)

    def describe(self, old: RouterConfig, new: RouterConfig) -> list[str]:
        """One line per change that a reload applies, for the log and the admin API."""
        lines = [f"{key}: {_shown(key, before)} -> {_shown(key, after)}"
                 for key, before, after in self.settings]
        lines += [f"backend {_label(new.backends[i])}: added" for i in self.added]
        lines += [f"backend {_label(old.backends[i])}: removed (drains, then leaves)"
                  for i in self.removed]
        return lines + list(self.backend_changes)


@dataclass(frozen=True, slots=True)
class SyncPlan:
    join: tuple[BackendSpec, ...] = ()
    update: tuple[BackendSpec, ...] = ()
    drain: tuple[str, ...] = ()  # addresses


@dataclass(frozen=True, slots=True)
class ReloadOutcome:
    """What a reload did: applied (``changes``, possibly none), or refused with ``error``
    (``InvalidInput``, ``RestartRequired``, or why new backends could not start), the
    running config untouched."""

    changes: tuple[str, ...] = ()
    error: RouterError | None = None

    @property
    def reloaded(self) -> bool:
        return self.error is None


def diff(old: RouterConfig, new: RouterConfig) -> ConfigDiff:
    restart: list[str] = []
    settings: list[tuple[str, Any, Any]] = []
    # The instances are the replica manager's to follow (``InstanceManager.reconfigure``).
    for key, before, after in _changed_leaves(old, new, exclude=("backends", "instances")):
        if key in LIVE_KEYS:
            settings.append((key, before, after))
        else:
            restart.append(f"{key}: {before!r} -> {after!r} needs a restart")
    added, removed, kept = match_backends(old.backends, new.backends)
    changes = [
        f"backend {_label(new.backends[j])}: {key} {before!r} -> {after!r}"
        for i, j in kept
        for key, before, after in _changed_leaves(old.backends[i], new.backends[j])
    ]
    return ConfigDiff(
        tuple(restart), tuple(settings), tuple(added), tuple(removed), tuple(kept),
        tuple(changes),
    )


def match_backends(
    old: Sequence[BackendConfig], new: Sequence[BackendConfig]
) -> tuple[list[int], list[int], list[tuple[int, int]]]:
    """(added new indexes, removed old indexes, kept (old, new) pairs): each new entry pairs
    with the first unpaired old entry of the same identity."""
    unpaired: dict[tuple[Any, ...], list[int]] = {}
    for i, entry in enumerate(old):
        unpaired.setdefault(_identity(entry), []).append(i)
    added: list[int] = []
    kept: list[tuple[int, int]] = []
    for j, entry in enumerate(new):
        partners = unpaired.get(_identity(entry))
        if partners:
            kept.append((partners.pop(0), j))
        else:
            added.append(j)
    removed = sorted(i for partners in unpaired.values() for i in partners)
    return added, removed, kept


def plan_sync(
    current: Mapping[str, BackendSpec], desired: Mapping[str, BackendSpec]
) -> SyncPlan:
    """From the backends there are to the backends there should be, both keyed by address.
    A spec of another protocol at the same address is a different backend: the old one
    drains and the new one joins."""
    join = [spec for address, spec in desired.items() if address not in current]
    update: list[BackendSpec] = []
    drain = [address for address in current if address not in desired]
    for address, spec in desired.items():
        before = current.get(address)
        if before is None or before == spec:
            continue
        if before.protocol != spec.protocol:
            drain.append(address)
            join.append(spec)
        else:
            update.append(spec)
    return SyncPlan(tuple(join), tuple(update), tuple(drain))


def _shown(key: str, value: Any) -> str:
    """A setting's value for a change line; model groups as ``name (policy: models)``."""
    if key == "model_groups":
        groups: tuple[ModelGroupConfig, ...] = value
        return "[" + ", ".join(f"{g.name} ({g.policy}: {', '.join(g.models)})"
                               for g in groups) + "]"
    return repr(value)


def _identity(entry: BackendConfig) -> tuple[Any, ...]:
    return tuple(getattr(entry, key) for key in _BACKEND_IDENTITY)


def _label(entry: BackendConfig) -> str:
    return entry.address if entry.protocol == "tcp" else f"{entry.address} ({entry.protocol})"


def _changed_leaves(
    old: BaseModel, new: BaseModel, prefix: str = "", exclude: tuple[str, ...] = ()
) -> Iterator[tuple[str, Any, Any]]:
    """(dotted key, old value, new value) for every leaf that differs; nested sections are
    walked, other values (tuples included) compared whole."""
    for name in type(old).model_fields:
        if name in exclude:
            continue
        before, after = getattr(old, name), getattr(new, name)
        key = f"{prefix}{name}"
        if isinstance(before, BaseModel) and isinstance(after, BaseModel):
            yield from _changed_leaves(before, after, f"{key}.")
        elif before != after:
            yield key, before, after
