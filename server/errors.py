"""The one mapping of errors: a protocol.HoomiError (or a database outage) to an `error`
frame on the socket and to an HTTP status with its JSON body, registered as Starlette
exception handlers (`exception_handlers`).

    HoomiError ─ wire_error() ─> Error frame (+ retry_after_ms for temporary codes)
               └ http_response() ─> status, {"error", "message", "field"}, Retry-After

Any other exception is a bug: HTTP 500 with no details (the traceback goes to the log).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from hoomi_protocol import Error, ErrorCode, HoomiError, Ref
from storage.errors import is_outage

if TYPE_CHECKING:
    from .services import Services

_log = logging.getLogger(__name__)

STATUS = {
    ErrorCode.INVALID: 400, ErrorCode.UNAUTHORIZED: 401, ErrorCode.FORBIDDEN: 403,
    ErrorCode.NOT_FOUND: 404, ErrorCode.TOO_LARGE: 413, ErrorCode.RATE_LIMITED: 429,
    ErrorCode.UNAVAILABLE: 503,
}
# A temporary error without its own wait: ask again after this long.
RETRY_AFTER_MS = 1000


def unavailable(message: str = "storage unavailable") -> HoomiError:
    return HoomiError(ErrorCode.UNAVAILABLE, message)


def as_hoomi_error(exc: BaseException) -> HoomiError | None:
    """The error a client sees for `exc`: itself, `unavailable` for an outage of the
    database, None for a bug (which must propagate)."""
    if isinstance(exc, HoomiError):
        return exc
    if is_outage(exc):
        _log.warning("storage unavailable: %s", exc)
        return unavailable()
    return None


def retry_after_ms(err: HoomiError) -> int | None:
    if err.retry_after_ms is not None:
        return err.retry_after_ms
    return RETRY_AFTER_MS if err.code.temporary else None


def wire_error(err: HoomiError, ref: Ref) -> Error:
    """The `error` frame for `err`, answering the request `ref`."""
    return Error(code=err.code, message=err.message, ref=ref, retry_after_ms=retry_after_ms(err))


def http_response(services: Services, err: HoomiError) -> JSONResponse:
    services.metrics.errors.labels(err.code.value).inc()
    body: dict[str, Any] = {"error": err.code.value, "message": err.message}
    if err.field:
        body["field"] = err.field
    headers: dict[str, str] | None = None
    wait = retry_after_ms(err)
    if wait is not None:  # whole seconds, rounded up, at least 1
        headers = {"Retry-After": str(max(1, math.ceil(wait / 1000)))}
    if err.code == ErrorCode.UNAUTHORIZED:
        headers = {"WWW-Authenticate": "Bearer"}
    return JSONResponse(body, status_code=STATUS[err.code], headers=headers)


async def _hoomi_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HoomiError)
    return http_response(request.app.state.services, exc)


async def _http_exception(request: Request, exc: Exception) -> Response:
    """Starlette's own errors (no such route, wrong method) in our JSON shape too."""
    assert isinstance(exc, HTTPException)
    services: Services = request.app.state.services
    if exc.status_code == 404:
        return http_response(services, HoomiError(ErrorCode.NOT_FOUND, "path: no such route",
                                                  "path"))
    if exc.status_code == 405:
        response = http_response(services, HoomiError(
            ErrorCode.INVALID, f"method: {request.method} is not allowed here", "method"))
        if exc.headers and "Allow" in exc.headers:
            response.headers["Allow"] = exc.headers["Allow"]
        response.status_code = 405
        return response
    return JSONResponse({"error": "invalid", "message": str(exc.detail)},
                        status_code=exc.status_code)


async def _internal_error(request: Request, exc: Exception) -> Response:
    # The traceback goes to the log (Starlette re-raises after this); the client gets
    # JSON without details, which could hold data we must not echo.
    return JSONResponse({"error": "internal", "message": "internal error"}, status_code=500)


exception_handlers: dict[Any, Callable[[Request, Exception], Awaitable[Response]]] = {
    HoomiError: _hoomi_error, HTTPException: _http_exception, Exception: _internal_error,
}
