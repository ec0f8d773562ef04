"""``routertest.Echo``: a gRPC service with no .proto, for testing transparent proxying.

Messages are raw bytes (no serialisation), one method per call kind:

* ``Unary``: answers the request.
* ``ServerStream``: answers the request ``x-echo-count`` times (default 3).
* ``ClientStream``: answers all requests joined, once the client half-closes.
* ``Bidi``: answers each request as it arrives.

Request metadata steers it, so a test can see what a proxy forwarded:

* every ``x-*`` header comes back in the trailing metadata as ``echo-<name>``;
* ``x-echo-delay-ms``: wait that long before answering;
* ``x-echo-status`` (a status code name) with ``x-echo-details``: end with that status, the
  details, and trailing metadata ``x-echo-trailer: kept``;
* the initial metadata carries ``x-backend`` (this process's port) and the trailing metadata
  ``x-deadline-ms``: the time left on the call when it arrived (``none`` without deadline).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc

SERVICE = "routertest.Echo"
Context = Any  # grpc.aio.ServicerContext; grpc ships no type information


def _headers(context: Context) -> dict[str, str]:
    return {
        key: value for key, value in context.invocation_metadata() or ()
        if isinstance(value, str)
    }


class EchoService:
    def __init__(self, port: int | str) -> None:  # str: a unix socket address
        self.port = port

    async def _begin(self, context: Context) -> dict[str, str]:
        headers = _headers(context)
        await context.send_initial_metadata((("x-backend", str(self.port)),))
        remaining = context.time_remaining()
        deadline = "none" if remaining is None else str(int(remaining * 1000))
        trailing = [(f"echo-{k}", v) for k, v in headers.items() if k.startswith("x-")]
        context.set_trailing_metadata((*trailing, ("x-deadline-ms", deadline)))
        delay_ms = float(headers.get("x-echo-delay-ms", "0"))
        if delay_ms > 0:
            await asyncio.sleep(delay_ms / 1000)
        return headers

    async def _end(self, headers: dict[str, str], context: Context) -> None:
        status = headers.get("x-echo-status")
        if status is not None:
            await context.abort(
                grpc.StatusCode[status], headers.get("x-echo-details", ""),
                (("x-echo-trailer", "kept"),),
            )

    async def unary(self, request: bytes, context: Context) -> bytes:
        headers = await self._begin(context)
        await self._end(headers, context)
        return request

    async def server_stream(self, request: bytes, context: Context) -> AsyncIterator[bytes]:
        headers = await self._begin(context)
        for _ in range(int(headers.get("x-echo-count", "3"))):
            yield request
        await self._end(headers, context)

    async def client_stream(self, requests: AsyncIterator[bytes], context: Context) -> bytes:
        headers = await self._begin(context)
        parts = [message async for message in requests]
        await self._end(headers, context)
        return b"".join(parts)

    async def bidi(self, requests: AsyncIterator[bytes], context: Context) -> AsyncIterator[bytes]:
        headers = await self._begin(context)
        async for message in requests:
            yield message
        await self._end(headers, context)

    def handler(self) -> Any:
        return grpc.method_handlers_generic_handler(SERVICE, {
            "Unary": grpc.unary_unary_rpc_method_handler(self.unary),
            "ServerStream": grpc.unary_stream_rpc_method_handler(self.server_stream),
            "ClientStream": grpc.stream_unary_rpc_method_handler(self.client_stream),
            "Bidi": grpc.stream_stream_rpc_method_handler(self.bidi),
        })
