"""``--register URL`` for the test backends: join a router's fleet by themselves, with a
lease (``router.client.registration``), and leave it in order on SIGTERM.

One implementation for ``backends.echo`` and ``backends.kserve``: ``add_arguments`` declares
the flags, ``options`` reads them, ``advertised`` says which address the router is told, and
``lease(...)`` is the context the backend serves inside. Leaving it deregisters, so when the
backend's drain starts the router has stopped sending it new requests; the backend then
finishes what is in flight (at most ``--drain-grace-s``) and exits.

The address registered is ``--advertise`` if given, else the one the backend listens on:
``unix:/absolute/path`` for ``--unix``, ``HOST:PORT`` with the bound port otherwise (a
wildcard host such as 0.0.0.0 names no backend, so it needs ``--advertise``).
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import os
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from router.client.lease import DEFAULT_LEASE_TTL_S
from router.client.registration import Protocol, Registration, RegistrationRefused

DRAIN_GRACE_S = 5.0  # the launcher's SIGTERM-to-SIGKILL is 5 s; a drain normally takes ms


@dataclass(frozen=True, slots=True)
class RegisterOptions:
    router_url: str
    lease_ttl_s: float = DEFAULT_LEASE_TTL_S
    token: str | None = None
    advertise: str | None = None
    backend_id: str | None = None
    drain_grace_s: float = DRAIN_GRACE_S
    report_to: tuple[str, ...] = ()
    heartbeat_interval_s: float | None = None  # None: the router's answer (a third of the TTL)

    def __post_init__(self) -> None:
        if not self.router_url.startswith(("http://", "https://")):
            raise ValueError(f"--register takes the router's admin URL (http://HOST:PORT), "
                             f"got {self.router_url!r}")
        if not self.lease_ttl_s > 0:
            raise ValueError(f"--lease-ttl must be > 0, got {self.lease_ttl_s}")
        if self.heartbeat_interval_s is not None and not self.heartbeat_interval_s > 0:
            raise ValueError(f"--heartbeat-interval must be > 0, got {self.heartbeat_interval_s}")
        if self.drain_grace_s < 0:
            raise ValueError(f"--drain-grace-s must be >= 0, got {self.drain_grace_s}")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("self-registration")
    group.add_argument("--register", metavar="URL", default=None,
                       help="register with the router whose admin API is at URL "
                            "(http://127.0.0.1:7072), keep the lease, deregister on SIGTERM")
    group.add_argument("--lease-ttl", metavar="S", type=float, default=DEFAULT_LEASE_TTL_S,
                       help="lease TTL in seconds; a heartbeat every third of it")
    group.add_argument("--token-file", metavar="PATH", default=None,
                       help="the router's admin bearer token (admin.token_file)")
    group.add_argument("--advertise", metavar="ADDRESS", default=None,
                       help="the address to register (HOST:PORT or unix:/path); "
                            "default: the one listened on")
    group.add_argument("--backend-id", metavar="ID", default=None,
                       help="the id to register under (default: the address)")
    group.add_argument("--heartbeat-interval", metavar="S", type=float, default=None,
                       help="renew (and report) this often, in seconds (default: a third of "
                            "the TTL, as the router answers)")
    group.add_argument("--report-to", metavar="URL", action="append", default=[],
                       help="also send each heartbeat (the load report) to the router whose "
                            "admin API is at URL: another router on the same etcd registry "
                            "(repeatable)")
    group.add_argument("--drain-grace-s", metavar="S", type=float, default=DRAIN_GRACE_S,
                       help="after deregistering on SIGTERM, wait at most this long for "
                            "requests in flight")


def options(args: argparse.Namespace, parser: argparse.ArgumentParser) -> RegisterOptions | None:
    """The registration the flags ask for (None without ``--register``); a bad flag is a
    usage error. ``args`` has the backend's ``host`` and ``unix`` too."""
    if args.register is None:
        given = [flag for flag, value in (("--token-file", args.token_file),
                                          ("--advertise", args.advertise),
                                          ("--backend-id", args.backend_id),
                                          ("--report-to", args.report_to),
                                          ("--heartbeat-interval", args.heartbeat_interval))
                 if value]
        if given:
            parser.error(f"{', '.join(given)} need --register")
        return None
    if args.advertise is None and args.unix is None and _is_wildcard(args.host):
        parser.error(f"--host {args.host} names no address to register: give --advertise")
    try:
        token = Path(args.token_file).read_text().strip() if args.token_file else None
        return RegisterOptions(args.register, args.lease_ttl, token or None, args.advertise,
                               args.backend_id, args.drain_grace_s, tuple(args.report_to),
                               args.heartbeat_interval)
    except (OSError, ValueError) as exc:
        parser.error(str(exc))


def advertised(register: RegisterOptions, *, host: str, port: int, unix: str | None) -> str:
    """The address the router is told to reach this backend at."""
    if register.advertise is not None:
        return register.advertise
    if unix is not None:
        return "unix:" + os.path.abspath(unix)
    if _is_wildcard(host):
        raise ValueError(f"listening on {host} names no address to register: "
                         "give --advertise HOST:PORT")
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _is_wildcard(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_unspecified
    except ValueError:
        return False  # a host name


class ModelUse:
    """Each model's requests here now (``begin`` on arrival, ``end`` on the answer): a
    heartbeat's ``model_use``, with no model left at 0."""

    __slots__ = ("_counts",)

    def __init__(self) -> None:
        self._counts: dict[str, int] = {}

    def begin(self, model: str) -> None:
        self._counts[model] = self._counts.get(model, 0) + 1

    def end(self, model: str) -> None:
        left = self._counts[model] - 1
        if left:
            self._counts[model] = left
        else:
            del self._counts[model]

    def counts(self) -> dict[str, int]:
        return dict(self._counts)


@contextlib.asynccontextmanager
async def lease(
    register: RegisterOptions | None, *, address: str, protocol: Protocol,
    models: Iterable[str] = (), inflight: Callable[[], int] | None = None,
    loaded_models: Callable[[], Iterable[str]] | None = None,
    model_use: Callable[[], Mapping[str, int]] | None = None,
    labels: Mapping[str, str] | None = None,
) -> AsyncIterator[Registration | None]:
    """Registered while inside (nothing without ``register``); deregistered on the way out."""
    if register is None:
        yield None
        return
    registration = Registration(
        register.router_url, address=address, protocol=protocol, models=models,
        backend_id=register.backend_id, lease_ttl_s=register.lease_ttl_s,
        token=register.token, inflight=inflight, loaded_models=loaded_models,
        model_use=model_use, labels=labels,
        report_to=register.report_to, heartbeat_interval_s=register.heartbeat_interval_s,
    )
    try:
        await registration.__aenter__()
    except RegistrationRefused as exc:
        raise SystemExit(f"--register: {register.router_url} refused {address}: {exc}") from None
    try:
        yield registration
    finally:
        await registration.close()
