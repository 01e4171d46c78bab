"""Clients of the real app with API keys, for every suite: make a key, send it, run the app."""

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx

from wallet.domain.access import Scope
from wallet.http.app import create_app
from wallet.service.access import Access
from wallet.settings import Settings
from wallet.store.database import Database, create_engine


async def create_key(
    database_url: str, *scopes: Scope, reads_per_second: int = 0, writes_per_second: int = 0
) -> str:
    """A new API key with `scopes` (admin unless told) on the database at `database_url`."""
    database = Database(create_engine(Settings(database_url=database_url)))
    access = Access(database, default_reads_per_second=0, default_writes_per_second=0)
    _, secret = await access.create_key(
        label="tests",
        scopes=frozenset(scopes or {Scope.ADMIN}),
        reads_per_second=reads_per_second,
        writes_per_second=writes_per_second,
    )
    await database.close()
    return secret


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@asynccontextmanager
async def app_client(
    settings: Settings, *, key: str | None = None, **app_options: Any
) -> AsyncIterator[httpx.AsyncClient]:
    """An HTTP client of the real app for `settings` (its lifespan run), sending `key`."""
    app = create_app(settings, **app_options)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app),
            base_url="http://wallet.test",
            headers=bearer(key) if key else None,
        ) as http,
    ):
        yield http
