"""Engine and transactions: PostgreSQL through asyncpg, or an embedded SQLite file (aiosqlite).
Every database error leaves this module as a domain error or as `TransientConflict`."""

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event, exc
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from wallet import metrics
from wallet.domain.errors import Conflict, DatabaseUnavailable, InvalidRequest
from wallet.settings import SYSTEM_SHARDS, Settings
from wallet.store.ledger import ShardPicker

# Serialization failure and deadlock: the transaction did nothing and may simply run again.
RETRYABLE_SQLSTATES = frozenset({"40001", "40P01"})
SQLITE_WRITE = "wallet_sqlite_write"


class TransientConflict(Exception):
    """The database aborted the transaction for a reason a retry resolves."""


class StaleConnection(DatabaseUnavailable):
    """The transaction's first statement found its pooled connection closed by the database (a
    restart, an idle timeout): nothing ran, so the work may run again at once, on a new
    connection. Unavailable to a caller that does not rerun its work."""


# There is no ping before a transaction (a round trip on every batch): a dead connection is found
# by the first statement instead. Each transaction puts its progress on its pooled connection.
_PROGRESS = "wallet_progress"


@dataclass(slots=True)
class _Progress:
    has_run: bool = False  # a statement of the transaction completed


def _note_statement_ran(connection: sa.Connection, *_: Any) -> None:
    progress = connection.info.get(_PROGRESS)
    if progress is not None:
        progress.has_run = True


def create_engine(settings: Settings) -> AsyncEngine:
    """An engine for the configured URL, tuned for this service's transactions."""
    url = sa.make_url(settings.database_url.get_secret_value())
    timeout = settings.database_timeout_s
    if url.get_backend_name() == "sqlite":
        # hide_parameters: a logged error never carries the bound values (emails, metadata).
        engine = create_async_engine(url, pool_timeout=timeout, hide_parameters=True)
        _use_explicit_sqlite_transactions(engine, busy_timeout_ms=int(timeout * 1000))
    else:
        engine = _create_postgres_engine(url, settings)
    _count_connections_in_use(engine)
    event.listen(engine.sync_engine, "after_cursor_execute", _note_statement_ran)
    return engine


def _count_connections_in_use(engine: AsyncEngine) -> None:
    event.listen(engine.sync_engine, "checkout", lambda *_: metrics.POOL_IN_USE.inc())
    event.listen(engine.sync_engine, "checkin", lambda *_: metrics.POOL_IN_USE.dec())


def _create_postgres_engine(url: sa.URL, settings: Settings) -> AsyncEngine:
    timeout = settings.database_timeout_s
    return create_async_engine(
        url,
        pool_size=settings.database_pool_size,
        max_overflow=settings.database_pool_size // 2,
        pool_timeout=timeout,
        hide_parameters=True,
        isolation_level=settings.database_isolation.replace("_", " ").upper(),
        connect_args={"timeout": timeout, "command_timeout": timeout},
    )


def _use_explicit_sqlite_transactions(engine: AsyncEngine, *, busy_timeout_ms: int) -> None:
    """Writers start with BEGIN IMMEDIATE: the sqlite3 driver's lazy DEFERRED BEGIN lets two
    writers both read, then fails one with 'database is locked'."""

    @event.listens_for(engine.sync_engine, "connect")
    def on_connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None  # the driver issues no BEGIN of its own
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute(f"PRAGMA busy_timeout={busy_timeout_ms}")
        cursor.close()

    @event.listens_for(engine.sync_engine, "begin")
    def on_begin(connection: sa.Connection) -> None:
        is_write = connection.get_execution_options().get(SQLITE_WRITE, False)
        connection.exec_driver_sql("BEGIN IMMEDIATE" if is_write else "BEGIN")


class Database:
    """Owns the engine; hands out one connection in one transaction at a time. Its writers
    spread over `system_shards` balance rows of each system account and asset."""

    def __init__(self, engine: AsyncEngine, *, system_shards: int = SYSTEM_SHARDS) -> None:
        self.engine = engine
        self.shards = ShardPicker(system_shards)

    @property
    def dialect(self) -> str:
        return self.engine.dialect.name

    @asynccontextmanager
    async def transaction(
        self, *, is_write: bool, is_snapshot: bool = False, is_schema_change: bool = False
    ) -> AsyncIterator[AsyncConnection]:
        """A connection inside a transaction that commits when the block ends and rolls back
        if it raises. A snapshot transaction sees one state of the database throughout (SQLite's
        read transactions always do). A schema change on SQLite runs with foreign keys off,
        since altering a table rebuilds it, and checks them all before it commits."""
        progress = _Progress()
        try:
            async with self.engine.connect() as connection:
                connection.info[_PROGRESS] = progress
                if is_write and self.dialect == "sqlite":
                    await connection.execution_options(**{SQLITE_WRITE: True})
                if is_snapshot and self.dialect == "postgresql":
                    await connection.execution_options(isolation_level="REPEATABLE READ")
                if is_schema_change and self.dialect == "sqlite":
                    async with _sqlite_foreign_keys_off(connection), connection.begin():
                        yield connection
                        await _check_foreign_keys(connection)
                else:
                    async with connection.begin():
                        yield connection
        except exc.DBAPIError as error:
            if error.connection_invalidated and not progress.has_run:
                raise StaleConnection("the database closed the connection") from error
            translated = _translate(error)
            if translated is None:
                raise  # a defect of the service, not of the request or the database
            raise translated from error
        except (exc.TimeoutError, OSError) as error:
            raise DatabaseUnavailable("the database cannot be reached") from error

    async def is_reachable(self) -> bool:
        """True when a trivial query succeeds."""
        try:
            async with self.transaction(is_write=False) as connection:
                await connection.execute(sa.text("SELECT 1"))
        except DatabaseUnavailable:
            return False
        return True

    async def close(self) -> None:
        await self.engine.dispose()


@asynccontextmanager
async def _sqlite_foreign_keys_off(connection: AsyncConnection) -> AsyncIterator[None]:
    # The pragma is ignored inside a transaction: it goes to the driver before BEGIN.
    driver = (await connection.get_raw_connection()).driver_connection
    assert driver is not None
    await driver.execute("PRAGMA foreign_keys=OFF")
    try:
        yield
    finally:
        await driver.execute("PRAGMA foreign_keys=ON")


async def _check_foreign_keys(connection: AsyncConnection) -> None:
    violations = (await connection.exec_driver_sql("PRAGMA foreign_key_check")).all()
    if violations:
        raise Conflict(f"the schema change leaves {len(violations)} broken foreign keys")


def _translate(error: exc.DBAPIError) -> Exception | None:
    sqlstate = str(getattr(error.orig, "sqlstate", None) or "")
    if sqlstate in RETRYABLE_SQLSTATES:
        return TransientConflict(sqlstate)
    if isinstance(error, exc.IntegrityError) or sqlstate.startswith("23"):
        return Conflict("the request conflicts with the stored data")
    if isinstance(error, exc.DataError) or sqlstate.startswith("22"):
        return InvalidRequest("the database refused a value of the request", field="body")
    if isinstance(error, exc.ProgrammingError):
        return None
    return DatabaseUnavailable("the database cannot be reached")
