"""The ASGI application: `create_app(settings)` wires the service to the routes."""

import asyncio
import hmac
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import structlog
import swagger_ui_bundle
from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.openapi.utils import get_openapi
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi.routing import iter_route_contexts
from fastapi.staticfiles import StaticFiles
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.trace.export import SpanExporter
from starlette.responses import Response

from wallet import metrics
from wallet.http import schemas
from wallet.http.errors import install_error_handlers, problem
from wallet.http.gate import Gate, scoped
from wallet.http.lean import LeanFlows
from wallet.http.limits import BodyLimits
from wallet.http.rate_limits import RateLimits
from wallet.http.routes import router
from wallet.http.tracing import (
    OpenTelemetryMiddleware,
    instrument_engine,
    tracer_provider,
    uninstrument,
)
from wallet.logs import configure_logging
from wallet.service.access import Access
from wallet.service.batcher import Batcher
from wallet.service.posting import sweep_expired
from wallet.service.wallet import Wallet
from wallet.settings import Settings
from wallet.store.database import Database, create_engine

DESCRIPTION = """Virtual currencies for games and loyalty programmes, kept in a double-entry ledger.
Errors are application/problem+json with a stable `code`; every flow takes an idempotency key.
Every endpoint but health, /metrics and these docs needs an API key: `Authorization: Bearer wk_...`
(or `X-API-Key`)."""
# Swagger UI's own files, served by the service: /docs works offline and behind a firewall.
SWAGGER_ASSETS = Path(swagger_ui_bundle.swagger_ui_path)
log = structlog.get_logger()
# Expired holds no longer count the moment they expire; marking them `expired` can lag a little.
SWEEP_EVERY_S = 1.0
SWEEP_LIMIT = 100


def create_app(settings: Settings, *, span_exporter: SpanExporter | None = None) -> FastAPI:
    """The application for `settings`; the database is opened at startup and closed at shutdown.
    Spans go to `span_exporter`, else over OTLP when OTEL_EXPORTER_OTLP_ENDPOINT is set."""
    if span_exporter is None and settings.otel_exporter_otlp_endpoint:
        span_exporter = OTLPSpanExporter()
    tracing = None if span_exporter is None else tracer_provider(span_exporter)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        database = Database(create_engine(settings), system_shards=settings.system_shards)
        if tracing is not None:
            instrument_engine(database.engine, tracing)
        batcher = (
            Batcher(
                database,
                max_size=settings.batch_max_size,
                max_wait_s=settings.batch_max_wait_ms / 1000,
                max_in_flight=(
                    min(settings.batches_in_flight, settings.database_pool_size)
                    if database.dialect == "postgresql"
                    else 1
                ),
            )
            if settings.batch_max_size > 1
            else None
        )
        app.state.wallet = Wallet(database, batcher=batcher)
        app.state.access = Access(
            database,
            default_reads_per_second=settings.default_reads_per_second,
            default_writes_per_second=settings.default_writes_per_second,
        )
        redis_url = settings.redis_url.get_secret_value() if settings.redis_url else None
        app.state.rate_limits = RateLimits(redis_url)
        if settings.auth_disabled:
            log.warning("auth disabled (WALLET_AUTH_DISABLED): every request is let through")
        stop_sweeping = asyncio.Event()
        sweeper = asyncio.create_task(
            sweep_expired(database, every_s=SWEEP_EVERY_S, limit=SWEEP_LIMIT, stop=stop_sweeping),
            name="wallet-sweeper",
        )
        yield
        stop_sweeping.set()
        await sweeper
        if batcher is not None:
            await batcher.close()
        await database.close()
        if tracing is not None:
            uninstrument(tracing)
        metrics.forget_this_process()

    app = FastAPI(
        title="Wallet service",
        version="1.3.0",
        description=DESCRIPTION,
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        # The service traces with its own middleware (below); FastAPI's built-in telemetry would
        # only look up the global providers on every request (4% of a worker's CPU) to find none.
        telemetry={"tracing": False, "metrics": False, "logs": False},
    )
    app.include_router(router)
    _add_operator_routes(app, settings)
    install_error_handlers(app)
    app.add_middleware(BodyLimits)
    if settings.lean_flows:
        app.add_middleware(LeanFlows, wallet=lambda: app.state.wallet)
    app.add_middleware(
        Gate,
        routes=scoped([context.route for context in iter_route_contexts(app.routes)]),
        access=lambda: app.state.access,
        rate_limits=lambda: app.state.rate_limits,
        is_auth_disabled=settings.auth_disabled,
        timeout_s=settings.request_timeout_s,
    )
    if tracing is not None:
        app.add_middleware(OpenTelemetryMiddleware, tracer_provider=tracing)

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            document = get_openapi(
                title=app.title, version=app.version, description=app.description, routes=app.routes
            )
            components = document.setdefault("components", {})
            schema_components = components.setdefault("schemas", {})
            problem_schema = schemas.Problem.model_json_schema(
                ref_template="#/components/schemas/{model}"
            )
            schema_components.update(problem_schema.pop("$defs", {}))
            schema_components["Problem"] = problem_schema
            components["securitySchemes"] = {
                "bearerAuth": {"type": "http", "scheme": "bearer", "bearerFormat": "wk_..."},
                "apiKeyHeader": {"type": "apiKey", "in": "header", "name": "X-API-Key"},
            }
            app.openapi_schema = document
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app


def _add_operator_routes(app: FastAPI, settings: Settings) -> None:
    """The routes beside the API: a signpost at /, the docs and /metrics."""
    app.mount("/docs/assets", StaticFiles(directory=SWAGGER_ASSETS), name="swagger-assets")

    async def docs(_: Request) -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url="/openapi.json",
            title="Wallet service: API",
            swagger_js_url="/docs/assets/swagger-ui-bundle.js",
            swagger_css_url="/docs/assets/swagger-ui.css",
            swagger_favicon_url="/docs/assets/favicon-32x32.png",
        )

    async def root(_: Request) -> JSONResponse:
        return JSONResponse(
            {
                "service": "wallet",
                "docs": "/docs",
                "openapi": "/openapi.json",
                "health": "/api/v1/health",
                "ready": "/api/v1/health/ready",
            }
        )

    token = settings.metrics_token.get_secret_value() if settings.metrics_token else None

    async def metrics_endpoint(request: Request) -> Response:
        presented = request.headers.get("authorization", "")
        if token is not None and not _same(presented, f"Bearer {token}"):
            return problem(
                401,
                "unauthenticated",
                "GET /metrics needs Authorization: Bearer <WALLET_METRICS_TOKEN>",
                headers={"WWW-Authenticate": "Bearer"},
            )
        content, media_type = metrics.exposition()
        return Response(content, media_type=media_type)

    app.add_route("/", root, include_in_schema=False)
    app.add_route("/docs", docs, include_in_schema=False)
    app.add_route("/metrics", metrics_endpoint, include_in_schema=False)


def _same(presented: str, expected: str) -> bool:
    """Constant-time comparison: its time says nothing about how much of a token was right."""
    return hmac.compare_digest(presented.encode(), expected.encode())


def create_app_from_environment() -> FastAPI:
    """Factory for uvicorn workers: reads the settings from the environment."""
    settings = Settings()
    configure_logging(settings.log_level)
    return create_app(settings)
