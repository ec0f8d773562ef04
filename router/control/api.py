"""The admin API declared once: a table of routes from which both the aiohttp application and
the OpenAPI 3.1 document (``GET /openapi.json``) are built, and the one middleware that turns
every failure into a JSON error and counts every request.

A route names its method, path template, summary, the pydantic model of its JSON body (if it
takes one; a body that fails it is 400 VALIDATION_ERROR before the handler runs), the model of
its query parameters (likewise), the model of each response by status (or a media type for a
body that is not JSON, such as /metrics), and whether it mutates (those need the admin
credential, see ``AdminAuth``). Handlers are bound to the table by name, so the document and
docs/api.md are generated without a running server.

Every error is ``{"error": message, "code": CODE, "timestamp": RFC 3339 UTC}`` with the status
of its ``RouterError`` class: unknown paths 404 NOT_FOUND, wrong methods 405
METHOD_NOT_ALLOWED (with ``Allow``), an exception nobody expected 500 INTERNAL_ERROR, logged
with its traceback. Requests are counted by method, declared path template (never the raw
path, which would make one series per backend id or scanner probe) and status.
"""

from __future__ import annotations

import collections
import logging
import re
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http import HTTPStatus
from typing import Any, TypeVar

import orjson
import pydantic
from aiohttp import web
from prometheus_client.core import CounterMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from router.core.errors import (
    ClientProtocolError,
    InternalError,
    InvalidInput,
    MethodNotAllowed,
    RouteNotFound,
    RouterError,
)

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
ModelT = TypeVar("ModelT", bound=pydantic.BaseModel)
MUTATING_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
# Probed by orchestrators (kubelet, load balancers) without credentials; they reveal nothing.
PROBE_PATHS = frozenset({"/healthz", "/readyz"})
# The route label of a request that matched no declared route (404, 405).
UNMATCHED = "<unmatched>"
BODY_KEY = web.RequestKey("body", pydantic.BaseModel)
QUERY_KEY = web.RequestKey("query", pydantic.BaseModel)
_PARAMETER = re.compile(r"\{(\w+)\}")


class ErrorBody(pydantic.BaseModel):
    """Every error the admin API answers."""

    error: str
    code: str
    timestamp: str = pydantic.Field(description="RFC 3339, UTC")


@dataclass(frozen=True, slots=True)
class Route:
    name: str  # binds the handler
    method: str
    path: str  # aiohttp and OpenAPI spell templates alike: /backends/{id}
    summary: str
    # Status -> the pydantic model of the JSON body, or a media type for a body that is not JSON.
    responses: Mapping[int, type[pydantic.BaseModel] | str]
    request: type[pydantic.BaseModel] | None = None
    mutates: bool = False
    # The query parameters, one field each (values arrive as text: the model's fields are
    # not strict); a request whose query fails it is 400 VALIDATION_ERROR.
    query: type[pydantic.BaseModel] | None = None
    parameters: tuple[str, ...] = field(init=False)

    def __post_init__(self) -> None:
        # AdminAuth decides by method, so the declaration must agree with it.
        if self.mutates != (self.method in MUTATING_METHODS):
            raise ValueError(f"{self.method} {self.path}: mutates={self.mutates} disagrees "
                             "with its method")
        object.__setattr__(self, "parameters", tuple(_PARAMETER.findall(self.path)))


def timestamp() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def json_response(body: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(body, option=orjson.OPT_INDENT_2), status=status,
                        content_type="application/json")


def error_response(error: RouterError, status: int | None = None) -> web.Response:
    body = {"error": error.message, "code": error.code, "timestamp": timestamp()}
    return json_response(body, status=status or error.http_status)


def _validating(route: Route, handler: Handler) -> Handler:
    model, query = route.request, route.query
    if model is None and query is None:
        return handler

    async def validate(request: web.Request) -> web.StreamResponse:
        if query is not None:
            # An empty value (?end=) is the parameter left out: a slice's open end.
            given = {key: value for key, value in request.query.items() if value != ""}
            try:
                request[QUERY_KEY] = query.model_validate(given)
            except pydantic.ValidationError as exc:
                raise InvalidInput(problems_of(exc)) from None
        if model is not None:
            try:
                request[BODY_KEY] = model.model_validate_json(await request.read())
            except pydantic.ValidationError as exc:
                raise InvalidInput(problems_of(exc)) from None
        return await handler(request)

    return validate


def problems_of(exc: pydantic.ValidationError) -> list[str]:
    """Each wrong field of a request, "path.to.field: why": the HTTP and gRPC APIs alike."""
    return [f"{'.'.join(map(str, e['loc'])) or 'body'}: {e['msg']}" for e in exc.errors()]


def validated(model: type[ModelT], data: Mapping[str, Any]) -> ModelT:
    """``model`` from ``data``; ``InvalidInput`` naming each wrong field."""
    try:
        return model.model_validate(data)
    except pydantic.ValidationError as exc:
        raise InvalidInput(problems_of(exc)) from None


class ApiErrors:
    """The middleware that answers every failure as JSON and counts every request."""

    def __init__(self) -> None:
        self.requests: collections.Counter[tuple[str, str, str]] = collections.Counter()

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            response = await handler(request)
        except web.HTTPException as exc:
            response = _http_error(exc)
        except RouterError as exc:
            response = error_response(exc)
        except Exception:
            log.exception("admin API: %s %s failed", request.method, request.path)
            response = error_response(InternalError("the router failed to answer this "
                                                    "request; its log has the cause"))
        resource = request.match_info.route.resource
        route = resource.canonical if resource is not None else UNMATCHED
        self.requests[(request.method, route, str(response.status))] += 1
        return response

    def collector(self) -> Collector:
        return _RequestsCollector(self.requests)


def _http_error(exc: web.HTTPException) -> web.StreamResponse:
    if exc.status < 400:
        return exc  # a redirect is an answer, not an error
    if isinstance(exc, web.HTTPNotFound):
        return error_response(RouteNotFound("no such path in the admin API (GET /openapi.json "
                                            "lists them)"))
    if isinstance(exc, web.HTTPMethodNotAllowed):
        allowed = ", ".join(sorted(exc.allowed_methods))
        response = error_response(MethodNotAllowed(f"{exc.method} is not allowed here; "
                                                   f"allowed: {allowed}"))
        response.headers["Allow"] = allowed
        return response
    return error_response(ClientProtocolError(exc.reason), status=exc.status)


class _RequestsCollector(Collector):
    def __init__(self, counts: collections.Counter[tuple[str, str, str]]) -> None:
        self._counts = counts

    def collect(self) -> Iterable[Metric]:
        family = CounterMetricFamily(
            "router_admin_requests", "Admin API requests by method, declared route and status",
            labels=["method", "route", "code"])
        for labels, count in sorted(self._counts.items()):
            family.add_metric(list(labels), count)
        yield family


def build_app(routes: Iterable[Route], handlers: Mapping[str, Handler],
              middlewares: Iterable[Any] = ()) -> tuple[web.Application, ApiErrors]:
    """The application serving ``routes`` with ``handlers`` (one per route name, no more, no
    fewer), behind the error middleware and then ``middlewares``."""
    routes = list(routes)
    names = {route.name for route in routes}
    if names != set(handlers):
        raise ValueError(f"handlers do not match the routes: missing {names - set(handlers)}, "
                         f"extra {set(handlers) - names}")
    errors = ApiErrors()
    app = web.Application(middlewares=[errors.middleware, *middlewares])
    for route in routes:
        app.router.add_route(route.method, route.path,
                             _validating(route, handlers[route.name]))
    return app, errors


# -- the OpenAPI document ----------------------------------------------------------------------


def openapi(routes: Iterable[Route], title: str, version: str) -> dict[str, Any]:
    """The OpenAPI 3.1 document of ``routes``: every schema from its pydantic model, nested
    models (``$defs``) under ``components/schemas``."""
    schemas: dict[str, Any] = {}

    def ref(model: type[pydantic.BaseModel]) -> dict[str, Any]:
        schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
        for name, nested in schema.pop("$defs", {}).items():
            _add(schemas, name, nested)
        _add(schemas, model.__name__, schema)
        return {"$ref": f"#/components/schemas/{model.__name__}"}

    def content(declared: type[pydantic.BaseModel] | str) -> dict[str, Any]:
        if isinstance(declared, str):
            return {declared: {"schema": {"type": "string"}}}
        return {"application/json": {"schema": ref(declared)}}

    paths: dict[str, dict[str, Any]] = {}
    for route in routes:
        responses = {str(status): {"description": HTTPStatus(status).phrase,
                                   "content": content(declared)}
                     for status, declared in sorted(route.responses.items())}
        responses["default"] = {"description": "An error", "content": content(ErrorBody)}
        operation: dict[str, Any] = {"operationId": route.name, "summary": route.summary,
                                     "responses": responses}
        parameters = [{"name": name, "in": "path", "required": True,
                       "schema": {"type": "string"}} for name in route.parameters]
        if route.query is not None:
            parameters += _query_parameters(route.query)
        if parameters:
            operation["parameters"] = parameters
        if route.request is not None:
            operation["requestBody"] = {"required": True, "content": content(route.request)}
        if route.mutates:
            operation["security"] = [{"bearer": []}, {"clientCertificate": []}]
        paths.setdefault(route.path, {})[route.method.lower()] = operation
    return {
        "openapi": "3.1.0",
        "info": {"title": title, "version": version},
        "paths": paths,
        "components": {"schemas": schemas, "securitySchemes": {
            "bearer": {"type": "http", "scheme": "bearer",
                       "description": "the token in admin.token_file"},
            "clientCertificate": {"type": "mutualTLS",
                                  "description": "a certificate admin.tls lets in"},
        }},
    }


def _query_parameters(model: type[pydantic.BaseModel]) -> list[dict[str, Any]]:
    schema = model.model_json_schema()
    required = set(schema.get("required", ()))
    out = []
    for name, prop in schema["properties"].items():
        prop = dict(prop)
        description = prop.pop("description", None)
        prop.pop("title", None)
        parameter = {"name": name, "in": "query", "required": name in required,
                     "schema": prop}
        if description:
            parameter["description"] = description
        out.append(parameter)
    return out


def _add(schemas: dict[str, Any], name: str, schema: dict[str, Any]) -> None:
    if schemas.setdefault(name, schema) != schema:
        raise ValueError(f"two different models are named {name}")


def endpoint_table(routes: Iterable[Route]) -> str:
    """The Markdown table of ``routes`` that docs/api.md carries."""
    lines = ["| method | path | summary | answers | credential |", "|---|---|---|---|---|"]
    for route in routes:
        answers = ", ".join(
            f"{status} `{declared if isinstance(declared, str) else declared.__name__}`"
            for status, declared in sorted(route.responses.items()))
        credential = ("always" if route.mutates else
                      "never" if route.path in PROBE_PATHS else "off loopback")
        lines.append(f"| {route.method} | `{route.path}` | {route.summary} | {answers} | "
                     f"{credential} |")
    return "\n".join(lines) + "\n"
