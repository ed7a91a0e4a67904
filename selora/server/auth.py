"""Who may call what: the browser Origin gate, API keys, per-tenant rate limits, and the rules
mapping a caller's adapter reference to a ``tenant/name`` address.

- ``OriginGate`` (outermost): a request whose ``Origin`` is not an allowed one gets 403 before
  anything else runs, simple cross-origin POSTs (forms, ``text/plain``) included. Preflights and
  CORS headers for allowed origins come from Starlette's ``CORSMiddleware`` inside it.
- ``Authenticate``: once the store holds a key, every path but ``/health`` and ``/ready`` needs
  ``Authorization: Bearer <key>``; each request reads the key's row (one indexed SQLite read,
  no cache), so a revocation holds from the next request on; before, a key sent anyway is
  ignored (the OpenAI SDK always sends one). Then the tenant's token bucket.
  The caller lands in ``request.state.caller``.
- A tenant uses its own adapters (``name`` or ``<tenant>/name``) and the shared ones
  (``shared/name``); another tenant's adapter is "unknown", exactly as an absent one. Admins
  address any adapter as ``tenant/name`` and alone change shared ones.
"""

from __future__ import annotations

import math
import threading
import time

from fastapi import Depends, Request
from fastapi.security import HTTPBearer

from selora.runtime.registry import UnknownAdapterError, address
from selora.runtime.store import SHARED_TENANT, AdapterStore, Caller
from selora.server import errors
from selora.server.errors import ForbiddenError, UnauthorizedError

OPEN_PATHS = ("/health", "/ready")


class OriginGate:
    """ASGI middleware: 403 for a request carrying an ``Origin`` outside ``allowed``."""

    def __init__(self, app, allowed: tuple[str, ...]):
        self.app, self.allowed = app, set(allowed)

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            origin = dict(scope.get("headers", [])).get(b"origin")
            if origin is not None and origin.decode("latin-1").rstrip("/") not in self.allowed:
                response = errors.error_response(403, "origin_not_allowed", "requests from this browser origin are not allowed")
                return await response(scope, receive, send)
        await self.app(scope, receive, send)


class TokenBuckets:
    """One token bucket per tenant: ``rate`` tokens a second, at most ``burst``."""

    def __init__(self):
        self._buckets: dict[str, tuple[float, float]] = {}  # tenant -> (tokens, when)
        self._lock = threading.Lock()

    def take(self, tenant: str, rate: float, burst: int | None) -> float:
        """0 if a token was taken, else the seconds until one is available."""
        capacity = float(burst or max(1, math.ceil(rate)))
        now = time.monotonic()
        with self._lock:
            tokens, when = self._buckets.get(tenant, (capacity, now))
            tokens = min(capacity, tokens + (now - when) * rate)
            if tokens >= 1:
                self._buckets[tenant] = (tokens - 1, now)
                return 0.0
            self._buckets[tenant] = (tokens, now)
            return (1 - tokens) / rate


class Authenticate:
    """ASGI middleware: the caller of every request but ``OPEN_PATHS``, or 401 / 429."""

    def __init__(self, app, store: AdapterStore, on_request=lambda tenant: None, on_error=lambda kind: None):
        self.app, self.store, self.on_request, self.on_error = app, store, on_request, on_error
        self.buckets = TokenBuckets()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS:
            return await self.app(scope, receive, send)
        try:
            caller = self.identify(dict(scope.get("headers", [])).get(b"authorization"))
        except UnauthorizedError as e:
            return await self._refuse(scope, receive, send, 401, "unauthorized", str(e), {"WWW-Authenticate": "Bearer"})
        if caller.rate_per_s is not None:
            wait = self.buckets.take(caller.tenant, caller.rate_per_s, caller.burst)
            if wait > 0:
                return await self._refuse(scope, receive, send, 429, "rate_limited",
                                          f"over the rate limit of {caller.rate_per_s:g} requests/s",
                                          {"Retry-After": str(max(1, math.ceil(wait)))})
        self.on_request(caller.tenant)
        scope.setdefault("state", {})["caller"] = caller
        await self.app(scope, receive, send)

    def identify(self, header: bytes | None) -> Caller:
        if not self.store.has_keys():  # a keyless store serves everyone; a key sent anyway (the OpenAI SDK always sends one) changes nothing
            return self.store.anonymous()
        if header is None:
            raise UnauthorizedError("missing API key: send 'Authorization: Bearer <key>'")
        scheme, _, key = header.decode("latin-1").partition(" ")
        caller = self.store.authenticate(key.strip()) if scheme.lower() == "bearer" else None
        if caller is None:
            raise UnauthorizedError("invalid or revoked API key")
        return caller

    async def _refuse(self, scope, receive, send, status: int, kind: str, message: str, headers: dict) -> None:
        self.on_error(kind)
        await errors.error_response(status, kind, message, headers)(scope, receive, send)


BEARER = HTTPBearer(auto_error=False, description="an API key of `selora keys create`")


def get_caller(request: Request, _: object = Depends(BEARER)) -> Caller:
    """The caller ``Authenticate`` found (the dependency on ``BEARER`` documents the scheme)."""
    return request.state.caller


def require_admin(caller: Caller) -> None:
    if not caller.admin:
        raise ForbiddenError("this needs an admin key")


def _split(caller: Caller, ref: str) -> tuple[str, str]:
    tenant, sep, name = ref.partition("/")
    return (tenant, name) if sep else (caller.tenant, ref)


def _not_found(ref: str) -> UnknownAdapterError:
    return UnknownAdapterError(f"unknown adapter {ref.rpartition('/')[2]!r}")  # the same words as for an absent one


def can_use(caller: Caller, tenant: str) -> bool:
    return caller.admin or tenant in (caller.tenant, SHARED_TENANT)


def usable(caller: Caller, ref: str) -> str:
    """The address of the adapter ``ref`` names for ``caller`` to list, read or run."""
    tenant, name = _split(caller, ref)
    if not can_use(caller, tenant):
        raise _not_found(ref)
    return address(tenant, name)


def writable(caller: Caller, ref: str) -> tuple[str, str]:
    """``(tenant, name)`` of the adapter ``ref`` names for ``caller`` to upload, replace or delete."""
    tenant, name = _split(caller, ref)
    if caller.admin or tenant == caller.tenant:
        return tenant, name
    if tenant == SHARED_TENANT:
        raise ForbiddenError("shared adapters are changed by admin keys only")
    raise _not_found(ref)


def shown_name(caller: Caller, tenant: str, name: str) -> str:
    """How ``caller`` addresses ``tenant/name``: bare for its own, else ``tenant/name``."""
    return name if tenant == caller.tenant else address(tenant, name)
