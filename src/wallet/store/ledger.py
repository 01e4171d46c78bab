"""Every statement of the posting engine. Each takes a whole batch, so a batch of any size costs
the same few round trips. Row locks are taken only in `lock_balances`, in one global order."""

from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection

from wallet.domain.ledger import AccountId, Entry, Flow, Transaction, TransactionId, UserId
from wallet.store.tables import accounts, assets, balances, entries, idempotency_keys, transactions

BalanceKey = tuple[AccountId, str]


def insert_on_conflict(connection: AsyncConnection, table: sa.Table) -> Any:
    """INSERT with this dialect's ON CONFLICT support."""
    dialect = postgresql if connection.dialect.name == "postgresql" else sqlite
    return dialect.insert(table)


async def existing_users(connection: AsyncConnection, user_ids: Iterable[str]) -> set[str]:
    """The given ids that name users (not system accounts)."""
    rows = await connection.execute(
        sa.select(accounts.c.id).where(accounts.c.id.in_(set(user_ids)), ~accounts.c.is_system)
    )
    return set(rows.scalars())


async def existing_assets(connection: AsyncConnection, symbols: Iterable[str]) -> set[str]:
    rows = await connection.execute(
        sa.select(assets.c.symbol).where(assets.c.symbol.in_(set(symbols)))
    )
    return set(rows.scalars())


async def claim_keys(connection: AsyncConnection, keys: Iterable[str]) -> set[str]:
    """Insert the keys not yet taken and return them. On PostgreSQL a key that another
    transaction holds uncommitted makes this wait for that transaction to end. Keys go in sorted
    order, so two batches claiming the same keys wait on each other in one order, not in a cycle."""
    ordered = sorted(set(keys))
    if not ordered:
        return set()
    statement = (
        insert_on_conflict(connection, idempotency_keys)
        .values([{"key": key} for key in ordered])
        .on_conflict_do_nothing(index_elements=["key"])
        .returning(idempotency_keys.c.key)
    )
    return set((await connection.execute(statement)).scalars())


async def release_keys(connection: AsyncConnection, keys: Iterable[str]) -> None:
    """Forget claims whose commands failed: a failed request records nothing."""
    keys = set(keys)
    if keys:
        await connection.execute(
            sa.delete(idempotency_keys).where(idempotency_keys.c.key.in_(keys))
        )


async def stored_requests(
    connection: AsyncConnection, keys: Iterable[str]
) -> dict[str, tuple[str, Transaction]]:
    """For keys taken by earlier requests: the request's fingerprint and the transaction it made."""
    keys = set(keys)
    if not keys:
        return {}
    rows = await connection.execute(
        sa.select(transactions).where(transactions.c.idempotency_key.in_(keys))
    )
    return {row.idempotency_key: (row.request_fingerprint, to_transaction(row)) for row in rows}


async def lock_balances(
    connection: AsyncConnection, keys: Iterable[BalanceKey]
) -> dict[BalanceKey, int]:
    """Lock the balance rows of `keys`, creating missing ones at zero, and return their balances.

    Every transaction locks in ascending (account, asset) order, so none waits on another in a
    cycle. Rows are created first with ON CONFLICT DO NOTHING, so concurrent first top-ups of a
    user never race on the insert. On SQLite, BEGIN IMMEDIATE already holds the one write lock."""
    ordered = sorted(set(keys))
    if not ordered:
        return {}
    await connection.execute(
        insert_on_conflict(connection, balances)
        .values([{"account_id": a, "asset_symbol": s, "balance": 0} for a, s in ordered])
        .on_conflict_do_nothing(index_elements=["account_id", "asset_symbol"])
    )
    rows = await connection.execute(
        sa.select(balances.c.account_id, balances.c.asset_symbol, balances.c.balance)
        .where(sa.tuple_(balances.c.account_id, balances.c.asset_symbol).in_(ordered))
        .order_by(balances.c.account_id, balances.c.asset_symbol)
        .with_for_update()
    )
    return {(AccountId(r.account_id), r.asset_symbol): r.balance for r in rows}


async def update_balances(connection: AsyncConnection, changed: Mapping[BalanceKey, int]) -> None:
    """Write each changed balance once."""
    if not changed:
        return
    await connection.execute(
        sa.update(balances)
        .where(
            balances.c.account_id == sa.bindparam("key_account"),
            balances.c.asset_symbol == sa.bindparam("key_asset"),
        )
        .values(balance=sa.bindparam("new_balance")),
        [
            {"key_account": account, "key_asset": asset, "new_balance": balance}
            for (account, asset), balance in changed.items()
        ],
    )


async def insert_postings(
    connection: AsyncConnection,
    posted: Sequence[tuple[str, Transaction]],
    posted_entries: Sequence[Entry],
) -> None:
    """Insert transactions (with their request fingerprints) and entries in application order,
    so their `seq` follows it."""
    if not posted:
        return
    await connection.execute(
        sa.insert(transactions),
        [
            {
                "id": t.id,
                "type": t.flow.value,
                "user_id": t.user_id,
                "asset_symbol": t.asset_symbol,
                "amount": t.amount,
                "balance_after": t.balance_after,
                "idempotency_key": t.idempotency_key,
                "request_fingerprint": fingerprint,
                "note": t.note,
                "metadata": t.metadata,
                "created_at": t.created_at,
            }
            for fingerprint, t in posted
        ],
    )
    await connection.execute(
        sa.insert(entries),
        [
            {
                "id": e.id,
                "transaction_id": e.transaction_id,
                "account_id": e.account_id,
                "asset_symbol": e.asset_symbol,
                "direction": e.direction.value,
                "amount": e.amount,
                "balance_after": e.balance_after,
                "created_at": e.created_at,
            }
            for e in posted_entries
        ],
    )


def to_transaction(row: sa.Row[Any]) -> Transaction:
    return Transaction(
        id=TransactionId(row.id),
        flow=Flow(row.type),
        user_id=UserId(row.user_id),
        asset_symbol=row.asset_symbol,
        amount=row.amount,
        balance_after=row.balance_after,
        idempotency_key=row.idempotency_key,
        note=row.note,
        metadata=row.metadata,
        created_at=as_utc(row.created_at),
    )


def as_utc(moment: datetime) -> datetime:
    """SQLite hands timestamps back without a zone; every stored timestamp is UTC."""
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)
