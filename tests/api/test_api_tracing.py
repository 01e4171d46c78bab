"""OpenTelemetry tracing: a request is one SERVER span carrying the request's id, and the
database statements it caused are spans of the same trace under it, whether its flow ran in a
group-commit batch or in a transaction of its own. Without a collector configured no tracing is
installed; with one configured that nobody listens on, the service still starts and answers."""

import uuid
from collections.abc import Sequence

import httpx
import pytest
from api_checks import ALICE, API
from fastapi import FastAPI
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from app_clients import app_client, bearer
from wallet.http.app import create_app
from wallet.http.tracing import OpenTelemetryMiddleware
from wallet.settings import Settings

OTLP_ENDPOINT = "OTEL_EXPORTER_OTLP_ENDPOINT"
# A span of the SQLAlchemy instrumentation carries the database system (db.system, or
# db.system.name under the newer semantic conventions).
DB_SYSTEM_ATTRIBUTES = ("db.system", "db.system.name")
DB_STATEMENT_ATTRIBUTES = ("db.statement", "db.query.text")
MAX_CHAIN = 50


def _attribute(span: ReadableSpan, names: Sequence[str]) -> str | None:
    attributes = span.attributes or {}
    for name in names:
        if name in attributes:
            return str(attributes[name])
    return None


def _is_database_span(span: ReadableSpan) -> bool:
    return _attribute(span, DB_SYSTEM_ATTRIBUTES) is not None


def _describe(spans: Sequence[ReadableSpan]) -> str:
    return "\n  ".join(
        f"{s.name} {s.kind.name} trace={s.context.trace_id:032x} span={s.context.span_id:016x} "
        f"parent={f'{s.parent.span_id:016x}' if s.parent else None} {dict(s.attributes or {})}"
        for s in spans
    )


def _leads_to(span: ReadableSpan, ancestor: ReadableSpan, spans: Sequence[ReadableSpan]) -> bool:
    """Whether `span`'s parent chain, through the recorded spans, reaches `ancestor`."""
    by_id = {s.context.span_id: s for s in spans if s.context.trace_id == ancestor.context.trace_id}
    current: ReadableSpan | None = span
    for _ in range(MAX_CHAIN):
        if current is None or current.parent is None:
            return False
        if current.parent.span_id == ancestor.context.span_id:
            return True
        current = by_id.get(current.parent.span_id)
    return False


@pytest.mark.parametrize("batch_max_size", [128, 1], ids=["group-commit", "own-transaction"])
async def test_a_flow_request_is_a_server_span_with_its_database_spans_beneath(
    settings: Settings, admin_key: str, batch_max_size: int
) -> None:
    exporter = InMemorySpanExporter()
    request_id = f"trace-test-{uuid.uuid4().hex}"
    body = {
        "userId": ALICE,
        "assetSymbol": "GOLD_COINS",
        "amount": 7,
        "idempotencyKey": f"tracing-{uuid.uuid4().hex}",
    }
    traced = settings.model_copy(update={"batch_max_size": batch_max_size})

    # Checked once the block is left: an assertion failing inside it would skip the lifespan's
    # shutdown, leaving the (process-wide) SQLAlchemy instrumentation on for the next tests.
    async with app_client(traced, key=admin_key, span_exporter=exporter) as http:
        response = await http.post(
            f"{API}/wallet/topup", json=body, headers={"X-Request-ID": request_id}
        )
    # The lifespan has ended: the tracer provider is shut down, its spans flushed.
    assert response.status_code == 201, response.text
    assert response.headers["x-request-id"] == request_id

    spans = exporter.get_finished_spans()
    servers = [
        s
        for s in spans
        if s.kind is SpanKind.SERVER and (s.attributes or {}).get("wallet.request_id") == request_id
    ]
    assert len(servers) == 1, f"server spans of {request_id}:\n  {_describe(spans)}"
    (server,) = servers

    in_trace = [s for s in spans if s.context.trace_id == server.context.trace_id]
    database_spans = [s for s in in_trace if _is_database_span(s)]
    assert database_spans, f"no database span in the request's trace:\n  {_describe(spans)}"
    detached = [s for s in database_spans if not _leads_to(s, server, spans)]
    assert not detached, f"database spans not under the server span:\n  {_describe(detached)}"
    # The flow's own statements (not only the key lookup before it) are in the trace: the
    # insert of the transaction row, which a group-commit batch runs for the request.
    statements = [(_attribute(s, DB_STATEMENT_ATTRIBUTES) or s.name) for s in database_spans]
    assert any(
        "INSERT" in text.upper() and "TRANSACTIONS" in text.upper() for text in statements
    ), f"the flow's insert is not in the request's trace: {statements}"
    elsewhere = [
        s for s in spans if _is_database_span(s) and s.context.trace_id != server.context.trace_id
    ]
    posted_elsewhere = [
        s for s in elsewhere if "INSERT" in (_attribute(s, DB_STATEMENT_ATTRIBUTES) or "").upper()
    ]
    assert not posted_elsewhere, (
        f"inserts outside the request's trace:\n  {_describe(posted_elsewhere)}"
    )


def _has_tracing(app: FastAPI) -> bool:
    # Starlette types `cls` as a middleware factory, which a class is too.
    middleware_classes: list[object] = [middleware.cls for middleware in app.user_middleware]
    return OpenTelemetryMiddleware in middleware_classes


async def _health_and_a_read(app: FastAPI, key: str) -> tuple[httpx.Response, httpx.Response]:
    """GET /health and a balance from `app`, its lifespan run around them (so the tracer
    provider, if any, is shut down at the end)."""
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://wallet.test"
        ) as http,
    ):
        health = await http.get(f"{API}/health")
        balance = await http.get(f"{API}/wallet/balance/{ALICE}/GOLD_COINS", headers=bearer(key))
    return health, balance


async def test_without_an_otlp_endpoint_no_tracing_is_installed(
    settings: Settings, admin_key: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(OTLP_ENDPOINT, raising=False)
    untraced = Settings(database_url=settings.database_url)
    assert untraced.otel_exporter_otlp_endpoint is None
    app = create_app(untraced)

    assert not _has_tracing(app)
    health, balance = await _health_and_a_read(app, admin_key)
    assert health.status_code == 200, health.text
    assert balance.status_code == 200, balance.text


async def test_with_an_otlp_endpoint_nobody_listens_on_the_service_still_answers(
    settings: Settings, admin_key: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Port 1 on the loopback: nothing listens there, so every export is refused at once. The
    # exporter retries a refused export until its timeout (10 s unless told) when the provider
    # shuts down at the end of the lifespan; 2 s keeps this test short.
    monkeypatch.setenv(OTLP_ENDPOINT, "http://127.0.0.1:1")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TIMEOUT", "2")
    traced = Settings(database_url=settings.database_url)
    assert traced.otel_exporter_otlp_endpoint == "http://127.0.0.1:1"
    app = create_app(traced)

    assert _has_tracing(app)
    health, balance = await _health_and_a_read(app, admin_key)
    assert health.status_code == 200, health.text
    assert balance.status_code == 200, balance.text
