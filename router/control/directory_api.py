"""The handlers of ``admin_routes.V1_ROUTES``: the directory over HTTP. One router process
serves them from its ``BackendDirectory``; the admin API of a multi-process router forwards
them to its processes (``control.federation``)."""

from __future__ import annotations

from aiohttp import web

from router.control.api import BODY_KEY, Handler, json_response
from router.control.directory import (
    BackendDirectory,
    BackendInfo,
    LeaseBatch,
    LoadReport,
    Registration,
    WeightChange,
)


def _json(model: BackendInfo | list[BackendInfo], status: int = 200) -> web.Response:
    if isinstance(model, list):
        return json_response([info.model_dump(mode="json") for info in model], status)
    return json_response(model.model_dump(mode="json"), status)


def directory_handlers(directory: BackendDirectory) -> dict[str, Handler]:
    async def register(request: web.Request) -> web.Response:
        body = request[BODY_KEY]
        assert isinstance(body, Registration)
        registered = await directory.register(body)
        return json_response(registered.model_dump(mode="json"), status=201)

    async def list_backends(request: web.Request) -> web.Response:
        return _json(directory.list())

    async def get_backend(request: web.Request) -> web.Response:
        return _json(directory.get(request.match_info["id"]))

    async def heartbeat(request: web.Request) -> web.Response:
        report = request[BODY_KEY]
        assert isinstance(report, LoadReport)
        registered = await directory.heartbeat(request.match_info["id"], report)
        return json_response(registered.model_dump(mode="json"))

    async def heartbeat_many(request: web.Request) -> web.Response:
        batch = request[BODY_KEY]
        assert isinstance(batch, LeaseBatch)
        result = await directory.heartbeat_many(batch.leases)
        return json_response(result.model_dump(mode="json"))

    async def deregister(request: web.Request) -> web.Response:
        return _json(await directory.deregister(request.match_info["id"]), status=202)

    async def drain(request: web.Request) -> web.Response:
        return _json(await directory.set_drained(request.match_info["id"], True))

    async def undrain(request: web.Request) -> web.Response:
        return _json(await directory.set_drained(request.match_info["id"], False))

    async def weight(request: web.Request) -> web.Response:
        change = request[BODY_KEY]
        assert isinstance(change, WeightChange)
        return _json(await directory.set_weight(request.match_info["id"], change.weight))

    return {"v1_register": register, "v1_list": list_backends, "v1_get": get_backend,
            "v1_heartbeat": heartbeat, "v1_heartbeat_many": heartbeat_many,
            "v1_deregister": deregister, "v1_drain": drain,
            "v1_undrain": undrain, "v1_weight": weight}
