"""The handlers of ``admin_routes.INSTANCE_ROUTES``: the replica manager over HTTP.

``GET /v1/instances/{name}/logs`` answers JSON (``LogLines``); with ``follow=true`` it
answers ``text/plain`` instead, the lines of the range and then every new line as the
replica writes it, one per line, until the replica is removed (scale-down, delete), the
router stops, the client has fallen 10,000 lines behind, or the client has gone (noticed at
the next line, or within ``CLIENT_CHECK_S`` of a quiet replica).
"""

from __future__ import annotations

import asyncio

from aiohttp import web

from router.control.api import BODY_KEY, QUERY_KEY, Handler, json_response
from router.control.instances.manager import InstanceManager
from router.control.instances.models import InstanceInfo, LogLines, LogQuery, ScaleRequest
from router.core.config import InstanceConfig
from router.core.errors import NotSupported

# How often a follow with no new line looks whether its client is still connected.
CLIENT_CHECK_S = 5.0


def _json(info: InstanceInfo, status: int = 200) -> web.Response:
    return json_response(info.model_dump(mode="json"), status)


def instance_handlers(manager: InstanceManager) -> dict[str, Handler]:
    async def list_instances(request: web.Request) -> web.Response:
        return json_response([info.model_dump(mode="json") for info in manager.list_instances()])

    async def create(request: web.Request) -> web.Response:
        body = request[BODY_KEY]
        assert isinstance(body, InstanceConfig)
        return _json(await manager.create(body), status=201)

    async def get(request: web.Request) -> web.Response:
        return _json(manager.info(request.match_info["name"]))

    async def delete(request: web.Request) -> web.Response:
        return _json(await manager.delete(request.match_info["name"]))

    async def restart(request: web.Request) -> web.Response:
        return _json(manager.restart(request.match_info["name"]), status=202)

    async def scale(request: web.Request) -> web.Response:
        body = request[BODY_KEY]
        assert isinstance(body, ScaleRequest)
        return _json(manager.scale(request.match_info["name"], body.replicas), status=202)

    async def logs(request: web.Request) -> web.StreamResponse:
        query = request[QUERY_KEY]
        assert isinstance(query, LogQuery)
        name = request.match_info["name"]
        if query.follow:
            return await _follow(request, manager, name, query)
        lines = await manager.read_log(name, query.replica, query.start, query.end)
        return json_response(LogLines(
            instance=name, replica=query.replica, start=lines.start, total=lines.total,
            truncated=lines.truncated, lines=lines.lines).model_dump(mode="json"))

    return {"instances_list": list_instances, "instances_create": create,
            "instance_get": get, "instance_delete": delete, "instance_restart": restart,
            "instance_scale": scale, "instance_logs": logs}


async def _follow(request: web.Request, manager: InstanceManager, name: str,
                  query: LogQuery) -> web.StreamResponse:
    lines, follower, replica_log = await manager.follow_log(name, query.replica, query.start,
                                                            query.end)
    response = web.StreamResponse(headers={"Content-Type": "text/plain; charset=utf-8"})
    try:
        await response.prepare(request)
        if lines.lines:
            await response.write("".join(f"{line}\n" for line in lines.lines).encode())
        while True:
            try:
                async with asyncio.timeout(CLIENT_CHECK_S):
                    line = await follower.next_line()
            except TimeoutError:
                if request.transport is None or request.transport.is_closing():
                    break  # the client left while the replica was quiet
                continue
            if line is None:
                break
            await response.write(f"{line}\n".encode())
        await response.write_eof()
    except (ConnectionResetError, ConnectionError):
        pass  # the client went away: the follow ends
    finally:
        replica_log.unfollow(follower)
    return response


def unsupported_handlers(names: list[str]) -> dict[str, Handler]:
    """For a multi-process router, whose processes would each run their own replicas."""

    async def refuse(request: web.Request) -> web.Response:
        raise NotSupported("the replica manager runs in a single-process router "
                           "(listener.processes = 1)")

    return dict.fromkeys(names, refuse)
