"""The one table from errors to HTTP statuses, and the problem+json (RFC 9457) bodies."""

from collections.abc import Sequence
from contextvars import ContextVar
from http import HTTPStatus
from typing import Any

import structlog
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from wallet.domain import errors

PROBLEM_MEDIA_TYPE = "application/problem+json"
STATUS_OF: dict[type[errors.WalletError], int] = {
    errors.UnknownUser: 404,
    errors.UnknownAsset: 404,
    errors.UnknownTransaction: 404,
    errors.UnknownHold: 404,
    errors.UserExists: 409,
    errors.AssetExists: 409,
    errors.HoldNotActive: 409,
    errors.RefundExceedsOriginal: 409,
    errors.CaptureExceedsHold: 422,
    errors.NotRefundable: 422,
    errors.IdempotencyKeyReused: 409,
    errors.Conflict: 409,
    errors.InsufficientFunds: 422,
    errors.BalanceLimitExceeded: 422,
    errors.InvalidRequest: 422,
    errors.DatabaseUnavailable: 503,
    errors.Unauthenticated: 401,
    errors.InsufficientScope: 403,
    errors.UnknownKey: 404,
    errors.RateLimited: 429,
    errors.RequestTimeout: 503,
}
# Headers an error's answer must carry besides the body.
HEADERS_OF: dict[type[errors.WalletError], dict[str, str]] = {
    errors.Unauthenticated: {"WWW-Authenticate": "Bearer"},
    errors.DatabaseUnavailable: {"Retry-After": "1"},
    errors.RequestTimeout: {"Retry-After": "1"},
}
CODE_OF_HTTP_STATUS = {
    400: "bad_request",
    404: "not_found",
    405: "method_not_allowed",
    413: "payload_too_large",
    415: "unsupported_media_type",
}
log = structlog.get_logger()
# The id of the request being answered, set by the gate (gate.py) for every problem body.
REQUEST_ID: ContextVar[str | None] = ContextVar("request_id", default=None)


def problem(
    status: int,
    code: str,
    detail: str,
    *,
    errors: list[dict[str, str]] | None = None,
    headers: dict[str, str] | None = None,
    operation_index: int | None = None,
) -> JSONResponse:
    body: dict[str, Any] = {
        "type": f"urn:wallet:problem:{code}",
        "title": HTTPStatus(status).phrase,
        "status": status,
        "detail": detail,
        "code": code,
        "requestId": REQUEST_ID.get(),
    }
    if errors is not None:
        body["errors"] = errors
    if operation_index is not None:
        body["operationIndex"] = operation_index
    return JSONResponse(body, status_code=status, headers=headers, media_type=PROBLEM_MEDIA_TYPE)


def wallet_problem(error: errors.WalletError) -> JSONResponse:
    if isinstance(error, errors.DatabaseUnavailable):
        log.warning("database unavailable", cause=repr(error.__cause__))
    field_errors = (
        [{"field": error.field, "message": error.detail}]
        if isinstance(error, errors.InvalidRequest)
        else None
    )
    # The nearest class the tables know: the store raises a kind of DatabaseUnavailable too.
    known = next(cls for cls in type(error).__mro__ if cls in STATUS_OF)
    headers = dict(HEADERS_OF.get(known, {}))
    if isinstance(error, errors.Refusal) and error.is_replay:
        headers["Idempotent-Replayed"] = "true"
    return problem(
        STATUS_OF[known],
        error.code,
        error.detail,
        errors=field_errors,
        headers=headers,
        operation_index=error.operation_index,
    )


def validation_problem(details: Sequence[Any]) -> JSONResponse:
    """400 for a body that is not JSON, else 422 naming each field. Locations are the
    framework's: ("body", "amount"), ("header", "Idempotency-Key"), ("query", "limit")."""
    if any(d["type"] == "json_invalid" for d in details):
        return problem(400, "malformed_json", "the body is not valid JSON")
    field_errors = [
        {"field": ".".join(str(p) for p in d["loc"][1:]) or str(d["loc"][0]), "message": d["msg"]}
        for d in details
    ]
    return problem(422, "validation_error", "the request is invalid", errors=field_errors)


def unexpected_problem(error: Exception) -> JSONResponse:
    log.exception("unexpected error", exc_info=error)
    return problem(500, "internal_error", "the service failed; the request may be retried")


async def on_wallet_error(_request: Request, error: Exception) -> JSONResponse:
    assert isinstance(error, errors.WalletError)
    return wallet_problem(error)


async def on_validation_error(_request: Request, error: Exception) -> JSONResponse:
    assert isinstance(error, RequestValidationError)
    return validation_problem(error.errors())


async def on_http_error(_request: Request, error: Exception) -> JSONResponse:
    assert isinstance(error, HTTPException)
    code = CODE_OF_HTTP_STATUS.get(error.status_code, "http_error")
    response = problem(error.status_code, code, str(error.detail))
    response.headers.update(error.headers or {})  # e.g. Allow, which a 405 must carry
    return response


async def on_unexpected_error(_request: Request, error: Exception) -> JSONResponse:
    return unexpected_problem(error)


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(errors.WalletError, on_wallet_error)
    app.add_exception_handler(RequestValidationError, on_validation_error)
    app.add_exception_handler(HTTPException, on_http_error)
    app.add_exception_handler(Exception, on_unexpected_error)
