"""What a launched process prints on stdout to say it is ready, formatted and parsed side by side.

A backend prints ``READY <port>`` once it listens on TCP (``format_ready``; ``ready_port``
reads it), or ``READY unix:<path>`` once it listens on a unix socket (``format_ready_unix``;
``ready_unix_path`` reads it);
the router prints its start banner (``format_banner``; ``parse_banner`` reads it). The parsers
are ready readers for ``router.control.launcher``: given the latest lines of output, they
return what was announced once the lines hold it, None until then. ``examples/router.toml``
documents the READY line for backends the router spawns.

Pure functions: no I/O, no asyncio.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

_READY_LINE = re.compile(r"READY ([0-9]{1,5})")
_READY_UNIX_LINE = re.compile(r"READY unix:(/\S+)")


def format_ready(port: int) -> str:
    """The line a backend prints on stdout once it listens on ``port``."""
    return f"READY {port}"


def ready_port(lines: Sequence[str]) -> int | None:
    """The port of a ``READY <port>`` line when it is the latest line, else None."""
    match = _READY_LINE.fullmatch(lines[-1].strip()) if lines else None
    port = int(match[1]) if match else 0
    return port if 0 < port < 65536 else None


def format_ready_unix(path: str) -> str:
    """The line a backend prints on stdout once it listens on the unix socket ``path``
    (absolute, no whitespace: the line ends at the first space)."""
    return f"READY unix:{path}"


def ready_unix_path(lines: Sequence[str]) -> str | None:
    """The path of a ``READY unix:<path>`` line when it is the latest line, else None."""
    match = _READY_UNIX_LINE.fullmatch(lines[-1].strip()) if lines else None
    return match[1] if match else None


@dataclass(frozen=True, slots=True)
class Banner:
    """Where a router listens, as its start banner says."""

    listen: tuple[str, int]
    admin: tuple[str, int]
    grpc: tuple[str, int] | None = None
    admin_grpc: tuple[str, int] | None = None  # admin.grpc_listen
    anyserve: tuple[str, int] | None = None  # admin.anyserve_listen

    @property
    def admin_url(self) -> str:
        return f"http://{self.admin[0]}:{self.admin[1]}"

    @property
    def grpc_target(self) -> str | None:
        return None if self.grpc is None else f"{self.grpc[0]}:{self.grpc[1]}"


# ``\S+:(\d+)`` takes the last colon, so IPv6 hosts (``::1``) parse as printed.
_BANNER_LISTEN = re.compile(r"inference-router listening on (\S+):(\d+) ")
_BANNER_GRPC = re.compile(r"  grpc: (\S+):(\d+) ")
_BANNER_ADMIN_GRPC = re.compile(r"  admin grpc: (\S+):(\d+) ")
_BANNER_ANYSERVE = re.compile(r"  anyserve: (\S+):(\d+) ")
_BANNER_ADMIN = re.compile(r"  admin: http://(\S+):(\d+)/")


def format_banner(banner: Banner, extra: str) -> str:
    """The router's start banner: what it listens on and how to try it. ``parse_banner``
    reads it back; the first line is the one people and scripts look for."""
    (lh, lp), (ah, ap) = banner.listen, banner.admin
    lines = [f"inference-router listening on {lh}:{lp} (length-prefixed TCP)"]
    if banner.grpc is not None:
        gh, gp = banner.grpc
        lines.append(f"  grpc: {gh}:{gp} (any service; KServe v2 routed by model)")
    if banner.admin_grpc is not None:
        h, p = banner.admin_grpc
        lines.append(f"  admin grpc: {h}:{p} (inference_router.v1.Registry, "
                     "anyserve.WorkerManagement)")
    if banner.anyserve is not None:
        h, p = banner.anyserve
        lines.append(f"  anyserve: {h}:{p} (anyserve.WorkerManagement, no credentials)")
    lines += [f"  admin: http://{ah}:{ap}/metrics /healthz /readyz /backends", f"  {extra}",
              f"  try it: inference-router call --to {lh}:{lp} hello"]
    return "\n".join(lines)


def parse_banner(lines: Sequence[str]) -> Banner | None:
    """The ``Banner`` that ``format_banner`` printed, once ``lines`` hold it up to its admin
    line (the gRPC lines, when there are some, come before it); None until then."""
    listen: tuple[str, int] | None = None
    found: dict[str, tuple[str, int]] = {}
    optional = (("grpc", _BANNER_GRPC), ("admin_grpc", _BANNER_ADMIN_GRPC),
                ("anyserve", _BANNER_ANYSERVE))
    for line in lines:
        if match := _BANNER_LISTEN.match(line):
            listen, found = (match[1], int(match[2])), {}
        elif listen is None:
            continue
        elif match := _BANNER_ADMIN.match(line):
            return Banner(listen, (match[1], int(match[2])), **found)
        else:
            for name, pattern in optional:
                if match := pattern.match(line):
                    found[name] = (match[1], int(match[2]))
    return None
