"""What every request passes through before a route runs, and what is recorded after it:
its id, its API key, the key's scope for the route and its rate budget, the request's deadline,
the response headers every answer carries, one log line and the request metrics."""

import asyncio
import re
import secrets
import time
from collections.abc import Callable, Sequence
from typing import Any

import structlog
from opentelemetry import trace
from starlette.routing import BaseRoute, Match, Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from wallet import metrics
from wallet.domain.access import ApiKey
from wallet.domain.access import Scope as KeyScope
from wallet.domain.errors import (
    InsufficientScope,
    RateLimited,
    RequestTimeout,
    Unauthenticated,
    WalletError,
)
from wallet.http.errors import REQUEST_ID, unexpected_problem, wallet_problem
from wallet.http.rate_limits import RateLimits
from wallet.service.access import Access

SCOPE_FIELD = "x-required-scope"
ROUTE_KEY = "wallet.route"  # in the ASGI scope: the template of the route the request matched
UNROUTED = "other"  # no route (404), or a route without this method (405)
PUBLIC: dict[str, Any] = {"security": []}
# Routes the framework adds, which need no key.
PUBLIC_PATHS = frozenset({"/", "/openapi.json", "/docs", "/docs/assets", "/metrics"})
REQUEST_ID_PATTERN = re.compile(r"[A-Za-z0-9_.:-]{1,128}")
READ_METHODS = frozenset({"GET", "HEAD"})
ANSWER_HEADERS = [(b"cache-control", b"no-store"), (b"x-content-type-options", b"nosniff")]
log = structlog.get_logger()


def requires(*scopes: KeyScope) -> dict[str, Any]:
    """A route's declaration of the scope a key needs for it (read by the gate, and shown in
    the OpenAPI document with the answers the gate may give). With several, the gate lets a key
    with any of them through and the route checks what the request needs (an atomic batch)."""
    names = [scope.value for scope in scopes]
    return {
        "security": [
            {scheme: [name]} for name in names for scheme in ("bearerAuth", "apiKeyHeader")
        ],
        SCOPE_FIELD: names[0] if len(names) == 1 else names,
        "responses": {
            "401": _problem_answer(
                "No key, an unknown key or a revoked key.",
                {"WWW-Authenticate": "Always Bearer."},
            ),
            "403": _problem_answer(f"The key lacks the scope {' or '.join(names)}."),
            "429": _problem_answer(
                "Over the key's budget; nothing was recorded.",
                {
                    "Retry-After": "Seconds to wait.",
                    "RateLimit-Policy": 'The budget, e.g. "writes";q=200;w=2.',
                    "RateLimit": 'What remains, e.g. "writes";r=0;t=1.',
                },
            ),
        },
    }


def _problem_answer(description: str, headers: dict[str, str] | None = None) -> dict[str, Any]:
    answer: dict[str, Any] = {
        "description": description,
        "content": {
            "application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}
        },
    }
    if headers:
        answer["headers"] = {
            name: {"description": text, "schema": {"type": "string"}}
            for name, text in headers.items()
        }
    return answer


def required_scope(route: BaseRoute) -> frozenset[KeyScope] | None:
    """The scopes `route` lets through (a key needs one of them); None for a public route. A
    route that declares neither is a defect: `scoped` refuses it when the app is built."""
    extra = getattr(route, "openapi_extra", None) or {}
    if SCOPE_FIELD in extra:
        declared = extra[SCOPE_FIELD]
        return frozenset(map(KeyScope, [declared] if isinstance(declared, str) else declared))
    if extra.get("security") == [] or getattr(route, "path", None) in PUBLIC_PATHS:
        return None
    raise LookupError(f"route {getattr(route, 'path', route)} declares no scope")


def scoped(routes: Sequence[BaseRoute]) -> list[tuple[BaseRoute, frozenset[KeyScope] | None]]:
    """Each route with the scope it needs; raises LookupError for a route that declares none."""
    return [(route, required_scope(route)) for route in routes]


class Gate:
    """Pure ASGI middleware, outermost of the service's own."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        routes: Sequence[tuple[BaseRoute, frozenset[KeyScope] | None]],
        access: Callable[[], Access],
        rate_limits: Callable[[], RateLimits],
        is_auth_disabled: bool,
        timeout_s: float,
    ) -> None:
        self.app = app
        self.access = access
        self.rate_limits = rate_limits
        self.is_auth_disabled = is_auth_disabled
        self.timeout_s = timeout_s
        self.routes = routes
        # Routes without path parameters (the flows among them) are found by one look-up.
        self.fixed_routes = {
            (route.path, method): (route.path, needed)
            for route, needed in routes
            if isinstance(route, Route) and not route.param_convertors
            for method in route.methods or ()
        }

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        headers = dict(scope["headers"])
        request_id = _request_id(headers.get(b"x-request-id"))
        request_id_token = REQUEST_ID.set(request_id)
        structlog.contextvars.bind_contextvars(request_id=request_id)
        trace.get_current_span().set_attribute("wallet.request_id", request_id)
        answer_headers = [(b"x-request-id", request_id.encode()), *ANSWER_HEADERS]
        status = 500
        is_started = False

        async def send_with_headers(message: Message) -> None:
            nonlocal status, is_started
            if message["type"] == "http.response.start":
                status, is_started = message["status"], True
                message["headers"] = [*message.get("headers", ()), *answer_headers]
                if status == 405:
                    message["headers"] = self._with_allow(scope, message["headers"])
            await send(message)

        template, needed = self._route(scope)
        scope[ROUTE_KEY] = template
        try:
            if needed is not None:
                await self._admit(scope, headers, needed, answer_headers)
            async with asyncio.timeout(self.timeout_s):
                await self.app(scope, receive, send_with_headers)
        except WalletError as refusal:
            await wallet_problem(refusal)(scope, receive, send_with_headers)
        except TimeoutError:
            if not is_started:
                timeout = RequestTimeout(
                    f"the request did not finish within {self.timeout_s:g} s; a retry with the "
                    "same idempotency key gives the definite answer"
                )
                await wallet_problem(timeout)(scope, receive, send_with_headers)
        except Exception as error:  # a defect: answered here, so the 500 carries the request id
            if not is_started:
                await unexpected_problem(error)(scope, receive, send_with_headers)
        finally:
            elapsed = time.perf_counter() - started
            method = scope["method"]
            metrics.REQUESTS.labels(template, method, str(status)).inc()
            metrics.REQUEST_SECONDS.labels(template, method).observe(elapsed)
            log.info(
                "request",
                method=method,
                route=template,
                status=status,
                latency_ms=round(elapsed * 1000, 3),
                key_id=key.id if (key := api_key_of(scope)) else None,
            )
            structlog.contextvars.unbind_contextvars("request_id")
            REQUEST_ID.reset(request_id_token)

    def _route(self, scope: Scope) -> tuple[str, frozenset[KeyScope] | None]:
        """The matching route's template and scope; for no route, or another method's route,
        (UNROUTED, None): routing answers 404 or 405 without asking for a key."""
        fixed = self.fixed_routes.get((scope["path"], scope["method"]))
        if fixed is not None:
            return fixed
        for route, needed in self.routes:
            match, _ = route.matches(scope)
            if match is Match.FULL:
                return (route.path if isinstance(route, Route) else UNROUTED), needed
        return UNROUTED, None

    def _with_allow(
        self, scope: Scope, headers: list[tuple[bytes, bytes]]
    ) -> list[tuple[bytes, bytes]]:
        """`headers` of a 405 with an Allow header that lists every method of the path (RFC 9110
        15.5.6). The router answers with the methods of the first route of the path alone, and
        the API has one route per method: GET and POST /keys are two."""
        methods = sorted(
            {
                method
                for route, _ in self.routes
                if isinstance(route, Route) and route.matches(scope)[0] is Match.PARTIAL
                for method in route.methods or ()
            }
        )
        if not methods:
            return headers
        return [
            *((name, value) for name, value in headers if name.lower() != b"allow"),
            (b"allow", ", ".join(methods).encode()),
        ]

    async def _admit(
        self,
        scope: Scope,
        headers: dict[bytes, bytes],
        needed: frozenset[KeyScope],
        answer_headers: list[tuple[bytes, bytes]],
    ) -> None:
        """Find the request's key (kept in the scope for the route and the log line), check its
        scope and take one request from its budget; raise the refusal if any. With auth
        disabled, let the request through."""
        if self.is_auth_disabled:
            log.warning("auth disabled: request let through without a key")
            return
        try:
            key = await self.access().authenticate(_presented_key(headers))
            scope.setdefault("state", {})["api_key"] = key
            if not any(key.allows(scope) for scope in needed):
                raise InsufficientScope(f"this route needs the scope {' or '.join(sorted(needed))}")
        except (Unauthenticated, InsufficientScope) as refusal:
            metrics.AUTH_FAILURES.labels(refusal.code).inc()
            raise
        is_read = scope["method"] in READ_METHODS
        verdict = await self.rate_limits().spend(
            key_id=key.id,
            budget="reads" if is_read else "writes",
            per_second=key.reads_per_second if is_read else key.writes_per_second,
        )
        if verdict is not None:
            answer_headers.extend(verdict.headers())
            if not verdict.is_allowed:
                metrics.RATE_LIMITED.labels(verdict.budget).inc()
                raise RateLimited(
                    f"over the key's {verdict.budget} budget; retry in {verdict.reset_s} s"
                )


def _request_id(presented: bytes | None) -> str:
    if presented is not None:
        text = presented.decode("latin-1")
        if REQUEST_ID_PATTERN.fullmatch(text):
            return text
    return secrets.token_hex(16)


def _presented_key(headers: dict[bytes, bytes]) -> str | None:
    authorization = headers.get(b"authorization")
    if authorization is not None:
        scheme, _, credentials = authorization.decode("latin-1").partition(" ")
        return credentials.strip() if scheme.lower() == "bearer" else None
    api_key = headers.get(b"x-api-key")
    return None if api_key is None else api_key.decode("latin-1").strip()


def api_key_of(scope: Scope) -> ApiKey | None:
    """The key the gate admitted the request with (None with auth disabled)."""
    key: ApiKey | None = scope.get("state", {}).get("api_key")
    return key
