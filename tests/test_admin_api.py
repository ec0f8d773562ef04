"""The admin API declared once (``router.control.admin_routes``): the OpenAPI document generated
from the table, the endpoint table of docs/api.md, and every error code answered as JSON by a
real ``AdminServer`` on 127.0.0.1."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pydantic
import pytest
from aiohttp import web
from prometheus_client import generate_latest
from prometheus_client.registry import CollectorRegistry

from router.control import admin_routes
from router.control.admin import AdminAuth, AdminServer, start_app
from router.control.api import BODY_KEY, Route, build_app, json_response
from router.core.config import AdminConfig
from router.core.config_diff import ReloadOutcome
from router.core.errors import InvalidInput, RestartRequired
from router.dispatch.backends import Registry
from router.lifecycle.readiness import Readiness
from router.lifecycle.state import Lifecycle
from tests.fakes import make_backend, memory_directory

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "api-test-token"


def _refs(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref":
                yield value
            else:
                yield from _refs(value)
    elif isinstance(node, list):
        for item in node:
            yield from _refs(item)


def test_every_declared_route_is_in_the_document_with_its_statuses() -> None:
    document = admin_routes.document()
    assert document["openapi"] == "3.1.0"
    declared = {(r.method.lower(), r.path) for r in admin_routes.ALL_ROUTES}
    documented = {(method, path) for path, item in document["paths"].items() for method in item}
    assert documented == declared
    for route in admin_routes.ALL_ROUTES:
        operation = document["paths"][route.path][route.method.lower()]
        assert set(operation["responses"]) == {*map(str, route.responses), "default"}
        assert ("security" in operation) == route.mutates
    metrics = document["paths"]["/metrics"]["get"]["responses"]["200"]["content"]
    assert list(metrics) == ["text/plain"]
    backend = document["paths"]["/backends/{id}"]["get"]
    assert backend["parameters"] == [{"name": "id", "in": "path", "required": True,
                                      "schema": {"type": "string"}}]


def test_every_schema_reference_resolves_and_nested_models_are_components() -> None:
    document = admin_routes.document()
    schemas = document["components"]["schemas"]
    refs = set(_refs(document))
    assert "#/components/schemas/BackendStats" in refs  # nested in BackendList, via $defs
    assert "ProcessHealth" in schemas  # nested in Healthz
    for ref in refs:
        assert ref.startswith("#/components/schemas/"), ref
        assert ref.removeprefix("#/components/schemas/") in schemas, ref
    assert "$defs" not in str(document)


def test_a_route_whose_method_disagrees_with_mutates_is_refused() -> None:
    with pytest.raises(ValueError, match="mutates"):
        Route("x", "POST", "/x", "x", {200: "text/plain"})
    with pytest.raises(ValueError, match="mutates"):
        Route("x", "GET", "/x", "x", {200: "text/plain"}, mutates=True)


def test_handlers_must_match_the_route_names() -> None:
    route = Route("x", "GET", "/x", "x", {200: "text/plain"})

    async def handler(request: web.Request) -> web.Response:
        return web.Response()

    with pytest.raises(ValueError, match="missing"):
        build_app([route], {"y": handler})


def test_docs_api_md_carries_the_generated_endpoint_table() -> None:
    table = admin_routes.table()
    assert table in (ROOT / "docs" / "api.md").read_text(), f"paste into docs/api.md:\n{table}"


# -- errors over a real AdminServer -------------------------------------------------------------


def _failing_stats() -> dict[str, Any]:
    raise RuntimeError("secret detail that must not reach the client")


class Admin:
    def __init__(self, base: str, metrics: CollectorRegistry,
                 outcomes: list[ReloadOutcome]) -> None:
        self.base = base
        self.metrics = metrics
        self.outcomes = outcomes  # POST /admin/reload answers the last one

    async def call(self, method: str, path: str, token: str | None = None,
                   body: bytes | None = None) -> tuple[int, dict[str, str], Any]:
        headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session, \
                session.request(method, self.base + path, headers=headers, data=body) as r:
            got: Any = (await r.json() if r.content_type == "application/json"
                        else await r.text())
            return r.status, dict(r.headers), got


@pytest.fixture
async def admin(tmp_path: Path) -> AsyncIterator[Admin]:
    token = tmp_path / "token"
    token.write_text(TOKEN)
    registry = Registry()
    registry.add(make_backend("127.0.0.1:9", "tcp", ("m",)))
    metrics = CollectorRegistry()
    outcomes: list[ReloadOutcome] = [ReloadOutcome(changes=("weights",))]

    async def reload() -> ReloadOutcome:
        return outcomes[-1]

    directory = memory_directory(registry)
    await directory.start()
    server = AdminServer(registry, metrics, Readiness(registry, Lifecycle()), _failing_stats,
                         reload, AdminAuth(AdminConfig(token_file=str(token)), None),
                         reload_certificates=list, directory=directory)
    host, port = await server.start("127.0.0.1", 0)
    handle = Admin(f"http://{host}:{port}", metrics, outcomes)
    try:
        yield handle
    finally:
        await server.close()
        await directory.close()


def _assert_error(status: int, body: Any, want_status: int, want_code: str) -> None:
    assert (status, body["code"]) == (want_status, want_code), body
    assert set(body) == {"error", "code", "timestamp"}
    stamped = datetime.fromisoformat(body["timestamp"])
    assert stamped.utcoffset() == timedelta(0)
    assert abs(datetime.now(UTC) - stamped) < timedelta(minutes=1)


async def test_unknown_path_404_and_wrong_method_405_are_json(admin: Admin) -> None:
    status, _, body = await admin.call("GET", "/no/such/path")
    _assert_error(status, body, 404, "NOT_FOUND")
    status, headers, body = await admin.call("DELETE", "/stats", token=TOKEN)
    _assert_error(status, body, 405, "METHOD_NOT_ALLOWED")
    assert "GET" in headers["Allow"]


async def test_backend_by_id_and_backend_not_found(admin: Admin) -> None:
    status, _, body = await admin.call("GET", "/backends/127.0.0.1:9")
    assert status == 200
    assert (body["id"], body["models"]) == ("127.0.0.1:9", ["m"])
    admin_routes.BackendStats.model_validate(body)
    status, _, body = await admin.call("GET", "/backends/nobody")
    _assert_error(status, body, 404, "BACKEND_NOT_FOUND")
    assert "'nobody'" in body["error"]


async def test_credentials_401_unauthorized_403_forbidden(admin: Admin) -> None:
    status, headers, body = await admin.call("POST", "/admin/reload")
    _assert_error(status, body, 401, "UNAUTHORIZED")
    assert headers["WWW-Authenticate"].startswith("Bearer")
    status, _, body = await admin.call("POST", "/admin/reload", token="wrong")
    _assert_error(status, body, 403, "FORBIDDEN")
    status, _, body = await admin.call("POST", "/admin/reload", token=TOKEN)
    assert (status, body) == (200, {"reloaded": True, "changes": ["weights"]})


async def test_an_unexpected_exception_is_500_internal_error_and_logged(
    admin: Admin, caplog: pytest.LogCaptureFixture
) -> None:
    status, _, body = await admin.call("GET", "/stats")
    _assert_error(status, body, 500, "INTERNAL_ERROR")
    assert "secret detail" not in body["error"]
    assert any(r.exc_info is not None and "secret detail" in str(r.exc_info[1])
               for r in caplog.records)


async def test_a_refused_reload_keeps_its_problems_and_gains_a_timestamp(admin: Admin) -> None:
    admin.outcomes.append(ReloadOutcome(error=InvalidInput(["dispatch.policy: unknown 'x'"])))
    status, _, body = await admin.call("POST", "/admin/reload", token=TOKEN)
    assert (status, body["code"], body["problems"]) == (
        400, "VALIDATION_ERROR", ["dispatch.policy: unknown 'x'"])
    admin_routes.ReloadRefused.model_validate(body)
    admin.outcomes.append(ReloadOutcome(error=RestartRequired(["listener.listen: restart"])))
    status, _, body = await admin.call("POST", "/admin/reload", token=TOKEN)
    assert (status, body["code"]) == (409, "RESTART_REQUIRED")


async def test_requests_are_counted_by_declared_route_never_the_raw_path(admin: Admin) -> None:
    for path in ("/backends/a", "/backends/b", "/backends/127.0.0.1:9", "/nope", "/nope2"):
        await admin.call("GET", path)
    text = generate_latest(admin.metrics).decode()
    assert ('router_admin_requests_total{code="404",method="GET",route="/backends/{id}"} 2.0'
            in text)
    assert ('router_admin_requests_total{code="200",method="GET",route="/backends/{id}"} 1.0'
            in text)
    assert ('router_admin_requests_total{code="404",method="GET",route="<unmatched>"} 2.0'
            in text)
    assert "/backends/a" not in text and "/nope" not in text


async def test_openapi_json_is_served_and_is_the_generated_document(admin: Admin) -> None:
    status, _, body = await admin.call("GET", "/openapi.json")
    assert (status, body) == (200, admin_routes.document())


# -- request bodies validated by the declared model ---------------------------------------------


class Weight(pydantic.BaseModel):
    weight: int = pydantic.Field(ge=0, le=1000)


async def test_a_body_that_fails_its_model_is_400_validation_error() -> None:
    async def put_weight(request: web.Request) -> web.Response:
        body = request[BODY_KEY]
        assert isinstance(body, Weight)
        return json_response({"weight": body.weight})

    route = Route("weight", "PUT", "/weight", "set", {200: Weight}, request=Weight, mutates=True)
    app, _ = build_app([route], {"weight": put_weight})
    runner, (host, port) = await start_app(app, "127.0.0.1", 0)
    try:
        async with aiohttp.ClientSession(f"http://{host}:{port}") as session:
            for bad in (b"{", b'{"weight": -1}', b'{"weight": "x"}', b"[]", b""):
                async with session.put("/weight", data=bad) as response:
                    body = await response.json()
                    _assert_error(response.status, body, 400, "VALIDATION_ERROR")
            async with session.put("/weight", data=b'{"weight": 5}') as response:
                assert (response.status, await response.json()) == (200, {"weight": 5})
    finally:
        await runner.cleanup()
