"""Fixtures shared by every test suite: a migrated, seeded database on SQLite and on PostgreSQL,
the service over it, and an HTTP client of the real app.

PostgreSQL is reached at WALLET_TEST_POSTGRES_URL (default: the local server, user postgres).
Without it the PostgreSQL tests skip with POSTGRES_SKIP_REASON, which `.ci/run` refuses."""

import asyncio
import logging
import os
import uuid
from collections.abc import AsyncIterator, Coroutine, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
import sqlalchemy as sa
import structlog
from sqlalchemy.ext.asyncio import create_async_engine

from app_clients import app_client, create_key
from wallet.service.seed import seed
from wallet.service.wallet import Wallet
from wallet.settings import Settings
from wallet.store.database import Database, create_engine
from wallet.store.migrate import migrate
from wallet.store.tables import metadata

POSTGRES_ADMIN_URL = os.environ.get(
    "WALLET_TEST_POSTGRES_URL", "postgresql+asyncpg://postgres@127.0.0.1:5432/postgres"
)
POSTGRES_SKIP_REASON = "PostgreSQL not reachable"
BACKENDS = ["sqlite", "postgresql"]
T = TypeVar("T")


def _run_apart(work: Coroutine[Any, Any, T]) -> T:
    """Run `work` on its own event loop in another thread: session set-up is reached through
    getfixturevalue from inside a running test loop."""
    with ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(asyncio.run, work).result()


async def _create_postgres_database() -> str:
    admin = create_async_engine(POSTGRES_ADMIN_URL, isolation_level="AUTOCOMMIT")
    name = f"wallet_test_{uuid.uuid4().hex[:12]}"
    try:
        async with admin.connect() as connection:
            await connection.execute(sa.text(f'CREATE DATABASE "{name}"'))
    finally:
        await admin.dispose()
    url = sa.make_url(POSTGRES_ADMIN_URL).set(database=name).render_as_string(hide_password=False)
    database = Database(create_engine(Settings(database_url=url)))
    await migrate(database)
    await database.close()
    return url


async def _drop_postgres_database(url: str) -> None:
    admin = create_async_engine(POSTGRES_ADMIN_URL, isolation_level="AUTOCOMMIT")
    async with admin.connect() as connection:
        name = sa.make_url(url).database
        await connection.execute(sa.text(f'DROP DATABASE "{name}" WITH (FORCE)'))
    await admin.dispose()


@pytest.fixture(autouse=True)
def logging_left_as_found() -> Iterator[None]:
    """A test that configures logging (`wallet serve` through the CLI runner, the log format
    test) points it at its own stdout, which is closed once the test ends: put it back."""
    structlog_config = structlog.get_config()
    handlers = {name: logging.getLogger(name).handlers[:] for name in ("uvicorn", "uvicorn.error")}
    yield
    structlog.configure(**structlog_config)
    for name, saved in handlers.items():
        logging.getLogger(name).handlers = saved


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A fresh PostgreSQL database for this test session, migrated; dropped at the end."""
    try:
        url = _run_apart(_create_postgres_database())
    except (OSError, sa.exc.DBAPIError) as error:
        pytest.skip(f"{POSTGRES_SKIP_REASON} at {POSTGRES_ADMIN_URL}: {error}")
    yield url
    _run_apart(_drop_postgres_database(url))


async def _fresh_data(url: str, *, is_new: bool) -> str:
    """Migrate a new database, or empty a used one; then seed it."""
    database = Database(create_engine(Settings(database_url=url)))
    if is_new:
        await migrate(database)
    else:
        async with database.transaction(is_write=True) as connection:
            tables = ", ".join(table.name for table in metadata.sorted_tables)
            await connection.execute(sa.text(f"TRUNCATE {tables} RESTART IDENTITY"))
    await seed(database)
    await database.close()
    return url


@pytest.fixture(params=BACKENDS)
async def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The URL of a migrated, seeded, otherwise empty database, on each backend in turn."""
    if request.param == "sqlite":
        return await _fresh_data(f"sqlite+aiosqlite:///{tmp_path / 'wallet.db'}", is_new=True)
    return await _fresh_data(request.getfixturevalue("postgres_url"), is_new=False)


@pytest.fixture
async def postgres_database_url(postgres_url: str) -> str:
    """Like `database_url`, on PostgreSQL only: for tests of real concurrency."""
    return await _fresh_data(postgres_url, is_new=False)


@pytest.fixture
def settings(database_url: str) -> Settings:
    return Settings(database_url=database_url)


@pytest.fixture
async def database(settings: Settings) -> AsyncIterator[Database]:
    database = Database(create_engine(settings))
    yield database
    await database.close()


@pytest.fixture
def wallet(database: Database) -> Wallet:
    return Wallet(database)


@pytest.fixture
async def admin_key(settings: Settings) -> str:
    return await create_key(settings.database_url.get_secret_value())


@pytest.fixture
async def client(settings: Settings, admin_key: str) -> AsyncIterator[httpx.AsyncClient]:
    """An HTTP client of the real app over the test database, with an admin key."""
    async with app_client(settings, key=admin_key) as http:
        yield http
