"""One table from failure type to HTTP status and error ``type``; one JSON error shape:
``{"error": {"type": ..., "message": ...}}`` (DESIGN.md, REST contract)."""

from __future__ import annotations

import logging
import re

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from selora import safejson
from selora.adapters.format import AdapterError, AdapterNotFoundError, BaseModelMismatchError
from selora.models.factory import ModelError
from selora.runtime import inputs, paths, registry, store
from selora.runtime.engine import EngineStoppedError, NoClassifierError, NonFiniteOutputError, OverloadedError
from selora.runtime.slots import DeviceSlotsFullError
from selora.server import openai_compat

log = logging.getLogger(__name__)


class NotReadyError(RuntimeError):
    """The base model is still loading."""


class PayloadTooLargeError(ValueError):
    """The request body is over the size limit."""


class UnauthorizedError(PermissionError):
    """No API key, or a wrong or revoked one."""


class ForbiddenError(PermissionError):
    """A known caller asking for something its key does not allow."""


# exception type -> (status, error type); the most specific class in an exception's MRO wins
ERRORS: dict[type[BaseException], tuple[int, str]] = {
    UnauthorizedError: (401, "unauthorized"),
    ForbiddenError: (403, "forbidden"),
    store.AdapterQuotaError: (403, "adapter_quota_exceeded"),
    store.StorageQuotaError: (403, "storage_quota_exceeded"),
    registry.UnknownAdapterError: (404, "adapter_not_found"),
    registry.InvalidAdapterNameError: (422, "invalid_adapter_name"),
    paths.UnsafePathError: (422, "unsafe_path"),
    registry.AdapterTooLargeError: (413, "adapter_too_large"),
    registry.UnsupportedInputSizeError: (422, "unsupported_input_size"),
    AdapterNotFoundError: (404, "adapter_files_not_found"),
    BaseModelMismatchError: (422, "base_model_mismatch"),
    AdapterError: (422, "invalid_adapter"),
    inputs.ImageDecodeError: (400, "invalid_image"),
    inputs.ImageTooLargeError: (413, "image_too_large"),
    inputs.TextTooLongError: (413, "text_too_long"),
    inputs.TooManyInputsError: (413, "too_many_inputs"),
    inputs.EmptyInputError: (400, "empty_input"),
    inputs.UnsupportedModalityError: (422, "unsupported_modality"),
    NoClassifierError: (422, "no_classifier"),
    NonFiniteOutputError: (422, "non_finite_output"),
    openai_compat.UrlInputError: (422, "url_not_fetched"),
    openai_compat.DimensionsError: (422, "unsupported_dimensions"),
    inputs.InputError: (422, "invalid_input"),
    ModelError: (422, "unsupported_model"),
    PayloadTooLargeError: (413, "payload_too_large"),
    safejson.JSONEncodingError: (400, "invalid_encoding"),
    safejson.JSONLimitError: (413, "json_too_complex"),
    safejson.JSONInputError: (422, "invalid_json"),
    RequestValidationError: (422, "invalid_request"),
    OverloadedError: (429, "overloaded"),
    NotReadyError: (503, "not_ready"),
    DeviceSlotsFullError: (503, "device_slots_full"),
    EngineStoppedError: (503, "unavailable"),
}


def status_of(exc: BaseException) -> tuple[int, str]:
    for cls in type(exc).__mro__:
        if cls in ERRORS:
            return ERRORS[cls]
    return 500, "internal_error"


_OBJECT_REPR = re.compile(r"<[^<>\n]{0,200}? at 0x[0-9a-fA-F]+>")
_ABSOLUTE_PATH = re.compile(r"(?<![\w.~-])(?:/[\w.@+-]+){2,}/?")
MAX_MESSAGE_CHARS = 500


def public_message(message: str) -> str:
    """``message`` without object reprs or absolute paths (a library's message may hold either), shortened."""
    message = _ABSOLUTE_PATH.sub("<path>", _OBJECT_REPR.sub("<object>", message))
    return message if len(message) <= MAX_MESSAGE_CHARS else message[: MAX_MESSAGE_CHARS - 3] + "..."


def error_response(status: int, kind: str, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": {"type": kind, "message": public_message(message)}}, status_code=status, headers=headers)


def install(app: FastAPI, on_error=lambda kind: None) -> None:
    """Route every exception through ``ERRORS``; ``on_error(type)`` counts them."""

    async def handle(request: Request, exc: Exception) -> JSONResponse:
        status, kind = status_of(exc)
        message = str(exc)
        if isinstance(exc, RequestValidationError):
            first = exc.errors()[0] if exc.errors() else {}
            message = f"{'.'.join(str(p) for p in first.get('loc', ()))}: {first.get('msg', 'invalid request')}"
        if status == 500:
            log.exception("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
            message = "internal error"
        headers = {"Retry-After": str(getattr(exc, "retry_after", 1))} if status in (429, 503) else None
        on_error(kind)
        return error_response(status, kind, message, headers)

    async def handle_http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        on_error(kind)
        return error_response(exc.status_code, kind, str(exc.detail), getattr(exc, "headers", None))

    app.add_exception_handler(StarletteHTTPException, handle_http)
    app.add_exception_handler(Exception, handle)
    for cls in ERRORS:
        app.add_exception_handler(cls, handle)
