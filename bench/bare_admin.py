"""A bare aiohttp app that answers the heartbeat route and nothing else: the HTTP floor.

``python -m bench.bare_admin`` listens on a free loopback port, prints ``READY <port>`` and
answers ``PUT /v1/backends/{id}/lease`` with the JSON the router's ``Registered`` has, with
no authentication, validation, store or metrics. ``make bench-registry`` sends it the same
heartbeats as the router, so the router's cost per heartbeat can be read against what aiohttp
itself costs on the same machine in the same sitting.
"""

from __future__ import annotations

import asyncio
import signal

import uvloop
from aiohttp import web

from router.protocol.announce import format_ready


async def lease(request: web.Request) -> web.Response:
    await request.read()
    return web.json_response({"id": request.match_info["id"], "lease_ttl_s": 10.0,
                              "heartbeat_interval_s": 10.0 / 3})


async def serve() -> None:
    app = web.Application()
    app.router.add_put("/v1/backends/{id}/lease", lease)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(format_ready(runner.addresses[0][1]), flush=True)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()


def main() -> None:
    uvloop.run(serve())


if __name__ == "__main__":
    main()
