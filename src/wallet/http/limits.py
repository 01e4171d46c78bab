"""Refuses request bodies that are too large (413), not JSON (415) or not valid JSON (400) before
any route runs, and decodes JSON one way for every route."""

import json
from typing import Any

from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from wallet.http.errors import problem
from wallet.http.gate import ROUTE_KEY, UNROUTED

MAX_BODY_BYTES = 64 * 1024
METHODS_WITH_BODY = frozenset({"POST", "PUT", "PATCH"})


async def read_json_body(scope: Scope, receive: Receive) -> bytes | Response | None:
    """The whole body, or the problem response refusing it; None if the client went away."""
    headers = dict(scope["headers"])
    if not _is_json(headers.get(b"content-type", b"").decode("latin-1")):
        return problem(415, "unsupported_media_type", "the body must be application/json")
    declared = headers.get(b"content-length", b"0")
    if not declared.isdigit() or int(declared) > MAX_BODY_BYTES:
        return _too_large()
    body = b""
    more = True
    while more:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        body += message.get("body", b"")
        more = message.get("more_body", False)
        if len(body) > MAX_BODY_BYTES:
            return _too_large()
    return body


def decode_json(body: bytes) -> Any:
    """Strict JSON: NaN and Infinity are refused (ValueError; RecursionError for nesting too deep
    to decode), and an integer too long to be an
    amount decodes as 10^20 of its sign, so it fails validation as out of range instead of
    costing a quadratic parse or tripping Python's 4300-digit limit."""
    return json.loads(body, parse_constant=_refuse_constant, parse_int=_bounded_int)


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _bounded_int(text: str) -> int:
    if len(text) <= 20:
        return int(text)
    return -(10**20) if text.startswith("-") else 10**20


def _is_json(content_type: str) -> bool:
    media_type = content_type.split(";", 1)[0].strip().lower()
    return media_type == "application/json" or (
        media_type.startswith("application/") and media_type.endswith("+json")
    )


def _too_large() -> Response:
    return problem(413, "payload_too_large", f"the body is larger than {MAX_BODY_BYTES} bytes")


class BodyLimits:
    """Pure ASGI middleware: the whole body is read, up to the limit, before the app sees it."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] != "http"
            or scope["method"] not in METHODS_WITH_BODY
            or scope.get(ROUTE_KEY, UNROUTED) == UNROUTED  # routing answers 404 or 405 first
        ):
            await self.app(scope, receive, send)
            return
        body = await read_json_body(scope, receive)
        if isinstance(body, Response):
            await body(scope, receive, send)
            return
        if body is None:
            return
        try:
            decoded = decode_json(body)
        except (ValueError, RecursionError):
            await problem(400, "malformed_json", "the body is not valid JSON")(scope, receive, send)
            return
        # The framework parses the body again: hand it the strictly decoded values.
        await self.app(scope, _replay(json.dumps(decoded).encode(), receive), send)


def _replay(body: bytes, receive: Receive) -> Receive:
    """A receive that hands the app the body already read, then defers to the real one."""
    sent = False

    async def replayed() -> Message:
        nonlocal sent
        if sent:
            return await receive()
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return replayed
