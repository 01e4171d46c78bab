"""What the fuzz and security tests share: the seed facts of API.md, a client of the real app, the
ledger's state as the audit sees it, and the search for internals leaking into a response."""

import json
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import httpx
import sqlalchemy as sa

from app_clients import bearer
from wallet.http.app import create_app
from wallet.service.audit import verify
from wallet.settings import Settings
from wallet.store.database import Database, create_engine
from wallet.store.tables import metadata

API = "/api/v1"
ALICE = "550e8400-e29b-41d4-a716-446655440000"  # the seed users, as API.md names them
BOB = "6ba7b810-9dad-11d1-80b4-00c04fd430c8"
ASSETS = ("DIAMONDS", "GOLD_COINS", "LOYALTY_POINTS")
FLOWS = ("topup", "bonus", "spend")
# What must never reach a client: SQL, driver and ORM names, stack traces, internal paths.
LEAK_PATTERNS = {
    "SQL keyword": re.compile(
        r"\b(SELECT|INSERT|UPDATE|DELETE|FROM|WHERE|RETURNING|ON CONFLICT|VALUES)\b"
    ),
    "ORM or driver": re.compile(r"sqlalchemy|asyncpg|aiosqlite|sqlite3|psycopg", re.IGNORECASE),
    "stack trace": re.compile(r"Traceback|File \"/|line \d+, in "),
    "internal path": re.compile(r"/work/|site-packages|\.py\b"),
    "connection detail": re.compile(r"Errno \d+|\w+://\S*@|\b\d{1,3}(\.\d{1,3}){3}\b"),
}


def leaks(text: str, *sent: str) -> list[str]:
    """The internals `text` shows, after removing what the client itself sent, as sent or as JSON
    spells it (an answer may echo free text or an unknown id back, and that may be SQL)."""
    spellings = {
        spelling
        for value in sent
        for spelling in (
            value,
            json.dumps(value)[1:-1],
            json.dumps(value, ensure_ascii=False)[1:-1],
        )
        if spelling
    }
    for spelling in sorted(spellings, key=len, reverse=True):
        text = text.replace(spelling, "")
    return [
        f"{name}: {m.group(0)!r}" for name, p in LEAK_PATTERNS.items() for m in p.finditer(text)
    ]


@asynccontextmanager
async def app_client(
    settings: Settings, *, key: str, raise_app_exceptions: bool = True
) -> AsyncIterator[httpx.AsyncClient]:
    """An HTTP client of the real app (its lifespan run) for `settings`, sending the API key
    `key` with every request. With raise_app_exceptions=False a crash is seen as the client
    would see it: the 500 answer."""
    app = create_app(settings)
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=raise_app_exceptions)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(
            transport=transport, base_url="http://wallet.test", headers=bearer(key)
        ) as client,
    ):
        yield client


@dataclass(frozen=True, slots=True)
class LedgerState:
    """What the database holds, as the audit reads it."""

    tables: frozenset[str]
    balances: dict[tuple[str, str], int]
    transactions: int
    entries: int
    audit_failures: list[str]


async def ledger_state(database_url: str) -> LedgerState:
    """The tables, every balance (a system account's: the sum of its rows), the row counts and
    `wallet verify`."""
    database = Database(create_engine(Settings(database_url=database_url)))
    try:
        checks = await verify(database)
        async with database.transaction(is_write=False) as connection:
            tables = await connection.run_sync(
                lambda sync: frozenset(sa.inspect(sync).get_table_names())
            )
            balances = metadata.tables["balances"]
            rows = await connection.execute(
                sa.select(balances.c.account_id, balances.c.asset_symbol, balances.c.balance)
            )
            counts = {
                name: await connection.scalar(
                    sa.select(sa.func.count()).select_from(metadata.tables[name])
                )
                for name in ("transactions", "entries")
            }
    finally:
        await database.close()
    summed: dict[tuple[str, str], int] = {}  # a system account's rows (shards) added up
    for account, asset, balance in rows:
        summed[(account, asset)] = summed.get((account, asset), 0) + balance
    return LedgerState(
        tables=tables,
        balances=summed,
        transactions=counts["transactions"] or 0,
        entries=counts["entries"] or 0,
        audit_failures=[f"{c.name}: {f}" for c in checks for f in c.failures],
    )
