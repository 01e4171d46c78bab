"""Bulk work on PostgreSQL for `wallet bench --populate`: COPY of generated ledger rows inside the
caller's transaction, VACUUM, table sizes, and EXPLAIN of the statements the service's reads run.
Rows are tuples in the order of the column tuples below; COPY skips the checks of the posting
engine, so whoever makes the rows keeps the ledger's invariants."""

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.dialects import postgresql
from sqlalchemy.ext.asyncio import AsyncConnection

from wallet.store.database import Database
from wallet.store.tables import accounts, balances, entries, idempotency_keys, transactions

Row = tuple[Any, ...]
COPY_TIMEOUT_S = 600.0
EXPLAIN_TIMEOUT_S = 60.0
LEDGER_TABLES = ", ".join(
    t.name for t in (accounts, balances, idempotency_keys, transactions, entries)
)
ACCOUNT_COLUMNS = ("id", "is_system", "email", "name", "created_at")
BALANCE_COLUMNS = (
    "account_id",
    "asset_symbol",
    "balance",
    "paid",
    "expiring",
    "chain_hash",
    "entry_count",
)
KEY_COLUMNS = ("key",)
TRANSACTION_COLUMNS = (
    "id",
    "type",
    "user_id",
    "asset_symbol",
    "amount",
    "balance_after",
    "idempotency_key",
    "request_fingerprint",
    "created_at",
    "paid_amount",
)
ENTRY_COLUMNS = (
    "id",
    "transaction_id",
    "account_id",
    "asset_symbol",
    "direction",
    "amount",
    "balance_after",
    "created_at",
    "chain_hash",
    "kind",
    "paid_after",
)
TABLE_SIZE = sa.text(
    "SELECT reltuples::bigint, pg_size_pretty(pg_total_relation_size(oid)) FROM pg_class "
    "WHERE oid = CAST(:name AS regclass)"
)


@dataclass(frozen=True, slots=True)
class Chunk:
    """Ledger rows to COPY together, in KEY_, TRANSACTION_ and ENTRY_COLUMNS order."""

    keys: list[Row]
    transactions: list[Row]
    entries: list[Row]


@dataclass(frozen=True, slots=True)
class BalanceHead:
    """What a balance row records of its chain: the balance and its paid part after the newest
    entry, that entry's link, and how many entries the chain has."""

    balance: int
    paid: int
    link: str
    entries: int


@dataclass(frozen=True, slots=True)
class TableSize:
    name: str
    rows: int  # PostgreSQL's estimate, exact right after ANALYZE
    size: str  # with indexes, as pg_size_pretty writes it


@dataclass(frozen=True, slots=True)
class Plan:
    """A statement, the parameters it ran with, and the lines of its EXPLAIN (ANALYZE, BUFFERS)."""

    statement: str
    parameters: list[Any]
    lines: list[str]


async def count_users_and_transactions(connection: AsyncConnection) -> tuple[int, int]:
    """How many user accounts and transactions are stored."""
    count = sa.select(sa.func.count())
    users = await connection.scalar(count.select_from(accounts).where(~accounts.c.is_system))
    posted = await connection.scalar(count.select_from(transactions))
    return users or 0, posted or 0


async def lock_ledger(connection: AsyncConnection) -> None:
    """Make every writer wait until this transaction ends; readers go on."""
    await connection.execute(sa.text(f"LOCK TABLE {LEDGER_TABLES} IN EXCLUSIVE MODE"))


async def balances_of_accounts(
    connection: AsyncConnection, account_ids: Sequence[str]
) -> dict[tuple[str, str], BalanceHead]:
    """The stored head of each (account, asset) of these accounts, in shard 0 (what the
    loader extends)."""
    rows = await connection.execute(
        sa.select(
            balances.c.account_id,
            balances.c.asset_symbol,
            balances.c.balance,
            balances.c.paid,
            balances.c.chain_hash,
            balances.c.entry_count,
        ).where(balances.c.account_id.in_(account_ids), balances.c.shard == 0)
    )
    return {
        (account, asset): BalanceHead(balance, paid, link, count)
        for account, asset, balance, paid, link, count in rows
    }


async def latest_created_at(connection: AsyncConnection) -> datetime | None:
    """The newest creation time of any account or transaction; None in an empty database."""
    newest: datetime | None = await connection.scalar(
        sa.select(
            sa.func.greatest(
                sa.select(sa.func.max(accounts.c.created_at)).scalar_subquery(),
                sa.select(sa.func.max(transactions.c.created_at)).scalar_subquery(),
            )
        )
    )
    return newest


async def copy_accounts(connection: AsyncConnection, rows: Sequence[Row]) -> None:
    await _copy(connection, accounts, ACCOUNT_COLUMNS, rows)


async def copy_ledger(connection: AsyncConnection, chunk: Chunk) -> None:
    """Keys first: transactions reference them, as entries reference transactions."""
    await _copy(connection, idempotency_keys, KEY_COLUMNS, chunk.keys)
    await _copy(connection, transactions, TRANSACTION_COLUMNS, chunk.transactions)
    await _copy(connection, entries, ENTRY_COLUMNS, chunk.entries)


async def copy_balances(connection: AsyncConnection, rows: Sequence[Row]) -> None:
    await _copy(connection, balances, BALANCE_COLUMNS, rows)


async def upsert_balances(
    connection: AsyncConnection, new_balances: Mapping[tuple[str, str], BalanceHead]
) -> None:
    """Set the head of each (account, asset) of system accounts (they hold no lots), creating
    missing rows."""
    if not new_balances:
        return
    insert = postgresql.insert(balances)
    await connection.execute(
        insert.on_conflict_do_update(
            index_elements=[balances.c.account_id, balances.c.asset_symbol, balances.c.shard],
            set_={
                "balance": insert.excluded.balance,
                "paid": insert.excluded.paid,
                "chain_hash": insert.excluded.chain_hash,
                "entry_count": insert.excluded.entry_count,
            },
        ),
        [
            {
                "account_id": account,
                "asset_symbol": asset,
                "balance": head.balance,
                "paid": head.paid,
                "chain_hash": head.link,
                "entry_count": head.entries,
            }
            for (account, asset), head in new_balances.items()
        ],
    )


async def vacuum_analyze(database: Database) -> None:
    """VACUUM (ANALYZE) the ledger tables, on a connection of its own: VACUUM refuses to run
    inside a transaction."""
    async with database.engine.connect() as connection:
        autocommit = await connection.execution_options(isolation_level="AUTOCOMMIT")
        await autocommit.execute(sa.text(f"VACUUM (ANALYZE) {LEDGER_TABLES}"))


async def table_sizes(connection: AsyncConnection) -> list[TableSize]:
    """Rows and size with indexes of each ledger table that grows with the load."""
    sizes = []
    for table in (accounts, balances, transactions, entries):
        rows, size = (await connection.execute(TABLE_SIZE, {"name": table.name})).one()
        sizes.append(TableSize(table.name, rows, size))
    return sizes


@contextmanager
def captured_statements(database: Database) -> Iterator[dict[str, Any]]:
    """The distinct statements the engine runs inside the block, each with its first parameters."""
    statements: dict[str, Any] = {}

    def capture(_connection: Any, _cursor: Any, statement: str, parameters: Any, *_: Any) -> None:
        statements.setdefault(statement, parameters)

    event.listen(database.engine.sync_engine, "before_cursor_execute", capture)
    try:
        yield statements
    finally:
        event.remove(database.engine.sync_engine, "before_cursor_execute", capture)


async def explain_analyze(connection: AsyncConnection, statements: Mapping[str, Any]) -> list[Plan]:
    """EXPLAIN (ANALYZE, BUFFERS) of each SELECT among `statements`: ANALYZE runs the statement,
    so any other kind is skipped."""
    driver = await _driver(connection)
    plans = []
    for statement, parameters in statements.items():
        if not statement.lstrip().upper().startswith("SELECT"):
            continue
        arguments = list(parameters or ())
        rows = await driver.fetch(
            "EXPLAIN (ANALYZE, BUFFERS) " + statement, *arguments, timeout=EXPLAIN_TIMEOUT_S
        )
        plans.append(Plan(statement, arguments, [row[0] for row in rows]))
    return plans


async def _copy(
    connection: AsyncConnection, table: sa.Table, columns: Sequence[str], rows: Sequence[Row]
) -> None:
    driver = await _driver(connection)
    await driver.copy_records_to_table(
        table.name, records=rows, columns=list(columns), timeout=COPY_TIMEOUT_S
    )


async def _driver(connection: AsyncConnection) -> Any:
    """The asyncpg connection under `connection`, in its transaction."""
    driver = (await connection.get_raw_connection()).driver_connection
    assert driver is not None
    return driver
