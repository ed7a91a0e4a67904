"""The OpenAPI document lists every route's real error responses in the one error shape."""

from __future__ import annotations

import json

from selora.server.openapi import error_statuses


def test_every_route_documents_its_errors_in_the_error_shape(hostile_client):
    spec = hostile_client.get("/openapi.json").json()
    assert "HTTPValidationError" not in json.dumps(spec)
    error = spec["components"]["schemas"]["ErrorResponse"]
    assert error["required"] == ["error"]
    assert set(spec["components"]["schemas"]["ErrorDetail"]["properties"]) == {"type", "message"}
    operations = [(m, p, op) for p, ops in spec["paths"].items() for m, op in ops.items()]
    assert len(operations) >= 10
    for method, path, op in operations:
        statuses = {int(s) for s in op["responses"] if s != "200"}
        assert statuses == set(error_statuses(method, path)) and {400, 413, 422} <= statuses, (method, path)
        for status in statuses:
            schema = op["responses"][str(status)]["content"]["application/json"]["schema"]
            assert schema == {"$ref": "#/components/schemas/ErrorResponse"}
    embeddings = spec["paths"]["/v1/embeddings"]["post"]["responses"]
    assert {"404", "429", "503"} <= set(embeddings) and "Retry-After" in embeddings["429"]["headers"]
