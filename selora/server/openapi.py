"""The OpenAPI document with every route's real error responses, in the one error shape
(``schemas.ErrorResponse``), in place of FastAPI's default 422 validation shape.

Every route can answer 400 (body not UTF-8), 413 (body or JSON over a limit) and 422 (body not
JSON, or not the request schema): ``selora.server.body.BodyGate`` stands in front of all of them;
and 403 (``OriginGate``: an Origin not allowed). Every route but ``auth.OPEN_PATHS`` can answer
401 (no or a bad key) and 429 (the tenant's rate limit). The statuses a route adds are listed in
``ROUTE_ERRORS``; a route missing there is documented with 404 and 503.
"""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from selora.server import schemas
from selora.server.auth import OPEN_PATHS

EVERY_ROUTE = (400, 403, 413, 422)
AUTHENTICATED = (401, 429)
ROUTE_ERRORS: dict[tuple[str, str], tuple[int, ...]] = {
    ("get", "/health"): (),
    ("get", "/metrics"): (),
    ("get", "/ready"): (503,),
    ("get", "/v1/models"): (503,),
    ("get", "/v1/adapters"): (503,),
    ("get", "/v1/adapters/{name}"): (404, 503),
    ("post", "/v1/adapters"): (404, 503),
    ("delete", "/v1/adapters/{name}"): (404, 503),
    ("post", "/v1/embeddings"): (404, 429, 503),
    ("post", "/v1/classify"): (404, 429, 503),
}
DEFAULT_ERRORS = (404, 503)
DESCRIPTIONS = {
    400: "Bad request: body not UTF-8, or an image that cannot be decoded, or an empty input",
    401: "Missing, invalid or revoked API key",
    403: "Origin not allowed, a key without the right (admin), or a quota exceeded",
    404: "Unknown adapter (or adapter files)",
    413: "Body, JSON nesting/number, image, decode cost, text or input count over a limit",
    422: "Body not JSON or not the request schema; adapter malformed, for another base, or unable to serve",
    429: "Overloaded or over the tenant's rate limit: retry after Retry-After seconds",
    503: "Not ready (base model loading) or stopping: retry after Retry-After seconds",
}
RETRY_AFTER = {"Retry-After": {"description": "seconds to wait before retrying", "schema": {"type": "integer"}}}
ERROR_REF = {"$ref": "#/components/schemas/ErrorResponse"}


def error_statuses(method: str, path: str) -> tuple[int, ...]:
    statuses = set(EVERY_ROUTE) | set(ROUTE_ERRORS.get((method, path), DEFAULT_ERRORS))
    return tuple(sorted(statuses if path in OPEN_PATHS else statuses | set(AUTHENTICATED)))


def install(app: FastAPI) -> None:
    """Make ``app.openapi()`` document every route's error responses."""

    def openapi() -> dict:
        if app.openapi_schema is None:
            app.openapi_schema = _document_errors(
                get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
            )
        return app.openapi_schema

    app.openapi = openapi


def _document_errors(spec: dict) -> dict:
    components = spec.setdefault("components", {}).setdefault("schemas", {})
    components.update(schemas.ErrorResponse.model_json_schema(ref_template="#/components/schemas/{model}")["$defs"])
    components["ErrorResponse"] = {
        k: v for k, v in schemas.ErrorResponse.model_json_schema(ref_template="#/components/schemas/{model}").items() if k != "$defs"
    }
    for path, operations in spec.get("paths", {}).items():
        for method, op in operations.items():
            responses = op.setdefault("responses", {})
            for status in error_statuses(method, path):
                responses[str(status)] = {
                    "description": DESCRIPTIONS[status],
                    "content": {"application/json": {"schema": ERROR_REF}},
                    **({"headers": RETRY_AFTER} if status in (429, 503) else {}),
                }
    for unused in ("HTTPValidationError", "ValidationError"):
        components.pop(unused, None)
    return spec
