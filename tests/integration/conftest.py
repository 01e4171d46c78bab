"""Fixtures of the integration suite: commands with fresh keys, direct SQL that bypasses the
service (to tamper, or to test the database's own constraints), a snapshot of the ledger, and an
empty database on each backend (for the migrations)."""

import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from datetime import datetime, timedelta, tzinfo
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import create_async_engine

import wallet.service.audit
import wallet.service.posting
from wallet.domain.ledger import Action, Command, Flow, UserId
from wallet.service.seed import ALICE
from wallet.store.database import Database
from wallet.store.tables import balances, entries, idempotency_keys, lot_moves, lots, transactions

MakeCommand = Callable[..., Command]


@pytest.fixture
def make_command() -> MakeCommand:
    """A Command builder: Alice's GOLD_COINS unless told, with a fresh key unless given one; a
    bonus's credits expire after `expires_in_days` if given."""

    def build(
        flow: Flow,
        amount: int,
        *,
        user_id: str = ALICE,
        asset: str = "GOLD_COINS",
        key: str | None = None,
        note: str | None = None,
        metadata: Mapping[str, str] | None = None,
        expires_in_days: int | None = None,
    ) -> Command:
        return Command(
            action=Action(flow),
            user_id=UserId(user_id),
            asset_symbol=asset,
            amount=amount,
            idempotency_key=key or f"test-{uuid.uuid4().hex}",
            note=note,
            metadata=metadata,
            credit_expires_in_days=expires_in_days,
        )

    return build


Sql = Callable[..., Awaitable[list[sa.Row[Any]]]]


@pytest.fixture
def sql(database: Database) -> Sql:
    """Run one statement in its own committed transaction on the raw engine, so database errors
    surface as SQLAlchemy's own (IntegrityError), not as the service's translation of them."""

    async def run(statement: str | sa.Executable, **params: Any) -> list[sa.Row[Any]]:
        if isinstance(statement, str):
            statement = sa.text(statement)
        async with database.engine.begin() as connection:
            result = await connection.execute(statement, params)
            return list(result) if result.returns_rows else []

    return run


LedgerState = dict[str, Any]


@pytest.fixture
def ledger_state(database: Database) -> Callable[[], Awaitable[LedgerState]]:
    """Reads everything the posting engine writes: balances (with their paid parts and what their
    lots hold), lots, transaction, entry and lot move ids, keys. A zero balance counts as no
    balance: the engine may create a row at zero when it locks."""

    async def read() -> LedgerState:
        async with database.engine.connect() as connection:

            async def column(selected: sa.ColumnElement[Any]) -> set[Any]:
                return set((await connection.execute(sa.select(selected))).scalars())

            rows = await connection.execute(sa.select(balances))
            lot_rows = await connection.execute(sa.select(lots))
            return {
                "balances": {
                    (r.account_id, r.asset_symbol): (r.balance, r.paid, r.expiring)
                    for r in rows
                    if r.balance or r.paid
                },
                "lots": {
                    (r.account_id, r.asset_symbol, r.kind, r.expires_at): r.remaining
                    for r in lot_rows
                },
                "transactions": await column(transactions.c.id),
                "entries": await column(entries.c.id),
                "lot_moves": await column(lot_moves.c.seq),
                "idempotency_keys": await column(idempotency_keys.c.key),
            }

    return read


StoredRefusal = tuple[str, str, str]  # the request's fingerprint, the refusal's code and detail


@pytest.fixture
def stored_refusal(sql: Sql) -> Callable[[str], Awaitable[StoredRefusal | None]]:
    """What an idempotency key holds of a refusal the ledger gave (API-operations.md: a refusal
    is final); None when the key is free, or holds a transaction instead."""

    async def read(key: str) -> StoredRefusal | None:
        rows = await sql(
            sa.select(
                idempotency_keys.c.request_fingerprint,
                idempotency_keys.c.refusal_code,
                idempotency_keys.c.refusal_detail,
            ).where(idempotency_keys.c.key == key, idempotency_keys.c.refusal_code.is_not(None))
        )
        return (rows[0][0], rows[0][1], rows[0][2]) if rows else None

    return read


@pytest.fixture
def account_balance(sql: Sql) -> Callable[..., Awaitable[int]]:
    """The stored balance of any account, system accounts included (the sum of their rows); 0
    without a row."""

    async def read(account_id: str, asset_symbol: str = "GOLD_COINS") -> int:
        rows = await sql(
            sa.select(balances.c.balance).where(
                balances.c.account_id == account_id, balances.c.asset_symbol == asset_symbol
            )
        )
        return sum(row.balance for row in rows)

    return read


@pytest.fixture
def account_paid(sql: Sql) -> Callable[..., Awaitable[int]]:
    """The stored paid part of any account's balance, system accounts included (the sum of
    their rows); 0 without a row."""

    async def read(account_id: str, asset_symbol: str = "GOLD_COINS") -> int:
        rows = await sql(
            sa.select(balances.c.paid).where(
                balances.c.account_id == account_id, balances.c.asset_symbol == asset_symbol
            )
        )
        return sum(row.paid for row in rows)

    return read


@pytest.fixture(params=["sqlite", "postgresql"])
async def empty_database_url(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    """The URL of a database with nothing in it, on each backend in turn."""
    if request.param == "sqlite":
        yield f"sqlite+aiosqlite:///{tmp_path / 'empty.db'}"
        return
    server_url = sa.make_url(request.getfixturevalue("postgres_url"))
    name = f"wallet_test_migrations_{uuid.uuid4().hex[:12]}"
    admin = create_async_engine(server_url, isolation_level="AUTOCOMMIT")
    try:
        async with admin.connect() as connection:
            await connection.execute(sa.text(f'CREATE DATABASE "{name}"'))
        yield server_url.set(database=name).render_as_string(hide_password=False)
    finally:
        async with admin.connect() as connection:
            await connection.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        await admin.dispose()


@pytest.fixture
def advance(monkeypatch: pytest.MonkeyPatch) -> Callable[[timedelta], None]:
    """Moves the clock of the engine (and of `verify`, which tells active holds by it) forward:
    credits expire without waiting for them."""
    shift = [timedelta(0)]

    class ShiftedDatetime(datetime):
        @classmethod
        def now(cls, tz: tzinfo | None = None) -> datetime:  # type: ignore[override]
            return datetime.now(tz) + shift[0]

    for module in (wallet.service.posting, wallet.service.audit):
        monkeypatch.setattr(module, "datetime", ShiftedDatetime)

    def move(by: timedelta) -> None:
        shift[0] += by

    return move
