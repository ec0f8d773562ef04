"""The replica manager's probe of one replica: is the process serving on its address?

Unlike the data plane's probers (``router.health``), which work over a backend's pooled
connections and decide routing, this one opens a fresh connection each time, so it answers
for a replica that is not (or not yet) a backend, and a hung process fails it even while
pooled connections sit idle:

- ``frames``: connect, send a zero-length frame, expect a zero-length frame back;
- ``grpc``: ``grpc.health.v1.Health/Check`` on a new channel; UNIMPLEMENTED counts as serving
  (the server answered; it has no health service), as in the data plane.

A probe returns None when the replica serves, else why not, and never raises for what the
replica does.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable

import grpc
from grpc_health.v1 import health_pb2

from router.core.types import UNIX_SCHEME

Probe = Callable[[str, float], Awaitable[str | None]]  # (address, timeout_s) -> why not
HEALTH_CHECK = "/grpc.health.v1.Health/Check"
_EMPTY_FRAME = b"\x00\x00\x00\x00"


async def _open(address: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    if address.startswith(UNIX_SCHEME):
        return await asyncio.open_unix_connection(address[len(UNIX_SCHEME):])
    host, _, port = address.rpartition(":")
    return await asyncio.open_connection(host.strip("[]"), int(port))


async def frame_probe(address: str, timeout_s: float) -> str | None:
    try:
        async with asyncio.timeout(timeout_s):
            reader, writer = await _open(address)
            try:
                writer.write(_EMPTY_FRAME)
                answer = await reader.readexactly(4)
            finally:
                writer.close()
                with contextlib.suppress(OSError):
                    await writer.wait_closed()
    except TimeoutError:
        return f"no answer to a frame probe within {timeout_s:g}s"
    except asyncio.IncompleteReadError:
        return "closed the connection instead of answering a frame probe"
    except OSError as exc:
        return f"connect failed: {exc.strerror or exc}"
    if answer != _EMPTY_FRAME:
        return f"answered a frame probe with {answer!r}, not an empty frame"
    return None


async def grpc_probe(address: str, timeout_s: float) -> str | None:
    channel = grpc.aio.insecure_channel(address)
    try:
        check = channel.unary_unary(
            HEALTH_CHECK, request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
            response_deserializer=health_pb2.HealthCheckResponse.FromString)
        reply = await check(health_pb2.HealthCheckRequest(service=""), timeout=timeout_s,
                            wait_for_ready=False)
    except grpc.aio.AioRpcError as exc:
        if exc.code() == grpc.StatusCode.UNIMPLEMENTED:
            return None
        return f"grpc.health Check failed: {exc.code().name}"
    finally:
        await channel.close()
    if reply.status != health_pb2.HealthCheckResponse.SERVING:
        return f"grpc.health says {health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)}"
    return None


def probe_for(protocol: str) -> Probe:
    return grpc_probe if protocol == "grpc" else frame_probe
