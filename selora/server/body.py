"""The one place request bodies are read: ``BodyGate``, an ASGI middleware in front of every route.

- A body is read (declared by Content-Length or chunked) up to ``max_bytes`` and no further:
  one byte more is a 413 ``payload_too_large``, and a declared length over the limit is refused
  before any byte is read.
- Every non-empty body that is not ``multipart/form-data`` must be JSON within the limits of
  ``selora.safejson`` (UTF-8, depth, number length, no duplicate keys): otherwise a 400
  (not UTF-8) or 422 (not JSON) or 413 (over a JSON limit), before any route runs.
- The accepted body is replayed to the app, which reads it as usual (``decode_json`` for routes
  that parse it themselves).
"""

from __future__ import annotations

import asyncio

from selora import safejson
from selora.server import errors
from selora.server.errors import PayloadTooLargeError

JSON_LIMITS = safejson.JSONLimits()
OFF_LOOP_BYTES = 1 << 18


def decode_json(body: bytes) -> object:
    """A request body as JSON, within ``JSON_LIMITS``; raises ``safejson.JSONInputError``."""
    return safejson.loads(body, JSON_LIMITS)


def _header(scope, name: bytes) -> bytes | None:
    for key, value in scope.get("headers", ()):
        if key.lower() == name:
            return value
    return None


async def read_body(receive, max_bytes: int) -> bytes:
    """The whole body, refused with ``PayloadTooLargeError`` as soon as it passes ``max_bytes``."""
    chunks, seen = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            break
        chunk = message.get("body", b"")
        seen += len(chunk)
        if seen > max_bytes:
            raise PayloadTooLargeError(f"request body over the limit of {max_bytes} bytes")
        chunks.append(chunk)
        if not message.get("more_body", False):
            break
    return b"".join(chunks)


class BodyGate:
    """ASGI middleware: read every body once within the limits, then hand it to the app."""

    def __init__(self, app, max_bytes: int, on_error=lambda kind: None):
        self.app, self.max_bytes, self.on_error = app, max_bytes, on_error

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        try:
            declared = _header(scope, b"content-length")
            if declared is not None and declared.strip().isdigit() and int(declared) > self.max_bytes:
                raise PayloadTooLargeError(f"request body of {int(declared)} bytes; the limit is {self.max_bytes}")
            body = await read_body(receive, self.max_bytes)
            content_type = (_header(scope, b"content-type") or b"").decode("latin-1").lower()
            if body and not content_type.startswith("multipart/form-data"):
                if len(body) > OFF_LOOP_BYTES:  # a large body is checked off the event loop
                    await asyncio.to_thread(decode_json, body)
                else:
                    decode_json(body)
        except (PayloadTooLargeError, safejson.JSONInputError) as e:
            status, kind = errors.status_of(e)
            self.on_error(kind)
            return await errors.error_response(status, kind, str(e))(scope, receive, send)

        delivered = False

        async def replay():
            nonlocal delivered
            if delivered:
                return await receive()
            delivered = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)
