"""The ASGI application: `create_app(settings)` wires the service to the routes."""

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from wallet.http import schemas
from wallet.http.errors import install_error_handlers
from wallet.http.lean import LeanFlows
from wallet.http.limits import BodyLimits
from wallet.http.routes import router
from wallet.logs import configure_logging
from wallet.service.batcher import Batcher
from wallet.service.wallet import Wallet
from wallet.settings import Settings
from wallet.store.database import Database, create_engine

DESCRIPTION = """Virtual currencies for games and loyalty programmes, kept in a double-entry ledger.
Errors are application/problem+json with a stable `code`; every flow takes an idempotency key."""


def create_app(settings: Settings) -> FastAPI:
    """The application for `settings`; the database is opened at startup and closed at shutdown."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        database = Database(create_engine(settings))
        batcher = (
            Batcher(
                database,
                max_size=settings.batch_max_size,
                max_wait_s=settings.batch_max_wait_ms / 1000,
            )
            if settings.batch_max_size > 1
            else None
        )
        app.state.wallet = Wallet(database, batcher=batcher)
        yield
        if batcher is not None:
            await batcher.close()
        await database.close()

    app = FastAPI(
        title="Wallet service", version="1.0.0", description=DESCRIPTION, lifespan=lifespan
    )
    app.include_router(router)
    install_error_handlers(app)
    app.add_middleware(BodyLimits)
    if settings.lean_flows:
        app.add_middleware(LeanFlows, wallet=lambda: app.state.wallet)

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            document = get_openapi(
                title=app.title, version=app.version, description=app.description, routes=app.routes
            )
            components = document.setdefault("components", {}).setdefault("schemas", {})
            problem_schema = schemas.Problem.model_json_schema(
                ref_template="#/components/schemas/{model}"
            )
            components.update(problem_schema.pop("$defs", {}))
            components["Problem"] = problem_schema
            app.openapi_schema = document
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app


def create_app_from_environment() -> FastAPI:
    """Factory for uvicorn workers: reads the settings from the environment."""
    settings = Settings()
    configure_logging(settings.log_level)
    return create_app(settings)
